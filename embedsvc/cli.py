"""Command line: `embedsvc serve`, `embedsvc pull`, `embedsvc models`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from embedsvc import __version__
from embedsvc.errors import ConfigError
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

    models = sub.add_parser("models", help="list the models in models.yaml")
    models.add_argument("--models-file", default=None, help="path of models.yaml")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            settings = Settings.from_sources(vars(args), os.environ)
            return serve(settings)
        if args.command == "pull":
            return pull(args)
        if args.command == "models":
            return list_models(args)
    except ConfigError as e:
        print(f"embedsvc: {e}", file=sys.stderr)
        return 2
    return 1


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def serve(settings: Settings) -> int:
    import uvicorn

    from embedsvc.api import create_app
    from embedsvc.engine import load_engines
    from embedsvc.metrics import Metrics
    from embedsvc.registry import load_registry

    _setup_logging(settings.log_level)
    registry = load_registry(settings.models_file or None)
    specs = registry.select(settings.model_names())
    for spec in specs:
        log.info("model %s: %s@%s (source: %s)", spec.name, spec.hf_id, spec.revision, spec.source)
    metrics = Metrics()
    failures: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_failure(reason: str) -> None:
        failures.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(
        settings,
        metrics,
        loader=lambda: load_engines(specs, settings, metrics),
        on_load_failure=on_load_failure,
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=settings.log_level.lower() == "debug",
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info("embedsvc %s listening on http://%s:%d", __version__, host, settings.port)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown so the default handler
    # kills the process; with these no-op handlers in place, a clean drain exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if failures:
        print(f"embedsvc: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def pull(args: argparse.Namespace) -> int:
    from embedsvc.model_files import pull_model
    from embedsvc.registry import load_registry

    _setup_logging("info")
    registry = load_registry(args.models_file)
    names = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    for spec in registry.select(names):
        if spec.source != "hf_cache":
            log.info("model %s comes from %s; nothing to pull", spec.name, spec.source)
            continue
        local = os.path.join(args.local_dir, spec.name) if args.local_dir else None
        path = pull_model(spec, cache_dir=args.cache_dir, local_dir=local)
        log.info("model %s: %s@%s ready at %s", spec.name, spec.hf_id, spec.revision[:12], path)
    return 0


def list_models(args: argparse.Namespace) -> int:
    from embedsvc.registry import load_registry

    registry = load_registry(args.models_file)
    for spec in registry.models.values():
        default = " (default)" if spec.name in registry.default_models else ""
        print(f"{spec.name:24} {spec.hf_id}@{spec.revision[:12]}  source={spec.source}{default}")
    return 0
