"""Request preparation in the front end: validation, prompts, Matryoshka dimensions and
tokenization of many requests in one tokenizer call."""

from __future__ import annotations

from tokenizers import Tokenizer

from embedsvc.engine.tokenize import TextTokenizer
from embedsvc.engine.types import NO_PROMPT, EmbedRequest, ModelInfo
from embedsvc.errors import (
    EmbedsvcError,
    EmptyInputError,
    PayloadTooLargeError,
    ValidationError,
)
from embedsvc.settings import Settings


class Preparer:
    def __init__(self, info: ModelInfo, settings: Settings) -> None:
        self.info = info
        self.spec = info.spec
        self.name = info.name
        self.settings = settings
        tok = Tokenizer.from_str(info.tokenizer_json)
        tok.no_padding()
        tok.no_truncation()
        self.tokenizer = TextTokenizer(tok, info.max_seq_length)

    def resolve_prompt(self, prompt_name: str | None, param: str = "prompt_name") -> str:
        """The prefix for `prompt_name`: None means the model's default prompt (if it
        has one), NO_PROMPT ("") none at all."""
        if prompt_name is None:
            default = self.info.default_prompt_name
            return self.spec.prompts[default] if default else ""
        if prompt_name == NO_PROMPT:
            return ""
        prompts = self.spec.prompts
        if prompt_name not in prompts:
            allowed = ", ".join(sorted(prompts)) if prompts else "none (this model has no prompts)"
            raise ValidationError(
                f"{param} {prompt_name!r} is not a prompt of model {self.name}; allowed: {allowed}",
                param=param,
            )
        return prompts[prompt_name]

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        allowed = self.info.allowed_dimensions()
        if dimensions not in allowed:
            raise ValidationError(
                f"dimensions {dimensions} is not supported by model {self.name}; allowed: "
                f"{', '.join(map(str, allowed))}",
                param="dimensions",
            )

    def validate(self, req: EmbedRequest) -> None:
        """Checks that need no tokenization; raise before anything is queued."""
        n = req.size
        if n == 0:
            raise EmptyInputError(f"{req.input_param} is empty", param=req.input_param)
        texts = req.texts
        if texts is not None:
            if "" in texts:
                i = texts.index("")
                where = f"{req.input_param}[{i}]" if n > 1 else req.input_param
                raise EmptyInputError(f"{where} is an empty string", param=req.input_param)
            limit = self.settings.max_input_chars
            if max(map(len, texts)) > limit:
                i = next(i for i, t in enumerate(texts) if len(t) > limit)
                where = f"{req.input_param}[{i}]" if n > 1 else req.input_param
                raise ValidationError(
                    f"{where} has {len(texts[i])} characters, more than max_input_chars "
                    f"({limit}); split the text",
                    param=req.input_param,
                )
        elif req.prompt_name:
            raise ValidationError(
                "a prompt cannot be applied to token-id input; send text, or tokenize the "
                "prompt and the text together with /tokenize",
                param="prompt_name",
            )
        if n > self.settings.max_concurrent_inputs:
            raise PayloadTooLargeError(
                f"{req.input_param} has {n} inputs; this server admits at most "
                f"{self.settings.max_concurrent_inputs} at once (max_concurrent_inputs), so "
                "send them in several requests",
                param=req.input_param,
            )
        self.resolve_prompt(req.prompt_name)
        self.check_dimensions(req.dimensions)

    def tokenize_many(self, reqs: list[EmbedRequest]) -> list[list[list[int]] | EmbedsvcError]:
        """Token ids of each request (or the error that refuses it); the texts of all
        requests go through one `encode_batch` call, which runs in Rust without the GIL."""
        full: list[str] = []
        spans: list[tuple[int, int]] = []
        for req in reqs:
            start = len(full)
            if req.texts is not None:
                prefix = self.resolve_prompt(req.prompt_name)
                full.extend([prefix + t for t in req.texts] if prefix else req.texts)
            spans.append((start, len(full)))
        encoded = self.tokenizer.encode_full(full) if full else []
        out: list[list[list[int]] | EmbedsvcError] = []
        for req, (a, b) in zip(reqs, spans, strict=True):
            try:
                out.append(self._fit(req, encoded[a:b], full[a:b]))
            except EmbedsvcError as e:
                out.append(e)
        return out

    def _fit(self, req: EmbedRequest, ids: list[list[int]], full: list[str]) -> list[list[int]]:
        truncate = self.settings.auto_truncate if req.truncate is None else req.truncate
        direction = req.truncation_direction
        if req.texts is not None:
            ids = self.tokenizer.fit(
                ids,
                full,
                prefix=self.resolve_prompt(req.prompt_name),
                truncate=truncate,
                direction=direction,
                param=req.input_param,
            )
        else:
            assert req.token_ids is not None
            ids = self.tokenizer.check_ids(
                req.token_ids, truncate=truncate, direction=direction, param=req.input_param
            )
        total = sum(len(x) for x in ids)
        if total > self.settings.max_request_tokens:
            raise PayloadTooLargeError(
                f"{req.input_param} has {total} tokens in total, more than max_request_tokens "
                f"({self.settings.max_request_tokens}); send fewer inputs per request",
                param=req.input_param,
            )
        return ids
