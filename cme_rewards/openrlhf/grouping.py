"""The group floor in OpenRLHF's file mode: a sample that cannot be scored waits for its group.

Why: OpenRLHF 0.11.2's ``group_norm`` normalises each prompt's raw rewards before clipping, so a
fixed floor of -50 becomes nearly the whole group std and wipes out its signal
(``benchmarks/bench_floor.py``). One vLLM actor generates a prompt's samples, each calling
``reward_func`` from a thread with the same ``(prompt, label)``: within one process that is the
group, counted up to ``CME_REWARDS_GROUP_SIZE`` (= ``--rollout.n_samples_per_prompt``). A failed
sample waits (at most ``group_wait_s``) for the arrived members and gets the worst scored reward
minus ``floor_margin``. At most a quarter of asyncio's default thread pool waits at once
(:func:`default_max_waiting`); beyond that, and with no scored member, the fixed floor applies.
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

from cme_rewards.options import CheckedOptions, above, at_least, option
from cme_rewards.results import CMEResult

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupOptions(CheckedOptions):
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
        check=above(0),
    )


def default_max_waiting() -> int:
    """A quarter of asyncio's default thread pool (``min(32, CPUs + 4)``), at least 1."""
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
    """Open groups of this process (thread-safe): :meth:`arrive` for every sample, then
    :meth:`settle` for each; a group closes at ``size`` members (the same key then opens a new one)."""

    def __init__(
        self, size: int, wait_s: float, margin: float, *, max_waiting: int | None = None
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
        """A failed ``result`` with its group floor (after waiting at most ``wait_s`` for the group);
        a scored one, or one whose group has no scored member, as it is."""
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
        self._waiting += 1
        group.waiting += 1
        try:
            if not self._cond.wait_for(lambda: group.arrived >= self.size, self.wait_s):
                logger.warning(
                    "only %d of %d samples of a group arrived within %g s; the failed one "
                    "gets the floor from those (CME_REWARDS_GROUP_SIZE must equal OpenRLHF's "
                    "--rollout.n_samples_per_prompt)",
                    group.arrived,
                    self.size,
                    self.wait_s,
                )
        finally:
            self._waiting -= 1
            group.waiting -= 1

    def _prune(self, now: float) -> None:
        """Forget groups nobody waits for, last joined over ``wait_s`` ago (a lost member)."""
        stale = [
            key
            for key, g in self._open.items()
            if g.waiting == 0 and now - g.last_arrival > self.wait_s
        ]
        for key in stale:
            del self._open[key]
