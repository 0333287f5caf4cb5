"""models.yaml -> validated, frozen ModelSpec objects.

The file is read once at start. Every mistake is reported with the model's name and
the offending key, so a wrong file stops start-up with a message a person can act on.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, get_args

import yaml

from embedsvc.errors import ConfigError
from embedsvc.model_lock import LockedFiles, lock_key, read_locks

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")
# The kinds an entry names, as types mypy checks (a comparison with a string outside one
# is an error) and as the tuples the file is checked against.
BackendName = Literal["torch", "onnx"]
# embed: a sentence-transformers model (vectors); rerank: a cross-encoder (a score per
# (query, document) pair: a sequence-classification model with one label); sparse: a SPLADE
# model (sentence-transformers SparseEncoder: a weight per vocabulary entry); multivector: a
# ColBERT model (sentence-transformers MultiVectorEncoder, PyLate's format: a vector per token).
Task = Literal["embed", "rerank", "sparse", "multivector"]
OnnxVariant = Literal["auto", "fp32", "int8", "fp16"]
Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Pooling = Literal["cls", "mean", "lasttoken"]
BACKENDS: tuple[BackendName, ...] = get_args(BackendName)
TASKS: tuple[Task, ...] = get_args(Task)
ONNX_VARIANTS: tuple[OnnxVariant, ...] = get_args(OnnxVariant)
DEVICES: tuple[Device, ...] = get_args(Device)
DTYPES: tuple[Dtype, ...] = get_args(Dtype)
POOLINGS: tuple[Pooling, ...] = get_args(Pooling)

K = TypeVar("K", bound=str)

DEFAULT_MODELS_FILE = Path(__file__).with_name("models.yaml")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_id: str
    revision: str
    package: str | None = None
    local_dir: str | None = None
    task: Task = "embed"
    backend: BackendName = "torch"
    device: Device = "auto"
    dtype: Dtype = "auto"
    max_seq_length: int | None = None
    pooling: Pooling | None = None
    prompts: dict[str, str] = field(default_factory=dict)
    query_prompt: str | None = None
    passage_prompt: str | None = None
    # The prompt for requests that name none. `default_prompt_set` False: the entry does
    # not say, and the model folder's config_sentence_transformers.json decides.
    default_prompt_name: str | None = None
    default_prompt_set: bool = False
    # A request's own task instruction (`instruction` on /embed and /v1/embeddings) as the
    # prefix of each text: "{instruction}" is replaced by it (decoder embedders trained
    # with task instructions: Qwen3-Embedding, e5-mistral). None: the model takes none.
    instruction_template: str | None = None
    # Queries built with in-context examples as FlagEmbedding's FlagICLModel builds them
    # (bge-en-icl, engine/icl.py): the examples (instruct, query, response) before each
    # query, its instruction and text cut to query_max_tokens.
    icl: bool = False
    examples: tuple[tuple[str, str, str], ...] = ()
    query_max_tokens: int = 512
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_layer_norm: bool = False
    trust_remote_code: bool = False
    # With trust_remote_code, the commit of the repository that holds the code when
    # config.json takes it from another one (Nomic: nomic-ai/nomic-bert-2048).
    code_revision: str | None = None
    # BGE-M3: the folder's sparse_linear head gives lexical weights on /embed_sparse.
    lexical_weights: bool = False
    # BGE-M3: the folder's colbert_linear head gives token vectors on /embed_multivector.
    multivector: bool = False
    onnx_variant: OnnxVariant = "auto"  # auto: int8 on CPU, fp16 on CUDA
    onnx_dir: str | None = None  # where `embedsvc export` put the model (default: see export.py)
    description: str = ""
    # The files' sha256 from the models lock beside the models file (model_lock.py).
    lock: LockedFiles | None = field(default=None, compare=False, repr=False)

    @property
    def source(self) -> str:
        if self.local_dir:
            return "local_dir"
        if self.package:
            return "package"
        return "hf_cache"

    @property
    def outputs(self) -> tuple[str, ...]:
        """What the model gives per input: `dense` vectors, `sparse` weights (SPLADE,
        BGE-M3's lexical head), `multivector` token vectors (ColBERT, BGE-M3's ColBERT
        head); none for a reranker (a score per pair)."""
        if self.task == "embed":
            extra = {"sparse": self.lexical_weights, "multivector": self.multivector}
            return ("dense", *(name for name, has in extra.items() if has))
        return (self.task,) if self.task in ("sparse", "multivector") else ()

    def prompt_for_input_type(self, input_type: str) -> str | None:
        """Map the OpenAI-dialect `input_type` (query|passage|document) to a prompt name."""
        if input_type == "query":
            return self.query_prompt
        return self.passage_prompt


@dataclass(frozen=True)
class Registry:
    models: dict[str, ModelSpec]
    default_models: tuple[str, ...]
    path: Path

    def select(self, names: list[str]) -> list[ModelSpec]:
        wanted = names or list(self.default_models)
        if not wanted:
            raise ConfigError(f"{self.path}: no models requested and no default_models set")
        out = []
        for n in wanted:
            spec = self.lookup(n)
            if spec is None:
                known = ", ".join(sorted(self.models))
                raise ConfigError(f"unknown model {n!r}; {self.path} defines: {known}")
            out.append(spec)
        return out

    def lookup(self, name: str) -> ModelSpec | None:
        if name in self.models:
            return self.models[name]
        for spec in self.models.values():
            if spec.hf_id == name:
                return spec
        return None


_ALLOWED_KEYS = {f for f in ModelSpec.__dataclass_fields__} - {"lock", "default_prompt_set"}
_TOP_KEYS = {"default_models", "models"}


def load_registry(path: str | Path | None = None, models_lock: str | None = None) -> Registry:
    """The models file (default: the shipped one), each entry with its lock entry from the
    lock beside the file and the second lock (`models_lock`, EMBEDSVC_MODELS_LOCK, or the
    one in the Hugging Face cache: model_lock.read_locks)."""
    p = Path(path) if path else DEFAULT_MODELS_FILE
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"models file not found: {p}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    registry = parse_registry(raw, p)
    locked = read_locks(p, models_lock)
    for name, spec in registry.models.items():
        entry = locked.get(lock_key(spec.hf_id, spec.revision))
        if entry is not None:
            registry.models[name] = dataclasses.replace(spec, lock=entry)
    return registry


def parse_registry(raw: Any, path: Path) -> Registry:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with 'models'")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s): {', '.join(sorted(unknown))}")
    entries = raw.get("models")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: 'models' must be a non-empty list")
    models: dict[str, ModelSpec] = {}
    for i, entry in enumerate(entries):
        spec = _parse_entry(entry, f"{path}: models[{i}]", path.parent)
        if spec.name in models:
            raise ConfigError(f"{path}: model name {spec.name!r} is defined twice")
        models[spec.name] = spec
    defaults = raw.get("default_models", [])
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: default_models must be a list of model names")
    for d in defaults:
        if d not in models:
            raise ConfigError(f"{path}: default_models names {d!r}, which is not defined")
    return Registry(models=models, default_models=tuple(defaults), path=path)


def parse_examples(raw: Any) -> tuple[tuple[str, str, str], ...] | None:
    """In-context examples from a list of {instruct, query, response} (None if malformed)."""
    if not isinstance(raw, list):
        return None
    out = []
    for e in raw:
        if not isinstance(e, dict) or set(e) != {"instruct", "query", "response"}:
            return None
        if not all(isinstance(e[k], str) for k in ("instruct", "query", "response")):
            return None
        out.append((e["instruct"], e["query"], e["response"]))
    return tuple(out)


def _parse_entry(entry: Any, where: str, base_dir: Path) -> ModelSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: each model must be a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{where}: 'name' must be a non-empty string of letters, digits, ._/-")
    where = f"{where} ({name})"
    unknown = set(entry) - _ALLOWED_KEYS
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(_ALLOWED_KEYS))}"
        )
    for key in ("hf_id", "revision"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ConfigError(f"{where}: '{key}' is required")
    revision = entry["revision"]
    if not SHA_RE.match(revision):
        raise ConfigError(
            f"{where}: revision {revision!r} is not a 40-hex commit SHA; pin an exact commit, "
            "not a branch or tag"
        )

    def choice(key: str, allowed: tuple[K, ...], default: K) -> K:
        v = entry.get(key, default)
        if v not in allowed:
            raise ConfigError(f"{where}: {key} {v!r} is not one of {', '.join(allowed)}")
        return cast(K, v)

    prompts = entry.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()
    ):
        raise ConfigError(f"{where}: prompts must map names to prefix strings")
    for key in ("query_prompt", "passage_prompt", "default_prompt_name"):
        v = entry.get(key)
        if v is not None and v not in prompts:
            raise ConfigError(
                f"{where}: {key} {v!r} is not one of the prompts ({', '.join(prompts) or 'none'})"
            )
    template = entry.get("instruction_template")
    if template is not None and (
        not isinstance(template, str) or template.count("{instruction}") != 1
    ):
        raise ConfigError(
            f"{where}: instruction_template must be a string with '{{instruction}}' once "
            "(the text follows it), such as 'Instruct: {instruction}\\nQuery:'"
        )
    if template is not None and entry.get("task", "embed") != "embed":
        raise ConfigError(f"{where}: instruction_template applies to embedding models")
    icl = entry.get("icl", False)
    if not isinstance(icl, bool):
        raise ConfigError(f"{where}: icl must be true or false")
    raw_examples = entry.get("examples") or []
    examples = parse_examples(raw_examples)
    if examples is None:
        raise ConfigError(
            f"{where}: examples must be a list of {{instruct, query, response}} strings"
        )
    if (examples or "query_max_tokens" in entry) and not icl:
        raise ConfigError(f"{where}: examples and query_max_tokens apply with icl: true")
    query_max = entry.get("query_max_tokens", 512)
    if not isinstance(query_max, int) or query_max < 16:
        raise ConfigError(f"{where}: query_max_tokens must be an integer of at least 16")
    dims = entry.get("matryoshka_dims") or []
    if not isinstance(dims, list) or not all(isinstance(d, int) and d > 0 for d in dims):
        raise ConfigError(f"{where}: matryoshka_dims must be a list of positive integers")
    msl = entry.get("max_seq_length")
    if msl is not None and (not isinstance(msl, int) or msl < 1):
        raise ConfigError(f"{where}: max_seq_length must be a positive integer")
    for key in ("matryoshka_layer_norm", "trust_remote_code", "lexical_weights", "multivector"):
        if not isinstance(entry.get(key, False), bool):
            raise ConfigError(f"{where}: {key} must be true or false")
    code_revision = entry.get("code_revision")
    if code_revision is not None:
        if not isinstance(code_revision, str) or not SHA_RE.match(code_revision):
            raise ConfigError(
                f"{where}: code_revision {code_revision!r} is not a 40-hex commit SHA of the "
                "repository that holds the model's code"
            )
        if not entry.get("trust_remote_code"):
            raise ConfigError(f"{where}: code_revision applies with trust_remote_code: true")
    if entry.get("matryoshka_layer_norm") and not dims:
        raise ConfigError(f"{where}: matryoshka_layer_norm needs matryoshka_dims")
    local_dir = entry.get("local_dir")
    if local_dir is not None:
        local_dir = str((base_dir / str(local_dir)).resolve())
    package = entry.get("package")
    if local_dir and package:
        raise ConfigError(f"{where}: give either local_dir or package, not both")
    task = choice("task", TASKS, "embed")
    if task != "embed":
        embedding_only = ["matryoshka_dims", "pooling"]
        if task in ("rerank", "multivector"):
            # A ColBERT model's query and document markers come from its folder.
            embedding_only += ["prompts", "query_prompt", "passage_prompt"]
        given = [k for k in embedding_only if entry.get(k)]
        if given:
            raise ConfigError(
                f"{where}: {', '.join(given)} apply to embedding models, not task {task}"
            )
        if entry.get("backend", "torch") != "torch":
            raise ConfigError(f"{where}: task {task} runs on the torch backend")
    if entry.get("lexical_weights") and (
        task != "embed" or entry.get("backend", "torch") != "torch"
    ):
        raise ConfigError(f"{where}: lexical_weights needs task embed on the torch backend")
    if entry.get("multivector") and (task != "embed" or entry.get("backend", "torch") != "torch"):
        raise ConfigError(
            f"{where}: multivector: true is BGE-M3's ColBERT head on an embedding model (task "
            "embed, torch backend); a ColBERT model of its own is task: multivector"
        )
    pooling: Pooling | None = entry.get("pooling")
    if pooling is not None and pooling not in POOLINGS:
        raise ConfigError(f"{where}: pooling {pooling!r} is not one of {', '.join(POOLINGS)}")
    return ModelSpec(
        name=name,
        hf_id=entry["hf_id"],
        revision=revision,
        package=package,
        local_dir=local_dir,
        task=task,
        backend=choice("backend", BACKENDS, "torch"),
        device=choice("device", DEVICES, "auto"),
        dtype=choice("dtype", DTYPES, "auto"),
        max_seq_length=msl,
        pooling=pooling,
        prompts=dict(prompts),
        query_prompt=entry.get("query_prompt"),
        passage_prompt=entry.get("passage_prompt"),
        default_prompt_name=entry.get("default_prompt_name"),
        default_prompt_set="default_prompt_name" in entry,
        instruction_template=template,
        icl=icl,
        examples=examples,
        query_max_tokens=query_max,
        matryoshka_dims=tuple(sorted(set(dims), reverse=True)),
        matryoshka_layer_norm=bool(entry.get("matryoshka_layer_norm", False)),
        trust_remote_code=bool(entry.get("trust_remote_code", False)),
        code_revision=code_revision,
        lexical_weights=bool(entry.get("lexical_weights", False)),
        multivector=bool(entry.get("multivector", False)),
        onnx_variant=choice("onnx_variant", ONNX_VARIANTS, "auto"),
        onnx_dir=str((base_dir / str(entry["onnx_dir"])).resolve())
        if entry.get("onnx_dir")
        else None,
        description=str(entry.get("description", "")),
    )
