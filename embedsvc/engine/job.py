"""Bookkeeping of one admitted request inside the engine core: where its rows go, which
chunks are queued, and when it is complete."""

from __future__ import annotations

import math
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from embedsvc.engine.batcher import Item
from embedsvc.engine.postprocess import Outputs, Row
from embedsvc.engine.sparse import SparseRow
from embedsvc.engine.types import PER_TOKEN, CoreJob, JobDone, Want


@dataclass(eq=False, slots=True)
class Job:
    origin: Hashable  # which front end sent it (results go back there)
    key: int
    size: int
    tokens: int
    dimensions: int | None
    normalize: bool
    layer_norm: bool
    want: Want = Want.DENSE  # the outputs asked of each input (CoreJob.want)
    vectors: np.ndarray | None = None  # DENSE: allocated when the first row is finalized
    remaining: int = 0
    # Large requests enter the queue chunk by chunk: at most two chunks are queued at a
    # time and the next follows when one completes, so other requests' inputs get in
    # between and one big client batch cannot hold the model for its whole duration.
    chunk_remaining: list[int] = field(default_factory=list)
    waiting_chunks: list[list[Item]] = field(default_factory=list)
    cancelled: bool = False
    enqueued: float = 0.0
    deadline: float = math.inf  # perf_counter time past which it is dropped
    first_start: float = 0.0
    last_end: float = 0.0
    sparse_rows: list[SparseRow] | None = None  # SPARSE: each input's non-zero entries
    token_rows: list[np.ndarray] | None = None  # TOKEN_VECTORS / TOKEN_STATES: [tokens, d]
    attended: list[int] | None = None  # ColBERT queries: positions attended per input
    skip_tokens: bool = False  # the model's skiplist tokens get no vector
    sparse_entries: int = 0  # non-zero entries of the sparse rows stored so far

    @classmethod
    def admit(cls, origin: Hashable, cj: CoreJob, chunk_size: int) -> tuple[Job, list[Item]]:
        """A job for `cj` and the items to queue now."""
        n = len(cj.ids)
        now = time.perf_counter()
        deadline = now + cj.max_wait if cj.max_wait > 0 else math.inf
        # Positional: the field order above (keywords took twice as long per request).
        job = cls(
            origin,
            cj.key,
            n,
            cj.tokens,
            cj.dimensions,
            cj.normalize,
            cj.layer_norm,
            cj.want,
            None,
            n,
            [n],
            [],
            False,
            now,
            deadline,
        )
        if cj.want is not Want.DENSE:
            if cj.want & Want.SPARSE:
                job.sparse_rows = []
            if cj.want & PER_TOKEN:
                job.token_rows = [np.empty((0, 0), np.float32)] * n
                job.attended = cj.attended
                job.skip_tokens = cj.skip_tokens
        if n == 1:
            return job, [Item(job, 0, cj.ids[0])]
        if n <= chunk_size:
            return job, [Item(job, i, ids) for i, ids in enumerate(cj.ids)]
        chunks = [
            [Item(job, i, cj.ids[i], chunk=k) for i in range(start, min(start + chunk_size, n))]
            for k, start in enumerate(range(0, n, chunk_size))
        ]
        job.chunk_remaining = [len(c) for c in chunks]
        job.waiting_chunks = chunks[2:]
        return job, [it for c in chunks[:2] for it in c]

    def store(self, item: Item, row: Row, start: float, end: float) -> list[Item]:
        """Keep one finalized row; return the next chunk's items if one is due."""
        if isinstance(row, Outputs):
            self._store_outputs(item, row)
        elif self.token_rows is not None:
            assert isinstance(row, np.ndarray)
            self.token_rows[item.index] = row
        elif self.sparse_rows is not None:
            assert isinstance(row, tuple)
            if not self.sparse_rows:
                empty = (np.empty(0, np.int32), np.empty(0, np.float32))
                self.sparse_rows = [empty] * self.size
            self.sparse_rows[item.index] = row
            self.sparse_entries += len(row[0])
        elif self.size == 1:
            assert isinstance(row, np.ndarray)
            self.vectors = row[None]  # a view of the pass's finalized rows, not a copy
        else:
            assert isinstance(row, np.ndarray)
            if self.vectors is None:
                self.vectors = np.empty((self.size, row.shape[0]), dtype=np.float32)
            self.vectors[item.index] = row
        if not self.first_start:
            self.first_start = start
        self.last_end = end
        self.remaining -= 1
        self.chunk_remaining[item.chunk] -= 1
        if self.chunk_remaining[item.chunk] == 0 and self.waiting_chunks:
            return self.waiting_chunks.pop(0)
        return []

    def _store_outputs(self, item: Item, row: Outputs) -> None:
        if row.dense is not None:
            if self.vectors is None:
                self.vectors = np.empty((self.size, row.dense.shape[0]), dtype=np.float32)
            self.vectors[item.index] = row.dense
        if row.sparse is not None:
            assert self.sparse_rows is not None
            if not self.sparse_rows:
                empty = (np.empty(0, np.int32), np.empty(0, np.float32))
                self.sparse_rows = [empty] * self.size
            self.sparse_rows[item.index] = row.sparse
            self.sparse_entries += len(row.sparse[0])
        if row.tokens is not None:
            assert self.token_rows is not None
            self.token_rows[item.index] = row.tokens

    @property
    def waiting_tokens(self) -> int:
        """Tokens of the chunks not queued yet."""
        return sum(it.length for chunk in self.waiting_chunks for it in chunk)

    def done(self) -> JobDone:
        if not self.want & Want.DENSE:
            vectors = np.empty((self.size, 0), dtype=np.float32)
        else:
            assert self.vectors is not None
            vectors = self.vectors
        return JobDone(
            key=self.key,
            vectors=vectors,
            queue_time=max(self.first_start - self.enqueued, 0.0),
            inference_time=max(self.last_end - self.first_start, 0.0),
            sparse=self.sparse_rows,
            tokens=self.token_rows,
        )
