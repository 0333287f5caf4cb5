"""Keep the server's memory flat under traffic of varied shapes.

Continuous batching makes a new tensor shape for nearly every forward pass. With glibc's
default malloc, the activations of those passes (hundreds of KB to tens of MB each) land
in the heap once its dynamic mmap threshold has risen, and the freed holes of one size
rarely fit the next: resident memory climbed by half a gigabyte in minutes (MiniLM,
single-input RAG-mix traffic), where one fixed shape stayed flat. See docs/benchmarks.md
("Memory under a soak") for the measurements behind the choice.

`tune_allocator()` is called once at start, before models load. On glibc (unless
`--malloc system`), `Trimmer.maybe_trim()` then hands free pages inside the heap back to
the OS (`malloc_trim`) when the queue has drained, at most once a second, and at least
every 30 s under steady load. A fixed mmap threshold (every block of 128 KiB or 1 MiB
and more mapped apart) also kept memory down but cost 15-30% of throughput in page
faults, so it is not used. jemalloc (LD_PRELOAD, as the Docker image does) keeps memory
flat at full speed; with it, or another preloaded allocator, nothing here is changed.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import threading
import time

# The cyclic collector's young generation: net new container objects (allocated minus
# freed) that start a collection; CPython's default is 700. Under load the requests in
# flight alone hold about that many (64 connections, about 11 objects each), so with the
# default a collection ran every few dozen requests, walked them all and found nothing
# to free: 1.6-1.75 µs per request, as much as a tenth of a request's Python time with a
# near-free model. With 10,000 a steady load starts none; reference cycles are still
# collected once that many more objects are alive.
YOUNG_GENERATION = 10_000

_state: dict[str, str] = {"allocator": "unknown"}
_libc: ctypes.CDLL | None = None


def allocator() -> str:
    """What this process allocates with: "glibc+trim", "glibc", "jemalloc", "mimalloc",
    "tcmalloc" or "unknown" (shown in /info)."""
    return _state["allocator"]


def _preloaded() -> str | None:
    preload = os.environ.get("LD_PRELOAD", "")
    for name in ("jemalloc", "mimalloc", "tcmalloc"):
        if name in preload:
            return name
    return None


def tune_allocator(mode: str = "auto") -> str:
    """Enable trimming (mode "auto") or not ("system"); returns allocator()."""
    global _libc
    other = _preloaded()
    if other:
        _state["allocator"] = other
        return other
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return allocator()
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return allocator()
    trim.argtypes = [ctypes.c_size_t]
    _state["allocator"] = "glibc"
    if mode == "system":
        return allocator()
    _libc = libc
    _state["allocator"] = "glibc+trim"
    return allocator()


class Trimmer:
    """Calls malloc_trim(0) when a queue drains (at most every `min_interval` s) and at
    least every `max_interval` s while work goes on. Thread-safe; cheap when not due."""

    def __init__(self, min_interval: float = 1.0, max_interval: float = 30.0) -> None:
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def maybe_trim(self, idle: bool) -> bool:
        if _libc is None:
            return False
        now = time.monotonic()
        due = self.min_interval if idle else self.max_interval
        if now - self._last < due or not self._lock.acquire(blocking=False):
            return False
        try:
            self._last = now
            _libc.malloc_trim(0)
        finally:
            self._lock.release()
        return True


# One per process: trimming is process-wide, whichever model's worker calls it.
TRIMMER = Trimmer()


def settle_gc() -> None:
    """Once the models are loaded: everything alive now lives as long as the process, so
    it leaves the cyclic collector, whose full passes over torch's and transformers'
    objects otherwise stall the event loop for a hundred milliseconds or more; and the
    young generation grows to YOUNG_GENERATION."""
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION, *gc.get_threshold()[1:])
