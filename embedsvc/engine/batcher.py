"""The queue of tokenized inputs and how the next forward pass is chosen from it.

Continuous batching, no wait timer: whenever the model is ready for more work, the next
batch is formed from whatever is queued. The batch always contains the oldest queued
input (nothing starves), and is filled with the inputs closest to it in length (less
padding), within `max_batch_tokens` padded tokens and `max_batch_size` inputs.

Which inputs are candidates (`policy`):
- "arrival" (default): only the oldest ones, about four batches' worth (4 x
  `max_batch_size` inputs or 4 x `max_batch_tokens` tokens, whichever is less). Under a
  backlog, requests then finish roughly in the order they came instead of all of them
  near the end of it. With two batches' worth, throughput under overload fell 6% (more
  padding); with four it matched "length" (bench/policies.py, docs/benchmarks.md).
- "length": everything queued; the least padding, but a backlog spreads each request
  over many batches.

A forward pass costs about `overhead + real tokens + padded positions x their cost` (in
token-equivalents; the worker measures `overhead` and `pad_cost` for its model at warm-up:
a padded position costs `fixed + per_width x width`, up to a real token). When they are
known, an input joins the batch only if it raises real tokens per unit of cost: where
padding costs as much as a token (most backends) and a pass's fixed cost is a handful of
tokens (a CPU), a short query does not ride along with a long passage and pay for its
padding; on a GPU, where the fixed cost is thousands of tokens, the batch takes everything
that fits, and so it does where padding is nearly free (the own BERT encoder on a CPU
skips padded positions in its dense layers).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedsvc.backends.base import PaddedBatch
from embedsvc.engine.types import PER_TOKEN, Want


@dataclass(eq=False, slots=True)
class Item:
    """One input of one request, tokenized."""

    job: Any  # engine.Job; kept loose so this module stays free of engine state
    index: int
    ids: list[int]
    seq: int = field(default=0)
    chunk: int = field(default=0)

    @property
    def length(self) -> int:
        return len(self.ids)


POLICIES = ("arrival", "length")


@dataclass(frozen=True)
class PadCost:
    """What a padded position costs, in tokens, in a batch `width` tokens wide: `fixed`
    (the dense layers, about 1 where every position is computed, about 0 where padded
    positions skip them) plus `per_width` x width (attention), never past a real token."""

    fixed: float = 1.0
    per_width: float = 0.0

    def at(self, width: int) -> float:
        return min(1.0, self.fixed + self.per_width * width)


class BatchQueue:
    def __init__(self, max_batch_tokens: int, max_batch_size: int, policy: str = "arrival") -> None:
        if policy not in POLICIES:
            raise ValueError(f"batch policy must be one of {POLICIES}, got {policy!r}")
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.policy = policy
        self.overhead_tokens: float | None = None  # set by the worker once measured
        self.pad_cost = PadCost()  # measured with overhead
        # Called with the queue's length after every change, under the queue's lock, so
        # the last value written is the length now (a gauge set from several threads
        # outside it could stick at a stale value).
        self.on_size: Callable[[int], None] = lambda n: None
        self._pending: list[Item] = []
        self.tokens = 0  # real tokens of the queued items
        self._cond = threading.Condition()
        self._closed = False
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, items: Iterable[Item]) -> None:
        """Queue items (thread-safe; called from the event loop)."""
        with self._cond:
            for it in items:
                it.seq = next(self._counter)
                self._pending.append(it)
                self.tokens += it.length
            self.on_size(len(self._pending))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, timeout: float | None = None) -> list[Item] | None:
        """Block until inputs are queued; return the next batch (None once closed)."""
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                if not self._cond.wait(timeout):
                    return []
            pool = self._pending
            if self.policy == "arrival":
                pool = oldest(pool, 4 * self.max_batch_size, 4 * self.max_batch_tokens)
            batch = select_batch(
                pool,
                self.max_batch_tokens,
                self.max_batch_size,
                self.overhead_tokens,
                self.pad_cost,
            )
            chosen = {id(it) for it in batch}
            self._pending = [it for it in self._pending if id(it) not in chosen]
            self.tokens -= sum(it.length for it in batch)
            self.on_size(len(self._pending))
            return batch


def oldest(pending: list[Item], max_items: int, max_tokens: int) -> list[Item]:
    """The first items of `pending` (arrival order), up to `max_items` items or until
    they hold `max_tokens` tokens (at least one)."""
    tokens = 0
    for n, it in enumerate(pending):
        tokens += it.length
        if n >= max_items or (tokens > max_tokens and n > 0):
            return pending[:n]
    return pending


def select_batch(
    pending: list[Item],
    max_tokens: int,
    max_size: int,
    overhead: float | None = None,
    pad_cost: PadCost = PadCost(),
) -> list[Item]:
    """Choose a batch: the oldest item plus its nearest neighbours in length.

    `pending` is in arrival order. A batch holds size x longest length positions (bounded
    by `max_tokens`); with `overhead` (a pass's fixed cost in tokens), a neighbour joins
    only while it raises real tokens / (overhead + real + padding x `pad_cost`).
    """
    if not pending:
        return []
    longest = max(it.length for it in pending)
    if overhead is None and len(pending) <= max_size and len(pending) * longest <= max_tokens:
        return list(pending)
    ordered = sorted(pending, key=lambda it: (it.length, it.seq))
    oldest = min(pending, key=lambda it: it.seq)
    pos = ordered.index(oldest)
    # On the compute thread, with the GIL, once per pass: plain lists and arithmetic.
    lengths = [it.length for it in ordered]
    seqs = [it.seq for it in ordered]
    last = len(ordered) - 1
    base = lengths[pos]
    fixed, per_width = pad_cost.fixed, pad_cost.per_width
    lo = hi = pos
    top = real = base

    def cost(n: int, top: int, real: int) -> float:
        """A pass over `n` inputs padded to `top` tokens, `real` of them real, in tokens
        (PadCost.at inlined)."""
        assert overhead is not None
        return overhead + real + min(1.0, fixed + per_width * top) * (n * top - real)

    sides: tuple[int, ...]
    while hi - lo + 1 < max_size:
        n = hi - lo + 1
        # Prefer the neighbour that adds the least padding; ties go to the older one.
        if lo > 0 and hi < last:
            left = (base - lengths[lo - 1], seqs[lo - 1])
            right = (lengths[hi + 1] - base, seqs[hi + 1])
            sides = (lo - 1, hi + 1) if left < right else (hi + 1, lo - 1)
        elif lo > 0:
            sides = (lo - 1,)
        elif hi < last:
            sides = (hi + 1,)
        else:
            break
        for j in sides:
            length = lengths[j]
            new_top = top if top >= length else length
            if (n + 1) * new_top > max_tokens:
                continue
            if overhead is not None and (real + length) * cost(n, top, real) < real * cost(
                n + 1, new_top, real + length
            ):
                continue  # it would lower real tokens per unit of cost
            if j < lo:
                lo = j
            else:
                hi = j
            top, real = new_top, real + length
            break
        else:
            break
    return ordered[lo : hi + 1]


def pad(items: list[Item], pad_id: int) -> PaddedBatch:
    """Right-pad the items' ids into int64 arrays."""
    lengths = np.fromiter((len(it.ids) for it in items), dtype=np.int64, count=len(items))
    width = int(lengths.max())
    real = np.arange(width) < lengths[:, None]
    ids = np.full((len(items), width), pad_id, dtype=np.int64)
    # Row-major order of the real positions is the ids one after the other.
    ids[real] = np.fromiter(
        itertools.chain.from_iterable(it.ids for it in items),
        dtype=np.int64,
        count=int(lengths.sum()),
    )
    # Token vectors (or states) are computed for a pass only when one of its jobs asks.
    vectors = states = unattended = False
    mask = real.astype(np.int64)
    for row, it in enumerate(items):
        want = Want.DENSE if it.job is None else it.job.want
        if want is Want.DENSE or not want & PER_TOKEN:
            continue
        if want & Want.TOKEN_STATES:
            states = True
        if want & Want.TOKEN_VECTORS:
            vectors = True
            attended = it.job.attended
            if attended is not None:  # a ColBERT query's expansion: not attended to
                mask[row, attended[it.index] :] = 0
                unattended = True
    return PaddedBatch(ids, mask, vectors, states, unattended)
