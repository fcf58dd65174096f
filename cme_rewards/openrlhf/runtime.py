"""One verifier per process for OpenRLHF's file mode, configured by environment variables.

OpenRLHF calls ``reward_func`` once per sample, from threads, in every vLLM rollout actor. The
first call loads the verifier (after vLLM has taken its memory); concurrent calls share batches.
Every option of :class:`ScorerOptions`, :class:`BatchLimits`, :class:`RecoveryOptions`,
:class:`FileModeOptions` and :class:`GroupOptions` may be set as ``CME_REWARDS_<OPTION>``
(``CME_REWARDS_VERIFIER``, ``CME_REWARDS_MAX_WAIT_MS``, ``CME_REWARDS_GROUP_SIZE``, ...); all are
checked when OpenRLHF loads the file.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cme_rewards.batched_scorer import BatchedScorer, Sample
from cme_rewards.batching import BatchLimits
from cme_rewards.openrlhf.grouping import GroupBoard, GroupOptions, group_key
from cme_rewards.openrlhf.protocol import PromptRecovery, RecoveryOptions, extra_logs
from cme_rewards.options import (
    CheckedOptions,
    ScorerOptions,
    at_least,
    env_name,
    env_values,
    from_values,
    option,
)
from cme_rewards.results import CMEResult, Scorer, floored
from cme_rewards.retry import DEFAULT_TRIES, retry_sync

logger = logging.getLogger(__name__)

PREFIX = "CME_REWARDS_"
env_key = functools.partial(env_name, PREFIX)  # an option's variable: ``CME_REWARDS_<NAME>``


@dataclass(frozen=True)
class FileModeOptions(CheckedOptions):
    """Options only OpenRLHF's file mode has."""

    gpu_memory_fraction: float | None = option(
        None,
        "share of the GPU this process may allocate, in (0, 1]; lower vLLM's "
        "--vllm.gpu_memory_utilization so the two sum below 1",
        check=lambda v: None if v is None or 0 < v <= 1 else f"must be in (0, 1], got {v!r}",
    )
    max_retries: int = option(
        DEFAULT_TRIES, "tries on transient trouble before the floor reward", check=at_least(1)
    )


@dataclass(frozen=True)
class FileModeConfig:
    """File-mode settings, read from ``CME_REWARDS_*`` (see the module docstring)."""

    scorer: ScorerOptions
    batch: BatchLimits
    recovery: RecoveryOptions
    file: FileModeOptions
    group: GroupOptions = GroupOptions()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FileModeConfig:
        """Read and check ``CME_REWARDS_*``; a bad value raises :class:`OptionError` naming its variable."""
        classes = (ScorerOptions, BatchLimits, RecoveryOptions, FileModeOptions, GroupOptions)
        raw = env_values(classes, PREFIX, environ)
        return cls(*from_values(classes, raw, env_key, strings=True))

    @classmethod
    def load(cls) -> FileModeConfig:
        """:meth:`from_env` plus the checks that need this machine (e.g. a CUDA device here)."""
        config = cls.from_env()
        config.scorer.check_here(env_key)
        return config


class FileModeRuntime:
    """The process's verifier, batcher and prompt recovery, created on first use (thread-safe)."""

    def __init__(self, config: FileModeConfig, scorer: Scorer | None = None) -> None:
        self.config = config
        self._scorer = scorer
        self._lock = threading.Lock()
        self._batched: BatchedScorer | None = None
        self._recovery: PromptRecovery | None = None
        size = config.group.group_size
        self.groups: GroupBoard | None = (
            GroupBoard(size, config.group.group_wait_s, config.scorer.floor_margin)
            if size is not None and size > 1
            else None
        )

    def _load(self) -> tuple[BatchedScorer, PromptRecovery]:
        with self._lock:
            if self._batched is None or self._recovery is None:
                recovery = self.config.recovery.build()
                scorer = self._scorer if self._scorer is not None else self._load_scorer()
                self._batched = BatchedScorer(scorer, self.config.batch)
                self._recovery = recovery
            return self._batched, self._recovery

    def _load_scorer(self) -> Scorer:
        import torch

        from cme_rewards.models import resolve_device
        from cme_rewards.scorer import CMEScorer

        opts = self.config.scorer
        device = resolve_device(opts.device)
        fraction = self.config.file.gpu_memory_fraction
        if fraction is not None and device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(fraction, device)
        logger.info("loading verifier %r on %s (pid %d)", opts.verifier, device, os.getpid())
        return CMEScorer(options=opts.replace(device=str(device)))

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

        Transient trouble is retried (:mod:`cme_rewards.retry`), then floored; with a group size a
        sample that cannot be scored gets its group's floor, else the fixed one.
        """
        batched, recovery = self._load()
        options = self.config.scorer
        labels = list(labels) if labels is not None else [None] * len(queries)
        results = recovery.samples(queries, prompts, labels, options)
        samples = [item for item in results if isinstance(item, Sample)]
        if samples:
            try:
                scored = retry_sync(
                    lambda: batched.score_many(samples),
                    what="cme verifier",
                    tries=self.config.file.max_retries,
                )
            except Exception as exc:
                reason = f"verifier error: {type(exc).__name__}: {exc}"[:300]
                logger.exception("%d samples got the floor reward", len(samples))
                scored = [floored(reason, options) for _ in samples]
            done = iter(scored)
            results = [next(done) if isinstance(item, Sample) else item for item in results]
        if self.groups is None:
            return results
        members = [
            self.groups.arrive(group_key(prompt, label), r)
            for prompt, label, r in zip(prompts, labels, results, strict=True)
        ]
        return [self.groups.settle(g, r) for g, r in zip(members, results, strict=True)]


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
    return tensor_reply([r.cme for r in results], extra_logs(results))


def tensor_reply(rewards: Sequence[float], logs: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """``rewards`` as OpenRLHF's ``rewards`` and ``scores`` float32 tensors ``[n]``, and ``logs``
    as its ``extra_logs`` tensors."""
    import torch

    reward_tensor = torch.tensor(rewards, dtype=torch.float32)
    tensors = {k: torch.tensor(v, dtype=torch.float32) for k, v in logs.items()}
    return {"rewards": reward_tensor, "scores": reward_tensor.clone(), "extra_logs": tensors}
