"""Forward passes of small shapes as CUDA graphs: one launch instead of one per kernel.

A BERT-family encoder launches about a dozen kernels per layer; on a GPU a pass over a
batch of short queries finishes its arithmetic in far less time than the CPU takes to
launch them (bge-small, 12 layers: about 4.4 ms per pass of one query on an H200 host,
with the GPU 4-5% busy under load; launching is the likely reading, not a profile). A
CUDA graph records the launches of one input shape once and replays them with a single
call, so such a pass costs the CPU a few copies and one replay. Each shape needs its own
graph, so batches are padded up to a bucket: rows to a power of two, positions to a power
of two from 16 (extra rows are single-token filler, extra positions are masked out, so
real rows come out as without padding). Only buckets up to `max_tokens` padded positions
use graphs: larger passes are bound by the arithmetic, where launches do not matter and
padding would.

A bucket's graph is captured the first time a batch of that bucket comes, from the eager
module (no TorchScript under capture), and is kept only if it reproduces the module's
output for a batch of a smaller shape in the same bucket (padding included); otherwise
that bucket runs as before. A capture that raises turns graphs off for the model. All
graphs share one memory pool: passes run one at a time on one thread, and each pass's
output is copied to the host before the next replay, so no graph's live tensors are
another's scratch space.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedsvc.backends.base import PaddedBatch

log = logging.getLogger(__name__)

MIN_POSITIONS = 16
DEFAULT_MAX_TOKENS = 4096


def bucket(n: int, floor: int = 1) -> int:
    """The smallest power of two >= n (and >= floor)."""
    b = floor
    while b < n:
        b *= 2
    return b


def fill(host: np.ndarray, batch: PaddedBatch, pad_id: int) -> None:
    """Write `batch` into `host` ([2, rows, positions] int64: ids, mask), padded to its
    shape: extra positions are pad tokens masked out, extra rows one unmasked pad token
    (a row with no position to attend to would fill the pass with NaN)."""
    b, s = batch.shape
    ids, mask = host[0], host[1]
    ids[:b, :s] = batch.input_ids
    ids[:b, s:] = pad_id
    ids[b:] = pad_id
    mask[:b, :s] = batch.attention_mask
    mask[:b, s:] = 0
    mask[b:] = 0
    mask[b:, 0] = 1


@dataclass
class _Graph:
    host: Any  # [2, rows, positions] int64 (pinned on CUDA)
    host_np: np.ndarray  # numpy view of `host`
    device: Any  # `host` on the device: the graph's input
    out: Any  # the graph's output, [rows, dim] float32 on the device
    graph: Any  # torch.cuda.CUDAGraph, or None: run the module on the padded input


class BucketGraphs:
    """Runs `module` ((input_ids, attention_mask) -> float32 vectors) on batches padded to
    buckets, as CUDA graphs on a CUDA device (`capture`); without `capture` (CPU) it pads
    and runs the module, which is what the tests check the padding with."""

    def __init__(
        self,
        module: Any,
        device: str,
        pad_id: int,
        max_len: int,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        capture: bool = True,
    ) -> None:
        self.module = module
        self.device = device
        self.pad_id = pad_id
        self.max_len = max_len
        self.max_tokens = max_tokens
        self.capture = capture
        self.enabled = True
        self._graphs: dict[tuple[int, int], _Graph | None] = {}
        self._pool: Any = None

    def shape_for(self, rows: int, positions: int) -> tuple[int, int] | None:
        """The bucket of a batch, or None when it is too large for a graph."""
        shape = (bucket(rows), min(bucket(positions, MIN_POSITIONS), self.max_len))
        if positions > shape[1] or shape[0] * shape[1] > self.max_tokens:
            return None
        return shape

    def forward(self, batch: PaddedBatch) -> np.ndarray | None:
        """Vectors of `batch`'s rows, or None when it has no graph (run it otherwise)."""
        if not self.enabled:
            return None
        shape = self.shape_for(*batch.shape)
        if shape is None:
            return None
        if shape not in self._graphs:
            self._graphs[shape] = self._build(shape)
        g = self._graphs.get(shape)
        if g is None:
            return None
        return self._run(g, batch)

    def _run(self, g: _Graph, batch: PaddedBatch) -> np.ndarray:
        import torch

        fill(g.host_np, batch, self.pad_id)
        rows = batch.shape[0]
        with torch.inference_mode():
            if g.graph is None:
                out = self.module(g.device[0], g.device[1])
            else:
                # Three calls into torch per pass: the input copy, the replay and the copy
                # back (which waits for the pass). The host buffer is rewritten only by
                # the next pass, after this one's copy back has waited for the stream.
                g.device.copy_(g.host, non_blocking=True)
                g.graph.replay()
                out = g.out
            return out.cpu().numpy()[:rows]

    def _build(self, shape: tuple[int, int]) -> _Graph | None:
        import torch

        rows, positions = shape
        pinned = self.capture and self.device.startswith("cuda")
        host = torch.empty((2, rows, positions), dtype=torch.int64, pin_memory=pinned)
        host_np = host.numpy()
        one = np.ones((1, 1), np.int64)
        fill(host_np, PaddedBatch(one * self.pad_id, one), self.pad_id)
        if not self.capture:
            return _Graph(host, host_np, host, None, None)
        try:
            g = self._capture(host, host_np)
        except Exception as e:  # a module that cannot be captured runs as before
            log.warning("CUDA graphs off for this model: capture of %s failed: %s", shape, e)
            self.enabled = False
            return None
        if not self._reproduces(g, rows, positions):
            log.warning("CUDA graph for %s differs from the module; that shape runs without", shape)
            return None
        log.info("captured a CUDA graph for batches of %d x %d", rows, positions)
        return g

    def _capture(self, host: Any, host_np: np.ndarray) -> _Graph:
        import torch

        device = host.to(self.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # first-call work (kernel choice, workspaces) outside capture
                self.module(device[0], device[1])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a CUDA call another thread of the process makes meanwhile cannot
        # invalidate this capture (embedsvc makes all of its own on the compute thread).
        capture = torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local")
        with torch.inference_mode(), capture:
            out = self.module(device[0], device[1])
        if self._pool is None:
            self._pool = graph.pool()
        return _Graph(host, host_np, device, out, graph)

    def _reproduces(self, g: _Graph, rows: int, positions: int) -> bool:
        """Whether the graph gives the module's vectors for a batch smaller than its
        bucket in both directions (so padding is checked too)."""
        import torch

        b, s = rows // 2 + 1 if rows > 1 else 1, positions // 2 + 1
        rng = np.random.default_rng(rows * 1000 + positions)
        ids = rng.integers(1000, 2000, size=(b, s), dtype=np.int64)
        mask = np.ones((b, s), dtype=np.int64)
        mask[0, s // 2 :] = 0
        batch = PaddedBatch(ids, mask)
        got = self._run(g, batch)
        with torch.inference_mode():
            t_ids, t_mask = torch.from_numpy(ids).to(self.device), torch.from_numpy(mask)
            want = self.module(t_ids, t_mask.to(self.device)).float().cpu().numpy()
        return bool(got.shape == want.shape and np.allclose(got, want, atol=2e-2, rtol=2e-2))
