"""MicroBatcher: coalescing, limits, per-item results and error isolation, threads and asyncio."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import tiny_llama

from cme_rewards.batched_scorer import BatchedScorer, Sample
from cme_rewards.batching import (
    BatcherClosed,
    BatchLimits,
    BatchStats,
    MicroBatcher,
    Overloaded,
    TooManyItems,
)
from cme_rewards.options import OptionError
from cme_rewards.results import FLOOR_REWARD
from cme_rewards.retry import is_transient


class Recorder:
    """A batch function that squares numbers and remembers every batch it saw."""

    def __init__(self, delay: float = 0.0, poison: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay = delay
        self.poison = poison
        self.lock = threading.Lock()

    def __call__(self, items: list[int]) -> list[int]:
        with self.lock:
            self.batches.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        if self.poison is not None and self.poison in items:
            raise ValueError(f"poisoned item {self.poison}")
        return [x * x for x in items]


def run_threads(fn, args):
    out: dict = {}

    def work(a):
        try:
            out[a] = fn(a)
        except Exception as exc:
            out[a] = exc

    threads = [threading.Thread(target=work, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_threads_coalesce_and_each_gets_its_own_result():
    rec = Recorder(delay=0.02)
    stats: list[BatchStats] = []
    b = MicroBatcher(rec, BatchLimits(max_batch_size=16, max_wait_ms=50), on_batch=stats.append)
    out = run_threads(lambda x: b.submit(x).result(10), range(64))
    b.close()
    assert out == {x: x * x for x in range(64)}
    assert sorted(x for batch in rec.batches for x in batch) == list(range(64))  # each once
    assert len(rec.batches) < 64 and max(len(batch) for batch in rec.batches) > 1
    assert all(len(batch) <= 16 for batch in rec.batches)
    assert sum(s.size for s in stats) == 64 and len(stats) == len(rec.batches)


def test_batch_size_one_turns_batching_off():
    rec = Recorder()
    b = MicroBatcher(rec, BatchLimits(max_batch_size=1, max_wait_ms=20))
    out = run_threads(lambda x: b.submit(x).result(10), range(10))
    b.close()
    assert out == {x: x * x for x in range(10)}
    assert all(len(batch) == 1 for batch in rec.batches)


def test_padded_token_limit_and_oversized_item_alone():
    rec = Recorder()
    b = MicroBatcher(rec, BatchLimits(max_batch_tokens=100, max_batch_size=64, max_wait_ms=200))
    # costs 30 each: at most 3 per batch (3 x 30 = 90 <= 100); 250 exceeds the bound and runs alone.
    futures = [b.submit(30, cost=30) for _ in range(7)] + [b.submit(250, cost=250)]
    assert [f.result(10) for f in futures] == [900] * 7 + [62500]
    b.close()
    for batch in rec.batches:
        assert len(batch) * max(batch) <= 100 or batch == [250]
    assert [250] in rec.batches


def test_error_on_one_item_is_isolated():
    rec = Recorder(poison=13)
    b = MicroBatcher(rec, BatchLimits(max_batch_size=32, max_wait_ms=100))
    futures = {x: b.submit(x) for x in range(20)}
    for x, f in futures.items():
        if x == 13:
            with pytest.raises(ValueError, match="poisoned"):
                f.result(10)
        else:
            assert f.result(10) == x * x
    assert b.submit(5).result(10) == 25  # the worker survived
    b.close()


def test_overload_cancel_and_close():
    gate = threading.Event()

    def slow(items):
        gate.wait(10)
        return items

    b = MicroBatcher(slow, BatchLimits(max_batch_size=1, max_queue=2, max_wait_ms=0))
    first = b.submit(1)
    while not b.busy:  # the worker holds item 1; the queue is empty
        time.sleep(0.005)
    queued, withdrawn = b.submit(2), b.submit(3)
    with pytest.raises(Overloaded):
        b.submit(4)
    assert is_transient(Overloaded("x"))
    assert withdrawn.cancel()
    gate.set()
    assert first.result(10) == 1 and queued.result(10) == 2
    b.close(timeout=10)
    with pytest.raises(BatcherClosed):
        b.submit(5)


def test_close_finishes_queued_items():
    rec = Recorder(delay=0.01)
    b = MicroBatcher(rec, BatchLimits(max_batch_size=2, max_wait_ms=1000))
    futures = [b.submit(x) for x in range(5)]
    b.close(timeout=10)
    assert [f.result(0) for f in futures] == [0, 1, 4, 9, 16]


def test_asyncio_callers_share_batches():
    rec = Recorder(delay=0.01)
    b = MicroBatcher(rec, BatchLimits(max_batch_size=64, max_wait_ms=30))

    async def main():
        return await asyncio.gather(*(asyncio.wrap_future(b.submit(x)) for x in range(40)))

    assert asyncio.run(main()) == [x * x for x in range(40)]
    assert len(rec.batches) < 40
    b.close()


def test_submissions_enter_whole_or_not_at_all_and_withdraw():
    """A rejected or abandoned submission leaves nothing behind in the queue (issue: a queue
    that stayed "full" after a 20-sample request was refused with max_queue 16)."""
    gate = threading.Event()
    rec = Recorder()

    def gated(items):
        gate.wait(10)
        return rec(items)

    b = MicroBatcher(gated, BatchLimits(max_batch_size=4, max_queue=16, max_wait_ms=0))
    with pytest.raises(TooManyItems, match="max_queue=16"):
        b.submit_many(list(range(20)), [1] * 20)
    assert not is_transient(TooManyItems("x"))  # permanent: retrying cannot help
    running = b.submit(100)
    while not b.busy:
        time.sleep(0.005)
    held = b.submit_many(list(range(12)), [1] * 12)
    with pytest.raises(Overloaded):
        b.submit_many(list(range(5)), [1] * 5)  # 12 + 5 > 16: none of the five enter
    assert b.queue_depth == 12
    assert b.withdraw(held) == 12 and b.queue_depth == 0
    assert all(f.cancelled() for f in held)
    later = b.submit_many(list(range(16)), [1] * 16)  # the whole queue is free again
    gate.set()
    assert running.result(10) == 10000 and [f.result(10) for f in later] == [
        x * x for x in range(16)
    ]
    b.close()
    computed = [x for batch in rec.batches for x in batch]
    assert sorted(computed) == sorted([100, *range(16)])  # the withdrawn twelve never ran


def test_batch_limits_are_checked_options():
    with pytest.raises(OptionError, match="max_queue: must be at least 1"):
        BatchLimits(max_queue=0)
    with pytest.raises(OptionError, match="max_wait_ms: expected a number"):
        BatchLimits(max_wait_ms="soon")


def test_batched_scorer_floors_a_sample_that_fails_alone(tiny_scorer):
    """A real CMEScorer (tiny random model): a sample whose batch fails alone gets the floor."""

    class Faulty:
        def __init__(self, scorer):
            self.options, self.verifier_name, self.scorer = scorer.options, "faulty", scorer

        def encode(self, prompt, response):
            return self.scorer.encode(prompt, response)

        def score(self, prompts, responses, **kw):
            if "POISON" in responses:
                raise RuntimeError("injected fault")
            return self.scorer.score(prompts, responses, **kw)

    bs = BatchedScorer(Faulty(tiny_scorer), BatchLimits(max_wait_ms=50))
    good = [Sample("Say hi.", "Hello there!", id="ok1"), Sample("2+2?", "4", id="ok2")]
    bad = Sample("Hi", "POISON", id="bad")
    results = bs.score_many([good[0], bad, good[1]])
    expected = tiny_scorer.score([g.prompt for g in good], [g.response for g in good])
    assert results[1].cme == FLOOR_REWARD and "injected fault" in results[1].error
    for got, want in zip([results[0], results[2]], expected, strict=True):
        assert got.error is None and got.cme == pytest.approx(want.cme, abs=1e-5)
    bs.close()


@pytest.fixture(scope="module")
def tiny_scorer(smollm_tokenizer_only):
    from cme_rewards import CMEScorer

    return CMEScorer(model=tiny_llama(), tokenizer=smollm_tokenizer_only, device="cpu")


@pytest.fixture(scope="module")
def smollm_tokenizer_only():
    from transformers import AutoTokenizer

    from cme_rewards.models import cached_model_dir

    return AutoTokenizer.from_pretrained(cached_model_dir("smollm2-135m-instruct"))
