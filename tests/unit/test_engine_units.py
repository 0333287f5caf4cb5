"""Pure engine pieces: batch selection, padding, post-processing, tokenization, settings."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from tokenizers import Tokenizer

from embedsvc.api.encode import to_base64
from embedsvc.engine.batcher import BatchQueue, Item, PadCost, oldest, pad, select_batch
from embedsvc.engine.postprocess import finalize, layer_norm
from embedsvc.engine.tokenize import TextTokenizer
from embedsvc.errors import ConfigError, ValidationError
from embedsvc.settings import Settings
from tests.support.models import MINILM_PATH


def items(lengths: list[int]) -> list[Item]:
    out = [Item(None, i, [7] * n) for i, n in enumerate(lengths)]
    for seq, it in enumerate(out):
        it.seq = seq
    return out


def test_batch_respects_token_budget_and_size_and_keeps_oldest() -> None:
    rng = random.Random(0)
    for _ in range(200):
        pending = items([rng.randint(1, 300) for _ in range(rng.randint(1, 80))])
        budget, size = rng.choice([512, 2048, 4096]), rng.choice([4, 16, 64])
        batch = select_batch(pending, budget, size)
        assert pending[0] in batch  # the oldest input is always served
        assert len(batch) <= size
        assert len(batch) == 1 or len(batch) * max(it.length for it in batch) <= budget


def test_batch_groups_similar_lengths() -> None:
    # Oldest is 100 tokens; the queue holds short and long inputs. The batch should take
    # the inputs nearest to 100, not the ones that arrived next.
    pending = items([100, 5, 300, 98, 6, 102, 290, 99])
    batch = select_batch(pending, max_tokens=4 * 102, max_size=64)
    assert sorted(it.length for it in batch) == [98, 99, 100, 102]


def test_everything_fits_takes_all_in_arrival_order() -> None:
    pending = items([3, 9, 4])
    assert select_batch(pending, 1000, 10) == pending


def test_cheap_passes_keep_padding_out_and_costly_ones_take_everything() -> None:
    # A CPU-like model (a pass's fixed cost is 30 tokens): the oldest, a 12-token query,
    # does not carry 100-token passages (each would pad every row to 100).
    pending = items([12, 100, 11, 98, 13, 102, 12])
    batch = select_batch(pending, max_tokens=4096, max_size=64, overhead=30)
    assert sorted(it.length for it in batch) == [11, 12, 12, 13]
    rest = [it for it in pending if it not in batch]
    assert sorted(it.length for it in select_batch(rest, 4096, 64, 30)) == [98, 100, 102]
    # A GPU-like model (fixed cost of thousands of tokens): one pass for all.
    assert len(select_batch(pending, max_tokens=4096, max_size=64, overhead=2000)) == 7
    # Limits still hold with a cost model.
    for overhead in (0.0, 30.0, 2000.0):
        batch = select_batch(pending, max_tokens=3 * 102, max_size=64, overhead=overhead)
        assert pending[0] in batch and len(batch) * max(it.length for it in batch) <= 306


def test_padding_that_costs_little_no_longer_splits_batches() -> None:
    # The own BERT encoder on a CPU skips padded positions in its dense layers: there a
    # padded position costs attention alone, ~0.05 of a token at a width of 32 (measured
    # at warm-up), so short queries of different lengths share one pass, and so do
    # queries and 100-token passages.
    cheap = PadCost(fixed=0.0, per_width=0.05 / 32)
    queries = items([8, 21, 12, 17, 9, 14, 20, 11])
    assert len(select_batch(queries, 4096, 64, overhead=30)) < 8  # padding at full cost
    assert len(select_batch(queries, 4096, 64, overhead=30, pad_cost=cheap)) == 8
    mixed = items([12, 100, 11, 98, 13, 102, 12])
    assert len(select_batch(mixed, 4096, 64, overhead=30, pad_cost=cheap)) == 7
    # Attention grows with the width: padding to 512 costs nearly a token per position
    # again, so a lone long passage does not take the queries along.
    longest = items([12, 512, 11, 13, 12])
    batch = select_batch(longest, 8192, 64, overhead=30, pad_cost=cheap)
    assert sorted(it.length for it in batch) == [11, 12, 12, 13]
    assert PadCost().at(8) == PadCost().at(512) == 1.0  # computed padding: a full token


def test_queue_drains_every_item_exactly_once() -> None:
    q = BatchQueue(max_batch_tokens=64, max_batch_size=5)
    its = [Item(None, i, [1] * (1 + i % 13)) for i in range(57)]
    q.put(its)
    seen: list[Item] = []
    while len(q):
        batch = q.take(timeout=0)
        assert batch
        assert len(batch) <= 5 and len(batch) * max(b.length for b in batch) <= 64
        seen.extend(batch)
    assert sorted(id(x) for x in seen) == sorted(id(x) for x in its)
    q.close()
    assert q.take() is None


def test_oldest_window_counts_items_and_tokens() -> None:
    pending = items([10, 20, 30, 40, 50])
    assert oldest(pending, max_items=3, max_tokens=1000) == pending[:3]
    assert oldest(pending, max_items=10, max_tokens=60) == pending[:3]  # 10 + 20 + 30
    assert oldest(pending, max_items=10, max_tokens=5) == pending[:1]  # at least one
    assert oldest(pending, max_items=10, max_tokens=1000) == pending


def backlog(policy: str) -> tuple[int, list[int]]:
    """12 requests of 8 inputs of varied lengths, all queued at once: how many batches
    the backlog takes, and the batch in which each request's last input leaves."""
    rng = random.Random(3)
    q = BatchQueue(max_batch_tokens=256, max_batch_size=4, policy=policy)
    for request in range(12):
        q.put([Item(request, i, [1] * rng.randint(4, 60)) for i in range(8)])
    left = dict.fromkeys(range(12), 8)
    finished: dict[int, int] = {}
    batches = 0
    while len(q):
        batches += 1
        for it in q.take(timeout=0) or []:
            left[it.job] -= 1
            if left[it.job] == 0:
                finished[it.job] = batches
    return batches, [finished[r] for r in range(12)]


def test_arrival_policy_finishes_requests_sooner_under_a_backlog() -> None:
    (n_arrival, arrival), (n_length, length) = backlog("arrival"), backlog("length")
    assert n_arrival == n_length  # no more passes for it
    # With "length" each request waits for inputs spread over the whole backlog.
    assert sorted(arrival)[6] < sorted(length)[6]  # median request
    assert arrival[0] < length[0]  # the oldest request
    with pytest.raises(ValueError, match="batch policy"):
        BatchQueue(256, 4, policy="fastest")


def test_pad_right_pads_with_mask() -> None:
    batch = pad([Item(None, 0, [5, 6, 7]), Item(None, 1, [8])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.input_ids.dtype == np.int64


def test_finalize_order_layer_norm_truncate_normalize() -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 16)) * 3 + 1).astype(np.float32)
    out = finalize(x, dimensions=8, normalize=True, layer_norm_first=True)
    ln = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
    expected = ln[:, :8] / np.linalg.norm(ln[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # Truncating before the layer norm would give something else: the order matters.
    wrong = layer_norm(x[:, :8])
    wrong /= np.linalg.norm(wrong, axis=1, keepdims=True)
    assert not np.allclose(out, wrong, atol=1e-3)
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)
    raw = finalize(x, dimensions=None, normalize=False, layer_norm_first=False)
    np.testing.assert_array_equal(raw, x)


def test_base64_is_little_endian_float32() -> None:
    import base64

    row = np.array([1.0, -2.5, 3.25], dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(to_base64(row)), dtype="<f4")
    np.testing.assert_array_equal(decoded, row)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    t = Tokenizer.from_file(str(MINILM_PATH / "tokenizer.json"))
    t.no_truncation()
    t.no_padding()
    return TextTokenizer(t, max_length=16)


def test_truncation_keeps_special_tokens(tok: TextTokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(40))
    with pytest.raises(ValidationError, match=r"inputs has \d+ tokens .* limit of 16"):
        tok.encode([text], prefix="", truncate=False, direction="right", param="inputs")
    right = tok.encode([text], prefix="", truncate=True, direction="right", param="inputs")[0]
    left = tok.encode([text], prefix="", truncate=True, direction="left", param="inputs")[0]
    full = tok.encode([text], prefix="", truncate=True, direction="right", param="inputs")
    assert len(right) == len(left) == 16 == len(full[0])
    assert right[0] == left[0] == 101 and right[-1] == left[-1] == 102  # [CLS] ... [SEP]
    assert right[1:3] != left[1:3]


def test_prefix_counts_toward_the_limit(tok: TextTokenizer) -> None:
    text = "one two three four five six seven eight nine ten"  # 12 tokens with specials
    ids = tok.encode([text], prefix="", truncate=False, direction="right", param="inputs")
    assert len(ids[0]) == 12
    with pytest.raises(ValidationError, match="including prompt"):
        tok.encode(
            [text], prefix="query: a b c d: ", truncate=False, direction="right", param="inputs"
        )


def test_token_ids_checked(tok: TextTokenizer) -> None:
    with pytest.raises(ValidationError, match=r"token id 99999999, outside .*\[0, 30522\)"):
        tok.check_ids([[101, 99999999]], truncate=False, direction="right", param="input")
    # Without special ids at the ends, the ids are cut as they are.
    assert tok.check_ids([list(range(1000, 1029))], truncate=True, direction="left", param="x") == [
        list(range(1013, 1029))
    ]


def test_left_truncation_keeps_the_prompt(tok: TextTokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(40))
    # "query", ":" (the ids between [CLS] and the text "x" + [SEP])
    prompt = tok.encode(["x"], prefix="query: ", truncate=False, direction="right", param="inputs")[
        0
    ][1:-2]
    tail = tok.encode([text], prefix="", truncate=True, direction="left", param="inputs")[0]
    got = tok.encode([text], prefix="query: ", truncate=True, direction="left", param="inputs")[0]
    assert len(got) == 16
    # [CLS] + prompt + the text's last tokens + [SEP]
    assert got == [101, *prompt, *tail[1 + len(prompt) : -1], 102]
    # Right truncation kept the prompt already: it is the start.
    right = tok.encode([text], prefix="query: ", truncate=True, direction="right", param="x")[0]
    assert right[1 : 1 + len(prompt)] == prompt and right[-1] == 102


@pytest.mark.parametrize("direction", ["right", "left"])
def test_truncated_token_ids_keep_special_tokens_like_text(
    tok: TextTokenizer, direction: str
) -> None:
    text = " ".join(f"word{i}" for i in range(40))
    ids = tok.encode_full([text])  # as /tokenize gives them: untruncated, with specials
    assert len(ids[0]) > 16 and ids[0][0] == 101 and ids[0][-1] == 102
    from_ids = tok.check_ids(ids, truncate=True, direction=direction, param="inputs")
    from_text = tok.encode([text], prefix="", truncate=True, direction=direction, param="inputs")
    assert from_ids == from_text
    assert from_ids[0][0] == 101 and from_ids[0][-1] == 102 and len(from_ids[0]) == 16


def test_settings_from_flags_env_and_defaults() -> None:
    s = Settings.from_sources(
        {"port": "9000", "auto_truncate": None},
        {"EMBEDSVC_PORT": "1", "EMBEDSVC_MAX_BATCH_TOKENS": "4096", "EMBEDSVC_AUTO_TRUNCATE": "1"},
    )
    assert (s.port, s.max_batch_tokens, s.auto_truncate, s.host) == (9000, 4096, True, "127.0.0.1")
    with pytest.raises(ConfigError, match="EMBEDSVC_MAX_BATCH_SIZE must be an integer"):
        Settings.from_sources({}, {"EMBEDSVC_MAX_BATCH_SIZE": "lots"})
    with pytest.raises(ConfigError, match="max_batch_size must be at least 1"):
        Settings.from_sources({"max_batch_size": "0"}, {})
    with pytest.raises(ConfigError, match=r"max_batch_tokens must be 0 \(auto\) or more"):
        Settings.from_sources({"max_batch_tokens": "-1"}, {})
    assert Settings.from_sources({}, {"EMBEDSVC_KEEP_ALIVE_TIMEOUT": "75"}).keep_alive_timeout == 75
    for bad in ("0", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match="keep_alive_timeout must be a positive number"):
            Settings.from_sources({"keep_alive_timeout": bad}, {})
    auto = Settings()
    assert (auto.batch_tokens_for("cpu"), auto.batch_tokens_for("cuda:0")) == (2048, 16384)
    # Defaults a GPU run has not proven stay off; the connection bounds are on.
    assert auto.cuda_graphs is False and auto.http_direct is True
    assert (auto.max_header_bytes, auto.header_timeout, auto.max_connections) == (32768, 10, 4096)
    env = {"EMBEDSVC_HTTP_DIRECT": "false", "EMBEDSVC_MAX_CONNECTIONS": "0"}
    assert (
        Settings.from_sources({}, env).http_direct,
        Settings.from_sources({}, env).max_connections,
    ) == (False, 0)
    for name, bad in (
        ("header_timeout", "0"),
        ("max_connections", "-1"),
        ("max_header_bytes", "0"),
    ):
        with pytest.raises(ConfigError, match=name):
            Settings.from_sources({name: bad}, {})


def test_secrets_never_show_and_the_effective_settings_are_described() -> None:
    s = Settings.from_sources({"port": "9001"}, {"EMBEDSVC_API_KEY": "s3cret-key"})
    assert s.api_keys() == ["s3cret-key"]
    assert "s3cret" not in repr(s) and "s3cret" not in s.describe()
    described = dict(part.split("=", 1) for part in s.describe().split(", "))
    assert described["api_key"] == "***" and described["port"] == "9001"
    assert set(described) == {f.name for f in Settings.fields()}
    assert dict(p.split("=", 1) for p in Settings().describe().split(", "))["api_key"] == "''"


def test_api_workers_auto_and_explicit() -> None:
    from embedsvc.settings import available_cpus

    cpus = available_cpus()
    assert 1 <= cpus <= (os.cpu_count() or 1)
    assert Settings().api_workers_for(accelerated=False) == 1
    assert Settings().api_workers_for(accelerated=True) == max(1, min(cpus - 1, 8))
    assert Settings(api_workers=3).api_workers_for(accelerated=False) == 3
    env = {"EMBEDSVC_API_WORKERS": "2"}
    assert Settings.from_sources({}, env).api_workers_for(accelerated=False) == 2
    with pytest.raises(ConfigError, match="api_workers"):
        Settings.from_sources({"api_workers": "-1"}, {})


def test_rate_estimate_moves_with_passes_and_gives_retry_after() -> None:
    from embedsvc.engine.admission import RateEstimate, retry_after

    est = RateEstimate(1000.0)
    assert est.wait(1000, 1000) == pytest.approx(2.0)
    for _ in range(200):  # the model turns out slower: 100 tokens/s
        est.update(100, 1.0)
    assert est.rate == pytest.approx(100, rel=0.01)
    assert retry_after(12.2, 5.0) == 8 and retry_after(5.1, 5.0) == 1


def test_queue_counts_its_tokens() -> None:
    q = BatchQueue(max_batch_tokens=64, max_batch_size=2)
    q.put([Item(None, i, [1] * n) for i, n in enumerate([3, 5, 7])])
    assert q.tokens == 15
    taken = q.take(timeout=0)
    assert taken and q.tokens == 15 - sum(it.length for it in taken)


def test_observe_many_counts_as_observe_does() -> None:
    """A pass's phases go into the histograms in one update per bucket: the same buckets,
    count and sum as one observe() per amount, bounds and +Inf included."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from embedsvc.metrics import observe_many

    rng = random.Random(7)
    amounts = [0.0, 0.0004, 0.0005, 0.0005001, 0.003, 0.003, 0.7, 30.0, 31.0, 1e9]
    amounts += [rng.uniform(0, 40) for _ in range(200)]
    texts = []
    buckets = (0.0005, 0.001, 0.005, 1.0, 30.0)
    for many in (False, True):
        r = CollectorRegistry()
        h = Histogram("phase", "t", ["model"], buckets=buckets, registry=r)
        child = h.labels("m")
        if many:
            observe_many(child, amounts[:7])
            observe_many(child, [])
            observe_many(child, amounts[7:])
        else:
            for a in amounts:
                child.observe(a)
        lines = generate_latest(r).decode().splitlines()
        texts.append("\n".join(ln for ln in lines if "_created" not in ln))
    assert texts[0] == texts[1] and "phase_sum" in texts[1]
    assert 'phase_bucket{le="0.0005",model="m"} 3.0' in texts[1]
    assert f'phase_count{{model="m"}} {float(len(amounts))}' in texts[1]


def test_a_callback_request_is_answered_once_and_a_failing_callback_is_contained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from embedsvc.engine.frontend import Callback

    calls: list[tuple[object, object]] = []
    cb = Callback(lambda result, error: calls.append((result, error)))
    assert not cb.done()
    error = ValueError("x")
    cb.set_exception(error)
    cb.set_result("late")  # type: ignore[arg-type]  # a second answer is dropped
    assert cb.done() and calls == [(None, error)]

    def fails(result: object, error: object) -> None:
        raise RuntimeError("writing the answer failed")

    broken = Callback(fails)
    broken.set_result("r")  # type: ignore[arg-type]
    assert broken.done() and "answering a request failed" in caplog.text


def test_admission_refuses_by_health_capacity_and_estimated_wait() -> None:
    from embedsvc.engine.admission import RateEstimate, refusal
    from embedsvc.errors import ErrorKind

    rate = RateEstimate(1000.0)  # tokens per second
    base = dict(
        healthy=True, inflight=0, limit=100, inputs=4, tokens=200, ahead=0, rate=rate, max_wait=1.0
    )
    assert refusal("m", **base) is None
    sick = refusal("m", **{**base, "healthy": False})
    assert sick is not None and sick.kind is ErrorKind.UNHEALTHY and sick.counter == ""
    full = refusal("m", **{**base, "inflight": 98})
    assert full is not None and full.counter == "capacity" and "98 of 100" in full.message
    # 900 tokens ahead + 200 of its own at 1000 tokens/s: 1.1 s, past its 1 s.
    late = refusal("m", **{**base, "ahead": 900})
    assert late is not None and late.counter == "queue_time" and late.retry_after == 1
    assert "about 1.1 s" in late.message
    assert refusal("m", **{**base, "ahead": 700}) is None  # 0.9 s
    assert refusal("m", **{**base, "ahead": 900, "max_wait": 0.0}) is None  # no limit
    # Alone, a request is admitted however long it would take.
    assert refusal("m", **{**base, "tokens": 10**6}) is None


def test_rows_finalized_per_job_with_lexical_weights_beside_vectors() -> None:
    from types import SimpleNamespace

    from embedsvc.backends.base import ForwardOutput
    from embedsvc.engine.postprocess import finalize_rows
    from embedsvc.engine.types import Want

    def item(index: int, ids: list[int], **job: object) -> Item:
        fields = dict(dimensions=None, normalize=True, layer_norm=False, want=Want.DENSE)
        return Item(SimpleNamespace(**{**fields, **job}), index, ids)  # type: ignore[arg-type]

    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(3, 8)).astype(np.float32)
    weights = np.array([[0, 1, 2, 0], [0, 0.5, 0.5, 0], [0, 3, 0, 0]], dtype=np.float32)
    items = [
        item(0, [1, 7, 9, 2]),
        item(1, [1, 7, 7, 2], want=Want.SPARSE),
        item(2, [1, 5, 2], dimensions=4),
    ]
    rows = finalize_rows(items, ForwardOutput(pooled, weights), False, lambda: frozenset({1, 2}))
    np.testing.assert_allclose(rows[0], pooled[0] / np.linalg.norm(pooled[0]), rtol=1e-6)
    np.testing.assert_allclose(rows[2], pooled[2, :4] / np.linalg.norm(pooled[2, :4]), rtol=1e-6)
    idx, val = rows[1]
    assert idx.tolist() == [7] and val.tolist() == [0.5]  # max weight per token id


def test_every_output_has_a_finisher_and_a_name_maps_to_it() -> None:
    """A member of Want without a finisher would fail only when a request asked for it."""
    from embedsvc.engine.postprocess import FINISHERS
    from embedsvc.engine.types import OUTPUT_WANTS, Want, want_of

    assert set(FINISHERS) == set(Want)
    assert want_of(["dense", "multivector"]) == Want.DENSE | Want.TOKEN_VECTORS
    assert want_of([]) == Want(0) and set(OUTPUT_WANTS.values()) <= set(Want)
