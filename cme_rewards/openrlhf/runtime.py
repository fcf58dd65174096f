"""One verifier per process for OpenRLHF's file mode, configured by environment variables.

OpenRLHF calls ``reward_func`` once per sample, concurrently from threads, inside every vLLM rollout
actor. The first call loads the verifier (so vLLM has taken its memory first); later calls share
it, and concurrent calls are coalesced into verifier batches by a micro-batcher.

Environment variables (all optional):

=================================== ===========================================================
``CME_REWARDS_VERIFIER``            verifier name (default ``smollm2-135m-instruct``)
``CME_REWARDS_DEVICE``              ``auto`` (CUDA when visible), ``cpu``, ``cuda``, ``cuda:1``
``CME_REWARDS_DTYPE``               ``auto`` (bf16 on CUDA, fp32 on CPU), ``float32``, ...
``CME_REWARDS_GPU_MEMORY_FRACTION`` share of the GPU this process may allocate, in (0, 1]; set
                                    it and lower ``--vllm.gpu_memory_utilization`` so they sum < 1
``CME_REWARDS_MAX_LENGTH``          verifier tokens per sample (default 2048)
``CME_REWARDS_MAX_BATCH_TOKENS``    micro-batch bound, batch size x longest sample (16384)
``CME_REWARDS_MAX_BATCH_SIZE``      most samples per batch (64)
``CME_REWARDS_MAX_WAIT_MS``         how long a sample waits for company (10)
``CME_REWARDS_TOKEN_BUDGET``        padded tokens per verifier forward (2048 on CPU, 16384 GPU)
``CME_REWARDS_POLICY_TOKENIZER``    the policy's tokenizer: strips its chat template / tokens
``CME_REWARDS_PROMPT_SOURCE``       ``auto``, ``label``, ``template`` or ``templated``
``CME_REWARDS_RETRIES``             tries on transient trouble before the floor reward (5)
=================================== ===========================================================
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cme_rewards.batching import (
    BatchedScorer,
    BatchLimits,
    Sample,
    floor_result,
    is_transient,
)
from cme_rewards.openrlhf.protocol import (
    PROMPT_SOURCES,
    PromptRecovery,
    extra_logs,
    load_policy_tokenizer,
)
from cme_rewards.results import CMEResult
from cme_rewards.scorer import default_token_budget

logger = logging.getLogger(__name__)

PREFIX = "CME_REWARDS_"


def _env(environ: Mapping[str, str], name: str, kind: type, default: Any) -> Any:
    raw = environ.get(PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{PREFIX}{name}: expected {kind.__name__}, got {raw!r}") from None


@dataclass(frozen=True)
class FileModeConfig:
    """File-mode settings (see the module docstring for the environment variables)."""

    verifier: str = "smollm2-135m-instruct"
    device: str = "auto"
    dtype: str = "auto"
    gpu_memory_fraction: float | None = None
    max_length: int = 2048
    token_budget: int | None = None
    limits: BatchLimits = field(default_factory=BatchLimits)
    policy_tokenizer: str | None = None
    prompt_source: str = "auto"
    retries: int = 5

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FileModeConfig:
        """Read ``CME_REWARDS_*``; a bad value raises ``ValueError`` naming its variable."""
        env = os.environ if environ is None else environ
        d = BatchLimits()
        fraction = _env(env, "GPU_MEMORY_FRACTION", float, None)
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"{PREFIX}GPU_MEMORY_FRACTION: must be in (0, 1], got {fraction}")
        source = _env(env, "PROMPT_SOURCE", str, "auto")
        if source not in PROMPT_SOURCES:
            raise ValueError(
                f"{PREFIX}PROMPT_SOURCE: must be one of {PROMPT_SOURCES}, got {source!r}"
            )
        try:
            limits = BatchLimits(
                max_batch_tokens=_env(env, "MAX_BATCH_TOKENS", int, d.max_batch_tokens),
                max_batch_size=_env(env, "MAX_BATCH_SIZE", int, d.max_batch_size),
                max_wait_ms=_env(env, "MAX_WAIT_MS", float, d.max_wait_ms),
            )
        except ValueError as exc:
            raise ValueError(f"{PREFIX}{str(exc).split(' ', 1)[0].upper()}: {exc}") from None
        config = cls(
            verifier=_env(env, "VERIFIER", str, cls.verifier),
            device=_env(env, "DEVICE", str, cls.device),
            dtype=_env(env, "DTYPE", str, cls.dtype),
            gpu_memory_fraction=fraction,
            max_length=_env(env, "MAX_LENGTH", int, cls.max_length),
            token_budget=_env(env, "TOKEN_BUDGET", int, None),
            limits=limits,
            policy_tokenizer=_env(env, "POLICY_TOKENIZER", str, None),
            prompt_source=source,
            retries=_env(env, "RETRIES", int, cls.retries),
        )
        if config.max_length < 2:
            raise ValueError(f"{PREFIX}MAX_LENGTH: must be at least 2, got {config.max_length}")
        if config.token_budget is not None and config.token_budget < 1:
            raise ValueError(f"{PREFIX}TOKEN_BUDGET: must be at least 1, got {config.token_budget}")
        if config.retries < 1:
            raise ValueError(f"{PREFIX}RETRIES: must be at least 1, got {config.retries}")
        return config


class FileModeRuntime:
    """The process's verifier, batcher and prompt recovery, created on first use (thread-safe)."""

    def __init__(self, config: FileModeConfig, scorer: Any = None) -> None:
        self.config = config
        self._scorer = scorer
        self._lock = threading.Lock()
        self._batched: BatchedScorer | None = None
        self._recovery: PromptRecovery | None = None

    def _load(self) -> tuple[BatchedScorer, PromptRecovery]:
        with self._lock:
            if self._batched is None or self._recovery is None:
                cfg = self.config
                tokenizer = (
                    load_policy_tokenizer(cfg.policy_tokenizer) if cfg.policy_tokenizer else None
                )
                recovery = PromptRecovery(tokenizer, cfg.prompt_source)
                if (warning := recovery.startup_warning()) is not None:
                    logger.warning(warning)
                scorer = self._scorer if self._scorer is not None else self._load_scorer()
                self._batched = BatchedScorer(scorer, cfg.limits)
                self._recovery = recovery
            return self._batched, self._recovery

    def _load_scorer(self) -> Any:
        import torch

        from cme_rewards.models import resolve_device
        from cme_rewards.scorer import CMEScorer

        cfg = self.config
        device = resolve_device(cfg.device)
        if cfg.gpu_memory_fraction is not None and device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(cfg.gpu_memory_fraction, device)
        logger.info("loading verifier %s on %s (pid %d)", cfg.verifier, device, os.getpid())
        return CMEScorer(
            cfg.verifier,
            device=str(device),
            dtype=cfg.dtype,
            max_length=cfg.max_length,
            token_budget=cfg.token_budget or default_token_budget(device),
        )

    def close(self) -> None:
        """Finish queued samples and stop the batcher thread (a later call starts a new one)."""
        with self._lock:
            if self._batched is not None:
                self._batched.close()
                self._batched = None

    def score(
        self, queries: Sequence[str], prompts: Sequence[str], labels: Sequence[Any]
    ) -> list[CMEResult]:
        """CME of each OpenRLHF sample; never raises for a sample, never returns None or NaN.

        Transient trouble is retried ``retries`` times (with backoff), then gets the floor reward.
        """
        _, recovery = self._load()
        labels = list(labels) if labels is not None else [None] * len(queries)
        results: list[CMEResult | None] = [None] * len(queries)
        todo: list[tuple[int, Sample]] = []
        for i, (query, prompt, label) in enumerate(zip(queries, prompts, labels, strict=True)):
            rec = recovery.recover(query, prompt, label)
            if rec.error is not None:
                logger.warning("sample got the floor reward: %s (prompt %.80r)", rec.error, prompt)
                results[i] = floor_result(rec.error)
            else:
                todo.append((i, Sample(rec.prompt, rec.response)))
        if todo:
            for (i, _), r in zip(todo, self._score_with_retries([s for _, s in todo]), strict=True):
                results[i] = r
        return [r for r in results if r is not None]

    def _score_with_retries(self, samples: list[Sample]) -> list[CMEResult]:
        batched, _ = self._load()
        error: BaseException | None = None
        for attempt in range(self.config.retries):
            try:
                return batched.score_many(samples)
            except Exception as exc:
                if not is_transient(exc):
                    reason = f"verifier error: {type(exc).__name__}: {exc}"[:300]
                    logger.exception("%d samples got the floor reward: %s", len(samples), reason)
                    return [floor_result(reason) for _ in samples]
                error = exc
                logger.warning("transient verifier trouble (try %d): %s", attempt + 1, exc)
                time.sleep(min(0.5 * 2**attempt, 8.0))
        reason = f"verifier unavailable after {self.config.retries} tries: {error}"[:300]
        logger.error("%d samples got the floor reward: %s", len(samples), reason)
        return [floor_result(reason) for _ in samples]


_runtime: FileModeRuntime | None = None
_runtime_lock = threading.Lock()


def get_runtime(config: FileModeConfig | None = None) -> FileModeRuntime:
    """The process-wide runtime (built from the environment on first call)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = FileModeRuntime(config or FileModeConfig.from_env())
        return _runtime


def reward_dict(results: Sequence[CMEResult]) -> dict[str, Any]:
    """What OpenRLHF's file mode expects: ``rewards`` and ``scores`` tensors ``[n]``, numeric ``extra_logs``."""
    import torch

    rewards = torch.tensor([r.cme for r in results], dtype=torch.float32)
    logs = {k: torch.tensor(v, dtype=torch.float32) for k, v in extra_logs(results).items()}
    return {"rewards": rewards, "scores": rewards.clone(), "extra_logs": logs}
