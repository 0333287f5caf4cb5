"""How a front end reaches the engine core: the `CoreLink` protocol, and `LocalCore`, the
link to model workers in the same process.

The other link, to an engine process, is `remote.RemoteCore`. Both move requests and
results in batches: one `submit` per batch of tokenized requests, one delivery per
forward pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Protocol

from embedsvc.engine.types import CoreJob, JobDone, JobFailed
from embedsvc.engine.worker import ModelWorker

# Called on the front end's event loop with the results of one forward pass.
Deliver = Callable[[list[JobDone], list[JobFailed]], None]


class CoreLink(Protocol):
    def attach(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        """Start delivering results to `deliver` on `loop`."""

    def submit(self, model: str, jobs: list[CoreJob]) -> None: ...

    def cancel(self, model: str, keys: list[int]) -> None: ...

    def inflight(self, model: str) -> int:
        """Inputs admitted and not answered (for a remote core, as last reported)."""

    def healthy(self, model: str) -> bool: ...

    def estimate_wait(self, model: str, tokens: int, ahead: int = 0) -> float:
        """Seconds a request of `tokens` would wait if sent now, behind what the core
        has queued and `ahead` more tokens (admission.py); for a remote core, from its
        last report."""

    def stop(self) -> None: ...


class LocalCore:
    """Model workers in this process; results reach the loop once per forward pass."""

    ORIGIN: Hashable = 0

    def __init__(self, workers: dict[str, ModelWorker]) -> None:
        self.workers = workers
        self._deliver: Deliver | None = None

    def attach(self, loop: asyncio.AbstractEventLoop, deliver: Deliver) -> None:
        self._deliver = deliver

        def sink(origin: Hashable, done: list[JobDone], failed: list[JobFailed]) -> None:
            loop.call_soon_threadsafe(deliver, done, failed)

        for w in self.workers.values():
            w.start(sink)

    def submit(self, model: str, jobs: list[CoreJob]) -> None:
        refused = self.workers[model].submit(self.ORIGIN, jobs)
        if refused:
            assert self._deliver is not None
            self._deliver([], refused)

    def cancel(self, model: str, keys: list[int]) -> None:
        self.workers[model].cancel(self.ORIGIN, keys)

    def inflight(self, model: str) -> int:
        return self.workers[model].inflight_inputs

    def healthy(self, model: str) -> bool:
        w = self.workers[model]
        return w.ready and w.healthy

    def estimate_wait(self, model: str, tokens: int, ahead: int = 0) -> float:
        return self.workers[model].estimate_wait(tokens, ahead)

    def stop(self) -> None:
        for w in self.workers.values():
            w.stop()
