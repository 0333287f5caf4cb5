"""torch backend: sentence-transformers modules, minus the final Normalize.

The engine owns normalization (and Nomic's layer norm, and Matryoshka truncation), so
this backend stops at pooling (plus any Dense projection the model declares).
"""

from __future__ import annotations

import logging
import warnings
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
        # The transformer as a TorchScript trace, when it gives the same token states:
        # the same kernels without a few milliseconds of Python per forward pass.
        self._traced: Any = _trace_transformer(modules, device)

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
                modules = self._modules
                if self._traced is not None:
                    ids, mask = features["input_ids"], features["attention_mask"]
                    features["token_embeddings"] = self._traced(ids, mask)
                    modules = modules[1:]
                for module in modules:
                    features = module(features)
                out = features["sentence_embedding"]
                return out.to(torch.float32).cpu().numpy()
        except torch.OutOfMemoryError as e:
            del features
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            raise BackendOutOfMemory(str(e)) from e


def _trace_transformer(modules: Any, device: str) -> Any:
    """A trace of the Hugging Face model in the first (sentence-transformers Transformer)
    module, or None. Kept only if it matches the eager model within rounding on padded
    batches of shapes other than the one traced (a trace fixes Python control flow, so a
    model whose code branches on its inputs is caught here and runs eagerly)."""
    import torch

    first = modules[0]
    text = getattr(first, "modality_config", {}).get("text", {})
    if (
        type(first).__name__ != "Transformer"
        or getattr(first, "module_output_name", None) != "token_embeddings"
        or text.get("method") != "forward"
        or text.get("method_output_name") not in ("last_hidden_state", ("last_hidden_state",))
        or getattr(first.model.config, "output_hidden_states", False)
    ):
        return None

    class Hidden(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: Any, mask: Any) -> Any:
            return self.model(input_ids=ids, attention_mask=mask, return_dict=True)[
                "last_hidden_state"
            ]

    def probe(rows: int, cols: int, padded: bool) -> tuple[Any, Any]:
        g = torch.Generator().manual_seed(rows * cols)
        ids = torch.randint(1000, 2000, (rows, cols), generator=g)
        mask = torch.ones(rows, cols, dtype=torch.long)
        if padded:
            mask[0, cols // 2 :] = 0
        return ids.to(device), mask.to(device)

    eager = Hidden(first.model).eval()
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings: the probes below decide
            traced = torch.jit.trace(eager, probe(2, 8, True), check_trace=False)
            for rows, cols, padded in ((3, 13, True), (5, 4, True), (4, 6, False)):
                ids, mask = probe(rows, cols, padded)
                a, b = eager(ids, mask).float(), traced(ids, mask).float()
                tol = 1e-4 if a.dtype == torch.float32 else 1e-2
                if a.shape != b.shape or not torch.allclose(a, b, atol=tol, rtol=tol):
                    log.info("traced transformer differs from the eager one; running eagerly")
                    return None
    except Exception as e:  # a model that cannot be traced runs eagerly
        log.info("transformer cannot be traced (%s: %s); running eagerly", type(e).__name__, e)
        return None
    return traced


def load_torch_model(spec: BackendSpec, path: Path) -> LoadedModel:
    import torch
    from sentence_transformers import SentenceTransformer

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.threads:
        torch.set_num_threads(spec.threads)
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
