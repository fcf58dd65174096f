"""Turning per-token log-probs into a reward, and rewards into GRPO advantages.

Reductions (``ScorerOptions.reduction``) over the ``n`` scored response tokens, in nats: ``mean``
(CME, ``sum_t log q(y_t | x, y_<t) / n``); ``sum`` (total log-likelihood); ``min_k`` (mean of the
lowest ``ceil(min_k_percent / 100 * n)`` log-probs: how bad the worst tokens are); ``pmi`` (``mean``
minus ``mean`` of the same tokens after an empty prompt in the same format: predictable style
cancels out); ``pmi_sum`` (that difference summed, ``log q(y | x) - log q(y)``: the information the
prompt gives about the response).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch

from cme_rewards.options import REDUCTIONS

__all__ = ["REDUCTIONS", "grpo_advantages", "reduce_token_logprobs"]


def reduce_token_logprobs(
    logprobs: torch.Tensor | Sequence[float],
    *,
    reduction: str = "mean",
    min_tokens: int = 1,
    min_k_percent: float = 20.0,
    unconditional: torch.Tensor | Sequence[float] | None = None,
) -> tuple[float | None, str | None]:
    """Reduce one response's token log-probs ``[n_tokens]`` (nats) to its reward.

    ``unconditional`` (``[n_tokens]``, nats) are the same tokens' log-probs without the prompt,
    needed by ``pmi`` and ``pmi_sum``. Returns ``(reward, None)``, or ``(None, reason)`` when the
    response has fewer than ``min_tokens`` scored tokens or a log-prob is not finite. Never NaN.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    values = torch.as_tensor(logprobs, dtype=torch.float64).flatten()
    n = values.numel()
    if n == 0:
        return None, "empty response"
    if n < min_tokens:
        return None, f"response has {n} tokens, fewer than min_tokens={min_tokens}"
    if not bool(torch.isfinite(values).all()):
        return None, "non-finite log-prob from verifier"
    if reduction == "mean":
        return float(values.mean()), None
    if reduction == "sum":
        return float(values.sum()), None
    if reduction == "min_k":
        k = max(1, math.ceil(min_k_percent / 100 * n))
        return float(values.sort().values[:k].mean()), None
    if unconditional is None:
        return None, "no log-probs of the response without the prompt"
    base = torch.as_tensor(unconditional, dtype=torch.float64).flatten()
    if base.numel() != n:
        raise ValueError(f"pmi: {base.numel()} unconditional log-probs for {n} tokens")
    if not bool(torch.isfinite(base).all()):
        return None, "non-finite log-prob from verifier (without the prompt)"
    if reduction == "pmi_sum":
        return float(values.sum() - base.sum()), None
    return float(values.mean() - base.mean()), None


def grpo_advantages(values: Sequence[float], groups: Sequence[Hashable]) -> list[float]:
    """veRL's GRPO outcome advantage: ``(x - mean_g) / (std_g + 1e-6)``, unbiased std per group.

    ``values[i]`` belongs to group ``groups[i]``; a group of one gets advantage 0.
    """
    if len(values) != len(groups):
        raise ValueError(f"{len(values)} values but {len(groups)} group labels")
    out = [0.0] * len(values)
    for idx in group_members(groups).values():
        if len(idx) < 2:
            continue
        xs = [float(values[i]) for i in idx]
        mean = sum(xs) / len(xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        for i, x in zip(idx, xs, strict=True):
            out[i] = (x - mean) / (std + 1e-6)
    return out


def group_members(groups: Sequence[Hashable]) -> dict[Hashable, list[int]]:
    """Group label -> indices of its members, in first-seen order."""
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    return members
