"""An exact-match cache of finished dense vectors, per model, in each front end's memory.

RAG traffic repeats itself: the same user query, the same passage re-embedded by a
re-index. A request whose every input was answered before gets its vectors from here, on
the event loop, with no tokenizing and no forward pass; any other request runs as usual
and its vectors are kept for next time (a request with some inputs cached is not split:
the decision keeps one path for a request's rows, and the repeats that matter, single
queries, are whole).

The key is everything that changes a vector: the text as the tokenizer is handed it
(prompt or instruction included), whether, where (`max_tokens`) and from which side it
is cut, `dimensions` and `normalize`; the cache belongs to one loaded model (its name,
revision and the precision that serves it: `namespace`) and lives in memory, so a new
model or revision, loaded by a restart, never answers from an old one's cache. Only
plain text asking for the pooled vector is cached (not token ids, pairs, per-token
outputs, or the in-context queries of an icl model), and a request with an input cut to
the model's limit is not kept (its answer says so in a header that a cached answer could
not repeat exactly). Bounded in bytes (`--cache-bytes`, 0 = off): least recently used
entries go first.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from embedsvc.engine.types import EmbedRequest, EmbedResult, Texts, Want
from embedsvc.metrics import ModelMetrics

Key = tuple[str, bool, str, int | None, int | None, bool]
# What an entry costs besides its vector and text: the tuple, the dict slot, the array
# header (measured with sys.getsizeof on CPython 3.11; a bound, not an exact figure).
ENTRY_OVERHEAD = 360


@dataclass(slots=True, frozen=True)
class Entry:
    vector: np.ndarray  # float32 [d], as answered (normalized, Matryoshka size)
    tokens: int  # tokens embedded for it


class VectorCache:
    def __init__(self, namespace: str, max_bytes: int, metrics: ModelMetrics) -> None:
        self.namespace = namespace  # model name, revision, precision (/info)
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._m = metrics

    def keys(self, req: EmbedRequest, prefix: str, truncate: bool) -> list[Key] | None:
        """Each input's key, or None for a request this cache does not hold."""
        inputs = req.inputs
        if not isinstance(inputs, Texts) or req.want is not Want.DENSE or req.examples:
            return None
        direction, dims, normalize = req.truncation_direction, req.dimensions, req.normalize
        cut = req.max_tokens
        return [(prefix + t, truncate, direction, cut, dims, normalize) for t in inputs.texts]

    def lookup(self, keys: list[Key]) -> EmbedResult | None:
        """The answer when every input is cached (each counted a hit), else None (each
        counted a miss)."""
        entries = self._entries
        found = []
        for key in keys:
            entry = entries.get(key)
            if entry is None:
                self._m.cache_misses.inc(len(keys))
                return None
            found.append(entry)
        for key in keys:
            entries.move_to_end(key)
        self._m.cache_hits.inc(len(keys))
        vectors = np.stack([e.vector for e in found])
        counts = [e.tokens for e in found]
        return EmbedResult(vectors, sum(counts), 0.0, 0.0, 0.0, 0.0, counts)

    def store(self, keys: list[Key], result: EmbedResult) -> None:
        """Keep a finished request's vectors (none of a request with a cut input)."""
        if result.truncated:
            return
        for i, key in enumerate(keys):
            if key in self._entries:
                self._entries.move_to_end(key)
                continue
            vector = np.array(result.vectors[i], dtype=np.float32)
            entry = Entry(vector, result.input_tokens[i])
            size = _size(key, vector)
            if size > self.max_bytes:
                continue
            self._entries[key] = entry
            self.bytes += size
        self._evict()

    def _evict(self) -> None:
        evicted = 0
        while self.bytes > self.max_bytes and self._entries:
            key, entry = self._entries.popitem(last=False)
            self.bytes -= _size(key, entry.vector)
            evicted += 1
        if evicted:
            self._m.cache_evictions.inc(evicted)
        self._m.cache_bytes.set(self.bytes)


def _size(key: Key, vector: np.ndarray) -> int:
    return sys.getsizeof(key[0]) + vector.nbytes + ENTRY_OVERHEAD
