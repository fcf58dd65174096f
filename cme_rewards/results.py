"""What scoring returns, and the one path that finishes a sample (:func:`finish_sample`), shared
by the local scorer and the remote verifiers; grouped input then goes through :func:`finish_groups`.

A sample that can never be scored gets a floor reward with ``error`` set and a warning naming its
id. With its group known, the floor is the worst scored member's reward minus ``floor_margin``;
otherwise ``ScorerOptions.floor_reward()`` (``floor``, -50 nats; times ``max_length`` for "sum").
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cme_rewards.options import ScorerOptions
from cme_rewards.reductions import group_members, grpo_advantages, reduce_token_logprobs

if TYPE_CHECKING:
    import torch

    from cme_rewards.formatting import Prompt, VerifierInput

logger = logging.getLogger("cme_rewards")

FLOOR_REWARD = ScorerOptions.floor
"""Default fixed floor reward (nats) of a sample that can never be scored (``-50``)."""

RESULT_FIELDS = ("cme", "n_tokens", "truncated", "error")
"""Keys every scored sample carries; grouped input adds ``advantage``."""


@dataclass
class CMEResult:
    """CME of one response under the verifier.

    ``cme``: the reward in nats (by ``reduction``), always finite; the floor when ``error`` (a short
    reason) is set. ``n_tokens``: scored verifier tokens. ``truncated``: the verifier did not see the
    whole sample (cut to ``max_length``). ``advantage``: GRPO advantage in its group (grouped input).
    ``token_logprobs``: per scored token (nats), when requested.
    """

    cme: float
    n_tokens: int
    truncated: bool
    error: str | None
    advantage: float | None = None
    id: str | None = None
    token_logprobs: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The shared output fields: ``cme``, ``n_tokens``, ``truncated``, ``error`` (+ ``advantage``)."""
        out: dict[str, Any] = {name: getattr(self, name) for name in RESULT_FIELDS}
        if self.advantage is not None:
            out["advantage"] = self.advantage
        return out


class Scorer(Protocol):
    """The seam every adapter crosses: :class:`cme_rewards.CMEScorer` and anything like it."""

    verifier_name: str
    options: ScorerOptions

    def encode(self, prompt: Prompt, response: str) -> VerifierInput: ...

    def score(
        self,
        prompts: Sequence[Prompt],
        responses: Sequence[str],
        *,
        ids: Sequence[Any] | None = None,
        groups: Sequence[Hashable] | None = None,
        progress: bool | None = None,
    ) -> list[CMEResult]: ...


def floored(
    error: str, options: ScorerOptions, *, id: str | None = None, truncated: bool = False
) -> CMEResult:
    """The fixed floor result for a sample that cannot be scored; logs a warning naming ``id``."""
    who = "a sample without id" if id is None else f"sample {id!r}"
    logger.warning("%s cannot be scored: %r; it gets the floor reward", who, error)
    return CMEResult(options.floor_reward(), 0, truncated, error, id=id)


def finish_sample(
    inp: VerifierInput,
    token_logprobs: torch.Tensor | Sequence[float] | None,
    options: ScorerOptions,
    *,
    id: str | None = None,
    unconditional: torch.Tensor | Sequence[float] | None = None,
    keep_token_logprobs: bool = False,
) -> CMEResult:
    """One sample's reduced reward (nats), or the floor with ``error`` set.

    ``token_logprobs`` ``[inp.n_scored]`` (nats), ``None`` when not scored; ``unconditional`` is
    for ``reduction="pmi"``.
    """
    value, error = None, inp.error
    if error is None and token_logprobs is not None:
        value, error = reduce_token_logprobs(
            token_logprobs,
            reduction=options.reduction,
            min_tokens=options.min_tokens,
            min_k_percent=options.min_k_percent,
            unconditional=unconditional,
        )
    if value is None:
        return floored(error or "not scored", options, id=id, truncated=inp.truncated)
    values = [float(x) for x in token_logprobs] if keep_token_logprobs else None
    return CMEResult(value, inp.n_scored, inp.truncated, None, id=id, token_logprobs=values)


def group_floor(results: Sequence[CMEResult], groups: Sequence[Hashable], margin: float) -> None:
    """In place: each floored member of a group with scored members gets the worst scored
    member's reward minus ``margin`` (nats), so it ranks last without inflating the group's std."""
    for idx in group_members(groups).values():
        scored = [results[i].cme for i in idx if results[i].error is None]
        for i in idx:
            if scored and results[i].error is not None:
                results[i].cme = min(scored) - margin


def finish_groups(
    results: Sequence[CMEResult], groups: Sequence[Hashable], options: ScorerOptions
) -> None:
    """In place, for grouped input: the group-relative floor, then GRPO advantages."""
    if len(results) != len(groups):
        raise ValueError(f"groups: {len(groups)} labels for {len(results)} results")
    group_floor(results, groups, options.floor_margin)
    for result, adv in zip(results, grpo_advantages([r.cme for r in results], groups), strict=True):
        result.advantage = adv


METRIC_PREFIX = "cme/"
"""Prefix of every metric and log key the adapters write (never clobbers a framework's own)."""


def batch_metrics(results: Sequence[CMEResult]) -> dict[str, float]:
    """A step's ``cme/mean``, ``cme/std`` (population), ``cme/min``, ``cme/max`` over scored samples
    (nats; 0 when none), and ``cme/floored_frac``, ``cme/truncated_frac``, ``cme/n_tokens_mean``."""
    n = len(results)
    if n == 0:
        return {}
    scored = [r.cme for r in results if r.error is None]
    mean = sum(scored) / len(scored) if scored else 0.0
    var = sum((x - mean) ** 2 for x in scored) / len(scored) if scored else 0.0
    p = METRIC_PREFIX
    return {
        f"{p}mean": mean,
        f"{p}std": var**0.5,
        f"{p}min": min(scored, default=0.0),
        f"{p}max": max(scored, default=0.0),
        f"{p}floored_frac": (n - len(scored)) / n,
        f"{p}truncated_frac": sum(r.truncated for r in results) / n,
        f"{p}n_tokens_mean": sum(r.n_tokens for r in results) / n,
    }
