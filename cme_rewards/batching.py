"""Micro-batching: coalesce concurrent single-sample requests into one verifier batch.

Callers each submit items and get one future per item. One worker thread takes the waiting items
(FIFO) as a batch bounded by :class:`BatchLimits`, runs the batch function once, and settles every
future. A failing batch is split in halves, so one bad item fails alone.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from cme_rewards.options import CheckedOptions, at_least, option
from cme_rewards.retry import TransientError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(TransientError):
    """The queue already holds ``max_queue`` items."""


class TooManyItems(ValueError):
    """One submission holds more items than the queue can ever hold: retrying cannot help."""


class BatcherClosed(TransientError):
    """The batcher is shutting down and takes no new items."""


@dataclass(frozen=True)
class BatchLimits(CheckedOptions):
    """Limits on the micro-batches of concurrent callers (declared once for every surface)."""

    max_batch_tokens: int = option(
        16384,
        "bound on batch size x longest sample (the padded [batch, seq] size); a longer sample "
        "still runs, alone",
        unit="tokens",
        check=at_least(1),
    )
    max_batch_size: int = option(
        64, "most samples in one batch (1 turns batching off)", check=at_least(1)
    )
    max_wait_ms: float = option(
        10.0, "how long the oldest waiting sample may wait for others", unit="ms", check=at_least(0)
    )
    max_queue: int = option(
        4096,
        "most samples waiting; beyond it callers are told to retry",
        unit="samples",
        check=at_least(1),
    )


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
    """Thread-safe micro-batcher around ``process(items) -> results`` (same length and order),
    run on one worker thread; ``on_batch`` gets each batch's :class:`BatchStats` there."""

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        limits: BatchLimits | None = None,
        *,
        on_batch: Callable[[BatchStats], None] | None = None,
        name: str = "cme-batcher",
    ) -> None:
        self.process = process
        self.limits = limits or BatchLimits()
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

    def submit(self, item: T, cost: int = 1) -> concurrent.futures.Future[R]:
        """Queue one item of ``cost`` tokens; see :meth:`submit_many`."""
        return self.submit_many([item], [cost])[0]

    def submit_many(
        self, items: Sequence[T], costs: Sequence[int]
    ) -> list[concurrent.futures.Future[R]]:
        """Queue all ``items`` (``costs[i]``: tokens of item ``i``) or none; each future gets its
        item's result or exception. Raises :class:`TooManyItems` (more than ``max_queue``),
        :class:`Overloaded` (no room now) or :class:`BatcherClosed` (after :meth:`close`)."""
        if len(items) > self.limits.max_queue:
            raise TooManyItems(
                f"{len(items)} samples in one request; the queue holds at most "
                f"max_queue={self.limits.max_queue}"
            )
        now = time.monotonic()
        pending = [
            _Pending(item, max(1, int(cost)), concurrent.futures.Future(), now)
            for item, cost in zip(items, costs, strict=True)
        ]
        with self._cond:
            if self._closed:
                raise BatcherClosed("batcher is shutting down")
            if len(self._queue) + len(pending) > self.limits.max_queue:
                raise Overloaded(
                    f"queue full ({len(self._queue)} of max_queue={self.limits.max_queue} "
                    f"samples waiting, {len(pending)} more asked)"
                )
            self._queue.extend(pending)
            self._cond.notify_all()
        return [p.future for p in pending]

    def withdraw(self, futures: Sequence[concurrent.futures.Future[R]]) -> int:
        """Cancel the futures whose items still wait and drop those items; returns how many.

        Items already in a running batch finish (their results are dropped).
        """
        targets = {id(f) for f in futures}
        with self._cond:
            before = len(self._queue)
            self._queue = deque(
                p for p in self._queue if not (id(p.future) in targets and p.future.cancel())
            )
            self._cond.notify_all()
            return before - len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Stop taking items, finish every queued one, and stop the worker thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _fits(self, n: int, longest: int) -> bool:
        return n <= self.limits.max_batch_size and n * longest <= self.limits.max_batch_tokens

    def _full(self) -> bool:
        """Whether the queue already holds more than one batch's worth (lock held)."""
        longest = itertools.accumulate((p.cost for p in self._queue), max)
        return not all(self._fits(n, m) for n, m in enumerate(longest, start=1))

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
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return  # closed and drained
                wait_left = self._queue[0].enqueued + wait_s - time.monotonic()
                self._cond.wait_for(lambda: self._closed or self._full(), wait_left)
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
            costs = [p.cost for p in batch]
            seconds = time.perf_counter() - start
            try:
                self.on_batch(
                    BatchStats(len(batch), len(batch) * max(costs), sum(costs), seconds, failed)
                )
            except Exception:
                logger.exception("on_batch callback failed")

    def _process(self, batch: list[_Pending[T, R]]) -> int:
        """Run ``process`` on ``batch`` and settle every future; returns how many failed (a failing
        batch is split in halves, so only items that fail alone get the exception)."""
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
