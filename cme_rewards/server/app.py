"""The FastAPI app: ``POST /get_reward`` (OpenRLHF), ``POST /score`` (native), ``GET /health``, ``GET /metrics``.

Every sample is submitted to one micro-batcher, so concurrent one-sample requests share verifier
batches; each request gets its own results back. Failure policy (SPEC.md): a sample that can never
be scored answers 200 with the floor reward (its error in ``results``, a 1 in ``extra_logs.failed``);
overload and timeouts answer 503 with ``Retry-After`` so clients retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, HTTPException

from cme_rewards.batching import (
    BatchedScorer,
    BatchLimits,
    Overloaded,
    Sample,
    floor_result,
    is_transient,
)
from cme_rewards.openrlhf.protocol import PromptRecovery, openrlhf_reply
from cme_rewards.reductions import grpo_advantages
from cme_rewards.results import CMEResult
from cme_rewards.server.metrics import Metrics
from cme_rewards.server.schemas import GetRewardRequest, ScoreRequest, ScoreResponse
from cme_rewards.server.security import BodySizeLimit, RequestAccounting, token_checker

logger = logging.getLogger(__name__)

RETRY_AFTER = {"Retry-After": "1"}


@dataclass(frozen=True)
class ServerConfig:
    """Server behaviour apart from the verifier.

    Attributes:
        limits: micro-batch limits.
        request_timeout_s: a request not answered within this many seconds gets 503 (keep it
            below OpenRLHF's 180 s client timeout).
        max_body_bytes: larger request bodies get 413.
        token: bearer token required on every endpoint but ``/health`` (None: open).
    """

    limits: BatchLimits = field(default_factory=BatchLimits)
    request_timeout_s: float = 120.0
    max_body_bytes: int = 4 * 1024 * 1024
    token: str | None = None


async def _all_or_cancel(awaitables: Sequence[Any]) -> list[Any]:
    """Await all; if one raises (or we are cancelled), cancel the rest and re-raise."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


def create_app(
    scorer: Any, recovery: PromptRecovery | None = None, config: ServerConfig | None = None
) -> FastAPI:
    """The reward server around a loaded ``CMEScorer`` (its batcher thread starts now).

    ``recovery`` turns OpenRLHF's (query, prompt, label) into the verifier's prompt and response
    (default: labels, else the templated prompt as it is).
    """
    config = config or ServerConfig()
    recovery = recovery or PromptRecovery()
    metrics = Metrics()
    batched = BatchedScorer(scorer, config.limits, on_batch=metrics.record_batch)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has finished in-flight requests by now; finish anything still queued.
        await asyncio.to_thread(batched.close)

    app = FastAPI(title="cme-rewards", version="1", lifespan=lifespan)
    app.state.batched = batched
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(RequestAccounting, metrics=metrics)  # outermost: sees every status
    auth = [Depends(token_checker(config.token))]

    async def one(item: Sample | CMEResult) -> CMEResult:
        return item if isinstance(item, CMEResult) else await batched.score_async(item)

    async def score_all(items: list[Sample | CMEResult]) -> list[CMEResult]:
        try:
            return await asyncio.wait_for(
                _all_or_cancel([one(i) for i in items]), config.request_timeout_s
            )
        except asyncio.TimeoutError:
            metrics.record_error("timeout")
            raise HTTPException(
                503, f"not scored within {config.request_timeout_s} s", RETRY_AFTER
            ) from None
        except Exception as exc:
            if not is_transient(exc):
                raise
            metrics.record_error(
                "overloaded" if isinstance(exc, Overloaded) else type(exc).__name__
            )
            raise HTTPException(503, f"{type(exc).__name__}: {exc}"[:300], RETRY_AFTER) from None

    @app.post("/get_reward", dependencies=auth)
    async def get_reward(body: GetRewardRequest) -> dict[str, Any]:
        """OpenRLHF's remote reward protocol: ``{query, prompts, labels}`` -> ``{rewards, scores, extra_logs}``."""
        labels = body.labels if body.labels is not None else [None] * len(body.query)
        items: list[Sample | CMEResult] = []
        sources: Counter[str] = Counter()
        for query, prompt, label in zip(body.query, body.prompts, labels, strict=True):
            rec = recovery.recover(query, prompt, label)
            sources[rec.source] += 1
            if rec.error is not None:
                logger.warning("sample got the floor reward: %s (prompt %.80r)", rec.error, prompt)
                items.append(floor_result(rec.error))
            else:
                items.append(Sample(rec.prompt, rec.response))
        results = await score_all(items)
        metrics.record_samples(len(results), sum(r.error is not None for r in results), sources)
        return openrlhf_reply(results)

    @app.post("/score", dependencies=auth)
    async def score(body: ScoreRequest) -> ScoreResponse:
        """Native batch: ``{samples: [{prompt, response, id?, group?}]}`` -> ``{results: [...]}``."""
        samples = [
            Sample(
                s.prompt if isinstance(s.prompt, str) else [m.model_dump() for m in s.prompt],
                s.response,
                s.id,
            )
            for s in body.samples
        ]
        results = await score_all(list(samples))
        metrics.record_samples(len(results), sum(r.error is not None for r in results))
        out = [{"id": s.id, **r.to_dict()} for s, r in zip(body.samples, results, strict=True)]
        if body.samples[0].group is not None:
            groups = [s.group for s in body.samples]
            for d, adv in zip(out, grpo_advantages([r.cme for r in results], groups), strict=True):
                d["advantage"] = adv
        return ScoreResponse(results=out)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the verifier is loaded and the batcher runs (no token needed)."""
        return {
            "status": "ok",
            "verifier": getattr(scorer, "verifier_name", None),
            "device": str(getattr(scorer, "device", "")),
        }

    @app.get("/metrics", dependencies=auth)
    async def get_metrics() -> dict[str, Any]:
        """Counters: requests, samples, tokens/s, queue depth, batch sizes, errors, latency."""
        snap = metrics.snapshot(batched.batcher.queue_depth, batched.batcher.busy)
        snap["limits"] = {
            "max_batch_tokens": config.limits.max_batch_tokens,
            "max_batch_size": config.limits.max_batch_size,
            "max_wait_ms": config.limits.max_wait_ms,
            "max_queue": config.limits.max_queue,
        }
        return snap

    return app
