"""Micro-batching: coalesce concurrent single-sample requests into one verifier batch.

Callers (threads, or coroutines through :meth:`MicroBatcher.submit_async`) each submit one item
and get a future for its own result. One worker thread collects the items waiting in a FIFO queue
into a batch, bounded by :class:`BatchLimits` (padded batch tokens, batch size, and how long the
oldest item may wait for company), runs the batch function once, and hands every caller its own
result. An exception from a batch is isolated by splitting the batch in halves, so one bad item
fails alone and the others still get their results.

:class:`BatchedScorer` applies this to :meth:`cme_rewards.CMEScorer.score`; the HTTP server and the
OpenRLHF file-mode ``reward_func`` both use it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cme_rewards.results import FLOOR_REWARD, CMEResult

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class TransientError(RuntimeError):
    """Trouble that may pass if the caller retries (a server answers 503)."""


class Overloaded(TransientError):
    """The queue already holds ``max_queue`` items."""


class BatcherClosed(TransientError):
    """The batcher is shutting down and takes no new items."""


@dataclass(frozen=True)
class BatchLimits:
    """Limits on one batch.

    Attributes:
        max_batch_tokens: bound on ``batch_size * longest item`` (verifier tokens, i.e. the padded
            ``[batch, seq]`` size); an item longer than this still runs, alone.
        max_batch_size: most items in one batch (1 turns batching off).
        max_wait_ms: how long the oldest waiting item may wait for others before its batch runs.
        max_queue: most items waiting; beyond it :meth:`MicroBatcher.submit` raises
            :class:`Overloaded`.
    """

    max_batch_tokens: int = 16384
    max_batch_size: int = 64
    max_wait_ms: float = 10.0
    max_queue: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_size", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


@dataclass(frozen=True)
class BatchStats:
    """What one call of the batch function did (passed to ``on_batch``)."""

    size: int
    padded_tokens: int  # batch size x longest item (verifier tokens)
    tokens: int  # sum of item costs (verifier tokens)
    seconds: float  # wall time of the batch function, including any split retries
    failed: int  # items whose future got an exception


@dataclass
class _Pending(Generic[T, R]):
    item: T
    cost: int
    future: concurrent.futures.Future[R]
    enqueued: float  # time.monotonic()


class MicroBatcher(Generic[T, R]):
    """Thread-safe micro-batcher around ``process(items) -> results`` (same length and order).

    Args:
        process: the batch function; runs only on the worker thread, one batch at a time.
        limits: batch limits.
        cost: an item's size in tokens (for ``max_batch_tokens``); runs in the submitting thread.
        on_batch: called on the worker thread after every batch with its :class:`BatchStats`.
        name: worker thread name.
    """

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        limits: BatchLimits | None = None,
        *,
        cost: Callable[[T], int] = lambda _item: 1,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "cme-batcher",
    ) -> None:
        self.process = process
        self.limits = limits or BatchLimits()
        self.cost = cost
        self.on_batch = on_batch
        self._queue: deque[_Pending[T, R]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._busy = False
        self.batches_run = 0  # batches the worker has run
        self.items_run = 0  # items in them
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batch running now)."""
        with self._cond:
            return len(self._queue)

    @property
    def busy(self) -> bool:
        """Whether a batch is running now."""
        return self._busy

    def submit(self, item: T) -> concurrent.futures.Future[R]:
        """Queue one item; the future gets its result or the exception it raised.

        Raises :class:`Overloaded` when the queue is full and :class:`BatcherClosed` after
        :meth:`close`. An exception from ``cost`` is set on the returned future.
        """
        future: concurrent.futures.Future[R] = concurrent.futures.Future()
        try:
            cost = max(1, int(self.cost(item)))
        except Exception as exc:  # the item alone is bad: report it through its future
            future.set_exception(exc)
            return future
        with self._cond:
            if self._closed:
                raise BatcherClosed("batcher is shutting down")
            if len(self._queue) >= self.limits.max_queue:
                raise Overloaded(f"queue full ({self.limits.max_queue} samples waiting)")
            self._queue.append(_Pending(item, cost, future, time.monotonic()))
            self._cond.notify_all()
        return future

    async def submit_async(self, item: T) -> R:
        """Submit one item and await its result; cancelling the await withdraws a waiting item."""
        return await asyncio.wrap_future(self.submit(item))

    def close(self, timeout: float | None = None) -> None:
        """Stop taking items, finish every queued one, and stop the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- worker thread ---------------------------------------------------------------------------

    def _fits(self, n: int, longest: int) -> bool:
        lim = self.limits
        return n <= lim.max_batch_size and n * longest <= lim.max_batch_tokens

    def _full(self) -> bool:
        """Whether the queue already holds more than one batch's worth (lock held)."""
        longest = 0
        for n, p in enumerate(self._queue, start=1):
            longest = max(longest, p.cost)
            if not self._fits(n, longest):
                return True
        return False

    def _take_batch(self) -> list[_Pending[T, R]]:
        """Pop the next batch in FIFO order, skipping cancelled items (lock held)."""
        batch: list[_Pending[T, R]] = []
        longest = 0
        while self._queue:
            p = self._queue[0]
            if batch and not self._fits(len(batch) + 1, max(longest, p.cost)):
                break
            self._queue.popleft()
            if p.future.set_running_or_notify_cancel():
                batch.append(p)
                longest = max(longest, p.cost)
        return batch

    def _run(self) -> None:
        wait_s = self.limits.max_wait_ms / 1000.0
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed and drained
                deadline = self._queue[0].enqueued + wait_s
                while not self._closed and not self._full():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch = self._take_batch()
                self._busy = bool(batch)
            if batch:
                self._run_batch(batch)
            self._busy = False

    def _run_batch(self, batch: list[_Pending[T, R]]) -> None:
        start = time.perf_counter()
        failed = self._process(batch)
        self.batches_run += 1
        self.items_run += len(batch)
        if self.on_batch is not None:
            longest = max(p.cost for p in batch)
            stats = BatchStats(
                size=len(batch),
                padded_tokens=len(batch) * longest,
                tokens=sum(p.cost for p in batch),
                seconds=time.perf_counter() - start,
                failed=failed,
            )
            try:
                self.on_batch(stats)
            except Exception:
                logger.exception("on_batch callback failed")

    def _process(self, batch: list[_Pending[T, R]]) -> int:
        """Run ``process`` on ``batch`` and settle every future; returns how many failed.

        On an exception the batch is split in halves and each half retried, so only the
        items that fail alone get the exception.
        """
        try:
            results = list(self.process([p.item for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(
                    f"batch function returned {len(results)} results for {len(batch)} items"
                )
        except BaseException as exc:  # every failure must reach a future, or its caller hangs
            if len(batch) > 1:
                mid = len(batch) // 2
                return self._process(batch[:mid]) + self._process(batch[mid:])
            batch[0].future.set_exception(exc)
            return 1
        for p, r in zip(batch, results, strict=True):
            p.future.set_result(r)
        return 0


@dataclass(frozen=True)
class Sample:
    """One sample for the verifier: ``prompt`` (instruction text or chat messages) and ``response``."""

    prompt: str | list[dict[str, Any]]
    response: str
    id: str | None = None


def floor_result(error: str, id: str | None = None, floor: float = FLOOR_REWARD) -> CMEResult:
    """The floor reward (nats) for a sample that can never be scored, with ``error`` saying why."""
    return CMEResult(cme=floor, n_tokens=0, truncated=False, error=error, id=id)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass on a retry: overload, timeout, or out of (GPU) memory."""
    if isinstance(exc, TransientError | TimeoutError | MemoryError):
        return True
    return type(exc).__name__ == "OutOfMemoryError"  # torch.OutOfMemoryError (CUDA / MPS)


class BatchedScorer:
    """A :class:`cme_rewards.CMEScorer` behind a :class:`MicroBatcher`: one sample in, one result out.

    A sample that fails on its own with a non-transient exception gets the floor reward with the
    exception in ``error`` (and a logged warning naming its id); transient exceptions (see
    :func:`is_transient`) reach the caller so it can retry or answer 503.
    """

    def __init__(
        self,
        scorer: Any,
        limits: BatchLimits | None = None,
        *,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.scorer = scorer
        self.batcher: MicroBatcher[Sample, CMEResult] = MicroBatcher(
            self._score_batch, limits, cost=self._cost, on_batch=on_batch
        )

    def _cost(self, sample: Sample) -> int:
        return len(self.scorer.encode(sample.prompt, sample.response).input_ids)

    def _score_batch(self, samples: list[Sample]) -> list[CMEResult]:
        ids = [s.id or "" for s in samples] if any(s.id for s in samples) else None
        return self.scorer.score(
            [s.prompt for s in samples], [s.response for s in samples], ids=ids
        )

    def _settle(self, sample: Sample, exc: BaseException) -> CMEResult:
        if is_transient(exc):
            raise exc
        error = f"verifier error: {type(exc).__name__}: {exc}"[:300]
        logger.warning("sample %r got the floor reward: %s", sample.id, error)
        return floor_result(error, sample.id, floor=getattr(self.scorer, "floor", FLOOR_REWARD))

    def score(self, sample: Sample, timeout: float | None = None) -> CMEResult:
        """Score one sample, blocking; batched with whatever else is submitted meanwhile."""
        return self.score_many([sample], timeout)[0]

    def score_many(
        self, samples: Sequence[Sample], timeout: float | None = None
    ) -> list[CMEResult]:
        """Score samples from one thread, all submitted before waiting so they batch together.

        Raises the first transient exception (and withdraws the samples not yet started), or
        ``TimeoutError`` when ``timeout`` seconds pass before every result is in.
        """
        futures: list[concurrent.futures.Future[CMEResult]] = []
        try:
            for sample in samples:
                futures.append(self.batcher.submit(sample))
            _, pending = concurrent.futures.wait(futures, timeout)
            if pending:
                raise TimeoutError(f"no result within {timeout} s")
            return [self._result(s, f) for s, f in zip(samples, futures, strict=True)]
        except BaseException:
            for f in futures:
                f.cancel()
            raise

    def _result(self, sample: Sample, future: concurrent.futures.Future[CMEResult]) -> CMEResult:
        exc = future.exception()
        return future.result() if exc is None else self._settle(sample, exc)

    async def score_async(self, sample: Sample) -> CMEResult:
        """Score one sample from a coroutine; batched with concurrent calls."""
        try:
            return await self.batcher.submit_async(sample)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._settle(sample, exc)

    def close(self, timeout: float | None = None) -> None:
        """Finish queued samples and stop the worker thread."""
        self.batcher.close(timeout)
