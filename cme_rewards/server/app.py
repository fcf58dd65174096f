"""The FastAPI app: ``POST /get_reward`` (OpenRLHF), ``POST /score`` (native), ``GET /health``, ``GET /metrics``.

All samples go through one micro-batcher, so concurrent requests share verifier batches. A sample
that can never be scored answers 200 with the floor reward (its error in ``results``); overload
and timeouts answer 503 with ``Retry-After``; a request that can never succeed gets a 4xx naming
the limit or field. CPU work runs in worker threads; replies are ASCII JSON with finite numbers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator

from cme_rewards.batched_scorer import BatchedScorer, Sample
from cme_rewards.batching import BatchLimits, Overloaded, TooManyItems
from cme_rewards.openrlhf.protocol import PromptRecovery, openrlhf_reply
from cme_rewards.results import CMEResult, Scorer, finish_groups
from cme_rewards.retry import is_transient
from cme_rewards.server.metrics import Metrics
from cme_rewards.server.options import ServerOptions
from cme_rewards.server.security import (
    BodySizeLimit,
    RequestAccounting,
    RequestLifetime,
    TokenGuard,
)

RETRY_AFTER = {"Retry-After": "1"}
ROUTES = ("/get_reward", "/score", "/health", "/metrics", "/docs", "/openapi.json")
"""Paths the server answers (metrics count every other path under one label)."""


class AsciiJSONResponse(JSONResponse):
    """JSON in ASCII (lone surrogates become escapes, not encoding errors); NaN and infinities raise."""

    def render(self, content: Any) -> bytes:
        return json.dumps(
            content, ensure_ascii=True, allow_nan=False, separators=(",", ":")
        ).encode()


class GetRewardRequest(BaseModel):
    """OpenRLHF's ``POST /get_reward`` body: parallel lists, usually of one sample."""

    query: list[str] = Field(
        min_length=1, description="templated prompt + response, special tokens kept"
    )
    prompts: list[str] = Field(description="templated prompts (prefixes of query)")
    labels: list[Any] | None = Field(
        None, description="dataset labels: the raw prompts, in the recipe"
    )

    @model_validator(mode="after")
    def _same_lengths(self) -> GetRewardRequest:
        for name in ("prompts", "labels"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.query):
                raise ValueError(
                    f"field '{name}' has {len(values)} items but 'query' has {len(self.query)}"
                )
        return self


class ChatMessage(BaseModel):
    """One chat message."""

    role: str
    content: str


class ScoreSample(BaseModel):
    """One native sample: the raw instruction (or messages) and the response text."""

    prompt: str | list[ChatMessage]
    response: str
    id: str | None = None
    group: str | int | None = Field(None, description="samples sharing a group get GRPO advantages")


class ScoreRequest(BaseModel):
    """``POST /score`` body."""

    samples: list[ScoreSample] = Field(min_length=1)

    @model_validator(mode="after")
    def _groups_all_or_none(self) -> ScoreRequest:
        grouped = [s.group is not None for s in self.samples]
        if any(grouped) and not all(grouped):
            raise ValueError("field 'group' must be set on every sample or on none")
        return self


class ScoreResponse(BaseModel):
    """``POST /score`` reply: per sample its ``id`` and the shared result fields, in request order."""

    results: list[dict[str, Any]]


MAX_VALIDATION_ERRORS = 20
"""422 answers list at most this many problems (location, message, type; never the input)."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``create_app`` needs besides the scorer."""

    limits: BatchLimits = field(default_factory=BatchLimits)
    server: ServerOptions = field(default_factory=ServerOptions)


def create_app(
    scorer: Scorer, recovery: PromptRecovery | None = None, config: ServerConfig | None = None
) -> FastAPI:
    """The reward server around a loaded scorer (its batcher thread starts now); ``recovery``
    turns OpenRLHF's samples into the verifier's (default: :class:`PromptRecovery`)."""
    config = config or ServerConfig()
    opts = config.server
    # A request larger than the queue could never enter it: the smaller limit is the one that holds.
    max_samples, limit_name = min(
        (opts.max_samples, "max_samples"), (config.limits.max_queue, "max_queue")
    )
    recovery = recovery or PromptRecovery()
    metrics = Metrics(routes=ROUTES)
    batched = BatchedScorer(scorer, config.limits, on_batch=metrics.record_batch)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        # uvicorn has finished in-flight requests by now; finish anything still queued.
        await asyncio.to_thread(batched.close)

    docs = {} if opts.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="cme-rewards",
        version="1",
        lifespan=lifespan,
        default_response_class=AsciiJSONResponse,
        **docs,
    )
    app.state.batched = batched
    app.state.metrics = metrics
    # Innermost first; a request passes accounting, the token, its lifetime, then the body limit.
    app.add_middleware(BodySizeLimit, max_bytes=opts.max_body_bytes)
    app.add_middleware(
        RequestLifetime,
        timeout=opts.request_timeout,
        on_timeout=lambda: metrics.record_error("timeout"),
    )
    app.add_middleware(TokenGuard, token=opts.token, open_paths=("/health",))
    app.add_middleware(RequestAccounting, metrics=metrics)  # outermost: sees every status

    async def scored(
        n: int,
        prepare: Callable[[], list[Sample | CMEResult]],
        sources: Counter[str] | None = None,
    ) -> list[CMEResult]:
        """Check the request's ``n`` samples, run ``prepare`` in a worker thread, score the samples
        among its items and count them (``sources``: filled by ``prepare``)."""
        try:
            if n > max_samples:
                raise TooManyItems(
                    f"{n} samples in one request; the server takes at most {limit_name}={max_samples}"
                )
            items = await asyncio.to_thread(prepare)
            samples = [item for item in items if isinstance(item, Sample)]
            results = iter(await batched.score_many_async(samples))
        except TooManyItems as exc:
            metrics.record_error("too_many_samples")
            raise HTTPException(413, str(exc)) from None
        except Exception as exc:
            if not is_transient(exc):
                raise
            metrics.record_error(
                "overloaded" if isinstance(exc, Overloaded) else type(exc).__name__
            )
            raise HTTPException(503, f"{type(exc).__name__}: {exc}"[:300], RETRY_AFTER) from None
        done = [next(results) if isinstance(item, Sample) else item for item in items]
        metrics.record_samples(len(done), sum(r.error is not None for r in done), sources)
        return done

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 naming each bad field, without echoing the (possibly huge or hostile) input."""
        errors = exc.errors()
        detail = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in errors[:MAX_VALIDATION_ERRORS]
        ]
        return AsciiJSONResponse({"detail": detail, "n_errors": len(errors)}, status_code=422)

    @app.post("/get_reward")
    async def get_reward(body: GetRewardRequest) -> dict[str, Any]:
        """OpenRLHF's remote reward protocol: ``{query, prompts, labels}`` -> ``{rewards, scores, extra_logs}``."""
        labels = body.labels if body.labels is not None else [None] * len(body.query)
        sources: Counter[str] = Counter()
        results = await scored(
            len(body.query),
            lambda: recovery.samples(body.query, body.prompts, labels, scorer.options, sources),
            sources,
        )
        return openrlhf_reply(results)

    @app.post("/score")
    async def score(body: ScoreRequest) -> ScoreResponse:
        """Native batch: ``{samples: [{prompt, response, id?, group?}]}`` -> ``{results: [...]}``."""

        def prepare() -> list[Sample | CMEResult]:
            return [
                Sample(
                    s.prompt if isinstance(s.prompt, str) else [m.model_dump() for m in s.prompt],
                    s.response,
                    s.id,
                )
                for s in body.samples
            ]

        results = await scored(len(body.samples), prepare)
        if body.samples[0].group is not None:
            finish_groups(results, [s.group for s in body.samples], scorer.options)
        return ScoreResponse(
            results=[
                {"id": s.id, **r.to_dict()} for s, r in zip(body.samples, results, strict=True)
            ]
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: the verifier is loaded and the batcher runs (no token needed)."""
        return {
            "status": "ok",
            "verifier": scorer.verifier_name,
            "device": str(getattr(scorer, "device", "")),
        }

    @app.get("/metrics")
    async def get_metrics() -> dict[str, Any]:
        """Counters: requests, samples, tokens/s, queue depth, batch sizes, errors, latency."""
        snap = metrics.snapshot(batched.batcher.queue_depth, batched.batcher.busy)
        snap["limits"] = {**dataclasses.asdict(config.limits), "max_samples": max_samples}
        return snap

    return app
