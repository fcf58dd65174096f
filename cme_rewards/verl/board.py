"""The group-relative floor and the per-step ``cme/*`` metrics, across all of veRL's reward workers.

A GRPO group (same ``uid``) may reach several reward workers, so one named Ray actor per run,
:class:`GroupBoard`, sees every result. An unscorable sample waits (at most
``reward.cme.group_wait_s``) for its group, then gets the worst scored member's CME minus
``floor_margin``, else the fixed ``floor``. The board logs :func:`cme_rewards.results.batch_metrics`
(plus ``cme/<term>/mean``) of the first ``data.train_batch_size x rollout.n`` results of each
``global_steps`` through veRL's ``Tracking`` (``reward.cme.metrics_logger``), as the run
``<trainer.experiment_name>-cme``: veRL aggregates ``reward_extra_info`` only in validation.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from cme_rewards.results import METRIC_PREFIX, RESULT_FIELDS, CMEResult, batch_metrics

logger = logging.getLogger(__name__)

BOARD_PREFIX = "cme_board"


@dataclass
class _Group:
    count: int = 0
    scored: list[float] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    touched: float = field(default_factory=time.monotonic)


@dataclass
class _Step:
    results: list[CMEResult] = field(default_factory=list)
    terms: dict[str, list[float]] = field(default_factory=dict)


@dataclass(kw_only=True)
class GroupBoard:
    """See the module docstring. Used as an async Ray actor (:func:`get_group_board`)."""

    margin: float
    step_size: int | None = None
    metrics_logger: Sequence[str] = ()
    project: str = "cme_rewards"
    experiment: str = "cme"
    groups: dict[str, _Group] = field(default_factory=dict, init=False)
    steps: dict[int, _Step] = field(default_factory=dict, init=False)
    logged: set[int] = field(default_factory=set, init=False)  # steps already flushed
    tracking: Any = field(default=None, init=False)

    async def settle(
        self,
        uid: str | None,
        step: int | None,
        result: dict[str, Any],
        expected: int,
        wait_s: float,
        terms: dict[str, float] | None = None,
    ) -> float | None:
        """Record one sample's result; for a sample that cannot be scored (``error`` set), return
        the group floor (nats) once its group is complete, or ``None`` for the fixed floor."""
        self._record_step(step, result, terms or {})
        if uid is None:
            return None
        group = self.groups.setdefault(uid, _Group())
        group.count += 1
        group.touched = time.monotonic()
        if result.get("error") is None:
            group.scored.append(float(result["cme"]))
        if group.count >= expected:
            group.done.set()
            self.groups.pop(uid, None)
        self._evict(wait_s)
        if result.get("error") is None:
            return None
        if not group.done.is_set() and wait_s > 0:
            try:
                await asyncio.wait_for(group.done.wait(), wait_s)
            except asyncio.TimeoutError:
                logger.warning(
                    "group %r: %d of %d members after %.0f s; its unscorable sample gets the "
                    "fixed floor",
                    uid,
                    group.count,
                    expected,
                    wait_s,
                )
                return None
        return min(group.scored) - self.margin if group.scored else None

    def _evict(self, wait_s: float) -> None:
        """Forget groups nobody has reported to for long (they will never complete)."""
        if len(self.groups) < 1024:
            return
        horizon = time.monotonic() - max(2 * wait_s, 600.0)
        for uid in [u for u, g in self.groups.items() if g.touched < horizon]:
            self.groups.pop(uid).done.set()

    def _record_step(
        self, step: int | None, result: dict[str, Any], terms: dict[str, float]
    ) -> None:
        if step is None or step in self.logged:
            return
        bucket = self.steps.setdefault(step, _Step())
        bucket.results.append(CMEResult(**{key: result.get(key) for key in RESULT_FIELDS}))
        for name, value in terms.items():
            bucket.terms.setdefault(name, []).append(float(value))
        if self.step_size is not None and len(bucket.results) >= self.step_size:
            self._flush(step)
        elif self.step_size is None:
            for earlier in [s for s in self.steps if s < step]:
                self._flush(earlier)

    def _flush(self, step: int) -> None:
        bucket = self.steps.pop(step)
        data = batch_metrics(bucket.results)
        for name, values in bucket.terms.items():
            data[f"{METRIC_PREFIX}{name}/mean"] = sum(values) / len(values)
        self.logged.add(step)
        if not self.metrics_logger:
            return
        try:
            if self.tracking is None:
                from verl.utils.tracking import Tracking

                path = os.environ.get("VERL_FILE_LOGGER_PATH")
                if path:  # veRL's file logger truncates its file: write ours beside the trainer's
                    os.environ["VERL_FILE_LOGGER_PATH"] = f"{os.path.splitext(path)[0]}-cme.jsonl"
                self.tracking = Tracking(
                    project_name=self.project,
                    experiment_name=f"{self.experiment}-cme",
                    default_backend=list(self.metrics_logger),
                )
            self.tracking.log(data=data, step=step)
        except Exception:  # noqa: BLE001 - metrics must never stop training
            logger.exception("cme metrics for step %d could not be logged", step)


def get_group_board(**kwargs: Any) -> Any:
    """The run's :class:`GroupBoard` actor (``GroupBoard(**kwargs)``), started on first use;
    outside Ray, an in-process board with the same ``board.settle.remote(...)`` call."""
    import ray

    if not ray.is_initialized():
        board = GroupBoard(**kwargs)
        return SimpleNamespace(settle=SimpleNamespace(remote=board.settle))
    key = hashlib.sha256(repr(sorted(kwargs.items())).encode()).hexdigest()[:12]
    return (
        ray.remote(GroupBoard)
        .options(
            name=f"{BOARD_PREFIX}_{key}", get_if_exists=True, num_cpus=0, max_concurrency=100_000
        )
        .remote(**kwargs)
    )
