"""Deterministic RAG-shaped texts: short queries and 100-300 token passages."""

from __future__ import annotations

import random

WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an have not "
    "which but they more one all their has were can been there its also other these than "
    "system model data retrieval search index vector query passage document embedding "
    "language network learning training evaluation benchmark latency throughput memory "
    "river mountain city history science music energy climate ocean forest protein cell "
    "market policy health school engine bridge planet signal theory method result analysis "
    "structure process function value range level period region population government "
    "research development production information environment community experience"
).split()


def query(rng: random.Random) -> str:
    n = rng.randint(5, 14)
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "?"


def passage(rng: random.Random, words: tuple[int, int] = (100, 290)) -> str:
    # Roughly one token per word for this vocabulary: 100-300 tokens by default.
    n = rng.randint(*words)
    words = [rng.choice(WORDS) for _ in range(n)]
    for i in range(12, n, 15):
        words[i] += "."
    return " ".join(words).capitalize() + "."


def rag_mix(
    n: int, seed: int = 0, query_share: float = 0.5, passage_words: tuple[int, int] = (100, 290)
) -> list[str]:
    """`n` texts, about `query_share` of them short queries, the rest passages."""
    rng = random.Random(seed)
    return [
        query(rng) if rng.random() < query_share else passage(rng, passage_words) for _ in range(n)
    ]


def queries(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [query(rng) for _ in range(n)]
