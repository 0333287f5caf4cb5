"""Decoder embedders, on a Qwen3-Embedding-shaped folder with random weights (a 2-layer
Qwen3, a byte-level tokenizer that appends <|endoftext|>, last-token pooling): the vectors
sentence-transformers gives, for mixed lengths in one request and one by one, on both
routes, with the query prompt or a task instruction, truncated on either side with the
EOS kept; --dtype; and weights too large for the device refused before loading."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embedsvc.engine import load_engines
from embedsvc.errors import ConfigError
from embedsvc.metrics import Metrics
from embedsvc.registry import Registry, load_registry
from embedsvc.settings import Settings
from tests.support import Server, rows_close, run_server
from tests.support.models import (
    MINILM_ENTRY,
    QWEN3_QUERY,
    QWEN3_TEMPLATE,
    build_tiny_qwen3,
)

WORDS = "the capital of France is Paris and rivers flow to the sea while mountains rise".split()
# 3 to about 200 tokens each (the tokenizer's vocabulary is small: words split in pieces).
TEXTS = ["Paris", "what is the capital of China?"] + [
    " ".join(WORDS[i % len(WORDS)] for i in range(n)) for n in (5, 17, 40, 90)
]
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


@pytest.fixture(scope="module")
def qwen_registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("decoder")
    folder = build_tiny_qwen3(root / "tiny-qwen3", seed=3)
    entry = {
        "name": "tiny-qwen3",
        "hf_id": "test/tiny-qwen3",
        "revision": "0123456789abcdef0123456789abcdef01234567",
        "local_dir": str(folder),
        "pooling": "lasttoken",
        "max_seq_length": 256,
        "prompts": {"query": QWEN3_QUERY, "document": ""},
        "query_prompt": "query",
        "passage_prompt": "document",
        "instruction_template": QWEN3_TEMPLATE,
    }
    path = root / "models.yaml"
    path.write_text(json.dumps({"default_models": ["tiny-qwen3"], "models": [entry, MINILM_ENTRY]}))
    return load_registry(path)


@pytest.fixture(scope="module")
def folder(qwen_registry: Registry) -> Path:
    return Path(str(qwen_registry.models["tiny-qwen3"].local_dir))


@pytest.fixture(scope="module")
def qserver(qwen_registry: Registry) -> Iterator[Server]:
    with run_server(qwen_registry, ["tiny-qwen3", "all-minilm-l6-v2"]) as s:
        yield s


@pytest.fixture(scope="module")
def st(folder: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def test_lengths_cover_short_and_long(st: Any) -> None:
    lengths = [len(st.tokenizer(t)["input_ids"]) for t in TEXTS]
    assert min(lengths) <= 3 and max(lengths) >= 150, lengths


@pytest.mark.parametrize("prompt", [None, "query"])
def test_vectors_equal_sentence_transformers(qserver: Server, st: Any, prompt: str | None) -> None:
    expected = st.encode(TEXTS, prompt_name=prompt, normalize_embeddings=True)
    with qserver.client() as c:
        tei = c.post("/embed", json={"inputs": TEXTS, "prompt_name": prompt})
        one_by_one = [
            c.post("/embed", json={"inputs": t, "prompt_name": prompt}).json()[0] for t in TEXTS
        ]
        body: dict[str, Any] = {"input": TEXTS, "model": "tiny-qwen3"}
        if prompt:
            body["input_type"] = "query"
        openai = c.post("/v1/embeddings", json=body)
    assert tei.status_code == 200 and openai.status_code == 200, (tei.text, openai.text)
    rows_close(tei.json(), expected)
    rows_close(one_by_one, expected)
    rows_close([d["embedding"] for d in openai.json()["data"]], expected)


def test_an_instruction_is_the_prompt_it_spells(qserver: Server, st: Any) -> None:
    """The card's instruction through the template gives the card's query prompt; another
    instruction gives that instruction's prompt, on both routes."""
    with qserver.client() as c:
        card = c.post("/embed", json={"inputs": TEXTS, "instruction": INSTRUCTION}).json()
        own = "Given a question about geography, retrieve the answer"
        tei = c.post("/embed", json={"inputs": TEXTS, "instruction": own}).json()
        openai = c.post("/v1/embeddings", json={"input": TEXTS, "instruction": own}).json()
    rows_close(card, st.encode(TEXTS, prompt_name="query"))
    expected = st.encode(TEXTS, prompt=QWEN3_TEMPLATE.replace("{instruction}", own))
    rows_close(tei, expected)
    rows_close([d["embedding"] for d in openai["data"]], expected)


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/embed", {"inputs": "x", "instruction": "find", "model": "all-minilm-l6-v2"}, 422,
         "takes no task instruction"),
        ("/embed", {"inputs": "x", "instruction": "find", "prompt_name": "query"}, 422,
         "either instruction or a prompt"),
        ("/v1/embeddings", {"input": "x", "instruction": "find", "input_type": "query"}, 422,
         "either instruction or input_type"),
        ("/embed", {"inputs": "x", "instruction": ""}, 400, "instruction is an empty string"),
        ("/embed", {"inputs": [[1, 2, 3]], "instruction": "find"}, 422,
         "an instruction cannot be applied to token-id input"),
        ("/embed", {"inputs": "x", "instruction": "x" * 200_001}, 422, "max_input_chars"),
        ("/embed", {"inputs": "x", "instruction": 3}, 422, "instruction must be a string"),
    ],
)  # fmt: skip
def test_instruction_refusals_name_the_field(
    qserver: Server, path: str, body: dict, status: int, words: str
) -> None:
    with qserver.client() as c:
        r = c.post(path, json=body)
    assert r.status_code == status, r.text
    message = r.json()["error"]
    if path.startswith("/v1/"):
        assert message["param"] == "instruction"
        message = message["message"]
    assert words in message, message


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_keeps_the_eos_on_either_side(qserver: Server, st: Any, side: str) -> None:
    long = " ".join(WORDS[i % len(WORDS)] for i in range(400))
    assert len(st.tokenizer(long)["input_ids"]) > 256
    st.tokenizer.truncation_side = side
    try:
        expected = st.encode([long])
    finally:
        st.tokenizer.truncation_side = "right"
    body = {"inputs": long, "truncate": True, "truncation_direction": side.title()}
    with qserver.client() as c:
        r = c.post("/embed", json=body)
        ids = c.post("/tokenize", json={"inputs": long}).json()[0]
    assert ids[-1]["text"] == "<|endoftext|>" and ids[-1]["special"]
    assert r.status_code == 200 and int(r.headers["x-compute-tokens"]) == 256
    rows_close(r.json(), expected)


def test_dtype_setting_reaches_every_model(qwen_registry: Registry, st: Any) -> None:
    """--dtype bfloat16 (here on a CPU): the model runs in it, /info says so, and the
    vectors stay close to float32's."""
    with run_server(qwen_registry, ["tiny-qwen3"], dtype="bfloat16") as s, s.client() as c:
        info = c.get("/info").json()
        got = c.post("/embed", json={"inputs": TEXTS}).json()
    assert info["model_dtype"] == "bfloat16"
    rows_close(got, st.encode(TEXTS), floor=0.99)


def test_weights_too_large_are_refused_before_loading(
    qwen_registry: Registry, folder: Path, tmp_path: Path
) -> None:
    """A folder whose safetensors headers declare 4 TB of weights: refused from the headers
    alone (the file holds no tensor data, so any attempt to load it would fail otherwise)."""
    import shutil

    big = tmp_path / "big"
    shutil.copytree(folder, big)
    header = json.dumps(
        {"huge": {"dtype": "F32", "shape": [1_000_000, 1_000_000], "data_offsets": [0, 4 * 10**12]}}
    ).encode()
    (big / "model-00002-of-00002.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    text = qwen_registry.path.read_text().replace(str(folder), str(big))
    path = tmp_path / "models.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"its weights take \d+\.\d GiB as float32"):
        load_engines(load_registry(path).select(["tiny-qwen3"]), Settings(), Metrics())
