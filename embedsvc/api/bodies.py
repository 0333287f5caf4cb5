"""Every POST body, declared once.

Each body is a msgspec `Struct`: its decoder reads and checks a request in one step, at
orjson's speed, strictly (no string for a number, no number for a boolean); unknown
fields are ignored as TEI and OpenAI ignore them. The same declarations give the OpenAPI
document (`json_schema`) and, through `decode`, the 422 wording of both dialects: a new
field is one line here and nowhere else.

`inputs`/`input` take any JSON value here; `api/inputs.py` tells its four shapes apart
(a string, strings, token ids, lists of token ids) with messages that name the item.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import orjson

from embedsvc.errors import ValidationError

INPUTS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}},
        {"type": "array", "items": {"type": "integer"}},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
    ]
}

Inputs = Annotated[Any, msgspec.Meta(extra_json_schema=INPUTS_SCHEMA)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
Direction = Literal["Left", "Right", "left", "right"]
Instruction = Annotated[
    str,
    msgspec.Meta(
        description="a task instruction for the query, put before each input through the "
        "model's instruction_template (in place of a prompt; see /info)"
    ),
]
TeiFormat = Literal["float", "int8", "uint8", "binary", "ubinary"]
OpenAIFormat = Literal["float", "base64", "int8", "uint8", "binary", "ubinary"]


class Example(msgspec.Struct, forbid_unknown_fields=True):
    """An in-context example for a query (models with icl: bge-en-icl)."""

    instruct: str
    query: str
    response: str


Examples = Annotated[
    list[Example],
    msgspec.Meta(
        max_length=32,
        description="in-context examples put before each query, in place of the model's "
        "(models with icl: true; see /info)",
    ),
]


def example_tuples(examples: list[Example] | None) -> tuple[tuple[str, str, str], ...] | None:
    if examples is None:
        return None
    return tuple((e.instruct, e.query, e.response) for e in examples)


class TEIEmbedBody(msgspec.Struct):
    inputs: Inputs
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Direction = "Right"
    prompt_name: str | None = None
    instruction: Instruction | None = None
    examples: Examples | None = None
    dimensions: PositiveInt | None = None
    model: str | None = None
    encoding_format: TeiFormat = "float"
    # POST / with {source_sentence, sentences} inputs: /similarity's parameters.
    parameters: Annotated[Any, msgspec.Meta(description="similarity parameters (POST / only)")] = (
        None
    )


class TEISparseBody(msgspec.Struct):
    inputs: Inputs
    truncate: bool | None = None
    truncation_direction: Direction = "Right"
    prompt_name: str | None = None
    model: str | None = None


# Token vectors' encodings: JSON numbers, or per input one base64 string of its matrix of
# little-endian float32 (or float16: half the bytes), row after row.
TokenFormat = Literal["float", "base64", "base64_float16"]


class TEIMultivectorBody(msgspec.Struct):
    """Token vectors: per input, one normalized vector per token (BGE-M3's ColBERT head:
    per token after the first; a ColBERT model: per token less its skiplist, a query padded
    to its expansion length). prompt_name `query` or `document` picks a ColBERT model's
    side. base64 / base64_float16: each input's vectors as one little-endian float32 /
    float16 matrix, row after row (its width: the model's dimension in /info)."""

    inputs: Inputs
    truncate: bool | None = None
    truncation_direction: Direction = "Right"
    prompt_name: str | None = None
    model: str | None = None
    encoding_format: TokenFormat = "float"


class TEIEmbedAllBody(TEIMultivectorBody):
    """TEI's /embed_all: per input, the model's last hidden state at every token ([CLS] and
    [SEP] included), as computed, not pooled or normalized (as wide as `hidden_size` in
    /info). Fields as /embed_multivector's."""


class EncodeBody(msgspec.Struct):
    """Several outputs of one forward pass per input: `dense` (the vector, as /embed),
    `sparse` (lexical weights, as /embed_sparse), `multivector` (token vectors, as
    /embed_multivector), any the model has (see /info)."""

    inputs: Inputs
    outputs: Annotated[
        list[Literal["dense", "sparse", "multivector"]], msgspec.Meta(min_length=1, max_length=3)
    ]
    normalize: bool = True
    truncate: bool | None = None
    truncation_direction: Direction = "Right"
    prompt_name: str | None = None
    dimensions: PositiveInt | None = None
    model: str | None = None
    encoding_format: TokenFormat = "float"


class SimilarityInputs(msgspec.Struct, forbid_unknown_fields=True):
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(msgspec.Struct):
    truncate: bool | None = None
    truncation_direction: Direction = "Right"
    prompt_name: str | None = None


class TEISimilarityBody(msgspec.Struct):
    """TEI's /similarity (and the Hugging Face Inference API's sentence-similarity task,
    which `huggingface_hub.InferenceClient.sentence_similarity` posts to the base URL)."""

    inputs: SimilarityInputs
    parameters: SimilarityParameters | None = None
    model: str | None = None


class TEITokenizeBody(msgspec.Struct):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None
    model: str | None = None


class TEIDecodeBody(msgspec.Struct):
    # One sequence or several: [int] | [[int]] (checked in the route: msgspec takes one
    # array type per field).
    ids: Annotated[
        list[Any],
        msgspec.Meta(
            extra_json_schema={
                "anyOf": [
                    {"type": "array", "items": {"type": "integer"}},
                    {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
                ]
            }
        ),
    ]
    skip_special_tokens: bool = True
    model: str | None = None


class OpenAIEmbeddingsBody(msgspec.Struct):
    """OpenAI's schema, and four extensions: `input_type` (query|passage|document, as
    Cohere, Voyage and NIM name it) picks the model's query or passage prompt;
    `prompt_name` picks a prompt by name; `instruction` is a task instruction for models
    trained with them; `truncate` overrides --auto-truncate."""

    input: Inputs
    model: str | None = None
    encoding_format: OpenAIFormat = "float"
    dimensions: PositiveInt | None = None
    user: str | None = None
    input_type: Literal["query", "passage", "document"] | None = None
    prompt_name: str | None = None
    instruction: Instruction | None = None
    examples: Examples | None = None
    truncate: bool | None = None


RerankInstruction = Annotated[
    str,
    msgspec.Meta(
        description="the task an LLM reranker judges the documents for, in place of its "
        "default (models with a judge prompt; see /info)"
    ),
]


class TEIRerankBody(msgspec.Struct):
    query: str
    texts: list[str]
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool | None = None
    truncation_direction: Literal["Right", "right"] = "Right"
    model: str | None = None
    instruction: RerankInstruction | None = None


class DocumentText(msgspec.Struct):
    text: str


class RerankBody(msgspec.Struct):
    """Cohere's and Jina's rerank body (what LangChain, LlamaIndex and Haystack send)."""

    query: str
    documents: list[str | DocumentText]
    model: str | None = None
    top_n: PositiveInt | None = None
    return_documents: bool = False
    truncate: bool = True  # Cohere and Jina cut long documents
    instruction: RerankInstruction | None = None


PREDICT_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "description": "one text"},
        {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2,
         "description": "one pair of texts"},
        {"type": "array", "items": {"type": "array", "items": {"type": "string"},
         "minItems": 1, "maxItems": 2}, "description": "a batch of texts ([text]) and pairs"},
    ]
}  # fmt: skip


class TEIPredictBody(msgspec.Struct):
    """TEI's /predict: a text, a pair [text, text], or a batch [[text] | [text, text], ...]
    for a classifier (task classify); per input each label's score, best first."""

    inputs: Annotated[Any, msgspec.Meta(extra_json_schema=PREDICT_SCHEMA)]
    raw_scores: bool = False
    truncate: bool | None = None
    truncation_direction: Direction = "Right"
    model: str | None = None


class ClassifyBody(msgspec.Struct):
    """vLLM's and Infinity's /classify: a text or a list of texts for a classifier."""

    input: Annotated[Any, msgspec.Meta(extra_json_schema=INPUTS_SCHEMA)]
    model: str | None = None
    truncate: bool | None = None


CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]
CohereInputType = Literal["search_document", "search_query", "classification", "clustering"]


class CohereEmbedBody(msgspec.Struct):
    """Cohere's embed API v2 (what its `ClientV2.embed` sends). Texts only: `images` and
    `inputs` are refused with a 422 that says so. `input_type` picks the model's prompt
    (api/cohere.py); `priority` is accepted and has no effect (one queue serves all)."""

    texts: list[str] | None = None
    model: str | None = None
    input_type: CohereInputType | None = None
    embedding_types: Annotated[
        list[CohereEmbeddingType], msgspec.Meta(min_length=1, max_length=6)
    ] = msgspec.field(default_factory=lambda: ["float"])
    output_dimension: PositiveInt | None = None
    max_tokens: PositiveInt | None = None
    truncate: Literal["NONE", "START", "END"] | None = None
    images: list[Any] | None = None
    inputs: list[Any] | None = None
    priority: Annotated[int, msgspec.Meta(ge=0)] = 0


B = TypeVar("B", bound=msgspec.Struct)
_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}
# The bodies the routes read, in the order they were declared (`documented`): OpenAPI's
# components.
_DOCUMENTED: dict[type[msgspec.Struct], None] = {}


def decode(body: type[B], raw: bytes) -> B:
    """The body `raw` holds, checked; ValidationError (422) in words a person can act on."""
    try:
        decoder = _DECODERS.get(body)
        if decoder is None:
            decoder = _DECODERS[body] = msgspec.json.Decoder(body)
        decoded: B = decoder.decode(raw)
    except msgspec.ValidationError as e:
        raise _invalid(body, str(e), raw) from None
    except msgspec.DecodeError as e:
        raise _malformed(str(e)) from None
    except RecursionError:  # the decoder's own depth limit: a client's body, not a fault
        raise _too_deep() from None
    return decoded


def convert(body: type[B], value: Any) -> B:
    """`decode` for a value already parsed (a batch line, a body read for another route)."""
    try:
        converted: B = msgspec.convert(value, body)
    except msgspec.ValidationError as e:
        raise _invalid(body, str(e), value) from None
    except RecursionError:
        raise _too_deep() from None
    return converted


def json_schema() -> tuple[dict[type[Any], dict[str, Any]], dict[str, Any]]:
    """Each documented body's schema (a $ref) and the components they refer to, for
    OpenAPI."""
    bodies = tuple(_DOCUMENTED)
    refs, components = msgspec.json.schema_components(
        bodies, ref_template="#/components/schemas/{name}"
    )
    return dict(zip(bodies, refs, strict=True)), components


# msgspec's messages: "<what> - at `$.a.b[0]`" (no "at" for the top level).
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_EXPECTED = re.compile(r"^Expected `(?P<want>[^`]+)`(?:, got `(?P<got>[^`]+)`)?(?P<rest>.*)$")
_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean",
    "null": "null",
    "array": "a list",
    "object": "an object",
}


def _too_deep() -> ValidationError:
    return ValidationError(
        "request body nests lists or objects too deeply; no request field goes deeper than "
        "a list of lists (token ids of several inputs)"
    )


def _malformed(message: str) -> ValidationError:
    if "surrogate" in message:
        return ValidationError(
            "request body contains an unpaired UTF-16 surrogate (\\ud800-\\udfff), which is "
            "not valid text"
        )
    return ValidationError(f"request body is not valid JSON ({message})")


def _invalid(body: type[Any], message: str, raw: Any) -> ValidationError:
    m = _AT.match(message)
    assert m is not None  # the pattern matches any text
    what, path = m["what"], m["path"] or ""
    keys = [k for k in re.split(r"\.|\[(\d+)\]", path) if k]
    field = ".".join(keys).replace(".[", "[") if keys else ""
    field = re.sub(r"\.(\d+)", r"[\1]", field)
    param = keys[0] if keys else None
    if what.startswith("Object missing required field"):
        name = what.rsplit("`", 2)[-2]
        full = f"{field}.{name}" if field else name
        return ValidationError(f"{full} is required", param=param or name)
    if what.startswith("Object contains unknown field"):
        name = what.rsplit("`", 2)[-2]
        return ValidationError(f"{field or 'body'} has an unknown field {name!r}", param=param)
    if not keys and isinstance(raw, (bytes, bytearray, memoryview)):
        try:  # msgspec stops at the first value of the wrong type, before the end
            orjson.loads(raw)
        except orjson.JSONDecodeError as error:
            return _malformed(str(error))
    got = _shown(raw, keys)
    if what.startswith("Invalid enum value"):
        allowed = ", ".join(repr(v) for v in _enum(body, keys))
        return ValidationError(f"{field} must be one of {allowed}; got {got}", param=param)
    e = _EXPECTED.match(what)
    if e is not None:
        want = " or ".join(_WORDS.get(t.strip(), t.strip()) for t in e["want"].split("|"))
        bound = e["rest"].strip()
        if bound:  # a bound: "Expected `int` >= 1"
            number = bound.split()[-1]
            words = {">=": "of at least", ">": "greater than", "<=": "of at most", "<": "less than"}
            bound = f" {words.get(bound.split()[0], bound.split()[0])} {number}"
        where = field or "request body"
        if got == "another value" and e["got"]:
            got = _WORDS.get(e["got"], e["got"])
        return ValidationError(f"{where} must be {want}{bound}; got {got}", param=param)
    return ValidationError(f"{field or 'request body'}: {what}", param=param)


def _shown(raw: Any, keys: list[str]) -> str:
    """The value at `keys` of the request, short, for the message."""
    try:
        value = orjson.loads(raw) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
        for k in keys:
            value = value[int(k)] if k.isdigit() else value[k]
        text = orjson.dumps(value).decode()
    except (ValueError, TypeError, KeyError, IndexError):
        return "another value"
    return text if len(text) <= 60 else text[:57] + "..."


def _enum(body: type[Any], keys: list[str]) -> list[Any]:
    """The values a Literal field allows, found by walking the body's schema."""
    schema: Any = msgspec.json.schema(body)
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        while isinstance(node, dict) and "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        return node

    node = resolve(schema)
    for k in keys:
        node = resolve(node)
        if "anyOf" in node:
            node = next((resolve(a) for a in node["anyOf"] if "properties" in resolve(a)), node)
        node = node.get("properties", {}).get(k, {}) if not k.isdigit() else node.get("items", {})
    node = resolve(node)
    for option in [node, *node.get("anyOf", [])]:
        if "enum" in resolve(option):
            return list(resolve(option)["enum"])
    return []


def documented(body: type[msgspec.Struct]) -> dict[str, Any]:
    """FastAPI's `openapi_extra` for a route that reads `body`; the body's schema joins
    OpenAPI's components (`json_schema`, added by app.py)."""
    _DOCUMENTED[body] = None
    ref = {"$ref": f"#/components/schemas/{body.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
