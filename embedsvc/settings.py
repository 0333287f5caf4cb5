"""Server settings: each one defined once, readable as a CLI flag and an EMBEDSVC_* variable.

Precedence: command-line flag > environment variable > default. Nothing here is read at
import time; `Settings.from_sources(argv_values, environ)` is called once at start.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from embedsvc.errors import ConfigError

ENV_PREFIX = "EMBEDSVC_"


def _setting(default: Any, help: str, secret: bool = False) -> Any:
    """One setting; a `secret` one never shows in a repr or the start-up log."""
    return field(default=default, repr=not secret, metadata={"help": help, "secret": secret})


@dataclass(frozen=True)
class Settings:
    host: str = _setting("127.0.0.1", "address to bind (0.0.0.0 in containers)")
    port: int = _setting(8080, "TCP port")
    models_file: str = _setting(
        "", "path of models.yaml (default: the models.yaml shipped with embedsvc)"
    )
    models: str = _setting(
        "", "comma-separated served names to load (default: the file's default_models)"
    )
    models_lock: str = _setting(
        "",
        "a models lock read beside the one next to the models file, where `embedsvc pull` "
        "records what it fetched when that folder is not writable (default: "
        "$HF_HOME/embedsvc/models.lock.json, so it travels with the cache)",
    )
    require_verified: bool = _setting(
        False,
        "refuse to serve a model that has no entry in a models lock (else it loads "
        "unverified, with a WARNING and files_verified false in /info)",
    )
    api_workers: int = _setting(
        0,
        "front-end processes (HTTP, validation, tokenization, responses) beside one engine "
        "process that batches and runs the models; 1 = everything in one process; 0 = auto: "
        "1 when the models run on CPU (they need every core), else one per CPU this process "
        "may use (affinity and cgroup quota) but one, at most 8",
    )
    max_batch_tokens: int = _setting(
        0,
        "padded tokens per forward pass (batch size x longest input); 0 = auto: 16384 on "
        "CUDA, 2048 on CPU (where larger batches stop paying off), at least the model's "
        "max_seq_length; a value below a model's max_seq_length stops start-up",
    )
    threads: int = _setting(
        0,
        "CPU threads of a forward pass (torch intra-op, onnxruntime intra-op); 0 = auto: "
        "the CPUs this process may use (affinity and cgroup quota)",
    )
    max_batch_size: int = _setting(128, "inputs per forward pass")
    max_multivector_values: int = _setting(
        2_097_152,
        "numbers one /embed_multivector or /embed_all answer may hold (tokens x width, all inputs "
        "together; 413 beyond): 2048 tokens of a 1024-dimension model",
    )
    max_sparse_values: int = _setting(
        1_048_576,
        "non-zero entries one sparse answer (/embed_sparse, /encode's sparse output) may "
        "hold, all inputs together (413 beyond; counted as the forward passes make them)",
    )
    dtype: str = _setting(
        "",
        "the weights' dtype for every model (torch backend): auto, float32, float16 or "
        "bfloat16; empty: each model's dtype in models.yaml. auto on a CPU: bfloat16 where it "
        "has bf16 matrix units (AVX512-BF16, AMX) and the model's vectors keep cosine >= "
        "0.9999 to float32 on a probe at start-up, else float32; on a GPU bfloat16 for "
        "weights that ship in it (when the GPU has it), else float16",
    )
    cuda_graphs: bool = _setting(
        False,
        "on a CUDA device, run forward passes of up to 4096 padded tokens as CUDA graphs "
        "(one launch per pass instead of one per kernel; batches padded to power-of-two "
        "shapes); BERT-family models on the torch backend. Off until a GPU run shows the "
        "same vectors and a gain (bench/gpu_check.py)",
    )
    batch_policy: str = _setting(
        "arrival",
        "which queued inputs a forward pass draws from: arrival = the oldest (about four "
        "batches' worth), nearest in length first, so under a backlog requests finish in "
        "about the order they came; length = any queued input nearest in length (least "
        "padding)",
    )
    max_concurrent_inputs: int = _setting(
        4096,
        "inputs admitted at once across requests; more are refused with 429 (and one "
        "request may carry at most this many)",
    )
    max_queue_time: float = _setting(
        5.0,
        "seconds a request may wait for its vectors: one whose estimated wait (tokens "
        "queued ahead and its own, at the model's measured rate) is longer gets 429 at "
        "once, with Retry-After; one not started by then is dropped with 429. A client "
        "may ask for less with the header x-request-timeout. 0 = no limit",
    )
    max_client_batch_size: int = _setting(
        256,
        "inputs of one request queued at a time; larger requests are split into chunks "
        "of this size so one big client batch cannot monopolize the model",
    )
    auto_truncate: bool = _setting(
        True,
        "truncate over-long inputs when a request does not say, as TEI does by default "
        "(the answer's x-truncated-inputs header counts them); false: 422",
    )
    cache_bytes: int = _setting(
        0,
        "bytes of memory per model and front-end process for an exact-match cache of "
        "dense vectors (a request whose every input was answered before skips the "
        "model); 0 = off",
    )
    otlp_endpoint: str = _setting(
        "",
        "OpenTelemetry collector to send a trace of every engine request to, over OTLP/HTTP "
        "(http://host:4318; /v1/traces is added when no path is given); the standard "
        "OTEL_EXPORTER_OTLP_ENDPOINT variables turn tracing on too; empty = off",
    )
    otlp_service_name: str = _setting(
        "embedsvc", "service.name of the traces (OTEL_SERVICE_NAME, when set, wins)"
    )
    tokenization_workers: int = _setting(
        2,
        "threads per front-end process that tokenize large requests (small ones are "
        "tokenized together on the event loop)",
    )
    openai_token_ids: str = _setting(
        "model",
        "how token ids sent to /v1/embeddings are read: model = ids of the served model's "
        "own vocabulary (as /tokenize returns them); cl100k = OpenAI's cl100k_base ids, as "
        "LangChain's OpenAIEmbeddings sends by default: decoded with tiktoken, then embedded "
        "like that text (needs pip install 'embedsvc[cl100k]')",
    )
    max_payload_bytes: int = _setting(2_000_000, "largest request body accepted (413 beyond)")
    max_input_chars: int = _setting(
        200_000, "characters allowed in one input text (422 beyond), before tokenization"
    )
    max_request_chars: int = _setting(
        4_000_000,
        "characters one request hands the tokenizer, each input with its prompt, "
        "instruction or in-context examples (a query with each document, for rerank); "
        "counted before tokenizing, 413 beyond",
    )
    max_request_tokens: int = _setting(
        300_000, "tokens allowed in one request, all inputs together (413 beyond)"
    )
    api_key: str = _setting(
        "",
        "comma-separated API keys; when set, every route but /health and /metrics needs "
        "'Authorization: Bearer KEY'",
        secret=True,
    )
    api_key_file: str = _setting("", "file with one API key per line (adds to --api-key)")
    auth_health_metrics: bool = _setting(False, "require the API key on /health and /metrics too")
    cors_origins: str = _setting(
        "", "comma-separated origins allowed by CORS ('*' for any); empty = CORS off"
    )
    malloc: str = _setting(
        "auto",
        "auto = on glibc, hand free heap memory back to the OS when the queue drains "
        "(memory stays flat under varied batch shapes); system = leave malloc alone. "
        "Nothing changes under a preloaded jemalloc/mimalloc (the Docker image uses jemalloc)",
    )
    drain_timeout: int = _setting(
        30, "seconds to let in-flight requests finish after SIGTERM before exiting"
    )
    keep_alive_timeout: float = _setting(
        5.0,
        "seconds an idle client connection stays open; behind a load balancer that reuses "
        "connections, set it longer than the balancer's idle timeout",
    )
    max_header_bytes: int = _setting(
        32768, "bytes of a request's line and headers together (431 beyond)"
    )
    header_timeout: float = _setting(
        10.0,
        "seconds a request's line and headers may take to arrive, from the connection's "
        "opening or the request's first byte (408, or a silent close for a connection that "
        "sent nothing)",
    )
    max_headers: int = _setting(100, "header lines of one request (431 beyond)")
    body_timeout: float = _setting(
        10.0,
        "seconds a request's body may take to arrive after its head (408 and close); the "
        "clock stops while the server itself is not reading the connection",
    )
    write_timeout: float = _setting(
        30.0,
        "seconds a client may read nothing of an answer the server holds for it (beyond "
        "what the socket buffers take) before its connection is closed",
    )
    max_unsent_bytes: int = _setting(
        268_435_456,
        "bytes of answers held for clients that do not read them, all connections of a "
        "process together; past it, the connections that stopped reading first are closed",
    )
    max_connections: int = _setting(
        4096,
        "open client connections per front-end process; a request on one more is answered "
        "503 and its connection closed. 0 = no limit",
    )
    http_direct: bool = _setting(
        True,
        "answer small POSTs to the embedding routes straight from the HTTP protocol (no "
        "ASGI task; the fastest path for single inputs). It extends uvicorn's internals, "
        "checked at start: when they differ, or with --no-http-direct, uvicorn's own "
        "protocol serves every request (same answers, slower for small ones)",
    )
    log_level: str = _setting("info", "debug, info, warning or error")
    log_format: str = _setting("text", "text or json (one JSON object per line)")

    def describe(self) -> str:
        """Every setting as name=value, secrets as *** (the start-up log line)."""
        parts = []
        for f in self.fields():
            value = getattr(self, f.name)
            shown = "***" if f.metadata["secret"] and value else repr(value)
            parts.append(f"{f.name}={shown}")
        return ", ".join(parts)

    @classmethod
    def fields(cls) -> list[dataclasses.Field[Any]]:
        return list(dataclasses.fields(cls))

    @staticmethod
    def env_name(name: str) -> str:
        return ENV_PREFIX + name.upper()

    @staticmethod
    def flag_name(name: str) -> str:
        return "--" + name.replace("_", "-")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one flag per setting; defaults are None so unset flags fall back to env."""
        for f in cls.fields():
            help_text = f"{f.metadata['help']} [env {cls.env_name(f.name)}, default {f.default!r}]"
            if f.type in ("bool", bool):
                parser.add_argument(
                    cls.flag_name(f.name),
                    dest=f.name,
                    default=None,
                    action=argparse.BooleanOptionalAction,
                    help=help_text,
                )
            else:
                parser.add_argument(
                    cls.flag_name(f.name), dest=f.name, default=None, help=help_text
                )

    @classmethod
    def from_sources(
        cls, cli: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> Settings:
        cli = cli or {}
        environ = environ or {}
        values: dict[str, Any] = {}
        for f in cls.fields():
            raw: Any = cli.get(f.name)
            origin = cls.flag_name(f.name)
            if raw is None and cls.env_name(f.name) in environ:
                raw = environ[cls.env_name(f.name)]
                origin = cls.env_name(f.name)
            if raw is None:
                continue
            values[f.name] = _convert(raw, f.type, origin)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.max_batch_tokens < 0:
            raise ConfigError(
                f"max_batch_tokens must be 0 (auto) or more, got {self.max_batch_tokens}"
            )
        if not self.max_queue_time >= 0:
            raise ConfigError(f"max_queue_time must be 0 or more, got {self.max_queue_time}")
        if self.threads < 0:
            raise ConfigError(f"threads must be 0 (auto) or more, got {self.threads}")
        if self.api_workers < 0:
            raise ConfigError(f"api_workers must be 0 (auto) or more, got {self.api_workers}")
        if self.cache_bytes < 0:
            raise ConfigError(f"cache_bytes must be 0 (off) or more, got {self.cache_bytes}")
        positive = (
            "max_batch_size",
            "max_multivector_values",
            "max_sparse_values",
            "max_concurrent_inputs",
            "max_client_batch_size",
            "tokenization_workers",
            "max_payload_bytes",
            "max_input_chars",
            "max_request_tokens",
            "max_request_chars",
            "max_header_bytes",
            "max_headers",
            "max_unsent_bytes",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}")
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, got {self.log_format}")
        if self.dtype not in ("", "auto", "float32", "float16", "bfloat16"):
            raise ConfigError(
                f"dtype must be auto|float32|float16|bfloat16 (or empty), got {self.dtype!r}"
            )
        if self.batch_policy not in ("arrival", "length"):
            raise ConfigError(f"batch_policy must be arrival|length, got {self.batch_policy!r}")
        if self.openai_token_ids not in ("model", "cl100k"):
            raise ConfigError(
                f"openai_token_ids must be model|cl100k, got {self.openai_token_ids!r}"
            )
        if self.malloc not in ("auto", "system"):
            raise ConfigError(f"malloc must be auto|system, got {self.malloc!r}")
        if self.drain_timeout < 0:
            raise ConfigError(f"drain_timeout must be 0 or more, got {self.drain_timeout}")
        if self.max_connections < 0:
            raise ConfigError(
                f"max_connections must be 0 (no limit) or more, got {self.max_connections}"
            )
        for name in ("header_timeout", "body_timeout", "write_timeout"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ConfigError(
                    f"{name} must be a positive number of seconds, got {getattr(self, name)}"
                )
        if not 0 < self.keep_alive_timeout < float("inf"):
            raise ConfigError(
                f"keep_alive_timeout must be a positive number of seconds, got "
                f"{self.keep_alive_timeout}"
            )
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"log_level must be debug|info|warning|error, got {self.log_level}")

    def batch_tokens_for(self, device: str) -> int:
        if self.max_batch_tokens:
            return self.max_batch_tokens
        return 16384 if device.startswith("cuda") else 2048

    def cpu_threads(self) -> int:
        return self.threads or available_cpus()

    def api_workers_for(self, accelerated: bool) -> int:
        if self.api_workers:
            return self.api_workers
        # One core stays with the engine process, which drives the GPU.
        return max(1, min(available_cpus() - 1, 8)) if accelerated else 1

    def api_keys(self) -> list[str]:
        """Keys from --api-key and --api-key-file (read once, at start)."""
        keys = [k.strip() for k in self.api_key.split(",") if k.strip()]
        if self.api_key.strip() and not keys:
            raise ConfigError(
                f"api_key {self.api_key!r} holds no key (only commas and spaces); give at "
                "least one, or leave it unset to serve without keys"
            )
        if self.api_key_file:
            try:
                with open(self.api_key_file, encoding="utf-8") as f:
                    keys += [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
            except OSError as e:
                raise ConfigError(f"cannot read api_key_file {self.api_key_file}: {e}") from None
            if not keys:
                raise ConfigError(f"api_key_file {self.api_key_file} holds no keys")
        return keys

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def model_names(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(cpus, 1)


def _convert(raw: Any, type_name: Any, origin: str) -> Any:
    if not isinstance(raw, str):
        return raw
    kind = type_name if isinstance(type_name, str) else type_name.__name__
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{origin} must be an integer, got {raw!r}") from None
    if kind == "float":
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{origin} must be a number, got {raw!r}") from None
    if kind == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{origin} must be true or false, got {raw!r}")
    return raw
