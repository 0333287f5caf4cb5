"""Command line: `embedsvc serve`, `embedsvc pull`, `embedsvc models`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from embedsvc import __version__
from embedsvc.errors import ConfigError
from embedsvc.logs import setup_logging
from embedsvc.settings import Settings

log = logging.getLogger("embedsvc")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedsvc", description="Embedding inference service")
    parser.add_argument("--version", action="version", version=f"embedsvc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve models over HTTP")
    Settings.add_arguments(serve)

    pull = sub.add_parser(
        "pull", help="download models at their pinned revisions into the Hugging Face cache"
    )
    pull.add_argument("--models-file", default=None, help="path of models.yaml")
    pull.add_argument("--models", default=None, help="comma-separated served names")
    where = pull.add_mutually_exclusive_group()
    where.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    where.add_argument("--local-dir", default=None, help="plain folder (one subfolder per model)")

    export = sub.add_parser("export", help="export a model's transformer to ONNX")
    export.add_argument("model", help="served name from models.yaml")
    export.add_argument("--variant", choices=["fp32", "int8", "fp16"], default="fp32")
    export.add_argument(
        "--out",
        default=None,
        help="folder; the export goes to OUT/VARIANT (default: beside the model)",
    )
    export.add_argument("--models-file", default=None, help="path of models.yaml")

    models = sub.add_parser("models", help="list the models in models.yaml")
    models.add_argument("--models-file", default=None, help="path of models.yaml")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            from embedsvc.server import serve

            settings = Settings.from_sources(vars(args), os.environ)
            exit_now(serve(settings))
        if args.command == "pull":
            return pull(args)
        if args.command == "models":
            return list_models(args)
        if args.command == "export":
            return export(args)
    except ConfigError as e:
        print(f"embedsvc: {e}", file=sys.stderr)
        return 2
    return 1


def models_file(args: argparse.Namespace) -> str | None:
    """--models-file, else EMBEDSVC_MODELS_FILE (as for `serve`), else the shipped file."""
    return args.models_file or os.environ.get("EMBEDSVC_MODELS_FILE") or None


def exit_now(code: int) -> NoReturn:
    """End a server process without the interpreter's teardown. Native thread pools
    (torch, onnxruntime, tokenizers) still running then can abort it ("terminate called
    without an active exception", exit -6) after a clean drain; everything worth keeping
    (logs, metrics files, the run folder) is flushed or removed by now."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def pull(args: argparse.Namespace) -> int:
    """Download each model at its pinned revision, then load it from disk alone (no
    network) and run one forward pass, so what `serve` will do is proven here."""
    import numpy as np

    from embedsvc.backends import PaddedBatch, load_model
    from embedsvc.model_files import pull_model
    from embedsvc.registry import load_registry

    setup_logging("info")
    registry = load_registry(models_file(args))
    chosen = args.models or os.environ.get("EMBEDSVC_MODELS", "")
    names = [m.strip() for m in chosen.split(",") if m.strip()]
    for spec in registry.select(names):
        if spec.source != "hf_cache":
            log.info("model %s comes from %s; nothing to pull", spec.name, spec.source)
            continue
        local = os.path.join(args.local_dir, spec.name) if args.local_dir else None
        path = pull_model(spec, cache_dir=args.cache_dir, local_dir=local)
        model = load_model(spec, path)
        ids = np.array([model.tokenizer.encode("embedsvc pull check").ids], dtype=np.int64)
        out = model.backend.forward(PaddedBatch(ids, np.ones_like(ids)))
        log.info(
            "model %s: %s@%s at %s loads offline (dim %d)",
            spec.name, spec.hf_id, spec.revision[:12], path, out.shape[1],
        )  # fmt: skip
        if local:
            log.info("serve it with local_dir: %s in models.yaml", local)
    return 0


def export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from embedsvc.export import default_out_dir, export_model
    from embedsvc.model_files import check_model_dir, resolve_model_dir
    from embedsvc.registry import load_registry

    setup_logging("info")
    spec = load_registry(models_file(args)).select([args.model])[0]
    path = resolve_model_dir(spec)
    check_model_dir(spec, path)
    default = default_out_dir(spec, path, args.variant)
    out = Path(args.out) / args.variant if args.out else default
    done = export_model(spec, path, args.variant, out)
    print(done)
    if args.out:
        log.info("serve it with backend: onnx and onnx_dir: %s in models.yaml", args.out)
    return 0


def list_models(args: argparse.Namespace) -> int:
    from embedsvc.registry import load_registry

    registry = load_registry(models_file(args))
    for spec in registry.models.values():
        default = " (default)" if spec.name in registry.default_models else ""
        print(f"{spec.name:24} {spec.hf_id}@{spec.revision[:12]}  source={spec.source}{default}")
    return 0
