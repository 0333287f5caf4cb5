"""Admission by time: how long would a new request wait?

The worker keeps a moving estimate of the rate at which its model works through queued
tokens (real tokens per second of forward passes: padding and a pass's fixed cost are in
it, for the traffic of the moment), seeded at warm-up. A request's wait is then the
tokens queued ahead of it plus its own, over that rate. A request whose wait would pass
its limit (`--max-queue-time`, or the client's shorter `x-request-timeout`) is refused at
once with 429 and a Retry-After from the estimate; one still waiting for its first
forward pass at its deadline (the estimate was low) is dropped before that pass. This is
what Triton's queue policy and vLLM's queued-token limit do. The input-count limit stays
as a backstop.
"""

from __future__ import annotations

import math
import threading

# Each forward pass's weight in the estimate decays by this factor per pass: about the
# last 20 passes count.
DECAY = 0.95


class RateEstimate:
    """Real tokens per second of forward passes, as exponentially decayed sums."""

    def __init__(self, tokens_per_second: float) -> None:
        self._lock = threading.Lock()
        # Seeded as if one second of passes had run at the prior rate.
        self._tokens = max(tokens_per_second, 1.0)
        self._seconds = 1.0

    def update(self, tokens: int, seconds: float) -> None:
        if seconds <= 0:
            return
        with self._lock:
            self._tokens = self._tokens * DECAY + tokens
            self._seconds = self._seconds * DECAY + seconds

    @property
    def rate(self) -> float:
        return self._tokens / self._seconds

    def wait(self, tokens_ahead: int, tokens: int) -> float:
        """Seconds until a request of `tokens`, queued behind `tokens_ahead`, is done."""
        return (tokens_ahead + tokens) / self.rate


def retry_after(wait: float, limit: float) -> int:
    """Seconds after which the same request would likely be admitted (at least 1)."""
    return max(1, math.ceil(wait - limit))
