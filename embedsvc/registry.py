"""models.yaml -> validated, frozen ModelSpec objects.

The file is read once at start. Every mistake is reported with the model's name and
the offending key, so a wrong file stops start-up with a message a person can act on.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import msgspec
import yaml
from msgspec import UNSET, UnsetType

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
Task = Literal["embed", "rerank", "sparse", "multivector", "classify"]
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
    # An LLM reranker (task rerank): a causal LM asked for yes or no (backends/judge.py).
    judge: JudgePrompt | None = None
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
        head); none for a reranker (a score per pair) or a classifier (scores per label)."""
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


# (task, backend) -> the loader, "module:function" taking (BackendSpec, folder) ->
# LoadedModel (backends/loaders.py imports it when a model needs it). The one table of
# which task runs on which backend: an entry naming another pair is refused here.
LOADERS: dict[tuple[Task, BackendName], str] = {
    ("embed", "torch"): "embedsvc.backends.torch_backend:load_torch_model",
    ("embed", "onnx"): "embedsvc.backends.onnx_backend:load_onnx_model",
    ("rerank", "torch"): "embedsvc.backends.cross_encoder:load_cross_encoder",
    ("classify", "torch"): "embedsvc.backends.cross_encoder:load_classifier",
    ("sparse", "torch"): "embedsvc.backends.splade:load_splade",
    ("multivector", "torch"): "embedsvc.backends.colbert:load_colbert",
}


class JudgePrompt(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How an LLM reranker (Qwen3-Reranker) is asked whether a document meets a query, as
    its model card asks it: `prefix` + `pair` (with {instruction}, {query}, {document}
    filled in, cut to fit) + `suffix`, each tokenized on its own; the score is the
    probability of `yes` against `no` at the last position."""

    prefix: str
    pair: str
    suffix: str
    instruction: str  # when a request sends none
    yes: str = "yes"
    no: str = "no"


class Example(msgspec.Struct, forbid_unknown_fields=True):
    """An in-context example of an `icl: true` entry."""

    instruct: str
    query: str
    response: str


class Entry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One entry of models.yaml as written (ModelSpec documents each key and holds it
    normalized: paths resolved, defaults filled in, lists as tuples). Decoded by msgspec:
    types, choices and unknown keys are checked here, the rules between keys by `_check`."""

    name: Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]
    hf_id: str
    revision: str
    package: str | None = None
    local_dir: str | None = None
    task: Task = "embed"
    backend: BackendName = "torch"
    device: Device = "auto"
    dtype: Dtype = "auto"
    max_seq_length: Annotated[int, msgspec.Meta(ge=1)] | None = None
    pooling: Pooling | None = None
    prompts: dict[str, str] | None = None
    query_prompt: str | None = None
    passage_prompt: str | None = None
    default_prompt_name: str | UnsetType | None = UNSET  # set to null: no default prompt
    instruction_template: str | None = None
    icl: bool = False
    examples: list[Example] | None = None
    query_max_tokens: Annotated[int, msgspec.Meta(ge=16)] | UnsetType = UNSET
    matryoshka_dims: list[Annotated[int, msgspec.Meta(gt=0)]] | None = None
    matryoshka_layer_norm: bool = False
    trust_remote_code: bool = False
    code_revision: str | None = None
    lexical_weights: bool = False
    multivector: bool = False
    judge: JudgePrompt | None = None
    onnx_variant: OnnxVariant = "auto"
    onnx_dir: str | None = None
    description: str = ""


class ModelsFile(msgspec.Struct, forbid_unknown_fields=True):
    models: Annotated[list[Entry], msgspec.Meta(min_length=1)]
    default_models: list[str] = []


# What a key must be, in words, where msgspec's own message says it less plainly.
_HINTS = {
    "name": "must be a non-empty string of letters, digits, ._/-",
    "hf_id": "is required",
    "revision": "is required",
    "matryoshka_dims": "must be a list of positive integers",
    "max_seq_length": "must be a positive integer",
    "query_max_tokens": "must be an integer of at least 16",
    "prompts": "must map names to prefix strings",
    "examples": "must be a list of {instruct, query, response} strings",
    "judge": "must be {prefix, pair, suffix, instruction} strings (yes, no optional)",
    "default_models": "must be a list of model names",
    "models": "must be a non-empty list",
}
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_PLACE = re.compile(
    r"^\.models\[(?P<index>\d+)\](?:\.(?P<key>\w+)(?P<inside>.+)?)?|^\.(?P<top>\w+)"
)


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
    """The registry of a models file's parsed YAML; ConfigError naming the entry and key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping with 'models'")
    try:
        decoded = msgspec.convert(raw, ModelsFile)
    except msgspec.ValidationError as e:
        raise ConfigError(_where(str(e), raw, path)) from None
    models: dict[str, ModelSpec] = {}
    for i, entry in enumerate(decoded.models):
        spec = _spec(entry, f"{path}: models[{i}] ({entry.name})", path.parent)
        if spec.name in models:
            raise ConfigError(f"{path}: model name {spec.name!r} is defined twice")
        models[spec.name] = spec
    for d in decoded.default_models:
        if d not in models:
            raise ConfigError(f"{path}: default_models names {d!r}, which is not defined")
    return Registry(models=models, default_models=tuple(decoded.default_models), path=path)


def _where(message: str, raw: dict[str, Any], path: Path) -> str:
    """msgspec's message as "<file>: models[i] (<name>): <key> <what is wrong>"."""
    m = _AT.match(message)
    what, at = (m["what"], m["path"] or "") if m else (message, "")
    place = _PLACE.match(at)
    where, key = str(path), ""
    if place and place["index"] is not None:
        i = int(place["index"])
        entry = raw["models"][i]
        name = entry.get("name") if isinstance(entry, dict) else None
        where = f"{path}: models[{i}]" + (f" ({name})" if isinstance(name, str) else "")
        key = place["key"] or ""
    elif place:
        key = place["top"]
    if place and place["inside"]:  # within a key's value (an example, a list item)
        return f"{where}: {key} {_HINTS.get(key, what)}"
    unknown = re.match(r"Object contains unknown field `(?P<key>[^`]+)`", what)
    missing = re.match(r"Object missing required field `(?P<key>[^`]+)`", what)
    choice = re.match(r"Invalid enum value (?P<value>.+)", what)
    if unknown and not key and where == str(path):
        return f"{where}: unknown top-level key(s): {unknown['key']}"
    if unknown:
        allowed = ", ".join(sorted(Entry.__struct_fields__))
        return f"{where}: unknown key(s) {unknown['key']}; allowed: {allowed}"
    if missing:
        return f"{where}: '{missing['key']}' is required"
    if choice:
        allowed = ", ".join(_CHOICES.get(key, ()))
        return f"{where}: {key} {choice['value']} is not one of {allowed}"
    if key in _HINTS:
        return f"{where}: {key} {_HINTS[key]}"
    if key in _BOOLEANS:
        return f"{where}: {key} must be true or false"
    return f"{where}: {key + ': ' if key else ''}{what}"


_CHOICES = {
    "task": TASKS,
    "backend": BACKENDS,
    "device": DEVICES,
    "dtype": DTYPES,
    "pooling": POOLINGS,
    "onnx_variant": ONNX_VARIANTS,
}
_BOOLEANS = {
    "icl",
    "matryoshka_layer_norm",
    "trust_remote_code",
    "lexical_weights",
    "multivector",
}


def _spec(e: Entry, where: str, base_dir: Path) -> ModelSpec:
    """The ModelSpec of a decoded entry, after the rules between its keys (`_check`)."""
    _check(e, where)
    fields = msgspec.structs.asdict(e)
    fields.update(
        local_dir=str((base_dir / e.local_dir).resolve()) if e.local_dir else None,
        onnx_dir=str((base_dir / e.onnx_dir).resolve()) if e.onnx_dir else None,
        prompts=dict(e.prompts or {}),
        default_prompt_name=None if e.default_prompt_name is UNSET else e.default_prompt_name,
        default_prompt_set=e.default_prompt_name is not UNSET,
        examples=tuple((x.instruct, x.query, x.response) for x in e.examples or ()),
        query_max_tokens=512 if e.query_max_tokens is UNSET else e.query_max_tokens,
        matryoshka_dims=tuple(sorted(set(e.matryoshka_dims or ()), reverse=True)),
    )
    return ModelSpec(**fields)


def _check(e: Entry, where: str) -> None:
    """The rules between an entry's keys; ConfigError naming the entry and the key."""
    for key in ("hf_id", "revision"):
        if not getattr(e, key):
            raise ConfigError(f"{where}: '{key}' is required")
    if not SHA_RE.match(e.revision):
        raise ConfigError(
            f"{where}: revision {e.revision!r} is not a 40-hex commit SHA; pin an exact commit, "
            "not a branch or tag"
        )
    prompts = e.prompts or {}
    for key in ("query_prompt", "passage_prompt", "default_prompt_name"):
        v = getattr(e, key)
        if isinstance(v, str) and v not in prompts:
            raise ConfigError(
                f"{where}: {key} {v!r} is not one of the prompts ({', '.join(prompts) or 'none'})"
            )
    template = e.instruction_template
    if template is not None and template.count("{instruction}") != 1:
        raise ConfigError(
            f"{where}: instruction_template must be a string with '{{instruction}}' once "
            "(the text follows it), such as 'Instruct: {instruction}\\nQuery:'"
        )
    if template is not None and e.task != "embed":
        raise ConfigError(f"{where}: instruction_template applies to embedding models")
    if (e.examples or e.query_max_tokens is not UNSET) and not e.icl:
        raise ConfigError(f"{where}: examples and query_max_tokens apply with icl: true")
    if e.code_revision is not None:
        if not SHA_RE.match(e.code_revision):
            raise ConfigError(
                f"{where}: code_revision {e.code_revision!r} is not a 40-hex commit SHA of the "
                "repository that holds the model's code"
            )
        if not e.trust_remote_code:
            raise ConfigError(f"{where}: code_revision applies with trust_remote_code: true")
    if e.matryoshka_layer_norm and not e.matryoshka_dims:
        raise ConfigError(f"{where}: matryoshka_layer_norm needs matryoshka_dims")
    if e.local_dir and e.package:
        raise ConfigError(f"{where}: give either local_dir or package, not both")
    if e.task != "embed":
        embedding_only = ["matryoshka_dims", "pooling"]
        if e.task in ("rerank", "multivector", "classify"):
            # A ColBERT model's query and document markers come from its folder.
            embedding_only += ["prompts", "query_prompt", "passage_prompt"]
        given = [k for k in embedding_only if getattr(e, k)]
        if given:
            raise ConfigError(
                f"{where}: {', '.join(given)} apply to embedding models, not task {e.task}"
            )
    if (e.task, e.backend) not in LOADERS:
        on = sorted(b for t, b in LOADERS if t == e.task)
        raise ConfigError(f"{where}: task {e.task} runs on the {' or '.join(on)} backend")
    if e.judge is not None:
        if (e.task, e.backend) != ("rerank", "torch"):
            raise ConfigError(f"{where}: judge makes an LLM reranker: task rerank, torch backend")
        missing = [k for k in ("{instruction}", "{query}", "{document}") if k not in e.judge.pair]
        if missing:
            raise ConfigError(f"{where}: judge.pair must hold {', '.join(missing)}")
        try:
            e.judge.pair.format(instruction="", query="", document="")
        except (KeyError, IndexError, ValueError) as error:
            raise ConfigError(
                f"{where}: judge.pair has a field other than {{instruction}}, {{query}} and "
                f"{{document}} ({error}); write a literal brace twice: {{{{ }}}}"
            ) from None
    if e.lexical_weights and (e.task, e.backend) != ("embed", "torch"):
        raise ConfigError(f"{where}: lexical_weights needs task embed on the torch backend")
    if e.multivector and (e.task, e.backend) != ("embed", "torch"):
        raise ConfigError(
            f"{where}: multivector: true is BGE-M3's ColBERT head on an embedding model (task "
            "embed, torch backend); a ColBERT model of its own is task: multivector"
        )
