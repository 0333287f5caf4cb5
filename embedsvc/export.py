"""`embedsvc export`: the transformer of a served model to ONNX, in fp32, int8 or fp16.

The graph takes `input_ids` and `attention_mask` (dynamic batch and sequence axes) and
returns `last_hidden_state`; pooling, Matryoshka and normalization stay outside it, in
the same code for every backend. Exports use torch's own exporter (`torch.onnx.export`,
dynamo) so the sentence-transformers 6 / transformers 5 stack stays as it is. Beside
`model.onnx`, `export.json` records where the export came from; serving refuses an
export whose model, revision or variant does not match the models.yaml entry.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

from embedsvc import __version__
from embedsvc.errors import ConfigError
from embedsvc.files import sha256_file

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "int8", "fp16")


class ExportTarget(Protocol):
    """What exporting and finding an export need of a model entry (a registry ModelSpec or
    a backend's BackendSpec)."""

    @property
    def name(self) -> str: ...
    @property
    def hf_id(self) -> str: ...
    @property
    def revision(self) -> str: ...
    @property
    def onnx_variant(self) -> str: ...
    @property
    def onnx_dir(self) -> str | None: ...
    @property
    def trust_remote_code(self) -> bool: ...
    @property
    def code_revision(self) -> str | None: ...


OPSET = 18


def resolve_variant(spec: ExportTarget, device: str) -> str:
    if spec.onnx_variant != "auto":
        return spec.onnx_variant
    return "fp16" if device.startswith("cuda") else "int8"


def candidate_dirs(spec: ExportTarget, model_dir: Path, variant: str) -> list[Path]:
    """Where an export of `spec` in `variant` is looked for, in order."""
    if spec.onnx_dir:
        return [Path(spec.onnx_dir) / variant]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "embedsvc" / "onnx"
    return [
        model_dir / "embedsvc-onnx" / variant,
        cache / spec.hf_id.replace("/", "--") / spec.revision / variant,
    ]


def default_out_dir(spec: ExportTarget, model_dir: Path, variant: str) -> Path:
    """Beside the model when its folder is writable, else the user cache."""
    first, *rest = candidate_dirs(spec, model_dir, variant)
    if spec.onnx_dir or os.access(model_dir, os.W_OK) or not rest:
        return first
    return rest[0]


def find_export(spec: ExportTarget, model_dir: Path, variant: str) -> Path:
    """The folder of a matching export, or a ConfigError that says how to make one."""
    for d in candidate_dirs(spec, model_dir, variant):
        if (d / "model.onnx").is_file():
            check_export(spec, d, variant)
            return d
    looked = ", ".join(str(d) for d in candidate_dirs(spec, model_dir, variant))
    raise ConfigError(
        f"model {spec.name}: no ONNX export ({variant}) found (looked in {looked}); run "
        f"`embedsvc export {spec.name} --variant {variant}`"
    )


def _matching(spec: ExportTarget, export_dir: Path, variant: str) -> bool:
    try:
        check_export(spec, export_dir, variant)
    except ConfigError:
        return False
    return (export_dir / "model.onnx").is_file()


def check_export(spec: ExportTarget, export_dir: Path, variant: str) -> dict[str, Any]:
    meta_path = export_dir / "export.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(
            f"model {spec.name}: {export_dir} has no readable export.json; export again with "
            f"`embedsvc export {spec.name} --variant {variant}`"
        ) from None
    want = {"hf_id": spec.hf_id, "revision": spec.revision, "variant": variant}
    wrong = {k: meta.get(k) for k, v in want.items() if meta.get(k) != v}
    if wrong:
        found = ", ".join(f"{k}={v!r}" for k, v in wrong.items())
        wanted = ", ".join(f"{k}={want[k]!r}" for k in wrong)
        raise ConfigError(
            f"model {spec.name}: the ONNX export in {export_dir} does not match models.yaml "
            f"(export has {found}; entry wants {wanted}); export again with "
            f"`embedsvc export {spec.name} --variant {variant}`"
        )
    from embedsvc.model_lock import sha256_of

    if sha256_of(export_dir / "model.onnx") != meta.get("sha256"):
        raise ConfigError(
            f"model {spec.name}: {export_dir / 'model.onnx'} is not the file its export.json "
            f"records (sha256 differs); export again with `embedsvc export {spec.name} "
            f"--variant {variant}`"
        )
    return dict(meta)


def export_model(spec: ExportTarget, model_dir: Path, variant: str, out_dir: Path) -> Path:
    """Write `out_dir/model.onnx` and `out_dir/export.json`; return `out_dir`."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    target = out_dir / "model.onnx"
    if variant == "fp16":
        # Converted from the plain graph: the fused CPU kernels below have no fp16 CPU
        # versions, and onnxruntime fuses for CUDA itself when it loads the model.
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        plain = out_dir / "model.plain.onnx"
        _export_fp32(spec, model_dir, plain)
        model = convert_float_to_float16(onnx.load(str(plain)), keep_io_types=True)
        onnx.save(model, str(target))
        plain.unlink()
    else:
        fp32 = out_dir / ("model.onnx" if variant == "fp32" else "model.fp32.onnx")
        sibling = out_dir.parent / "fp32"
        if variant != "fp32" and _matching(spec, sibling, "fp32"):
            shutil.copyfile(sibling / "model.onnx", fp32)  # reuse the fp32 export
        else:
            _export_fp32(spec, model_dir, fp32)
            _fuse_for_ort(fp32)
        if variant == "int8":
            from embedsvc.quantize import quantize_int8

            quantize_int8(fp32, target)
            fp32.unlink()
    meta = {
        "hf_id": spec.hf_id,
        "revision": spec.revision,
        "variant": variant,
        "opset": OPSET,
        "inputs": ["input_ids", "attention_mask"],
        "output": "last_hidden_state",
        "sha256": sha256_file(target),
        "embedsvc": __version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out_dir / "export.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    log.info(
        "exported %s (%s) to %s in %.1fs",
        spec.name,
        variant,
        target,
        time.perf_counter() - started,
    )
    return out_dir


def _fuse_for_ort(path: Path) -> None:
    """Fuse attention, skip-layer-norm and GELU into onnxruntime's contrib ops (onnxscript's
    rewriter knows the dynamo exporter's patterns; onnxruntime's own optimizer fused no
    attention in them). MiniLM on CPU: fp32 went from 0.87x to 1.0x torch."""
    try:
        import onnx_ir as ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        model, stats = optimize_for_ort(ir.load(str(path)))
        ir.save(model, str(path))
        log.info("fused for onnxruntime: %s", {k: v for k, v in stats.items() if v})
    except Exception:  # an unfused graph is still correct, only slower
        log.warning(
            "could not fuse %s for onnxruntime; keeping the plain graph", path, exc_info=True
        )


def _export_fp32(spec: ExportTarget, model_dir: Path, target: Path) -> None:
    import warnings

    import torch
    from transformers import AutoModel

    code: dict[str, Any] = {"code_revision": spec.code_revision} if spec.code_revision else {}
    model = AutoModel.from_pretrained(
        str(model_dir),
        trust_remote_code=spec.trust_remote_code,
        **code,
        use_safetensors=True,
        local_files_only=True,
        attn_implementation="sdpa",
    ).eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # Example with padding, so the traced graph keeps the attention mask.
    ids = torch.full((2, 16), 100, dtype=torch.long)
    mask = torch.ones((2, 16), dtype=torch.long)
    mask[1, 9:] = 0
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            LastHiddenState(model),
            (ids, mask),
            str(target),
            input_names=["input_ids", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
        )
