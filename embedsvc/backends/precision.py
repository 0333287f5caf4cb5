"""`dtype: auto` for a torch model on a CPU: bfloat16 where the CPU has bf16 matrix units
and the model's outputs stay within `BOUND` of float32 on fixed probe texts; float32
otherwise. Every load says which precision serves it and why (`LoadedModel.precision`).

The decision, per model at start-up: without AVX512-BF16 or AMX-BF16 (from /proc/cpuinfo,
and torch's oneDNN must say it runs bf16 here), float32 as before. With them, the model is
loaded in float32 and run on the probe texts, then loaded in bfloat16 and run on the same
batches; bfloat16 serves it when the worst cosine of any output (each pooled vector, each
token's ColBERT vector, each row of lexical weights) to float32 is >= BOUND, else float32
does. A reranker's scores are not vectors: it stays float32 under auto.

A bfloat16 model on a CPU runs its linear layers on the matrix units and keeps its
embeddings, norms and residual stream in float32, whether the own encoder serves it
(backends/bert.py) or sentence-transformers / transformers do (torch_common.cpu_bf16_linears).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedsvc.backends.base import BackendSpec, ForwardOutput, LoadedModel, PaddedBatch
from embedsvc.backends.fixed_texts import TEXTS, long_texts

log = logging.getLogger(__name__)

# The worst cosine to float32 that bfloat16 may have on the probe to serve a model.
BOUND = 0.9999
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# The probe's longest input, in tokens (the model's limit if lower): long enough for the
# error that grows with length to show, short enough to cost little at start-up (a
# Qwen3-0.6B-shaped model on 2 CPUs spent about 21 s on a probe to 256 tokens, 15 s on
# this one: bench/shapes.py prints the load times).
PROBE_TOKENS = 128
PROBE_BATCH = 16  # short probe texts per forward pass

Loader = Callable[[BackendSpec, Path], LoadedModel]


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_units(flags: frozenset[str]) -> list[str]:
    """The bf16 matrix units among `flags` that torch's oneDNN also reports it uses."""
    import torch

    found = [f for f in BF16_FLAGS if f in flags]
    if not found:
        return []
    try:  # torch's own check (internal; torch 2.6-2.13 tested)
        usable = torch.backends.mkldnn.is_available() and bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError) as e:
        log.warning("cannot ask torch whether oneDNN runs bf16 (%s); dtype auto stays float32", e)
        usable = False
    return found if usable else []


def load_auto(
    spec: BackendSpec,
    path: Path,
    load: Loader,
    units: list[str] | None = None,
    bound: float = BOUND,
) -> LoadedModel:
    """`spec` (dtype auto, torch) loaded at the precision this CPU and the probe allow
    (`units`: the CPU's bf16 matrix units, found here when None; `bound`: the worst
    cosine to float32 allowed)."""
    from embedsvc.backends.torch_common import resolve_device

    device = resolve_device(spec.device)
    if device != "cpu":
        loaded = load(spec, path)
        loaded.precision = (
            f"{loaded.backend.dtype}: auto on a GPU (bfloat16 for weights shipped in "
            "bfloat16 where the GPU has it, else float16)"
        )
        return loaded
    if spec.task == "rerank":
        return _fixed(spec, path, load, "a reranker's scores stay float32 under auto on a CPU")
    units = bf16_units(cpu_flags()) if units is None else units
    if not units:
        return _fixed(spec, path, load, "auto on a CPU without bf16 matrix units")
    reference = load(dataclasses.replace(spec, dtype="float32"), path)
    batches = probe_batches(reference)
    want = [reference.backend.forward(b) for b in batches]
    keep = _fits_beside(path, "float32", "bfloat16")
    if not keep:
        del reference
        gc.collect()
    try:
        candidate = load(dataclasses.replace(spec, dtype="bfloat16"), path)
        worst = min(
            worst_cosine(a, candidate.backend.forward(b))
            for a, b in zip(want, batches, strict=True)
        )
    except Exception as e:  # a model that cannot run in bf16 here is served as float32
        log.warning("model %s: bfloat16 failed its probe (%s: %s)", spec.name, type(e).__name__, e)
        why = f"bfloat16 failed on this CPU ({type(e).__name__})"
        if keep:
            reference.precision = f"float32: {why}"
            return reference
        return _fixed(spec, path, load, why)
    if worst >= bound:
        candidate.precision = (
            f"bfloat16: auto on a CPU with {', '.join(units)}; the probe's worst cosine to "
            f"float32 is {worst:.5f} (bound {bound})"
        )
        return candidate
    del candidate
    gc.collect()
    why = f"bfloat16's worst cosine to float32 on the probe is {worst:.5f}, under {bound}"
    if keep:
        reference.precision = f"float32: {why}"
        return reference
    return _fixed(spec, path, load, why)


def _fixed(spec: BackendSpec, path: Path, load: Loader, why: str) -> LoadedModel:
    loaded = load(dataclasses.replace(spec, dtype="float32"), path)
    loaded.precision = f"float32: {why}"
    return loaded


def _fits_beside(path: Path, have: str, add: str) -> bool:
    """Whether the model's weights at `add` fit in memory beside those at `have`."""
    from embedsvc.backends.torch_common import WEIGHTS_SHARE, free_memory, weights_bytes

    return weights_bytes(path, add) <= WEIGHTS_SHARE * free_memory("cpu") - weights_bytes(
        path, have
    )


def probe_batches(model: LoadedModel) -> list[PaddedBatch]:
    """The probe texts as right-padded batches of the model's tokens: the short ones by
    PROBE_BATCH, then each long one alone, every input at most PROBE_TOKENS (or the
    model's limit) long; token vectors asked where the backend has them."""
    cap = min(PROBE_TOKENS, model.max_seq_length)
    tok = model.tokenizer
    short = sorted((e.ids[:cap] for e in tok.encode_batch(list(TEXTS))), key=len)
    longs = [e.ids[:cap] for e in tok.encode_batch(long_texts(cap))]
    groups = [short[i : i + PROBE_BATCH] for i in range(0, len(short), PROBE_BATCH)]
    groups += [[ids] for ids in longs]
    vectors = model.backend.token_vectors
    return [_padded(g, model.pad_token_id, vectors) for g in groups]


def _padded(rows: list[list[int]], pad_id: int, token_vectors: bool) -> PaddedBatch:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return PaddedBatch(ids, mask, token_vectors=token_vectors)


def worst_cosine(a: ForwardOutput, b: ForwardOutput) -> float:
    """The lowest cosine between matching rows of every output both passes carry: each
    pooled vector, each row of token weights, each position's token vector (rows that
    are zero in both count as equal)."""
    pairs = [(a.pooled, b.pooled)]
    if a.token_weights is not None and b.token_weights is not None:
        pairs.append((a.token_weights, b.token_weights))
    if a.token_vectors is not None and b.token_vectors is not None:
        width = a.token_vectors.shape[-1]
        pairs.append((a.token_vectors.reshape(-1, width), b.token_vectors.reshape(-1, width)))
    worst = 1.0
    for x, y in pairs:
        x, y = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
        nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        zero = (nx == 0) & (ny == 0)
        cos = (x * y).sum(1) / np.maximum(nx * ny, 1e-30)
        cos[zero] = 1.0
        worst = min(worst, float(cos.min()) if len(cos) else 1.0)
    return worst
