"""The one thread per process that runs model work: loading, warm-up, forward passes.

Measured on a 2-core machine: once torch has run parallel work on one thread, forward
passes on another thread were 1.3-2x slower (each thread gets its own OpenMP team and
they oversubscribe the cores). Running every forward pass of every model on the same
thread avoids that, and on one device forward passes of different models would compete
for the same cores or GPU anyway.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    def __init__(self, name: str = "embedsvc-compute") -> None:
        self._tasks: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        fut: Future[T] = Future()
        self._tasks.put((fn, fut))
        return fut

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the compute thread and wait for its result."""
        if threading.current_thread() is self._thread:
            return fn()
        return self.submit(fn).result()

    def _run(self) -> None:
        while True:
            fn, fut = self._tasks.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:
                fut.set_exception(e)


_default: ComputeThread | None = None
_lock = threading.Lock()


def compute_thread() -> ComputeThread:
    """The process-wide compute thread (started on first use, never stopped)."""
    global _default
    with _lock:
        if _default is None:
            _default = ComputeThread()
        return _default
