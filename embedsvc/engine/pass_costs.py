"""What a forward pass of one model costs, timed at warm-up: its fixed cost in tokens, what
a padded position costs, the tokens per second that seed admission, and whether the model
gains anything from more than one CPU thread. The batcher weighs padding against the fixed
cost (batcher.py); admission starts from the rate (admission.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from embedsvc.backends.base import LoadedModel, PaddedBatch
from embedsvc.engine.batcher import Item, PadCost, pad

log = logging.getLogger(__name__)

# Forward passes run on one CPU thread only for models whose 8x32-token pass takes less
# than this on one thread (a 2-layer, 32-wide BERT: 0.3 ms; MiniLM-L6: about 58 ms).
ONE_THREAD_MAX_PASS_S = 0.002
# A pass this many times slower than that on one thread settles the question in one turn
# (MiniLM: about 29x): the other turns took most of a busy machine's start-up.
CLEARLY_NOT_CHEAP = 10


@dataclass(frozen=True)
class PassCosts:
    overhead_tokens: float  # a pass's fixed cost, in tokens' worth
    pad_cost: PadCost
    tokens_per_second: float  # of an 8x32-token pass
    one_thread_enough: bool = False


def measure_pass_costs(model: LoadedModel, name: str) -> PassCosts:
    """Run on the thread that runs the model's passes. A pass's fixed cost in tokens: time
    a 1x8 and an 8x32 batch (best of 3 each), fit time = fixed + per_token x tokens.
    Padding is worth avoiding when the fixed cost is small (CPU), and not when it is large
    (GPU). Two padded batches give what a padded position costs at two widths. For a
    backend with CPU threads, also whether one thread is enough (see below)."""
    pad_id = model.pad_token_id
    small = pad([Item(None, 0, [pad_id] * 8)], pad_id)
    large = pad([Item(None, i, [pad_id] * 32) for i in range(8)], pad_id)

    def best(batch: PaddedBatch) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model.backend.forward(batch)
            times.append(time.perf_counter() - t0)
        return min(times)

    # Inputs of 8 tokens beside one of 32 (then 128): padded positions at two widths.
    def mixed(rows: int, width: int) -> PaddedBatch:
        short = [Item(None, i, [pad_id] * 8) for i in range(rows)]
        return pad([*short, Item(None, rows, [pad_id] * width)], pad_id)

    t_small, t_large = best(small), best(large)
    t_32, t_128 = best(mixed(8, 32)), best(mixed(4, 128))
    per_token = max(t_large - t_small, 1e-9) / (256 - 8)

    def padded_position(t: float, real: int, padding: int) -> float:
        return (t - t_small - (real - 8) * per_token) / (padding * per_token)

    at_32, at_128 = padded_position(t_32, 96, 192), padded_position(t_128, 160, 480)
    per_width = max((at_128 - at_32) / (128 - 32), 0.0)
    fixed = min(max(at_32 - 32 * per_width, 0.0), 1.0)
    costs = PassCosts(
        overhead_tokens=float(min(max(t_small / per_token - 8, 0.0), 1e6)),
        pad_cost=PadCost(fixed, per_width),
        tokens_per_second=256 / max(t_large, 1e-9),
    )
    threads = model.backend.cpu_threads
    if not model.backend.per_pass_threads or threads() <= 1:
        return costs
    # Does the model gain from parallel threads? A tiny one does not, and idle threads
    # spinning after each op take cores from the event loop. The two settings take turns
    # (best of 7 each, of 28 for a cheap pass), so a passing hiccup decides nothing.
    # A pass that looks cheap gets more turns (they cost milliseconds): its decision rests
    # on times near the noise of a busy machine.
    many = threads()
    t_many: list[float] = []
    t_one: list[float] = []
    rounds = 0
    while rounds < 7 or (rounds < 28 and min(t_one) < 5 * ONE_THREAD_MAX_PASS_S):
        rounds += 1
        for n, times in ((many, t_many), (1, t_one)):
            threads(n)
            t0 = time.perf_counter()
            model.backend.forward(large)
            times.append(time.perf_counter() - t0)
        if min(t_one) >= CLEARLY_NOT_CHEAP * ONE_THREAD_MAX_PASS_S:
            break  # no turn can make it cheap: the answer is no, and more turns cost start-up
    threads(many)
    log.info(
        "model %s: an 8x32 pass takes %.1f ms on one thread, %.2fx that on %d",
        name,
        min(t_one) * 1e3,
        min(t_many) / min(t_one),
        many,
    )
    # Only a cheap pass can run on one thread: a busy neighbour at start-up (another server
    # loading, say) makes threads look useless for a while, and taking them from a model
    # that needs them would halve it for good.
    enough = min(t_one) < 1.3 * min(t_many) and min(t_one) < ONE_THREAD_MAX_PASS_S
    return PassCosts(costs.overhead_tokens, costs.pad_cost, costs.tokens_per_second, enough)
