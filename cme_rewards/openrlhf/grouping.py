"""The group floor in OpenRLHF's file mode: a sample that cannot be scored waits for its group.

Why: OpenRLHF 0.11.2's ``group_norm`` (GRPO) normalises the raw rewards of each prompt's samples,
``(r - mean) / (std + 1e-9)`` with the unbiased std (``experience_maker.py``,
``compute_advantages_and_returns``), and only then clamps the result to ``--reward.clip_range``
(``models/utils.py``, ``compute_reward``). A fixed floor of -50 therefore enters its group's mean and
std as it is, and with rewards of -0.3 to -4 nats it becomes nearly the whole std: the other members'
advantages all move to about +0.35 and the group's signal is gone. Any fixed value far enough below
to rank last does the same (measured in ``benchmarks/bench_floor.py``).

How the group is known: OpenRLHF generates the ``n_samples_per_prompt`` samples of one prompt in one
vLLM actor (``LLMRayActor.generate_responses`` gathers them), and each sample calls ``reward_func``
from a thread as soon as its own generation ends, with the same ``prompt`` and ``label``. So within
one process the group is the samples sharing ``(prompt, label)``, counted up to the group size
(``CME_REWARDS_GROUP_SIZE``, which must equal ``--rollout.n_samples_per_prompt``). A sample that can
be scored returns at once and records its reward; a sample that cannot waits until its whole group
has arrived (at most ``group_wait_s``) and then gets the worst scored member's reward minus
``floor_margin``, as on every surface that knows the group. Its group's rollout finishes no later
for it, since OpenRLHF waits for every member anyway.

Limits, so that waiting never starves OpenRLHF: the reward calls share asyncio's default thread pool
(``min(32, CPUs + 4)`` threads), so at most a quarter of it (:func:`default_max_waiting`) waits at
once; another failed sample then gets the fixed floor at once. After ``group_wait_s`` a waiting
sample takes the members that have arrived. With no scored member (or no group size), the fixed
floor (``floor``, -50 nats) applies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from cme_rewards.options import at_least, check_fields, option
from cme_rewards.results import CMEResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupOptions:
    """How OpenRLHF's file mode finds a failed sample's group (``CME_REWARDS_GROUP_SIZE``, ...)."""

    group_size: int | None = option(
        None,
        "samples per prompt, equal to OpenRLHF's --rollout.n_samples_per_prompt: a sample that "
        "cannot be scored waits for its group and gets the group floor (none: the fixed floor)",
        check=at_least(1),
    )
    group_wait_s: float = option(
        300.0,
        "most time a sample that cannot be scored waits for the rest of its group",
        unit="seconds",
        check=lambda v: None if v > 0 else f"must be greater than 0, got {v!r}",
    )

    def __post_init__(self) -> None:
        check_fields(self)


def default_max_waiting() -> int:
    """How many failed samples may wait at once: a quarter of asyncio's default thread pool
    (``min(32, CPUs + 4)`` threads, from which OpenRLHF calls ``reward_func``), at least 1."""
    return max(1, min(32, (os.cpu_count() or 1) + 4) // 4)


def group_key(prompt: str, label: Any) -> Hashable:
    """The group of an OpenRLHF sample: its templated prompt and its label (any JSON value)."""
    return prompt, json.dumps(label, sort_keys=True, default=str)


@dataclass
class _Group:
    last_arrival: float
    arrived: int = 0
    waiting: int = 0
    scored: list[float] = field(default_factory=list)


class GroupBoard:
    """Members of each open group in this process, and the group floor of the failed ones.

    Call :meth:`arrive` for every sample of a call (scored or not), then :meth:`settle` for each
    failed one; thread-safe. A group closes when ``size`` members have arrived; a later sample with
    the same key opens a new one (a prompt that appears twice in a rollout).
    """

    def __init__(
        self,
        size: int,
        wait_s: float,
        margin: float,
        *,
        max_waiting: int | None = None,
    ) -> None:
        if size < 1:
            raise ValueError(f"group size must be at least 1, got {size}")
        self.size = size
        self.wait_s = wait_s
        self.margin = margin
        self.max_waiting = default_max_waiting() if max_waiting is None else max_waiting
        self._cond = threading.Condition()
        self._open: dict[Hashable, _Group] = {}
        self._waiting = 0

    def open_groups(self) -> int:
        """Groups with members still to come (for tests and metrics)."""
        with self._cond:
            return len(self._open)

    def arrive(self, key: Hashable, result: CMEResult) -> _Group:
        """Record one sample of group ``key``; returns its group (pass it to :meth:`settle`)."""
        now = time.monotonic()
        with self._cond:
            self._prune(now)
            group = self._open.get(key)
            if group is None:
                group = self._open[key] = _Group(last_arrival=now)
            group.arrived += 1
            group.last_arrival = now
            if result.error is None:
                group.scored.append(result.cme)
            if group.arrived >= self.size:
                del self._open[key]
            self._cond.notify_all()
            return group

    def settle(self, group: _Group, result: CMEResult) -> CMEResult:
        """A failed ``result`` with its group floor: the worst scored member's reward minus the
        margin, after waiting (at most ``wait_s``) for the whole group; unchanged when no member
        was scored. A scored ``result`` is returned as it is."""
        if result.error is None:
            return result
        with self._cond:
            if group.arrived < self.size:
                if self._waiting >= self.max_waiting:
                    logger.info(
                        "%d failed samples already wait for their groups; this one takes the "
                        "members that have arrived (%d of %d)",
                        self._waiting,
                        group.arrived,
                        self.size,
                    )
                else:
                    self._wait(group)
            scored = list(group.scored)
        if not scored:
            return result
        return dataclasses.replace(result, cme=min(scored) - self.margin)

    def _wait(self, group: _Group) -> None:
        deadline = time.monotonic() + self.wait_s
        self._waiting += 1
        group.waiting += 1
        try:
            while group.arrived < self.size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    logger.warning(
                        "only %d of %d samples of a group arrived within %g s; the failed one "
                        "gets the floor from those (CME_REWARDS_GROUP_SIZE must equal OpenRLHF's "
                        "--rollout.n_samples_per_prompt)",
                        group.arrived,
                        self.size,
                        self.wait_s,
                    )
                    return
                self._cond.wait(remaining)
        finally:
            self._waiting -= 1
            group.waiting -= 1

    def _prune(self, now: float) -> None:
        """Forget groups nobody waits for whose last member came more than ``wait_s`` ago (a
        member OpenRLHF lost never arrives)."""
        stale = [
            key
            for key, g in self._open.items()
            if g.waiting == 0 and now - g.last_arrival > self.wait_s
        ]
        for key in stale:
            del self._open[key]
