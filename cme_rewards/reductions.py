"""Turning per-token log-probs into a reward, and rewards into GRPO advantages."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch

from cme_rewards.results import FLOOR_REWARD

REDUCTIONS = ("mean", "sum")


def reduce_token_logprobs(
    logprobs: torch.Tensor | Sequence[float],
    *,
    reduction: str = "mean",
    min_tokens: int = 1,
    floor: float = FLOOR_REWARD,
) -> tuple[float, str | None]:
    """Reduce one response's token log-probs ``[n_tokens]`` (nats) to its reward.

    Returns ``(reward, error)``: the mean or sum in nats, or ``(floor, reason)`` when the response
    has fewer than ``min_tokens`` scored tokens or a log-prob is not finite. Never NaN.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    values = torch.as_tensor(logprobs, dtype=torch.float64)
    n = values.numel()
    if n == 0:
        return floor, "empty response"
    if n < min_tokens:
        return floor, f"response has {n} tokens, fewer than min_tokens={min_tokens}"
    if not bool(torch.isfinite(values).all()):
        return floor, "non-finite log-prob from verifier"
    total = float(values.sum())
    return (total / n if reduction == "mean" else total), None


def grpo_advantages(values: Sequence[float], groups: Sequence[Hashable]) -> list[float]:
    """veRL's GRPO outcome advantage: ``(x - mean_g) / (std_g + 1e-6)``, unbiased std per group.

    ``values[i]`` belongs to group ``groups[i]``; a group of one gets advantage 0.
    """
    if len(values) != len(groups):
        raise ValueError(f"{len(values)} values but {len(groups)} group labels")
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    out = [0.0] * len(values)
    for idx in members.values():
        if len(idx) < 2:
            continue
        xs = [float(values[i]) for i in idx]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        for i, x in zip(idx, xs, strict=True):
            out[i] = (x - mean) / (std + 1e-6)
    return out
