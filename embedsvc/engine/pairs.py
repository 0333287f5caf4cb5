"""(query, document) pairs for rerankers, tokenized with the query once per request.

A pair's ids are what the tokenizer gives for `encode((query, document))` with
"longest_first" truncation (as sentence-transformers' CrossEncoder cuts them), built here
from the query tokenized once and each document once, so a long query sent with thousands
of documents costs one tokenization, not one per document. Lengths are known before any
pair is built: the request's bounds are checked on them first.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer


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
