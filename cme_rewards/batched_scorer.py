"""A scorer shared by concurrent callers (the HTTP server, OpenRLHF's file mode, veRL's verifier
actor): one sample in, one result out, batched underneath by a :class:`MicroBatcher`."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cme_rewards.batching import BatchLimits, BatchStats, MicroBatcher
from cme_rewards.results import CMEResult, Scorer, floored
from cme_rewards.retry import is_transient


@dataclass(frozen=True)
class Sample:
    """One sample for the verifier: ``prompt`` (instruction text or chat messages) and ``response``."""

    prompt: str | list[dict[str, Any]]
    response: str
    id: str | None = None


class BatchedScorer:
    """A scorer behind a :class:`MicroBatcher`: samples from many callers share forward passes.

    A sample failing alone with a non-transient exception gets the floor with it in ``error``;
    transient ones (:func:`cme_rewards.retry.is_transient`) reach the caller. A call's samples
    enter the queue together or not at all, and leave it if the call is cancelled or times out.
    """

    def __init__(
        self,
        scorer: Scorer,
        limits: BatchLimits | None = None,
        *,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self.scorer = scorer
        self.batcher: MicroBatcher[Sample, CMEResult] = MicroBatcher(
            self._score_batch, limits, on_batch=on_batch
        )

    def cost(self, sample: Sample) -> int:
        """Verifier tokens of ``sample`` (tokenizes it: call it off the event loop)."""
        return len(self.scorer.encode(sample.prompt, sample.response).input_ids)

    def _score_batch(self, samples: list[Sample]) -> list[CMEResult]:
        ids = [s.id or "" for s in samples] if any(s.id for s in samples) else None
        return self.scorer.score(
            [s.prompt for s in samples], [s.response for s in samples], ids=ids
        )

    def _result(self, sample: Sample, future: concurrent.futures.Future[CMEResult]) -> CMEResult:
        exc = future.exception()
        if exc is None:
            return future.result()
        if is_transient(exc):
            raise exc
        error = f"verifier error: {type(exc).__name__}: {exc}"[:300]
        return floored(error, self.scorer.options, id=sample.id)

    def score_many(
        self, samples: Sequence[Sample], timeout: float | None = None
    ) -> list[CMEResult]:
        """Score samples, batched with whatever else comes meanwhile. Raises the first transient
        exception, :class:`~cme_rewards.batching.TooManyItems`, or ``TimeoutError`` (``timeout`` s)."""
        if not samples:
            return []
        futures = self.batcher.submit_many(samples, [self.cost(s) for s in samples])
        try:
            _, pending = concurrent.futures.wait(futures, timeout)
            if pending:
                raise TimeoutError(f"no result within {timeout} s")
            return [self._result(s, f) for s, f in zip(samples, futures, strict=True)]
        finally:
            self.batcher.withdraw(futures)

    async def score_many_async(self, samples: Sequence[Sample]) -> list[CMEResult]:
        """:meth:`score_many` from a coroutine (tokenization runs in a worker thread)."""
        if not samples:
            return []
        costs = await asyncio.to_thread(lambda: [self.cost(s) for s in samples])
        futures = self.batcher.submit_many(samples, costs)
        try:
            await asyncio.wait([asyncio.wrap_future(f) for f in futures])
            return [self._result(s, f) for s, f in zip(samples, futures, strict=True)]
        finally:
            self.batcher.withdraw(futures)

    async def score_async(self, sample: Sample) -> CMEResult:
        """Score one sample from a coroutine; batched with concurrent calls."""
        return (await self.score_many_async([sample]))[0]

    def close(self, timeout: float | None = None) -> None:
        """Finish queued samples and stop the worker thread."""
        self.batcher.close(timeout)
