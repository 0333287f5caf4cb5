"""Queries with in-context examples (bge-en-icl), on a bge-en-icl-shaped folder with random
weights (a 2-layer Mistral, a byte-level tokenizer that puts <s> first and </s> last): the
vectors FlagEmbedding's FlagICLModel gives for queries (with the model's examples, or a
request's own, cut at the query limit) and documents, on both routes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from embedsvc.registry import Registry, load_registry
from tests.support import Server, rows_close, run_server
from tests.support.models import MINILM_ENTRY, build_tiny_mistral

INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query."
EXAMPLES = [
    {"instruct": INSTRUCTION, "query": "what is the capital of France",
     "response": "Paris is the capital of France."},
    {"instruct": INSTRUCTION, "query": "why do rivers flow",
     "response": "Rivers flow to the sea because of gravity."},
]  # fmt: skip
OTHER = [{"instruct": "Retrieve the answer.", "query": "capital of China",
          "response": "The capital of China is Beijing."}]  # fmt: skip
WORDS = "the capital of France is Paris and rivers flow to the sea while mountains rise".split()
QUERIES = ["Paris", "what is the capital of China?"] + [
    " ".join(WORDS[i % len(WORDS)] for i in range(n)) for n in (9, 30, 120)
]
DOCS = ["The capital of China is Beijing.", " ".join(WORDS * 4)]
QUERY_MAX = 64  # small, so the long queries are cut


@pytest.fixture(scope="module")
def icl_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("icl")
    folder = build_tiny_mistral(root / "tiny-icl", seed=5)
    entry = {
        "name": "tiny-icl",
        "hf_id": "test/tiny-icl",
        "revision": "0123456789abcdef0123456789abcdef01234567",
        "local_dir": str(folder),
        "pooling": "lasttoken",
        "max_seq_length": 1024,
        "prompts": {"query": f"<instruct>{INSTRUCTION}\n<query>"},
        "query_prompt": "query",
        "instruction_template": "<instruct>{instruction}\n<query>",
        "icl": True,
        "examples": EXAMPLES,
        "query_max_tokens": QUERY_MAX,
    }
    path = root / "models.yaml"
    path.write_text(json.dumps({"default_models": ["tiny-icl"], "models": [entry, MINILM_ENTRY]}))
    return load_registry(path)


@pytest.fixture(scope="module")
def iserver(icl_registry: Registry) -> Iterator[Server]:
    with run_server(icl_registry, ["tiny-icl", "all-minilm-l6-v2"]) as s:
        yield s


@pytest.fixture(scope="module")
def flag(icl_registry: Registry) -> Any:
    from FlagEmbedding import FlagICLModel

    folder = str(icl_registry.models["tiny-icl"].local_dir)
    return FlagICLModel(
        folder,
        query_instruction_for_retrieval=INSTRUCTION,
        examples_for_task=EXAMPLES,
        use_fp16=False,
        devices="cpu",
        query_max_length=QUERY_MAX,
        batch_size=4,
    )


def test_some_queries_are_cut(flag: Any) -> None:
    lengths = [
        len(flag.tokenizer(f"<instruct>{INSTRUCTION}\n<query>{q}")["input_ids"]) for q in QUERIES
    ]
    assert min(lengths) < QUERY_MAX < max(lengths), lengths


def test_queries_and_documents_equal_flag_icl_model(iserver: Server, flag: Any) -> None:
    queries = flag.encode_queries(QUERIES)
    documents = flag.encode_corpus(DOCS)
    with iserver.client() as c:
        tei = c.post("/embed", json={"inputs": QUERIES, "prompt_name": "query", "truncate": True})
        alone = [
            c.post(
                "/embed", json={"inputs": q, "instruction": INSTRUCTION, "truncate": True}
            ).json()[0]
            for q in QUERIES
        ]
        body = {"input": QUERIES, "input_type": "query", "truncate": True}
        openai = c.post("/v1/embeddings", json=body)
        docs = c.post("/embed", json={"inputs": DOCS})
    assert tei.status_code == 200, tei.text
    rows_close(tei.json(), queries)
    rows_close(alone, queries)
    rows_close([d["embedding"] for d in openai.json()["data"]], queries)
    rows_close(docs.json(), documents)


def test_a_requests_own_examples(iserver: Server, flag: Any) -> None:
    flag.set_examples(OTHER)
    try:
        expected = flag.encode_queries(QUERIES)
    finally:
        flag.set_examples()
    body = {"inputs": QUERIES, "prompt_name": "query", "examples": OTHER, "truncate": True}
    with iserver.client() as c:
        r = c.post("/embed", json=body)
        body = {"input": QUERIES, "input_type": "query", "examples": OTHER, "truncate": True}
        openai = c.post("/v1/embeddings", json=body)
    rows_close(r.json(), expected)
    rows_close([d["embedding"] for d in openai.json()["data"]], expected)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"inputs": QUERIES[-1], "prompt_name": "query", "truncate": False}, 422,
         "more than this model's query limit"),
        ({"inputs": "x", "examples": OTHER}, 422, "examples go with queries"),
        ({"inputs": "x", "prompt_name": "query", "examples": OTHER,
          "model": "all-minilm-l6-v2"}, 422, "takes no in-context examples"),
        ({"inputs": "x", "prompt_name": "query", "examples": [{"instruct": "a"}]}, 422,
         "examples[0].query is required"),
        ({"inputs": "x", "prompt_name": "query", "examples": OTHER * 33}, 422, "examples"),
        ({"inputs": "x", "prompt_name": "query",
          "examples": [{"instruct": "a", "query": "b", "response": "c" * 200_001}]}, 422,
         "max_input_chars"),
    ],
)  # fmt: skip
def test_example_refusals_name_the_field(
    iserver: Server, body: dict, status: int, words: str
) -> None:
    with iserver.client() as c:
        r = c.post("/embed", json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()["error"]


def test_info_shows_the_examples(iserver: Server) -> None:
    with iserver.client() as c:
        models = c.get("/info").json()["models"]
    [icl] = [m for m in models if m["name"] == "tiny-icl"]
    assert icl["icl"] is True and icl["examples"] == EXAMPLES


def _long_examples(words: int) -> list[dict[str, str]]:
    text = " ".join(WORDS[i % len(WORDS)] for i in range(words))
    return [{"instruct": INSTRUCTION, "query": "what flows", "response": text}]


def test_long_examples_never_cut_the_query(iserver: Server, flag: Any) -> None:
    """Examples that fill most of max_seq_length (1024 here): FlagICLModel's vectors, the
    query whole (it widens its limit by the examples' length). Examples too long for the
    model's max_seq_length with a query are a 422 naming them, truncate or not: a cut
    there would drop the query (different queries came back as one vector)."""
    import numpy as np

    examples = _long_examples(440)
    n = len(flag.tokenizer(examples[0]["response"], add_special_tokens=False)["input_ids"])
    assert 800 < n < 1024 - QUERY_MAX - 60  # most of max_seq_length, room for any query
    flag.set_examples(examples)
    try:
        expected = flag.encode_queries(QUERIES[:3])
    finally:
        flag.set_examples()
    with iserver.client() as c:
        body = {"inputs": QUERIES[:3], "prompt_name": "query", "examples": examples}
        r = c.post("/embed", json={**body, "truncate": True})
        assert r.status_code == 200, r.text
        got = np.asarray(r.json())
        rows_close(r.json(), expected)
        assert max(float(got[0] @ got[k]) for k in (1, 2)) < 0.9999  # the queries count
        too_long = {**body, "examples": _long_examples(1100)}
        for truncate in (True, False):
            r = c.post("/embed", json={**too_long, "truncate": truncate})
            assert r.status_code == 422, r.text
            assert "examples" in r.json()["error"] and "1024" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # 64 queries with 200 KB of examples: 12.8 M characters to build and tokenize
        ({"inputs": ["q"] * 64, "prompt_name": "query",
          "examples": [{"instruct": "a", "query": "b", "response": "c" * 199_000}]},
         "examples"),
        # 4,096 inputs with a 2,000-character instruction: 8.3 M characters
        ({"inputs": ["q"] * 4096, "instruction": "i" * 2000}, "instruction"),
    ],
)  # fmt: skip
def test_instructions_and_examples_are_bounded_before_tokenizing(
    iserver: Server, body: dict, param: str
) -> None:
    """An instruction or examples go before every input: the characters they come to are
    counted and refused (413 naming max_request_chars) before anything is built or
    tokenized, on both routes."""
    with iserver.client() as c:
        r = c.post("/embed", json=body)
        assert r.status_code == 413, r.text
        assert "max_request_chars (4000000)" in r.json()["error"]
        oai = {"input": body["inputs"], **{k: v for k, v in body.items() if k != "inputs"}}
        r = c.post("/v1/embeddings", json=oai)
        assert r.status_code == 413 and r.json()["error"]["param"] == param, r.text


def test_the_biggest_allowed_request_tokenizes_off_the_event_loop(iserver: Server) -> None:
    """64 queries with examples of 60,000 characters (3.8 M characters, under
    max_request_chars) are built and tokenized on the tokenizer pool: /health is answered
    while that work is held on its thread (were it on the event loop, /health could not be
    answered until it ended)."""
    import threading

    engine = iserver.engines.get("tiny-icl")
    real = engine.prep.tokenize_many
    entered, health_done = threading.Event(), threading.Event()
    threads: list[threading.Thread] = []

    def held(reqs: Any) -> Any:  # the real tokenizing, after /health has been answered
        threads.append(threading.current_thread())
        entered.set()
        health_done.wait(timeout=20)
        return real(reqs)

    body = {"inputs": [f"query {i}" for i in range(64)], "prompt_name": "query",
            "examples": [{"instruct": "a", "query": "b", "response": "c " * 30_000}]}  # fmt: skip
    engine.prep.tokenize_many = held  # type: ignore[method-assign]
    try:
        with iserver.client() as c:
            result: dict[str, Any] = {}
            sender = threading.Thread(target=lambda: result.update(r=c.post("/embed", json=body)))
            sender.start()
            assert entered.wait(timeout=30)
            with iserver.client() as probe:
                assert probe.get("/health").status_code == 200
            answered_while_held = not health_done.is_set() and sender.is_alive()
            health_done.set()
            sender.join(timeout=120)
    finally:
        engine.prep.tokenize_many = real  # type: ignore[method-assign]
    assert answered_while_held
    assert threads and threads[0] is not threading.main_thread()
    assert "tokeniz" in threads[0].name or threads[0].name.startswith("ThreadPool")
    # the examples are longer than the model takes: refused after tokenizing, naming them
    assert result["r"].status_code == 422 and "examples" in result["r"].json()["error"]
