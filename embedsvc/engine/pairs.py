"""(query, document) pairs for rerankers, tokenized with the query once per request (and
an LLM reranker's, built from its prompt: `JudgeTemplate`).

A pair's ids are what the tokenizer gives for `encode((query, document))` with
"longest_first" truncation (as sentence-transformers' CrossEncoder cuts them), built here
from the query tokenized once and each document once, so a long query sent with thousands
of documents costs one tokenization, not one per document. Lengths are known before any
pair is built: the request's bounds are checked on them first.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

from embedsvc.engine.types import EmbedRequest, Pairs, Sequences
from embedsvc.errors import ConfigError, EmptyInputError, ValidationError
from embedsvc.registry import JudgePrompt


@dataclass(frozen=True)
class PairTemplate:
    """The special tokens of a pair: before the query, between, after the document."""

    before: list[int]
    between: list[int]
    after: list[int]

    @property
    def special(self) -> int:
        return len(self.before) + len(self.between) + len(self.after)

    @classmethod
    def of(cls, tok: Tokenizer) -> PairTemplate:
        """Read off the tokenizer's post-processor, from a probe pair."""
        a = tok.encode("a", add_special_tokens=False)
        b = tok.encode("b", add_special_tokens=False)
        probe = tok.post_process(a, b, add_special_tokens=True)
        parts: list[list[int]] = [[], [], []]
        part = 0
        for tid, special in zip(probe.ids, probe.special_tokens_mask, strict=True):
            if special:
                parts[part].append(tid)
            else:  # a's one token, then b's
                part = min(part + 1, 2)
        if parts[0] + a.ids + parts[1] + b.ids + parts[2] != probe.ids:
            raise ValueError("the tokenizer's pair template is not special tokens around A, B")
        return cls(*parts)


def cut_lengths(n_query: int, n_doc: int, budget: int) -> tuple[int, int]:
    """Tokens kept of each side under "longest_first" truncation to `budget` tokens (the
    model's length less the template's special tokens), exactly as the tokenizers library
    decides them (it removes from the longer side; past half the budget each, both)."""
    if n_query + n_doc <= budget:
        return n_query, n_doc
    n1, n2 = n_query, n_doc
    swap = n1 > n2
    if swap:
        n1, n2 = n2, n1
    n2 = n1 if n1 > budget else max(n1, budget - n1)
    if n1 + n2 > budget:
        n1 = budget // 2
        n2 = n1 + budget % 2
    return (n2, n1) if swap else (n1, n2)


def pair_ids(
    template: PairTemplate, query: list[int], docs: list[list[int]], limit: int
) -> list[list[int]]:
    """Each document's pair with the query, cut to `limit` tokens in all (right side)."""
    budget = max(limit - template.special, 0)
    out = []
    for doc in docs:
        nq, nd = cut_lengths(len(query), len(doc), budget)
        out.append(template.before + query[:nq] + template.between + doc[:nd] + template.after)
    return out


class JudgeTemplate:
    """An LLM reranker's pairs (registry.JudgePrompt), built as its model card builds
    them: the prefix's ids, then the pair text (instruction, query and document filled in)
    tokenized as the card's tokenizer call does (special tokens as the tokenizer adds them)
    and cut at its end to what the prefix and suffix leave of the model's length, then the
    suffix's ids. The query is in every pair text, so each pair is tokenized whole."""

    def __init__(self, tokenizer_json: str, prompt: JudgePrompt, max_length: int) -> None:
        self.prompt = prompt
        plain = Tokenizer.from_str(tokenizer_json)
        plain.no_padding()
        plain.no_truncation()
        self.prefix = plain.encode(prompt.prefix, add_special_tokens=False).ids
        self.suffix = plain.encode(prompt.suffix, add_special_tokens=False).ids
        self.special = len(self.prefix) + len(self.suffix)
        room = max_length - self.special
        if room < 8:
            raise ConfigError(
                f"an LLM reranker's prompt leaves {room} of its {max_length} tokens for the "
                "pair; raise its max_seq_length"
            )
        self._plain = plain
        self._cut = Tokenizer.from_str(tokenizer_json)
        self._cut.no_padding()
        self._cut.enable_truncation(room, strategy="longest_first")
        self._room = room

    def chars(self, instruction: str | None) -> int:
        """Characters each pair text adds to its query and document."""
        template = self.prompt.pair
        for key in ("{instruction}", "{query}", "{document}"):
            template = template.replace(key, "")
        return len(template) + len(self.instruction(instruction))

    def instruction(self, given: str | None) -> str:
        return self.prompt.instruction if given is None else given

    def texts(self, pairs: Pairs, instruction: str | None) -> list[str]:
        fill = {"instruction": self.instruction(instruction), "query": pairs.query}
        return [self.prompt.pair.format_map({**fill, "document": d}) for d in pairs.documents]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Each pair text's ids, whole (their lengths decide the request's bounds)."""
        return [e.ids for e in self._plain.encode_batch(texts)]

    def build(self, texts: list[str], bodies: list[list[int]]) -> list[list[int]]:
        """Each pair's ids, its text cut where it is longer than the room left."""
        over = [i for i, b in enumerate(bodies) if len(b) > self._room]
        if over:
            bodies = list(bodies)
            cut = self._cut.encode_batch([texts[i] for i in over])
            for i, e in zip(over, cut, strict=True):
                bodies[i] = e.ids
        return [self.prefix + b + self.suffix for b in bodies]


class SequenceTokens:
    """A classifier's inputs (`Sequences`): each text or text pair tokenized as its
    tokenizer takes one or two sequences (special tokens added, as transformers' pipeline
    tokenizes them), and one longer than the model takes cut: a pair "longest_first", a
    text from the request's side."""

    def __init__(self, tokenizer_json: str, max_length: int) -> None:
        self.max_length = max_length
        self._plain = Tokenizer.from_str(tokenizer_json)
        self._plain.no_padding()
        self._plain.no_truncation()
        self._cut: dict[str, Tokenizer] = {}
        for side in ("right", "left"):
            cut = Tokenizer.from_str(tokenizer_json)
            cut.no_padding()
            cut.enable_truncation(max_length, strategy="longest_first", direction=side)
            self._cut[side] = cut

    def encode(self, items: list[str | tuple[str, str]]) -> list[list[int]]:
        """Each item's ids, whole (their lengths decide the request's bounds)."""
        return [e.ids for e in self._plain.encode_batch(items)]

    def fit(
        self, req: EmbedRequest, inputs: Sequences, truncate: bool, model: str
    ) -> list[list[int]]:
        """Each item's ids; one over the model's length cut, or refused (truncate false)."""
        items, limit = inputs.items, self.max_length
        ids = self.encode(items)
        over = [i for i, x in enumerate(ids) if len(x) > limit]
        req.truncated = len(over)
        if not over:
            return ids
        if not truncate:
            i, param = over[0], req.input_param
            raise ValidationError(
                f"{param}[{i}] has {len(ids[i])} tokens (special tokens included), more than "
                f"model {model} takes ({limit}); shorten it, or set truncate: true",
                param=param,
            )
        ids = list(ids)
        cut = self._cut[req.truncation_direction].encode_batch([items[i] for i in over])
        for i, e in zip(over, cut, strict=True):
            ids[i] = e.ids
        return ids


def sequence_texts(inputs: Sequences, param: str) -> list[str]:
    """Each item's text (a pair's two joined), for the character bounds; an empty side of a
    pair is refused here (an empty text by the bounds)."""
    for i, x in enumerate(inputs.items):
        if isinstance(x, tuple) and not all(x):
            raise EmptyInputError(f"{param}[{i}] pairs an empty string", param=param)
    return [x if isinstance(x, str) else x[0] + x[1] for x in inputs.items]
