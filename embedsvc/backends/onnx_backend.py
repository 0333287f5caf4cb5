"""onnx backend: onnxruntime sessions over an `embedsvc export` of the transformer.

CPU provider everywhere; CUDA (and TensorRT where present) with onnxruntime-gpu, with IO
binding so inputs and outputs cross the bus once. The session returns token states;
pooling is the shared numpy code in pooling.py.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from embedsvc.backends.base import BackendSpec, ForwardOutput, LoadedModel, PaddedBatch
from embedsvc.backends.pooling import pool
from embedsvc.errors import ConfigError

log = logging.getLogger(__name__)

_ST_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "lasttoken",
}


class OnnxBackend:
    per_pass_threads = False  # onnxruntime fixes its threads when the session is made
    token_weights = False
    token_vectors = False
    token_vectors_from = 0
    states_dimension = 0

    def __init__(self, session: Any, pooling: str, device: str, dtype: str, dimension: int) -> None:
        self.session = session
        self.pooling = pooling
        self.device = device
        self.dtype = dtype
        self.dimension = dimension
        self._inputs = {i.name for i in session.get_inputs()}

    def cpu_threads(self, n: int | None = None) -> int:
        if n is not None:
            raise ValueError("onnxruntime's threads are fixed when the session is made")
        return int(self.session.get_session_options().intra_op_num_threads)

    def forward(self, batch: PaddedBatch) -> ForwardOutput:
        feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(batch.input_ids)
        if self.device.startswith("cuda"):
            binding = self.session.io_binding()
            for name, arr in feed.items():
                binding.bind_cpu_input(name, arr)
            binding.bind_output("last_hidden_state", "cpu")
            self.session.run_with_iobinding(binding)
            hidden = binding.copy_outputs_to_cpu()[0]
        else:
            hidden = self.session.run(["last_hidden_state"], feed)[0]
        return ForwardOutput(pool(hidden, batch.attention_mask, self.pooling))


def make_session(model_file: Path, device: str, threads: int = 0) -> tuple[Any, str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.inter_op_num_threads = 1
    available = ort.get_available_providers()
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ConfigError(
                "device cuda was requested for an onnx model but onnxruntime has no CUDA "
                "provider; install embedsvc[onnx-gpu]"
            )
        providers = [
            p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available
        ] + ["CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(model_file), sess_options=opts, providers=providers)
    return session, session.get_providers()[0]


def resolve_onnx_device(device: str) -> str:
    if device != "auto":
        return device
    try:
        import onnxruntime as ort
    except ImportError:
        return "cpu"
    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def load_onnx_model(spec: BackendSpec, path: Path) -> LoadedModel:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"model {spec.name}: backend onnx needs onnxruntime (pip install embedsvc[onnx])"
        ) from None
    from embedsvc.export import find_export, resolve_variant

    device = resolve_onnx_device(spec.device)
    variant = resolve_variant(spec, device)
    export_dir = find_export(spec, path, variant)
    pooling, dense = _st_pooling(path)
    if dense:
        raise ConfigError(
            f"model {spec.name}: has Dense modules after pooling, which the onnx backend does "
            "not run; serve it with backend: torch"
        )
    pooling = pooling or spec.pooling
    if pooling is None:
        raise ConfigError(f"model {spec.name}: set pooling in models.yaml (cls, mean, lasttoken)")
    if spec.pooling and pooling != spec.pooling:
        raise ConfigError(
            f"model {spec.name}: models.yaml says pooling {spec.pooling!r} but the model folder "
            f"declares {pooling!r}; fix the entry or the folder"
        )
    session, provider = make_session(export_dir / "model.onnx", device, spec.threads)
    dimension = int(session.get_outputs()[0].shape[-1])
    tokenizer, pad_id = _tokenizer(path)
    max_len = _max_seq_length(spec, path)
    dtype = {"fp32": "float32", "int8": "int8", "fp16": "float16"}[variant]
    log.info(
        "loaded %s (%s@%s) as ONNX %s from %s on %s: dim=%d pooling=%s max_seq_length=%d",
        spec.name,
        spec.hf_id,
        spec.revision[:12],
        variant,
        export_dir,
        provider,
        dimension,
        pooling,
        max_len,
    )
    return LoadedModel(
        path=path,
        backend=OnnxBackend(session, pooling, device, dtype, dimension),
        tokenizer=tokenizer,
        max_seq_length=max_len,
        pad_token_id=pad_id,
        pooling=pooling,
    )


def _st_pooling(path: Path) -> tuple[str | None, bool]:
    """Pooling mode from the sentence-transformers folder, and whether Dense modules follow."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None, False
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    dense = any(m.get("type", "").endswith("Dense") for m in modules)
    for m in modules:
        if m.get("type", "").endswith("Pooling"):
            cfg = json.loads((path / m["path"] / "config.json").read_text(encoding="utf-8"))
            if isinstance(cfg.get("pooling_mode"), str):
                return str(cfg["pooling_mode"]), dense
            for key, mode in _ST_POOLING.items():
                if cfg.get(key):
                    return mode, dense
    return None, dense


def _tokenizer(path: Path) -> tuple[Tokenizer, int]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tok.no_padding()
    tok.no_truncation()
    return tok, int(hf.pad_token_id or 0)


def _max_seq_length(spec: BackendSpec, path: Path) -> int:
    limits = [spec.max_seq_length] if spec.max_seq_length else []
    cfg = path / "sentence_bert_config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text(encoding="utf-8")).get("max_seq_length")
        if value:
            limits.append(int(value))
    if not limits:
        raise ConfigError(f"model {spec.name}: set max_seq_length in models.yaml")
    return min(limits)
