"""The thread per process that runs model work (loading, warm-up, forward passes), and on
a CPU the lanes beside it.

Measured on a 2-core machine: once torch has run parallel work on one thread, forward
passes on another thread were 1.3-2x slower (each thread gets its own OpenMP team and
they oversubscribe the cores); a lone pass on a second thread's team of two took 7.3 ms
against 5.6 ms on the compute thread. So only the compute thread (lane 0) runs a pass on
several cores; the other lanes run theirs on their share (one core each on 2 cores), and
all lanes take their cores from one budget, so passes never ask for more than there are.
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


class Lanes:
    """Forward passes on a CPU side by side: lane 0 is the compute thread, the others are
    threads of their own, and all share the cores.

    Measured on a 2-core machine with MiniLM under load (alternating wrk rounds): two
    passes at once, each on one core, got through 9-14% more short queries, 8-12% more of
    a RAG mix and 13-15% more 32-input requests than one pass at a time on both cores,
    with 10-13% less CPU per request. A pass spread over both cores waits at every op for
    its slower thread, and the event loop and the kernel take turns on those cores. A pass
    with nothing queued behind it still runs on every free core, for latency.
    """

    def __init__(self, cores: int, count: int, first: ComputeThread) -> None:
        self.cores = cores
        self.per_lane = max(1, cores // count)  # threads of a pass while others may run
        self.threads = [first] + [
            ComputeThread(f"embedsvc-compute-{i + 1}") for i in range(1, count)
        ]
        self._pending = [0] * count
        self.set_threads = [0] * count  # torch threads each lane last set (0: unknown)
        self._busy = [False] * count  # in a pass (between take and give)
        self._finishing = [False] * count  # past its pass, in the task's bookkeeping
        self._free = cores
        self._cond = threading.Condition()
        self.most_at_once = 0  # the most passes seen running side by side

    def submit(self, fn: Callable[[int], Any]) -> None:
        """Run `fn(lane)` on lane 0 if it is free (or only finishing the last pass's
        bookkeeping: a lone batch so still gets every core), else on the free lane or the
        one with the least work queued."""
        with self._cond:
            lane = self._choose(0)
            self._pending[lane] += 1
        self._post(lane, fn)

    def on(self, lane: int, fn: Callable[[int], Any]) -> None:
        """Run `fn(lane)`, a continuation from `lane`, there unless another batch already
        waits there (it would wait behind this one while another lane sits idle)."""
        with self._cond:
            lane = self._choose(lane)
            self._pending[lane] += 1
        self._post(lane, fn)

    def _choose(self, lane: int) -> int:
        """`lane` if nothing but its finishing pass is on it, else the least loaded."""
        if self._pending[lane] - self._finishing[lane] <= 0 and not self._busy[lane]:
            return lane
        return min(range(len(self.threads)), key=lambda k: (self._busy[k], self._pending[k], k))

    def _post(self, lane: int, fn: Callable[[int], Any]) -> None:
        def run() -> Any:
            try:
                return fn(lane)
            finally:
                with self._cond:
                    self._pending[lane] -= 1
                    self._finishing[lane] = False

        self.threads[lane].submit(run)

    def take(self, lane: int, backlog: bool) -> int:
        """Cores for a pass about to start on `lane` (waits for one): every free one for
        lane 0 with nothing queued behind the pass, else `per_lane`. Give them back."""
        with self._cond:
            while self._free == 0:
                self._cond.wait()
            n = self._free if lane == 0 and not backlog else min(self._free, self.per_lane)
            self._free -= n
            self._busy[lane] = True
            self.most_at_once = max(self.most_at_once, sum(self._busy))
            return n

    def give(self, lane: int, n: int) -> None:
        with self._cond:
            self._free += n
            self._busy[lane] = False
            self._finishing[lane] = True  # until its task returns
            self._cond.notify_all()


# At most this many CPU passes at once: each holds its activations, and a pass on fewer
# cores takes longer (only 2 cores were measured; see Lanes).
MAX_LANES = 4

_default: ComputeThread | None = None
_lanes: Lanes | None = None
_lock = threading.Lock()


def cpu_lanes(cores: int) -> Lanes | None:
    """The process-wide lanes for passes on `cores` CPU cores (None below 2 cores)."""
    global _lanes
    if cores < 2:
        return None
    first = compute_thread()
    with _lock:
        if _lanes is None or _lanes.cores != cores:
            _lanes = Lanes(cores, min(cores, MAX_LANES), first)
        return _lanes


def compute_thread() -> ComputeThread:
    """The process-wide compute thread (started on first use, never stopped)."""
    global _default
    with _lock:
        if _default is None:
            _default = ComputeThread()
        return _default
