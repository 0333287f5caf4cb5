"""Command line: `embedsvc serve`, `embed`, `pull`, `verify`, `export`, `models`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from embedsvc import __version__
from embedsvc.errors import ConfigError
from embedsvc.logs import setup_logging
from embedsvc.process import exit_now
from embedsvc.settings import Settings

log = logging.getLogger("embedsvc")

LOCK_HELP = (
    "the models lock to write (and read beside the one next to models.yaml); default: beside "
    "models.yaml when its folder is writable, else $HF_HOME/embedsvc/models.lock.json "
    "(env EMBEDSVC_MODELS_LOCK)"
)


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
    pull.add_argument("--models-lock", default=None, help=LOCK_HELP)
    pull.add_argument(
        "--no-load-check",
        action="store_true",
        help="check the files against the lock only; do not load each model and run a pass "
        "(an init container without the server's GPU or memory)",
    )
    where = pull.add_mutually_exclusive_group()
    where.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    where.add_argument("--local-dir", default=None, help="plain folder (one subfolder per model)")

    verify = sub.add_parser(
        "verify",
        help="hash every file of the models again (no cached hash) against the models lock",
    )
    verify.add_argument("--models-file", default=None, help="path of models.yaml")
    verify.add_argument("--models", default=None, help="comma-separated served names")
    verify.add_argument("--models-lock", default=None, help=LOCK_HELP)

    export = sub.add_parser("export", help="export a model's transformer to ONNX")
    export.add_argument("model", help="served name from models.yaml")
    export.add_argument("--variant", choices=["fp32", "int8", "fp16"], default="fp32")
    export.add_argument(
        "--out",
        default=None,
        help="folder; the export goes to OUT/VARIANT (default: beside the model)",
    )
    export.add_argument("--models-file", default=None, help="path of models.yaml")
    export.add_argument("--models-lock", default=None, help=LOCK_HELP)

    add_embed_parser(sub)

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
        if args.command == "verify":
            return verify_files(args)
        if args.command == "models":
            return list_models(args)
        if args.command == "export":
            return export(args)
        if args.command == "embed":
            return embed(args)
    except ConfigError as e:
        print(f"embedsvc: {e}", file=sys.stderr)
        return 2
    return 1


def run() -> None:
    """The `embedsvc` command: `main`, then the process ends without the interpreter's
    teardown, which can abort ("terminate called without an active exception") while a
    native thread pool of torch or the tokenizers is still alive after a stopped job."""
    exit_now(main())


def models_file(args: argparse.Namespace) -> str | None:
    """--models-file, else EMBEDSVC_MODELS_FILE (as for `serve`), else the shipped file."""
    return Settings.from_sources({"models_file": args.models_file}, os.environ).models_file or None


def pull(args: argparse.Namespace) -> int:
    """Fetch each model at its pinned revision (or find it in the cache as locked), check
    its files, then, unless --no-load-check, load it from disk alone (no network) and run
    one forward pass, so what `serve` will do is proven here."""
    from embedsvc.model_files import verify_model_files
    from embedsvc.model_lock import write_lock_path
    from embedsvc.pull import pull_model
    from embedsvc.registry import load_registry

    setup_logging("info")
    registry = load_registry(models_file(args), args.models_lock)
    names = Settings.from_sources({"models": args.models}, os.environ).model_names()
    lock = write_lock_path(registry.path, args.models_lock)
    for spec in registry.select(names):
        if spec.source != "hf_cache":
            log.info("model %s comes from %s; nothing to pull", spec.name, spec.source)
            continue
        local = os.path.join(args.local_dir, spec.name) if args.local_dir else None
        had_entry = spec.lock is not None
        pulled = pull_model(spec, cache_dir=args.cache_dir, local_dir=local, lock=lock)
        path = pulled.path
        spec = load_registry(registry.path, args.models_lock).models[spec.name]
        verify_model_files(spec, path)  # as serve will check them
        assert spec.lock is not None
        n = len(spec.lock.files) + len(spec.lock.code)
        if not pulled.fetched:
            said = "every pinned file is in the cache as locked (the Hub was not asked)"
        else:
            said = ("fetched and checked against" if had_entry else "recorded in") + f" {lock}"
        log.info("model %s: %d files, %s", spec.name, n, said)
        if not args.no_load_check:
            _load_check(spec, path)
        if local:
            log.info("serve it with local_dir: %s in models.yaml", local)
    return 0


def _load_check(spec: Any, path: Any) -> None:
    import numpy as np

    from embedsvc.backends import PaddedBatch, load_model

    model = load_model(spec, path)
    ids = np.array([model.tokenizer.encode("embedsvc pull check").ids], dtype=np.int64)
    out = model.backend.forward(PaddedBatch(ids, np.ones_like(ids))).pooled
    log.info(
        "model %s: %s@%s at %s loads offline (dim %d)",
        spec.name,
        spec.hf_id,
        spec.revision[:12],
        path,
        out.shape[1],
    )


def verify_files(args: argparse.Namespace) -> int:
    """Read every file of each model (and its remote code and ONNX export) again and check
    it against the lock, trusting no cached hash: 0 when all match, 1 when a model has no
    entry, 2 (a ConfigError naming the file) when one differs."""
    from embedsvc.model_files import resolve_model_dir, verify_model_files
    from embedsvc.registry import load_registry

    setup_logging("info")
    registry = load_registry(models_file(args), args.models_lock)
    names = Settings.from_sources({"models": args.models}, os.environ).model_names()
    unlocked = 0
    for spec in registry.select(names):
        path = resolve_model_dir(spec)
        if verify_model_files(spec, path, rehash=True):
            assert spec.lock is not None
            n = len(spec.lock.files) + len(spec.lock.code) + (spec.backend == "onnx")
            log.info("model %s: %d files hashed again, all as the lock records", spec.name, n)
        else:
            unlocked += 1
    return 1 if unlocked else 0


def export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from embedsvc.export import default_out_dir, export_model
    from embedsvc.model_files import check_model_dir, resolve_model_dir
    from embedsvc.model_lock import lock_key, record_export, write_lock_path
    from embedsvc.registry import load_registry

    setup_logging("info")
    registry = load_registry(models_file(args), args.models_lock)
    spec = registry.select([args.model])[0]
    path = resolve_model_dir(spec)
    check_model_dir(spec, path)
    default = default_out_dir(spec, path, args.variant)
    out = Path(args.out) / args.variant if args.out else default
    done = export_model(spec, path, args.variant, out)
    print(done)
    digest = json.loads((done / "export.json").read_text(encoding="utf-8"))["sha256"]
    lock = write_lock_path(registry.path, args.models_lock)
    if record_export(lock, lock_key(spec.hf_id, spec.revision), args.variant, digest, spec.lock):
        log.info("recorded the export's sha256 in %s", lock)
    else:
        log.warning(
            "model %s has no entry in %s: the export is not recorded, and serving it will "
            "be unverified like the model",
            spec.name,
            lock,
        )
    if args.out:
        log.info("serve it with backend: onnx and onnx_dir: %s in models.yaml", args.out)
    return 0


def add_embed_parser(sub: Any) -> None:
    """`embedsvc embed`'s flags: one statement each, over 80 lines (a reason) because
    there are that many."""
    p = sub.add_parser(
        "embed",
        help="embed a whole dataset into Parquet shards (resumable)",
        description="Embed every row of INPUT with a served model, through the same engine "
        "as the server, into Parquet shards under --output. Rerunning the same command "
        "continues where the last run stopped.",
    )
    p.add_argument(
        "input",
        help="a file or folder (JSONL, Parquet, CSV, Arrow), a dataset "
        "saved with datasets.save_to_disk, or a Hugging Face dataset id",
    )
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--model", default=None, help="served name (default: the default model)")
    p.add_argument("--text-column", default="text")
    p.add_argument(
        "--id-column",
        default="id",
        help="kept as the id of each vector "
        "(default id; the row number when the input has no such column)",
    )
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--input-type", choices=["query", "passage", "document"], default=None)
    prompt.add_argument("--prompt-name", default=None)
    prompt.add_argument(
        "--instruction",
        default=None,
        help="a task instruction before each text (models with an instruction_template)",
    )
    p.add_argument("--dimensions", type=int, default=None, help="Matryoshka size")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="of the embedding and multivector columns",
    )
    p.add_argument(
        "--outputs",
        default="dense",
        help="columns to write, comma-separated: dense (embedding), sparse (lexical or SPLADE "
        "weights), multivector (token vectors); any the model has, from one pass per batch",
    )
    p.add_argument(
        "--truncate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cut over-long texts to the model's limit (default) or fail the row",
    )
    formats = ["auto", "jsonl", "parquet", "csv", "arrow", "hf", "openai-batch"]
    p.add_argument("--format", default="auto", choices=formats)
    p.add_argument("--split", default=None, help="dataset split")
    p.add_argument("--revision", default=None, help="dataset commit on the Hub (required there)")
    p.add_argument("--streaming", action="store_true", help="stream a Hub dataset")
    p.add_argument(
        "--on-error",
        choices=["skip", "fail"],
        default="skip",
        help="a bad row: write it to errors.jsonl and go on, or stop",
    )
    p.add_argument(
        "--shard-rows", type=int, default=100_000, help="at most this many rows per Parquet shard"
    )
    p.add_argument(
        "--commit-seconds",
        type=float,
        default=60.0,
        help="commit the shard in progress at least this often (an interrupted job loses at "
        "most this much work); a shard also closes past 1 GB of columns",
    )
    p.add_argument("--overwrite", action="store_true", help="start over in --output")
    p.add_argument("--models-file", default=None, help="path of models.yaml")
    ray_help = "run on a Ray cluster: ADDRESS, else RAY_ADDRESS, else a local one"
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS", help=ray_help)
    p.add_argument(
        "--num-actors",
        type=int,
        default=0,
        help="model replicas on Ray (default: one per GPU, else one)",
    )
    p.add_argument("--log-level", default="info")


def embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    setup_logging(args.log_level)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ConfigError("embedsvc embed needs pyarrow: pip install 'embedsvc[bulk]'") from None
    if args.format == "openai-batch":
        from embedsvc.bulk.openai_batch import run_batch_file

        return run_batch_file(
            Path(args.input), Path(args.output), models_file(args), args.model, args.overwrite
        )
    from embedsvc.bulk.job import run
    from embedsvc.bulk.spec import Options

    opts = Options(
        input=args.input,
        output=Path(args.output),
        model=args.model,
        text_column=args.text_column,
        id_column=args.id_column or None,
        input_type=args.input_type,
        prompt_name=args.prompt_name,
        instruction=args.instruction,
        dimensions=args.dimensions,
        dtype=args.dtype,
        truncate=args.truncate,
        format=args.format,
        split=args.split,
        revision=args.revision,
        streaming=args.streaming,
        on_error=args.on_error,
        shard_rows=args.shard_rows,
        commit_seconds=args.commit_seconds,
        overwrite=args.overwrite,
        models_file=models_file(args),
        outputs=tuple(o.strip() for o in args.outputs.split(",") if o.strip()),
    )
    if args.ray is not None:
        from embedsvc.bulk.ray_job import run_ray

        return run_ray(opts, args.ray, args.num_actors)
    return run(opts)


def list_models(args: argparse.Namespace) -> int:
    from embedsvc.registry import load_registry

    registry = load_registry(models_file(args))
    for spec in registry.models.values():
        default = " (default)" if spec.name in registry.default_models else ""
        print(f"{spec.name:24} {spec.hf_id}@{spec.revision[:12]}  source={spec.source}{default}")
    return 0
