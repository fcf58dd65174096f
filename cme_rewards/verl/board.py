"""The group-relative floor and the per-step ``cme/*`` metrics, across all of veRL's reward workers.

veRL calls :meth:`CMERewardManager.run_single` once per sample, in ``reward.num_workers``
``RewardLoopWorker`` actors on every node, and the members of one GRPO group (same ``uid``,
``actor_rollout_ref.rollout.n`` samples) may reach different workers at different times. One named
Ray actor per training run, :class:`GroupBoard` (no CPU reserved), sees every sample's result:

- **Group floor.** A scored sample returns at once. A sample that cannot be scored waits until its
  group's ``rollout.n`` members have reported (or ``reward.cme.group_wait_s`` passed) and then gets
  the worst scored member's CME minus ``floor_margin``, so it ranks last without inflating the
  group's std (:func:`cme_rewards.results.group_floor`); when no member was scored, or the wait
  runs out, it gets the fixed floor (``floor``). The wait costs a training step nothing: the step
  waits for the group's slowest sample anyway. A validation group with fewer members
  (``val_kwargs.n`` < ``rollout.n``) waits out ``group_wait_s`` and gets the fixed floor.
- **Per-step metrics.** veRL 0.9.1 aggregates ``reward_extra_info`` only in validation (training
  writes it to the batch or TransferQueue and logs no aggregate of it), so the board does it: the
  results of the first ``data.train_batch_size x rollout.n`` samples with the same ``global_steps``
  (which veRL's v1 agent loop passes with every sample) make one step's
  :func:`cme_rewards.results.batch_metrics` (``cme/mean``, ``cme/std``, ...), plus ``cme/<term>/mean``
  for each combined reward, logged through veRL's own ``verl.utils.tracking.Tracking`` to the
  backends in ``reward.cme.metrics_logger`` as the run ``<trainer.experiment_name>-cme``, with
  ``step=global_steps``. Samples of that step after them (validation shares the step number) are
  not counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cme_rewards.results import METRIC_PREFIX, CMEResult, batch_metrics

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


class GroupBoard:
    """See the module docstring. Used as an async Ray actor (:func:`get_group_board`)."""

    def __init__(
        self,
        *,
        margin: float,
        step_size: int | None = None,
        metrics_logger: Sequence[str] = (),
        project: str = "cme_rewards",
        experiment: str = "cme",
    ) -> None:
        self.margin = margin
        self.step_size = step_size
        self.metrics_logger = list(metrics_logger)
        self.project = project
        self.experiment = experiment
        self.groups: dict[str, _Group] = {}
        self.steps: dict[int, _Step] = {}
        self.logged: dict[int, dict[str, float]] = {}
        self._tracking: Any = None

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

    def metrics(self) -> dict[int, dict[str, float]]:
        """The metrics logged so far, by step."""
        return dict(self.logged)

    # -- internals ---------------------------------------------------------------------------------

    def _evict(self, wait_s: float) -> None:
        """Forget groups nobody has reported to for long (they will never complete)."""
        if len(self.groups) < 1024:
            return
        horizon = time.monotonic() - max(2 * wait_s, 600.0)
        for uid in [u for u, g in self.groups.items() if g.touched < horizon]:
            self.groups[uid].done.set()
            del self.groups[uid]

    def _record_step(
        self, step: int | None, result: dict[str, Any], terms: dict[str, float]
    ) -> None:
        if step is None or step in self.logged:
            return
        bucket = self.steps.setdefault(step, _Step())
        bucket.results.append(
            CMEResult(
                cme=float(result["cme"]),
                n_tokens=int(result["n_tokens"]),
                truncated=bool(result["truncated"]),
                error=result.get("error"),
            )
        )
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
        self.logged[step] = data
        if self.metrics_logger:
            try:
                self._tracker().log(data=data, step=step)
            except Exception:  # noqa: BLE001 - metrics must never stop training
                logger.exception("cme metrics for step %d could not be logged", step)

    def _tracker(self) -> Any:
        if self._tracking is None:
            from verl.utils.tracking import Tracking

            path = os.environ.get("VERL_FILE_LOGGER_PATH")
            if path:  # veRL's file logger truncates its file: write ours beside the trainer's
                os.environ["VERL_FILE_LOGGER_PATH"] = f"{os.path.splitext(path)[0]}-cme.jsonl"
            self._tracking = Tracking(
                project_name=self.project,
                experiment_name=f"{self.experiment}-cme",
                default_backend=self.metrics_logger,
            )
        return self._tracking


def get_group_board(
    name: str,
    *,
    margin: float,
    step_size: int | None,
    metrics_logger: Sequence[str],
    project: str,
    experiment: str,
) -> Any:
    """The run's :class:`GroupBoard` actor ``name``, started on first use (no CPU reserved).

    Outside Ray (a manager built by hand, as in unit tests) an in-process board stands in, with
    the same ``board.settle.remote(...)`` call.
    """
    import ray

    kwargs = {
        "margin": margin,
        "step_size": step_size,
        "metrics_logger": list(metrics_logger),
        "project": project,
        "experiment": experiment,
    }
    if not ray.is_initialized():
        return _InProcess(GroupBoard(**kwargs))
    return (
        ray.remote(GroupBoard)
        .options(name=name, get_if_exists=True, num_cpus=0, max_concurrency=100_000)
        .remote(**kwargs)
    )


class _InProcess:
    """``handle.method.remote(...)`` on a plain object: returns the method's coroutine."""

    def __init__(self, obj: Any) -> None:
        self._obj = obj

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._obj, name)
        return type("_Method", (), {"remote": staticmethod(method)})
