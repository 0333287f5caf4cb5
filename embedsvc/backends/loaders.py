"""Which loader loads a model: registry.LOADERS, by (task, backend), each loader a module
of its own imported only when a model needs it (onnxruntime, transformers' classes)."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

from embedsvc.backends.base import BackendSpec, LoadedModel
from embedsvc.backends.precision import Loader, load_auto
from embedsvc.registry import LOADERS, ModelSpec

log = logging.getLogger(__name__)
JUDGE_LOADER = "embedsvc.backends.judge:load_judge"


def load_model(
    entry: ModelSpec | BackendSpec, path: Path, threads: int = 0, cuda_graphs: bool = False
) -> LoadedModel:
    """Load the model in `path` on the calling thread (torch's thread count is per
    thread: call it on the thread that will run the forward passes)."""
    spec = entry if isinstance(entry, BackendSpec) else BackendSpec.of(entry, threads, cuda_graphs)
    # A reranker with a judge prompt is an LLM reranker: a causal LM, not a classifier.
    target = JUDGE_LOADER if spec.judge is not None else LOADERS.get((spec.task, spec.backend))
    if target is None:  # the registry refuses these combinations first
        raise ValueError(f"no loader for task {spec.task} on backend {spec.backend}")
    module, _, function = target.partition(":")
    load: Loader = getattr(importlib.import_module(module), function)
    if spec.backend == "torch" and spec.dtype == "auto":
        loaded = load_auto(spec, path, load)
    else:
        loaded = load(spec, path)
        onnx = spec.backend == "onnx"
        setting = f"onnx_variant {spec.onnx_variant}" if onnx else f"dtype {spec.dtype}"
        loaded.precision = f"{loaded.backend.dtype}: {setting} as configured"
    log.info("model %s serves in %s", spec.name, loaded.precision)
    return loaded
