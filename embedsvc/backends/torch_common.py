"""What every backend that runs torch shares: device and dtype choice, thread counts, the
out-of-memory guard, loading a transformers model from a folder, the pad token."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tokenizers import Tokenizer

from embedsvc.backends.base import BackendOutOfMemory, BackendSpec
from embedsvc.errors import ConfigError

T = TypeVar("T")


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


class TorchThreads:
    """`cpu_threads` for the backends that run torch."""

    per_pass_threads = True
    token_weights = False  # TorchBackend sets it for a model with lexical weights

    def cpu_threads(self, n: int | None = None) -> int:
        """torch's intra-op threads for the calling thread: set to `n` if given; the count."""
        import torch

        if n is not None:
            torch.set_num_threads(n)
        return int(torch.get_num_threads())


def guarded(device: str, fn: Callable[[], T]) -> T:
    """Run `fn` in inference mode; torch's out-of-memory error becomes BackendOutOfMemory
    (the worker then splits the batch), with CUDA's cache emptied first."""
    import torch

    try:
        with torch.inference_mode():
            return fn()
    except torch.OutOfMemoryError as e:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        raise BackendOutOfMemory(str(e)) from e


def load_transformers_model(
    spec: BackendSpec, path: Path, auto_class: Any
) -> tuple[Any, str, str, Tokenizer]:
    """A transformers model of `auto_class` (safetensors, local files only) on the entry's
    device and dtype, in eval mode, with the folder's bare tokenizer; the device; the dtype."""
    import torch

    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"model {spec.name}: needs a fast tokenizer (tokenizer.json)")
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True}
    if dtype != "float32":
        kwargs["dtype"] = getattr(torch, dtype)
    try:
        model = auto_class.from_pretrained(str(path), **spec.remote_code(), **kwargs)
    except Exception as e:  # the library raises many types; report the reason plainly
        raise ConfigError(f"model {spec.name}: cannot load {path}: {type(e).__name__}: {e}") from e
    model.to(device).eval()
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return model, device, dtype, tokenizer


def pad_token_id_of(path: Path, tokenizer: Tokenizer, config: dict[str, Any]) -> int | None:
    """The tokenizer's pad token as its configuration names it, else config.json's."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            pad = json.loads((path / name).read_text(encoding="utf-8")).get("pad_token")
        except (OSError, ValueError, AttributeError):
            continue
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str) and tokenizer.token_to_id(pad) is not None:
            return tokenizer.token_to_id(pad)
    pad_id = config.get("pad_token_id")
    return int(pad_id) if isinstance(pad_id, int) else None
