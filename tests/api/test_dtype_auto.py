"""dtype auto on a CPU (backends/precision.py): bfloat16 only where the CPU has bf16 matrix
units and a probe at load keeps every output within cosine 0.9999 of float32, else
float32; /info says which and why. The parity test holds on any CPU (bfloat16 where it
has the units, float32 where not); the decision's tests pass the units in, so they run
the same everywhere (torch runs bfloat16 without the units too, only slower)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedsvc.backends import load_model
from embedsvc.backends.base import BackendSpec, ForwardOutput, PaddedBatch
from embedsvc.backends.fixed_texts import TEXTS
from embedsvc.backends.precision import BOUND, load_auto, probe_batches, worst_cosine
from embedsvc.backends.torch_backend import load_torch_model
from embedsvc.model_files import resolve_model_dir
from embedsvc.registry import load_registry
from tests.support import run_server
from tests.support import spec as entry_spec
from tests.support.models import MINILM_PATH, build_tiny_m3, build_tiny_qwen3

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from workload import queries, rag_mix


def minilm() -> BackendSpec:
    return BackendSpec.of(load_registry().select(["all-minilm-l6-v2"])[0])


def test_a_default_server_returns_vectors_within_the_bound(st_minilm: Any) -> None:
    texts = [*rag_mix(40, seed=5, passage_words=(30, 120)), *queries(20, seed=6), *TEXTS]
    with run_server(load_registry(), ["all-minilm-l6-v2"], dtype="") as s, s.client() as c:
        model = c.get("/info").json()["models"][0]
        got = []
        for i in range(0, len(texts), 16):
            r = c.post("/embed", json={"inputs": texts[i : i + 16]})
            assert r.status_code == 200, r.text
            got.extend(r.json())
    want = st_minilm.encode(texts, normalize_embeddings=True)
    cos = (np.asarray(got, dtype=np.float64) * want).sum(1)
    assert cos.min() >= BOUND, (model["precision"], cos.min())
    # The served dtype and why: "bfloat16: auto on a CPU with ..." or "float32: ...".
    assert model["precision"].split(":")[0] == model["model_dtype"]
    assert "auto" in model["precision"] or "under" in model["precision"]


def test_bfloat16_that_passes_the_probe_serves_and_what_fails_it_does_not() -> None:
    spec, path = minilm(), MINILM_PATH
    kept = load_auto(spec, path, load_torch_model, units=["amx_bf16"])
    assert kept.backend.dtype == "bfloat16"
    assert kept.precision.startswith("bfloat16: auto on a CPU with amx_bf16;")
    worst = float(kept.precision.split("cosine to float32 is ")[1].split()[0])
    assert BOUND <= worst < 1.0
    refused = load_auto(spec, path, load_torch_model, units=["amx_bf16"], bound=0.999999)
    assert refused.backend.dtype == "float32"
    assert "under 0.999999" in refused.precision
    none = load_auto(spec, path, load_torch_model, units=[])
    assert none.backend.dtype == "float32"
    assert none.precision == "float32: auto on a CPU without bf16 matrix units"


def test_a_reranker_stays_float32_under_auto(registry: Any) -> None:
    spec = BackendSpec.of(registry.select(["tiny-reranker"])[0])
    assert spec.dtype == "auto"
    loaded = load_model(spec, resolve_model_dir(registry.select(["tiny-reranker"])[0]))
    assert loaded.backend.dtype == "float32"
    assert "reranker" in loaded.precision


def test_bfloat16_on_a_cpu_keeps_norms_embeddings_and_residuals_in_float32(st_minilm: Any) -> None:
    """The own encoder in bfloat16 on a CPU: its linear layers' weights in bfloat16, all
    else float32; the probe texts' vectors within the bound of sentence-transformers'."""
    import torch

    spec = dataclasses.replace(minilm(), dtype="bfloat16")
    model = load_model(spec, MINILM_PATH)
    assert model.precision == "bfloat16: dtype bfloat16 as configured"
    eager = model.backend._states[0]  # the untraced encoder
    kinds = {
        type(m).__name__: {p.dtype for p in m.parameters(recurse=False)}
        for m in eager.modules()
        if isinstance(m, torch.nn.Linear | torch.nn.LayerNorm | torch.nn.Embedding)
    }
    assert kinds == {
        "Linear": {torch.bfloat16},
        "LayerNorm": {torch.float32},
        "Embedding": {torch.float32},
    }
    rows = [e.ids for e in model.tokenizer.encode_batch(list(TEXTS))]
    width = max(len(r) for r in rows)
    ids = np.array([r + [model.pad_token_id] * (width - len(r)) for r in rows])
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    got = model.backend.forward(PaddedBatch(ids, mask)).pooled
    want = st_minilm.encode(list(TEXTS), normalize_embeddings=True)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= BOUND


def test_the_probe_compares_lexical_weights_and_token_vectors(
    model_dir: Path, tmp_path: Path
) -> None:
    """A BGE-M3-shaped model: the probe's passes carry its lexical weights and ColBERT
    vectors, and the worst cosine counts every row of each."""
    folder = build_tiny_m3(tmp_path / "tiny-m3", model_dir / "tiny-bge")
    spec = entry_spec(
        "tiny-m3", pooling="cls", max_seq_length=64, lexical_weights=True, multivector=True
    )
    model = load_model(spec, folder)
    batch = probe_batches(model)[0]
    out = model.backend.forward(batch)
    assert out.token_weights is not None and out.token_vectors is not None
    assert worst_cosine(out, out) == pytest.approx(1.0)
    # One token's ColBERT vector turned by 90 degrees: the worst cosine is that row's.
    bent = out.token_vectors.copy()
    row = out.token_vectors[0, 0]
    bent[0, 0] = np.roll(row, 1)
    other = ForwardOutput(out.pooled, out.token_weights, bent)
    expect = float(row @ bent[0, 0] / (np.linalg.norm(row) * np.linalg.norm(bent[0, 0])))
    assert worst_cosine(out, other) == pytest.approx(expect, abs=1e-6)
    # Lexical weights by row (rows of zeros in both, as most of this tiny model's are,
    # count as equal): [1, 2, 0] against [2, 1, 0] is 4/5.
    pooled = np.ones((2, 3), dtype=np.float32)
    a = ForwardOutput(pooled, np.array([[1, 2, 0], [0, 0, 0]], dtype=np.float32))
    b = ForwardOutput(pooled, np.array([[2, 1, 0], [0, 0, 0]], dtype=np.float32))
    assert worst_cosine(a, b) == pytest.approx(0.8)


def test_bfloat16_through_transformers_runs_only_linear_layers_in_bfloat16(
    tmp_path: Path,
) -> None:
    """A model the own encoder does not serve (a Qwen3-shaped decoder, through
    sentence-transformers) in bfloat16 on a CPU: its linear layers in bfloat16, its norms
    and embeddings float32, its vectors close to float32's."""
    import torch

    folder = build_tiny_qwen3(tmp_path / "qwen3", seed=3, hidden=64)
    spec = entry_spec("tiny-qwen3", pooling="lasttoken", max_seq_length=256)
    full = load_model(spec, folder)
    half = load_model(dataclasses.replace(spec, dtype="bfloat16"), folder)
    # The transformer: traced, or the first of sentence-transformers' modules.
    module = half.backend._encoder or half.backend._head[0]
    dtypes: dict[str, set[Any]] = {}
    for name, p in module.named_parameters():
        kind = "linear" if name.endswith("proj.weight") or name.endswith("proj.bias") else "other"
        dtypes.setdefault(kind, set()).add(p.dtype)
    assert dtypes == {"linear": {torch.bfloat16}, "other": {torch.float32}}
    batch = probe_batches(full)[0]
    assert worst_cosine(full.backend.forward(batch), half.backend.forward(batch)) > 0.999
