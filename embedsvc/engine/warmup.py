"""A loaded model's warm-up, before it is reported ready: one pass over the calibration
texts (first-call costs, a check of the output's shape, and the int8/uint8 ranges of
engine/calibration.py), then the cost of a pass (engine/pass_costs.py) that batching and
admission start from."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from embedsvc.backends.base import LoadedModel
from embedsvc.engine.batcher import Item, pad
from embedsvc.engine.calibration import TEXTS as CALIBRATION_TEXTS
from embedsvc.engine.calibration import Ranges
from embedsvc.engine.calibration import ranges as calibration_ranges
from embedsvc.engine.compute import ComputeThread
from embedsvc.engine.pass_costs import PassCosts, measure_pass_costs
from embedsvc.registry import ModelSpec


@dataclass(frozen=True)
class WarmUp:
    calibration: Ranges  # per served size (task embed); empty for other tasks
    costs: PassCosts


def warm_up(model: LoadedModel, spec: ModelSpec, compute: ComputeThread) -> WarmUp:
    """Both steps, on the compute thread; RuntimeError if the model's output is not of
    the shape its backend declares."""
    encoded = model.tokenizer.encode_batch(list(CALIBRATION_TEXTS))
    items = [Item(None, i, e.ids[: model.max_seq_length]) for i, e in enumerate(encoded)]
    items.sort(key=lambda it: it.length)  # batches of similar length: little padding
    batches = [pad(items[k : k + 16], model.pad_token_id) for k in range(0, len(items), 16)]
    backend = model.backend
    outs = compute.call(lambda: [backend.forward(b) for b in batches])
    # A ColBERT model (task multivector) has no sentence vector: its passes give token
    # vectors only, asked or not.
    width = 0 if spec.task == "multivector" else backend.dimension
    for b, o in zip(batches, outs, strict=True):
        if o.pooled.shape != (b.shape[0], width):
            raise RuntimeError(f"warm-up returned shape {o.pooled.shape}")
        vectors = o.token_vectors
        first = backend.token_vectors_from
        want = (b.shape[0], b.shape[1] - first, backend.dimension)
        if spec.task == "multivector" and (vectors is None or vectors.shape != want):
            raise RuntimeError(f"warm-up returned no token vectors of shape {want}")
        weights = o.token_weights
        if backend.token_weights and (weights is None or weights.shape != b.shape):
            raise RuntimeError(f"warm-up returned no token weights of shape {b.shape}")
    calibration: Ranges = {}
    if spec.task == "embed":
        out = np.concatenate([o.pooled for o in outs])
        sizes = sorted({backend.dimension, *spec.matryoshka_dims})
        calibration = calibration_ranges(out, sizes, spec.matryoshka_layer_norm)
    costs = compute.call(functools.partial(measure_pass_costs, model, spec.name))
    return WarmUp(calibration, costs)
