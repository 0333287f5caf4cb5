"""torch backend: sentence-transformers modules, minus the final Normalize.

The engine owns normalization (and Nomic's layer norm, and Matryoshka truncation), so
this backend stops at pooling (plus any Dense projection the model declares).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from embedsvc.backends.base import BackendOutOfMemory, BackendSpec, LoadedModel, PaddedBatch
from embedsvc.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "float16" if device == "cuda" else "float32"
    return dtype


class TorchBackend:
    def __init__(self, modules: Any, device: str, dtype: str, dimension: int) -> None:
        self._modules = modules
        self.device = device
        self.dtype = dtype
        self.dimension = dimension

    def cpu_threads(self, n: int | None = None) -> int:
        """torch's intra-op threads for the calling thread: set to `n` if given; the count."""
        import torch

        if n is not None:
            torch.set_num_threads(n)
        return int(torch.get_num_threads())

    def forward(self, batch: PaddedBatch) -> np.ndarray:
        import torch

        features: dict[str, Any] = {
            "input_ids": torch.from_numpy(batch.input_ids).to(self.device, non_blocking=True),
            "attention_mask": torch.from_numpy(batch.attention_mask).to(
                self.device, non_blocking=True
            ),
        }
        try:
            with torch.inference_mode():  # called from the compute thread only
                for module in self._modules:
                    features = module(features)
                out = features["sentence_embedding"]
                return out.to(torch.float32).cpu().numpy()
        except torch.OutOfMemoryError as e:
            del features
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            raise BackendOutOfMemory(str(e)) from e


def load_torch_model(spec: BackendSpec, path: Path) -> LoadedModel:
    import torch
    from sentence_transformers import SentenceTransformer

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    model_kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype != "float32":
        model_kwargs["dtype"] = getattr(torch, dtype)  # float16 | bfloat16
    try:
        st = SentenceTransformer(
            str(path),
            device=device,
            local_files_only=True,
            trust_remote_code=spec.trust_remote_code,
            model_kwargs=model_kwargs,
        )
    except Exception as e:  # the library raises many types; report the reason plainly
        raise ConfigError(f"model {spec.name}: cannot load {path}: {type(e).__name__}: {e}") from e
    st.eval()

    modules = [m for m in st if type(m).__name__ != "Normalize"]
    pooling_modules = [m for m in modules if type(m).__name__ == "Pooling"]
    if not pooling_modules:
        raise ConfigError(f"model {spec.name}: {path} declares no pooling module")
    pooling = str(getattr(pooling_modules[0], "pooling_mode", "unknown"))
    if spec.pooling and pooling != spec.pooling:
        raise ConfigError(
            f"model {spec.name}: models.yaml says pooling {spec.pooling!r} but the model folder "
            f"declares {pooling!r}; fix the entry or the folder"
        )
    get_dim = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    dimension = get_dim()
    if not dimension:
        raise ConfigError(f"model {spec.name}: cannot tell the embedding dimension")

    hf_tokenizer = st.tokenizer
    backend_tokenizer = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend_tokenizer is None:
        raise ConfigError(f"model {spec.name}: needs a fast tokenizer (tokenizer.json)")
    tokenizer = Tokenizer.from_str(backend_tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.no_truncation()
    pad_id = hf_tokenizer.pad_token_id
    max_len = _max_seq_length(spec, st)

    backend = TorchBackend(modules, device=device, dtype=dtype, dimension=int(dimension))
    log.info(
        "loaded %s (%s@%s) from %s on %s/%s: dim=%d pooling=%s max_seq_length=%d",
        spec.name,
        spec.hf_id,
        spec.revision[:12],
        path,
        device,
        dtype,
        dimension,
        pooling,
        max_len,
    )
    return LoadedModel(
        path=path,
        backend=backend,
        tokenizer=tokenizer,
        max_seq_length=max_len,
        pad_token_id=int(pad_id) if pad_id is not None else 0,
        pooling=pooling,
    )


def _max_seq_length(spec: BackendSpec, st: Any) -> int:
    limits = [v for v in (spec.max_seq_length, getattr(st, "max_seq_length", None)) if v]
    if not limits:
        raise ConfigError(f"model {spec.name}: set max_seq_length in models.yaml")
    return int(min(limits))
