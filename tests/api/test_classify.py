"""Sequence classifiers (task classify) on TEI's /predict and vLLM's /classify: scores equal
transformers' text-classification pipeline (top_k=None) for texts, pairs and batches, for a
softmax classifier and a multi-label one; TEI's input shapes and errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedsvc.registry import load_registry
from tests.support import Server, run_server
from tests.support.models import build_tiny_cross_encoder

LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}
TOXIC = {0: "toxic", 1: "insult"}
TEXTS = ["A man is playing a guitar.", "The cat sleeps.", "word " * 600]  # the last is cut
PAIR = ["A man is playing a guitar.", "Someone makes music."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classify")
    nli = build_tiny_cross_encoder(root / "nli", seed=11, num_labels=3, id2label=LABELS)
    multi = build_tiny_cross_encoder(
        root / "multi", seed=12, num_labels=2, id2label=TOXIC,
        problem_type="multi_label_classification",
    )  # fmt: skip
    rev = "0123456789abcdef0123456789abcdef01234567"
    entries = "".join(
        f"""
  - name: tiny-{name}
    hf_id: test/tiny-{name}
    revision: {rev}
    local_dir: {folder}
    task: classify
    max_seq_length: 128
"""
        for name, folder in (("nli", nli), ("multi", multi))
    )
    (root / "models.yaml").write_text("models:" + entries)
    return {"nli": nli, "multi": multi, "yaml": root / "models.yaml"}


@pytest.fixture(scope="module")
def server(folders: dict[str, Path]) -> Iterator[Server]:
    with run_server(load_registry(folders["yaml"]), ["tiny-nli", "tiny-multi"]) as s:
        yield s


def pipeline_scores(folder: Path, inputs: list[Any]) -> list[dict[str, float]]:
    """transformers' pipeline("text-classification", top_k=None): label -> score."""
    from transformers import pipeline

    classify = pipeline("text-classification", model=str(folder), top_k=None, device="cpu")
    out = classify(inputs, truncation=True, max_length=128)
    return [{x["label"]: x["score"] for x in row} for row in out]


def close(got: list[dict[str, Any]], want: dict[str, float]) -> None:
    scores = [x["score"] for x in got]
    assert scores == sorted(scores, reverse=True)  # best first
    assert {x["label"] for x in got} == set(want)
    for x in got:
        assert abs(x["score"] - want[x["label"]]) < 1e-5, (x, want)


def test_predict_equals_the_pipeline(server: Server, folders: dict[str, Path]) -> None:
    nli = folders["nli"]
    texts = pipeline_scores(nli, TEXTS)
    pair = pipeline_scores(nli, [{"text": PAIR[0], "text_pair": PAIR[1]}])[0]
    with server.client() as c:
        one = c.post("/predict", json={"inputs": TEXTS[0], "model": "tiny-nli"})
        assert one.status_code == 200, one.text
        close(one.json(), texts[0])
        close(c.post("/predict", json={"inputs": PAIR, "model": "tiny-nli"}).json(), pair)
        batch = c.post(
            "/predict", json={"inputs": [[t] for t in TEXTS] + [PAIR], "model": "tiny-nli"}
        )
        assert batch.status_code == 200, batch.text
        assert batch.headers["x-truncated-inputs"] == "1"
        for got, want in zip(batch.json(), [*texts, pair], strict=True):
            close(got, want)
        # raw_scores: the logits, best first; their softmax is the pipeline's scores.
        raw = c.post("/predict", json={"inputs": TEXTS[1], "raw_scores": True}).json()
        logits = np.array([x["score"] for x in raw])
        soft = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        for x, p in zip(raw, soft, strict=True):
            assert abs(p - texts[1][x["label"]]) < 1e-5


def test_a_multi_label_model_scores_each_label_by_sigmoid(
    server: Server, folders: dict[str, Path]
) -> None:
    want = pipeline_scores(folders["multi"], TEXTS[:2])
    r = httpx.post(
        server.url + "/predict", json={"inputs": [[t] for t in TEXTS[:2]], "model": "tiny-multi"}
    )
    assert r.status_code == 200, r.text
    for got, w in zip(r.json(), want, strict=True):
        close(got, w)
    assert sum(x["score"] for x in r.json()[0]) != pytest.approx(1.0)  # not a softmax


def test_classify_route_as_vllm_answers(server: Server, folders: dict[str, Path]) -> None:
    want = pipeline_scores(folders["nli"], TEXTS[:2])
    r = httpx.post(server.url + "/classify", json={"input": TEXTS[:2], "model": "tiny-nli"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "tiny-nli"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    for i, (item, w) in enumerate(zip(body["data"], want, strict=True)):
        assert item["index"] == i and item["num_classes"] == 3
        assert item["label"] == max(w, key=lambda k: w[k])
        np.testing.assert_allclose(item["probs"], [w[LABELS[k]] for k in range(3)], atol=1e-5)
    one = httpx.post(server.url + "/classify", json={"input": "The cat sleeps."}).json()
    assert len(one["data"]) == 1  # the first classifier loaded answers without a model
    info = {m["name"]: m for m in httpx.get(server.url + "/info").json()["models"]}
    assert info["tiny-nli"]["task"] == "classify"
    assert info["tiny-nli"]["labels"] == [LABELS[k] for k in range(3)]
    assert info["tiny-multi"]["score_activation"] == "sigmoid"


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/predict", {"inputs": ["a", "b", "c"]}, 422, "send a batch as [[string]"),
        ("/predict", {"inputs": [["a"], ["b", "c", "d"]]}, 422, "inputs[1] must be"),
        ("/predict", {"inputs": []}, 422, "got an empty list"),
        ("/predict", {"inputs": [["a", ""]]}, 400, "inputs[0] pairs an empty string"),
        ("/predict", {"inputs": "word " * 600, "truncate": False}, 422, "set truncate: true"),
        ("/predict", {"inputs": 5}, 422, "inputs must be a string"),
        ("/classify", {"input": [1, 2]}, 422, "a string or a list of strings"),
        ("/classify", {"input": "x", "model": "nope"}, 404, "nope"),
    ],
)
def test_bad_requests_get_a_clear_4xx(
    server: Server, path: str, body: dict[str, Any], status: int, words: str
) -> None:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert words in message
    assert httpx.post(server.url + "/predict", json={"inputs": "ok"}).status_code == 200


def test_classification_is_bounded_like_embedding(folders: dict[str, Path]) -> None:
    registry = load_registry(folders["yaml"])
    with run_server(registry, ["tiny-nli"], max_request_chars=1000, max_request_tokens=100) as s:
        pairs = [["a" * 300, "b" * 300]] * 2  # 1,200 characters to tokenize
        r = httpx.post(s.url + "/predict", json={"inputs": pairs})
        assert r.status_code == 413 and "max_request_chars (1000)" in r.json()["error"]
        r = httpx.post(s.url + "/classify", json={"input": ["d e f g h " * 10] * 3})
        assert r.status_code == 413
        assert "max_request_tokens (100)" in r.json()["error"]["message"]
        assert httpx.post(s.url + "/classify", json={"input": "fine"}).status_code == 200


def test_a_classifier_answers_only_its_routes(server: Server, registry: Any) -> None:
    r = httpx.post(server.url + "/embed", json={"inputs": "x", "model": "tiny-nli"})
    assert r.status_code == 422 and "/predict and /classify" in r.json()["error"]
    with run_server(registry, ["all-minilm-l6-v2"]) as s:
        r = httpx.post(s.url + "/predict", json={"inputs": "x"})
        assert r.status_code == 422 and "not task classify" in r.json()["error"]
