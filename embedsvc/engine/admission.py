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
from dataclasses import dataclass

from embedsvc.errors import ErrorKind

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


@dataclass(frozen=True)
class Refusal:
    """Why a request is not admitted: its error, and the refusals counter it counts in
    (capacity | queue_time; "" for none)."""

    kind: ErrorKind
    message: str
    counter: str = ""
    retry_after: int | None = None


def refusal(
    model: str,
    *,
    healthy: bool,
    inflight: int,
    limit: int,
    inputs: int,
    tokens: int,
    ahead: int,
    rate: RateEstimate,
    max_wait: float,
) -> Refusal | None:
    """The admission decision for one request of `inputs` inputs and `tokens` tokens,
    with `inflight` inputs admitted (of `limit`) and `ahead` tokens queued ahead of it;
    `max_wait` seconds (0: no limit). None: admit it. A request with nothing ahead of it
    is admitted whatever its size (it could never be admitted otherwise)."""
    if not healthy:
        return Refusal(ErrorKind.UNHEALTHY, f"model {model} is not healthy")
    if inflight + inputs > limit:
        return Refusal(
            ErrorKind.OVERLOADED,
            f"model {model} is at capacity ({inflight} of {limit} inputs in flight); retry shortly",
            "capacity",
            retry_after=1,
        )
    if max_wait > 0 and ahead > 0:
        wait = rate.wait(ahead, tokens)
        if wait > max_wait:
            return Refusal(
                ErrorKind.OVERLOADED,
                f"model {model} would answer this request in about {wait:.1f} s ({ahead} "
                f"tokens queued ahead, about {rate.rate:.0f} tokens/s), more than its "
                f"limit of {max_wait:g} s; retry later or elsewhere",
                "queue_time",
                retry_after=retry_after(wait, max_wait),
            )
    return None
