"""CME summed with your own rewards in OpenRLHF's file mode: weighted, each part logged.

Write a reward file and pass its path to ``--reward.remote_url``::

    # my_reward.py
    from cme_rewards.openrlhf.compose import cme_reward, compose

    def brevity(queries, prompts, labels):
        return [-min(len(q) - len(p), 4000) / 4000 for q, p in zip(queries, prompts)]

    reward_func = compose((cme_reward, 1.0), (brevity, 0.1))

Each part takes OpenRLHF's ``(queries, prompts, labels)`` and returns one number per sample (list,
tensor, or ``{"rewards": ..., "extra_logs": {...}}``). The sum ``sum(weight * part)`` is OpenRLHF's
``rewards`` and ``scores``; each part's unweighted value is logged as ``reward/<name>`` (its
``__name__``), beside its ``extra_logs`` (CME's ``cme/...``; other parts' under ``<name>/``). A
part that raises or returns the wrong count or a non-finite value is logged as an error and
contributes ``on_error`` (0.0), so OpenRLHF never receives ``None`` or NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from cme_rewards.openrlhf.runtime import FileModeConfig, get_runtime, reward_dict, tensor_reply

logger = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str], list[Any]], Any]

_CONFIG = FileModeConfig.load()  # a bad CME_REWARDS_* variable fails when the file loads


def cme_reward(queries: list[str], prompts: list[str], labels: list[Any]) -> dict[str, Any]:
    """CME as a reward part: what ``cme-rewards openrlhf-reward-file``'s file computes (one verifier
    per process, configured by ``CME_REWARDS_*``, checked when this module was imported)."""
    return reward_dict(get_runtime(_CONFIG).score(queries, prompts, labels))


cme_reward.__name__ = "cme"


def _floats(value: Any) -> list[Any]:
    """A part's value (tensor, array, sequence or one number) as a list."""
    if hasattr(value, "tolist"):  # torch tensors and numpy arrays
        value = value.tolist()
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]


def _values(out: Any, n: int) -> tuple[list[float], dict[str, list[float]]]:
    """``(one float per sample, extra_logs)`` of a part's return value; ``ValueError`` if unusable."""
    logs: dict[str, Any] = {}
    if isinstance(out, dict):
        if "rewards" not in out:
            raise ValueError(f"returned a dict without 'rewards' (keys: {sorted(out)})")
        logs = out.get("extra_logs") or {}
        out = out["rewards"]
    values = _floats(out)
    if len(values) != n:
        raise ValueError(f"returned {len(values)} values for {n} samples")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"returned {v!r} for sample {i}, not a finite number")
    return [float(v) for v in values], {k: list(map(float, _floats(v))) for k, v in logs.items()}


def compose(*parts: tuple[RewardFn, float], on_error: float = 0.0) -> RewardFn:
    """One OpenRLHF ``reward_func`` summing weighted parts (see the module docstring). Raises
    ``ValueError`` at once for a part that is not ``(callable, finite weight)``, or a repeated name."""
    if not parts:
        raise ValueError("compose: give at least one (function, weight) part")
    if not math.isfinite(on_error):
        raise ValueError(f"compose: on_error must be a finite number, got {on_error!r}")
    named: list[tuple[str, RewardFn, float]] = []
    for i, part in enumerate(parts):
        if not (isinstance(part, tuple) and len(part) == 2 and callable(part[0])):
            raise ValueError(f"compose: part {i} must be (function, weight), got {part!r}")
        func, weight = part
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"compose: part {i} weight must be a number, got {weight!r}")
        if not math.isfinite(weight):
            raise ValueError(f"compose: part {i} weight must be finite, got {weight!r}")
        name = getattr(func, "__name__", f"part{i}")
        if name in {n for n, _, _ in named}:
            raise ValueError(f"compose: two parts are named {name!r}; give one a __name__")
        named.append((name, func, float(weight)))

    def reward_func(queries: list[str], prompts: list[str], labels: list[Any]) -> dict[str, Any]:
        n = len(queries)
        total = [0.0] * n
        logs: dict[str, list[float]] = {}
        for name, func, weight in named:
            try:
                values, part_logs = _values(func(queries, prompts, labels), n)
            except Exception as exc:  # noqa: BLE001 - a user part must not make the reward None
                logger.error(
                    "reward part %r failed: %s: %r; it contributes %r for these %d samples",
                    name,
                    type(exc).__name__,
                    str(exc),
                    on_error,
                    n,
                )
                values, part_logs = [on_error] * n, {}
            total = [t + weight * v for t, v in zip(total, values, strict=True)]
            logs[f"reward/{name}"] = values
            for key, value in part_logs.items():
                logs[key if func is cme_reward else f"{name}/{key}"] = value
        return tensor_reply(total, logs)

    reward_func.parts = [(name, weight) for name, _, weight in named]  # type: ignore[attr-defined]
    return reward_func
