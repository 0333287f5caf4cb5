"""What an `embedsvc embed` job is: its options, the model's engine settings for a job,
the manifest fields that describe it (compared on a rerun), and what it refuses before it
reads a row (here, or before the model loads)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedsvc.bulk.output import COMMIT_SECONDS, MANIFEST
from embedsvc.bulk.sources import Source
from embedsvc.engine import EngineSet, ModelEngine, load_engines
from embedsvc.engine.types import Want, want_of
from embedsvc.errors import ConfigError
from embedsvc.metrics import Metrics
from embedsvc.registry import ModelSpec, load_registry
from embedsvc.settings import Settings

CHUNK = 256  # rows per engine request
WINDOW = 16  # requests in flight: the engine sorts about CHUNK * WINDOW queued rows by length


@dataclass
class Options:
    input: str
    output: Path
    model: str | None = None
    text_column: str = "text"
    id_column: str | None = "id"
    input_type: str | None = None
    prompt_name: str | None = None
    instruction: str | None = None  # a task instruction (models with instruction_template)
    dimensions: int | None = None
    dtype: str = "float32"
    truncate: bool = True
    format: str = "auto"
    split: str | None = None
    revision: str | None = None
    streaming: bool = False
    on_error: str = "skip"
    shard_rows: int = 100_000
    commit_seconds: float = COMMIT_SECONDS  # a shard is committed at least this often
    overwrite: bool = False
    models_file: str | None = None
    # The columns to write: dense (`embedding`), sparse (lexical or SPLADE weights),
    # multivector (token vectors), any the model has, from one pass per batch.
    outputs: tuple[str, ...] = ("dense",)


OUTPUTS = ("dense", "sparse", "multivector")


def engine_settings(extra_inputs: int = 0, threads: int = 0) -> Settings:
    """The server's settings for a job that queues everything it reads: no time limit,
    batches by length, room for the whole window."""
    env = {k: v for k, v in os.environ.items() if k.startswith("EMBEDSVC_")}
    if threads:
        env["EMBEDSVC_THREADS"] = str(threads)
    env.setdefault("EMBEDSVC_MAX_QUEUE_TIME", "0")
    env.setdefault("EMBEDSVC_BATCH_POLICY", "length")
    env.setdefault("EMBEDSVC_MAX_CONCURRENT_INPUTS", str(CHUNK * WINDOW * 2 + extra_inputs))
    env.setdefault("EMBEDSVC_MAX_CLIENT_BATCH_SIZE", str(CHUNK))
    return Settings.from_sources({}, env)


def load(models_file: str | None, names: list[str], settings: Settings) -> EngineSet:
    registry = load_registry(models_file or settings.models_file or None)
    return load_engines(registry.select(names), settings, Metrics())


def resolve_prompt_name(engine: ModelEngine, opts: Options) -> str | None:
    if opts.input_type and opts.prompt_name:
        raise ConfigError("give either --input-type or --prompt-name, not both")
    if opts.input_type:
        from embedsvc.engine import NO_PROMPT

        return engine.spec.prompt_for_input_type(opts.input_type) or NO_PROMPT
    return opts.prompt_name


def job_prefix(engine: ModelEngine, opts: Options) -> str:
    """What goes before each row's text: the instruction through the model's template, or
    the prompt (ConfigError for an instruction the model cannot take)."""
    if opts.instruction is None:
        return engine.resolve_prompt(resolve_prompt_name(engine, opts))
    template = engine.spec.instruction_template
    if template is None:
        raise ConfigError(f"model {engine.name} takes no --instruction (no instruction_template)")
    if not opts.instruction:
        raise ConfigError("--instruction is empty")
    return template.replace("{instruction}", opts.instruction)


def describe_job(
    engine: ModelEngine, opts: Options, description: dict[str, Any], fingerprint: str
) -> dict[str, Any]:
    """What the manifest records about the job, and compares on a rerun."""
    request_want(engine, opts.outputs)
    engine.check_dimensions(opts.dimensions)
    job = static_job(engine.spec, opts, description, fingerprint)
    job["prompt"] = job_prefix(engine, opts)
    job["dimensions"] = opts.dimensions or engine.dimension
    # dtype auto can pick bfloat16 on one CPU and float32 on another: a job resumed on a
    # machine that serves the model at another precision would mix the two. Recorded when
    # not float32, so jobs begun before it resume.
    if engine.info.dtype != "float32":
        job["model_precision"] = engine.info.dtype
    return job


def static_job(
    spec: ModelSpec, opts: Options, description: dict[str, Any], fingerprint: str
) -> dict[str, Any]:
    """The job's manifest fields that need no loaded model."""
    job = {
        "model": spec.name,
        "hf_id": spec.hf_id,
        "revision": spec.revision,
        "normalized": True,
        "dtype": opts.dtype,
        "truncate": opts.truncate,
        "text_column": opts.text_column,
        "id_column": opts.id_column,
        "shard_rows": opts.shard_rows,
        "input": description,
        "input_fingerprint": fingerprint,
    }
    if opts.outputs != ("dense",):  # recorded when not the default, so older jobs resume
        job["outputs"] = list(opts.outputs)
    return job


def check_before_loading(opts: Options, source: Source) -> None:
    """Refuse a rerun into an output folder of another job before the model loads: the
    fields that need no model (the input, the model's pin, the columns, the options)."""
    path = opts.output / MANIFEST
    if opts.overwrite or not path.is_file():
        return
    registry = load_registry(opts.models_file or engine_settings().models_file or None)
    spec = registry.select([opts.model] if opts.model else [])[0]
    job = static_job(spec, opts, source.description, source.fingerprint)
    try:
        was = json.loads(path.read_bytes()).get("job", {})
    except ValueError:
        return  # open_output says what is wrong with it
    differ = [k for k in sorted(job) if was.get(k) != job[k]]
    differ += [k for k in ("outputs",) if k in was and k not in job]
    if differ:
        detail = "; ".join(f"{k}: was {was.get(k)!r}, now {job.get(k)!r}" for k in differ)
        raise ConfigError(
            f"{opts.output} holds the output of another job ({detail}); use another "
            "--output, or --overwrite to start over"
        )


def request_want(engine: ModelEngine, outputs: tuple[str, ...]) -> Want:
    """What a request that gives `outputs` of `engine`'s model in one pass wants.
    ConfigError, before anything is read, for an output the model does not have."""
    spec = engine.spec
    if any(o not in spec.outputs for o in outputs):
        raise ConfigError(
            f"model {engine.name} (task {spec.task}) cannot give --outputs "
            f"{','.join(outputs)}; it gives {','.join(spec.outputs) or 'no column'}"
        )
    return want_of(outputs)


def check_options(opts: Options) -> None:
    """What a job refuses before it reads anything (here or on Ray)."""
    if opts.dtype not in ("float32", "float16"):
        raise ConfigError(f"--dtype must be float32 or float16, got {opts.dtype!r}")
    if opts.on_error not in ("skip", "fail"):
        raise ConfigError(f"--on-error must be skip or fail, got {opts.on_error!r}")
    if opts.shard_rows < 1:
        raise ConfigError("--shard-rows must be at least 1")
    if not opts.commit_seconds > 0:
        raise ConfigError(f"--commit-seconds must be positive, got {opts.commit_seconds}")
    unknown = [o for o in opts.outputs if o not in OUTPUTS]
    if unknown or not opts.outputs or len(set(opts.outputs)) != len(opts.outputs):
        raise ConfigError(
            f"--outputs must name each of {', '.join(OUTPUTS)} at most once, comma-separated; "
            f"got {','.join(opts.outputs) or 'nothing'}"
        )
