"""What every backend that runs torch shares: device and dtype choice, thread counts, the
out-of-memory guard, whether the weights fit (before loading), loading a transformers
model from a folder, the pad token."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tokenizers import Tokenizer

from embedsvc.backends.base import BackendOutOfMemory, BackendSpec
from embedsvc.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was requested but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str, path: Path | None = None) -> str:
    """auto on a GPU: bfloat16 for weights that ship in bfloat16 (config.json's
    torch_dtype: Qwen3-Embedding, decoders whose activations can overflow float16) when
    the GPU has it, else float16. auto on a CPU: float32 here; backends/precision.py loads
    bfloat16 instead where the CPU's matrix units and the model's probe allow."""
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    config = _config(path)
    shipped = config.get("torch_dtype") or config.get("dtype")
    if shipped == "bfloat16":
        import torch

        if torch.cuda.is_bf16_supported():
            return "bfloat16"
    return "float16"


def _config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


BYTES_PER = {"float32": 4, "float16": 2, "bfloat16": 2}
# The share of the free memory the weights may take: the rest is for activations, the
# tokenizer, and the process around them.
WEIGHTS_SHARE = 0.9


def weights_bytes(path: Path, dtype: str) -> int:
    """The bytes the folder's weights take at `dtype`, from the safetensors headers alone
    (the tensors' shapes; nothing is loaded). 0 when the folder has none at the top."""
    elements = 0
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size < 100_000_000:
                raise ConfigError(f"{file}: not a safetensors file (header size {size})")
            header = json.loads(f.read(size))
        for name, tensor in header.items():
            if name != "__metadata__":
                elements += math.prod(tensor.get("shape", []))
    return elements * BYTES_PER.get(dtype, 4)


def free_memory(device: str) -> int:
    """Bytes free for the weights: on the GPU, or the memory the system can give."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_fits(name: str, path: Path, dtype: str, device: str) -> None:
    """Refuse, before loading, weights that cannot fit the device."""
    need = weights_bytes(path, dtype)
    have = free_memory(device)
    if need > WEIGHTS_SHARE * have:
        gib = 1024**3
        raise ConfigError(
            f"model {name}: its weights take {need / gib:.1f} GiB as {dtype}, and {device} "
            f"has {have / gib:.1f} GiB free (at most {WEIGHTS_SHARE:.0%} of it for weights); "
            "choose a smaller model or dtype (dtype in models.yaml, --dtype), or a device "
            "with more memory"
        )


class TorchThreads:
    """`cpu_threads` for the backends that run torch."""

    per_pass_threads = True
    token_weights = False  # TorchBackend sets it for a model with lexical weights
    token_vectors = False  # and this for a model with a ColBERT head
    token_vectors_from = 1  # BGE-M3's head: no vector for the first position ([CLS])
    states_dimension = 0  # TorchBackend: the encoder's hidden size

    def cpu_threads(self, n: int | None = None) -> int:
        """torch's intra-op threads for the calling thread: set to `n` if given; the count."""
        import torch

        if n is not None:
            torch.set_num_threads(n)
        return int(torch.get_num_threads())


def log_loaded(spec: BackendSpec, path: Path, device: str, dtype: str, what: str) -> None:
    """The one line each loaded model logs: which, from where, on what, and `what` it is."""
    log.info(
        "loaded %s (%s@%s) from %s on %s/%s: %s",
        spec.name, spec.hf_id, spec.revision[:12], path, device, dtype, what,
    )  # fmt: skip


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


def place(spec: BackendSpec, path: Path) -> tuple[str, str]:
    """The device and dtype `spec` loads on (refused if its weights would not fit there);
    the calling thread's torch threads set as the entry asks."""
    import torch

    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device, path)
    check_fits(spec.name, path, dtype, device)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    return device, dtype


def cpu_bf16_linears(model: Any) -> Any:
    """`model` (float32, on a CPU) with its linear layers in bfloat16, on the CPU's matrix
    units: each takes its input in bfloat16 and gives its output back in its input's
    dtype, so norms, embeddings, attention and the residual stream stay float32, as torch's
    autocast and OpenVINO run bf16 (and as backends/bert.py's own encoder does). Weights
    all in bfloat16 lost 2-3x the cosine for no more speed."""
    import torch
    import torch.nn.functional as F

    class Bf16Linear(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.to(dtype=torch.bfloat16)
            module.__class__ = Bf16Linear
    return model


def low_precision(dtype: str, device: str) -> dict[str, Any]:
    """from_pretrained's dtype argument: none for float32, and none for bfloat16 on a CPU
    (loaded as float32, then `cpu_bf16_linears`)."""
    import torch

    if dtype == "float32" or (dtype == "bfloat16" and device == "cpu"):
        return {}
    return {"dtype": getattr(torch, dtype)}  # float16 | bfloat16


def load_sentence_transformers(
    spec: BackendSpec, path: Path, model_class: Any, device: str, dtype: str
) -> Any:
    """A sentence-transformers model of `model_class` (SentenceTransformer,
    MultiVectorEncoder) from `path` (safetensors, local files only) in eval mode."""
    model_kwargs: dict[str, Any] = {"use_safetensors": True, **low_precision(dtype, device)}
    try:
        model = model_class(
            str(path),
            device=device,
            local_files_only=True,
            trust_remote_code=spec.trust_remote_code,
            model_kwargs=model_kwargs,
        )
    except Exception as e:  # the library raises many types; report the reason plainly
        raise ConfigError(f"model {spec.name}: cannot load {path}: {type(e).__name__}: {e}") from e
    if dtype == "bfloat16" and device == "cpu":
        cpu_bf16_linears(model)
    return model.eval()


def load_transformers_model(
    spec: BackendSpec, path: Path, auto_class: Any
) -> tuple[Any, str, str, Tokenizer]:
    """A transformers model of `auto_class` (safetensors, local files only) on the entry's
    device and dtype, in eval mode, with the folder's bare tokenizer; the device; the dtype."""

    if not (path / "tokenizer.json").is_file():
        raise ConfigError(f"model {spec.name}: needs a fast tokenizer (tokenizer.json)")
    device, dtype = place(spec, path)
    kwargs: dict[str, Any] = {"use_safetensors": True, "local_files_only": True}
    kwargs.update(low_precision(dtype, device))
    try:
        model = auto_class.from_pretrained(str(path), **spec.remote_code(), **kwargs)
    except Exception as e:  # the library raises many types; report the reason plainly
        raise ConfigError(f"model {spec.name}: cannot load {path}: {type(e).__name__}: {e}") from e
    model.to(device).eval()
    if dtype == "bfloat16" and device == "cpu":
        cpu_bf16_linears(model)
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


def trace_states(eager: Any, device: str) -> Any:
    """A TorchScript trace of `eager` ((ids, mask) -> token states): the same kernels
    without a few milliseconds of Python per forward pass. Kept only if it matches the
    eager module within rounding on padded batches of shapes other than the one traced (a
    trace fixes Python control flow, so a model whose code branches on its inputs is
    caught here); else None."""
    import torch

    def probe(rows: int, cols: int, padded: bool) -> tuple[Any, Any]:
        g = torch.Generator().manual_seed(rows * cols)
        ids = torch.randint(1000, 2000, (rows, cols), generator=g)
        mask = torch.ones(rows, cols, dtype=torch.long)
        if padded:
            mask[0, cols // 2 :] = 0
        return ids.to(device), mask.to(device)

    try:
        with torch.inference_mode(), warnings.catch_warnings():
            # The tracer's own warnings (branches on values it fixes): the probes below
            # decide. Others, such as torch.jit's deprecation, stay visible.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(eager, probe(2, 8, True), check_trace=False)
            for rows, cols, padded in ((3, 13, True), (5, 4, True), (4, 6, False)):
                ids, mask = probe(rows, cols, padded)
                a, b = eager(ids, mask), traced(ids, mask)
                tol = 1e-4 if a.dtype == torch.float32 else 1e-2
                a, b = a.float(), b.float()
                if a.shape != b.shape or not torch.allclose(a, b, atol=tol, rtol=tol):
                    log.warning(
                        "traced transformer differs from the eager one; running eagerly "
                        "(slower by the Python of each pass)"
                    )
                    return None
    except Exception as e:  # a model that cannot be traced runs eagerly
        log.warning(
            "transformer cannot be traced (%s: %s); running eagerly (slower by the Python of "
            "each pass)",
            type(e).__name__,
            e,
        )
        return None
    return traced
