"""Request preparation in the front end: validation, prompts, Matryoshka dimensions and
tokenization of many requests in one tokenizer call.

One class of somewhat over 450 lines, kept whole: each check reads the same request
against the same model and settings, and the bounds before tokenizing (characters,
inputs) and after (tokens, answer sizes) are best read side by side, for every kind of
input (texts, token ids, rerank pairs, a classifier's texts and pairs). The tokenizer's own
work is elsewhere: tokenize.py (truncation, token ids), icl.py (bge-en-icl queries),
pairs.py (rerank pairs, LLM rerankers' prompts, a classifier's sequences)."""

from __future__ import annotations

from tokenizers import Tokenizer

from embedsvc.engine.icl import SUFFIX, IclQueries, examples_prefix
from embedsvc.engine.pairs import (
    JudgeTemplate,
    PairTemplate,
    SequenceTokens,
    pair_ids,
    sequence_texts,
)
from embedsvc.engine.tokenize import TextTokenizer
from embedsvc.engine.types import NO_PROMPT, EmbedRequest, ModelInfo, Pairs, Sequences, Texts, Want
from embedsvc.engine.wants import check_want
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
        # Pairs (task rerank) are cut as CrossEncoder cuts them ("longest_first"), from the
        # query tokenized once (engine/pairs.py); a tokenizer whose pair template is not
        # special tokens around the two texts tokenizes each pair whole instead.
        self._plain = tok
        # A ColBERT model (task multivector): its markers, per-side lengths and expansion.
        self._colbert = info.colbert
        # Queries with in-context examples (bge-en-icl): built before tokenizing (icl.py).
        self._icl = (
            IclQueries.of(tok, info.path, self.spec.query_max_tokens) if self.spec.icl else None
        )
        judge, limit = self.spec.judge, info.max_seq_length  # an LLM reranker's prompt
        self._judge = JudgeTemplate(info.tokenizer_json, judge, limit) if judge else None
        classify = self.spec.task == "classify"  # a classifier's texts and text pairs
        self._sequences = SequenceTokens(info.tokenizer_json, limit) if classify else None
        self._template: PairTemplate | None
        try:
            self._template = PairTemplate.of(tok)
        except ValueError:
            self._template = None
            self._pairs_cut = Tokenizer.from_str(info.tokenizer_json)
            self._pairs_cut.no_padding()
            self._pairs_cut.enable_truncation(info.max_seq_length, strategy="longest_first")

    def resolve_prompt(self, prompt_name: str | None, param: str = "prompt_name") -> str:
        """The prefix for `prompt_name`: None means the model's default prompt (if it
        has one), NO_PROMPT ("") none at all. A ColBERT model's are its markers: `query`,
        or `document` (also when none is named, as sentence-transformers encodes)."""
        colbert = self._colbert
        if colbert is not None:
            if prompt_name not in (None, "query", "document"):
                raise ValidationError(
                    f"{param} {prompt_name!r} is not a side of ColBERT model {self.name}; "
                    "allowed: query, document",
                    param=param,
                )
            return colbert.query_prefix if prompt_name == "query" else colbert.document_prefix
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

    def prefix(self, req: EmbedRequest) -> str:
        """What goes before each of the request's texts: its instruction through the
        model's template, or its prompt."""
        if req.instruction is not None:
            template = self.spec.instruction_template or "{instruction}"
            return template.replace("{instruction}", req.instruction)
        return self.resolve_prompt(req.prompt_name)

    def _check_instruction(self, req: EmbedRequest) -> None:
        instruction = req.instruction
        if instruction is None:
            return
        if self.spec.instruction_template is None and self._judge is None:
            raise ValidationError(
                f"model {self.name} takes no task instruction (an embedding model needs an "
                "instruction_template, a reranker must be an LLM reranker); leave it out, or "
                "use a model that takes one",
                param="instruction",
            )
        if req.prompt_name is not None:
            raise ValidationError(
                "give either instruction or a prompt (prompt_name, input_type), not both: the "
                "instruction takes the query prompt's place",
                param="instruction",
            )
        if not instruction:
            raise EmptyInputError("instruction is an empty string", param="instruction")
        if len(instruction) > self.settings.max_input_chars:
            raise ValidationError(
                f"instruction has {len(instruction)} characters, more than max_input_chars "
                f"({self.settings.max_input_chars})",
                param="instruction",
            )

    def _check_examples(self, req: EmbedRequest) -> None:
        examples = req.examples
        if examples is None:
            return
        if not self.spec.icl:
            raise ValidationError(
                f"model {self.name} takes no in-context examples (only models with icl: "
                "true, such as bge-en-icl)",
                param="examples",
            )
        if not isinstance(req.inputs, Texts) or not self.prefix(req):
            raise ValidationError(
                "examples go with queries: send them with an instruction, a prompt_name or "
                "input_type query (documents take none)",
                param="examples",
            )
        chars = sum(len(part) for example in examples for part in example)
        if chars > self.settings.max_input_chars:
            raise ValidationError(
                f"examples have {chars} characters in all, more than max_input_chars "
                f"({self.settings.max_input_chars})",
                param="examples",
            )

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
        check_want(self.info, req)
        n = req.size
        if n == 0:
            raise EmptyInputError(f"{req.input_param} is empty", param=req.input_param)
        inputs = req.inputs
        if isinstance(inputs, Pairs):  # one query with many documents (the rerank routes)
            self._check_texts([inputs.query], "query")
            self._check_texts(inputs.documents, req.input_param)
        elif isinstance(inputs, Texts):
            self._check_texts(inputs.texts, req.input_param)
        elif isinstance(inputs, Sequences):
            self._check_texts(sequence_texts(inputs, req.input_param), req.input_param)
        elif self._colbert is not None:
            raise ValidationError(
                f"model {self.name} is a ColBERT model: it takes text, to which it adds its "
                "query or document marker (and expands queries); send text, not token ids",
                param=req.input_param,
            )
        elif req.prompt_name or req.instruction is not None:
            what = "an instruction" if req.instruction is not None else "a prompt"
            raise ValidationError(
                f"{what} cannot be applied to token-id input; send text, or tokenize the "
                "prompt and the text together with /tokenize",
                param="instruction" if req.instruction is not None else "prompt_name",
            )
        self._check_count(n, req.input_param)
        self._check_instruction(req)
        self._check_examples(req)
        self._check_chars(req)
        self.check_dimensions(req.dimensions)

    def _check_chars(self, req: EmbedRequest) -> None:
        """What the tokenizer would be handed, from character counts: a prompt, an
        instruction or in-context examples go before every text, so they multiply by the
        inputs; bounded here, before any of it is built or tokenized."""
        inputs = req.inputs
        examples = 0
        if isinstance(inputs, Texts):
            n, own = len(inputs.texts), sum(map(len, inputs.texts))
            each = len(self.prefix(req))
            if self._icl is not None and each:
                chosen = self.spec.examples if req.examples is None else req.examples
                examples = len(examples_prefix(chosen)) + len(SUFFIX)
            chars = own + n * (each + examples)
        elif isinstance(inputs, Pairs):  # the query is tokenized once (_pair_ids), but
            docs = inputs.documents  # into each pair where the tokenizer builds them whole
            judge = self._judge  # and an LLM reranker's prompt and instruction into each
            copies = 1 if self._template is not None and judge is None else len(docs)
            each = len(inputs.query) + (judge.chars(req.instruction) if judge else 0)
            chars = each * copies + sum(map(len, docs))
        elif isinstance(inputs, Sequences):
            chars = sum(map(len, sequence_texts(inputs, req.input_param)))
        else:
            return
        req.chars = chars
        limit = self.settings.max_request_chars
        if chars <= limit:
            return
        param = req.input_param
        if isinstance(inputs, Pairs):
            what = "each document with the query"
        elif isinstance(inputs, Sequences):
            what = "the texts, a pair's two together"
        else:
            kind = "instruction" if req.instruction is not None else "prompt"
            what = f"each input with its {kind} ({each} characters)"
            if req.instruction is not None:
                param = "instruction"
            if examples:
                what += f" and the in-context examples ({examples} characters)"
                if req.examples is not None:
                    param = "examples"
        raise PayloadTooLargeError(
            f"{req.input_param} comes to {chars} characters to tokenize ({what}), more than "
            f"max_request_chars ({limit}); send fewer inputs per request, or shorter ones",
            param=param,
        )

    def check_inputs(self, texts: list[str], param: str) -> None:
        """The bounds of a request's texts that need no tokenizing (/tokenize's too)."""
        self._check_texts(texts, param)
        self._check_count(len(texts), param)

    def _check_count(self, n: int, param: str) -> None:
        if n > self.settings.max_concurrent_inputs:
            raise PayloadTooLargeError(
                f"{param} has {n} inputs; this server admits at most "
                f"{self.settings.max_concurrent_inputs} at once (max_concurrent_inputs), so "
                "send them in several requests",
                param=param,
            )

    def _check_texts(self, texts: list[str], param: str) -> None:
        n = len(texts)
        if "" in texts:
            i = texts.index("")
            where = f"{param}[{i}]" if n > 1 else param
            raise EmptyInputError(f"{where} is an empty string", param=param)
        limit = self.settings.max_input_chars
        if max(map(len, texts)) > limit:
            i = next(i for i, t in enumerate(texts) if len(t) > limit)
            where = f"{param}[{i}]" if n > 1 else param
            raise ValidationError(
                f"{where} has {len(texts[i])} characters, more than max_input_chars "
                f"({limit}); split the text",
                param=param,
            )

    def _pair_ids(self, req: EmbedRequest, pairs: Pairs) -> list[list[int]]:
        """Each pair's ids. The query and each document are tokenized once, and the
        request's bounds checked on the pairs' lengths before any pair is built."""
        truncate = self.settings.auto_truncate if req.truncate is None else req.truncate
        limit = self.info.max_seq_length
        tok, judge = self._plain, self._judge
        if judge is not None:
            texts = judge.texts(pairs, req.instruction)
            bodies = judge.encode(texts)
            lengths = [len(b) + judge.special for b in bodies]
        else:
            query = tok.encode(pairs.query, add_special_tokens=False).ids
            docs = [e.ids for e in tok.encode_batch(pairs.documents, add_special_tokens=False)]
            special = (
                self._template.special
                if self._template is not None
                else tok.num_special_tokens_to_add(is_pair=True)
            )
            lengths = [len(query) + len(d) + special for d in docs]
        if not truncate and max(lengths) > limit:
            i = next(i for i, n in enumerate(lengths) if n > limit)
            raise ValidationError(
                f"{req.input_param}[{i}] with the query has {lengths[i]} tokens, more than "
                f"model {self.name} takes ({limit}); shorten it, or set truncate: true",
                param=req.input_param,
            )
        self._check_total(sum(min(n, limit) for n in lengths), req.input_param)
        req.truncated = sum(n > limit for n in lengths)
        if judge is not None:
            return judge.build(texts, bodies)
        if self._template is not None:
            return pair_ids(self._template, query, docs, limit)
        both = [(pairs.query, d) for d in pairs.documents]
        return [e.ids for e in self._pairs_cut.encode_batch(both)]

    def _check_total(self, total: int, param: str) -> None:
        if total > self.settings.max_request_tokens:
            raise PayloadTooLargeError(
                f"{param} has {total} tokens in total, more than max_request_tokens "
                f"({self.settings.max_request_tokens}); send fewer inputs per request",
                param=param,
            )

    def tokenize_many(self, reqs: list[EmbedRequest]) -> list[list[list[int]] | EmbedsvcError]:
        """Token ids of each request (or the error that refuses it); the texts of all
        requests go through one `encode_batch` call, which runs in Rust without the GIL."""
        full: list[str] = []
        spans: list[tuple[int, int]] = []
        built: dict[int, EmbedsvcError | None] = {}  # icl queries: whole texts, or the error
        for k, req in enumerate(reqs):
            start = len(full)
            inputs = req.inputs
            if isinstance(inputs, Texts):
                prefix = self.prefix(req)
                texts = [prefix + t for t in inputs.texts] if prefix else inputs.texts
                if self._icl is not None and prefix:
                    try:
                        texts = self._icl_queries(req, texts)
                        built[k] = None
                    except EmbedsvcError as e:
                        built[k], texts = e, []
                full.extend(texts)
            spans.append((start, len(full)))
        encoded = self.tokenizer.encode_full(full) if full else []
        out: list[list[list[int]] | EmbedsvcError] = []
        for k, (req, (a, b)) in enumerate(zip(reqs, spans, strict=True)):
            error = built.get(k)
            if error is not None:
                out.append(error)
                continue
            try:
                out.append(self._fit(req, encoded[a:b], full[a:b], whole=k in built))
            except EmbedsvcError as e:
                out.append(e)
        return out

    def is_query(self, req: EmbedRequest) -> bool:
        """A ColBERT request encodes queries (else documents)."""
        return req.prompt_name == "query"

    def colbert_ids(
        self, req: EmbedRequest, ids: list[list[int]]
    ) -> tuple[list[list[int]], list[int] | None, bool]:
        """A ColBERT request's ids as its model takes them: a query shorter than the
        expansion length filled with the expansion token up to it; the positions attended
        per input (None: all); whether the skiplist applies to its side."""
        colbert = self._colbert
        assert colbert is not None
        query = self.is_query(req)
        skip = colbert.skip_query if query else colbert.skip_document
        width = colbert.expansion
        if not query or not width:
            return ids, None, skip
        attended = [len(x) for x in ids]
        fill = colbert.expansion_id
        ids = [x + [fill] * (width - len(x)) if len(x) < width else x for x in ids]
        return ids, None if colbert.attend_expansion else attended, skip

    def _icl_queries(self, req: EmbedRequest, texts: list[str]) -> list[str]:
        assert self._icl is not None
        truncate = self.settings.auto_truncate if req.truncate is None else req.truncate
        examples = self.spec.examples if req.examples is None else req.examples
        return self._icl.build(
            texts,
            examples,
            truncate=truncate,
            direction=req.truncation_direction,
            param=req.input_param,
        )

    def _fit(
        self, req: EmbedRequest, ids: list[list[int]], full: list[str], whole: bool = False
    ) -> list[list[int]]:
        """`whole`: the texts are complete (icl queries): no prompt to keep in truncation."""
        truncate = self.settings.auto_truncate if req.truncate is None else req.truncate
        direction = req.truncation_direction
        inputs = req.inputs
        if isinstance(inputs, Pairs):
            ids = self._pair_ids(req, inputs)
        elif isinstance(inputs, Sequences):
            assert self._sequences is not None  # check_want: they go to classifiers only
            ids = self._sequences.fit(req, inputs, truncate, self.name)
        elif whole:
            if req.max_tokens is not None:
                raise ValidationError(
                    f"model {self.name} builds each query with in-context examples and cuts "
                    "them by its own rule; max_tokens does not apply to it, leave it out",
                    param="max_tokens",
                )
            self._check_icl_lengths(req, ids)
        elif isinstance(inputs, Texts):
            colbert = self._colbert
            limit = colbert.length(self.is_query(req)) if colbert else self.tokenizer.max_length
            if req.max_tokens is not None:
                limit = min(limit, req.max_tokens)
            req.truncated = sum(len(x) > limit for x in ids)
            ids = self.tokenizer.fit(
                ids,
                full,
                prefix="" if whole else self.prefix(req),
                truncate=truncate,
                direction=direction,
                param=req.input_param,
                limit=limit,
            )
        else:
            req.truncated = sum(len(x) > self.tokenizer.max_length for x in inputs.ids)
            ids = self.tokenizer.check_ids(
                inputs.ids, truncate=truncate, direction=direction, param=req.input_param
            )
        self._check_total(sum(len(x) for x in ids), req.input_param)
        if req.want & Want.TOKEN_STATES:
            values = sum(len(x) for x in ids) * self.info.states_dimension
            self._check_values(values, req.input_param, "hidden state")
        elif req.want & Want.TOKEN_VECTORS:
            # BGE-M3: a vector per token after the first; ColBERT: per token, and a query at
            # least its expansion length (the skiplist only lowers this).
            colbert = self._colbert
            if colbert is None:
                tokens = sum(len(x) - 1 for x in ids)
            else:
                floor = colbert.expansion if self.is_query(req) else 0
                tokens = sum(max(len(x), floor) for x in ids)
            self._check_values(tokens * self.info.dimension, req.input_param, "vector")
        return ids

    def _check_icl_lengths(self, req: EmbedRequest, ids: list[list[int]]) -> None:
        """A query with in-context examples is never cut: its query part is already within
        query_max_tokens (icl.py), and FlagICLModel widens its limit by the examples, so a
        cut could only drop the query (and with it what tells the vectors apart). Longer
        than the model's max_seq_length, the examples are refused instead."""
        limit = self.info.max_seq_length
        longest = max(range(len(ids)), key=lambda i: len(ids[i]))
        if len(ids[longest]) <= limit:
            return
        where = f"{req.input_param}[{longest}]" if len(ids) > 1 else req.input_param
        whose = "the request's examples" if req.examples is not None else "the model's examples"
        raise ValidationError(
            f"{where} with {whose} has {len(ids[longest])} tokens, more than model "
            f"{self.name} takes ({limit}, its max_seq_length); the query alone is cut to "
            f"{self.spec.query_max_tokens} tokens, so send fewer or shorter examples",
            param="examples",
        )

    def _check_values(self, values: int, param: str, what: str) -> None:
        """A per-token answer's size, before any work: 413 past max_multivector_values."""
        limit = self.settings.max_multivector_values
        if values > limit:
            width = self.info.states_dimension if what == "hidden state" else self.info.dimension
            raise PayloadTooLargeError(
                f"{param} would be answered with {values} numbers (a {what} of {width} per "
                f"token), more than max_multivector_values ({limit}); send fewer or shorter "
                "inputs per request",
                param=param,
            )
