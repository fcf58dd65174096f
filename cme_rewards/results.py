"""What scoring returns, the one path that finishes a sample, and the seam adapters use.

Every scoring surface (Python, CLI JSONL, server JSON, adapters' extra info) uses the field names of
:class:`CMEResult`. A sample is finished in one place, :func:`finish_sample` (reduce, floor, log,
build the result), shared by the local scorer and the remote verifiers; grouped input then goes
through :func:`finish_groups` (group-relative floor, GRPO advantages).

Failure policy: a sample that can never be scored gets a floor reward with ``error`` set and a
warning logged with its id (escaped). Where its group is known, the floor is the worst scored
member's reward minus ``floor_margin``, so it ranks last without inflating the group's std; where
no group is known (or every member failed), it is ``ScorerOptions.floor_reward()``: ``floor``
(-50 nats), times ``max_length`` for ``reduction="sum"``.
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

    Attributes:
        cme: the reward in nats (by the scorer's ``reduction``); the floor reward when ``error``
            is set. Always finite.
        n_tokens: number of scored verifier tokens.
        truncated: the verifier did not see the whole prompt + response (cut to ``max_length``).
        error: ``None``, or a short reason why the sample got the floor reward.
        advantage: GRPO advantage within the sample's group (grouped input only).
        id: the sample's id, when one was given.
        token_logprobs: per-token log-probs (nats, one per scored token), when requested.
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
        out: dict[str, Any] = {
            "cme": self.cme,
            "n_tokens": self.n_tokens,
            "truncated": self.truncated,
            "error": self.error,
        }
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
    return CMEResult(
        cme=options.floor_reward(), n_tokens=0, truncated=truncated, error=error, id=id
    )


def finish_sample(
    inp: VerifierInput,
    token_logprobs: torch.Tensor | Sequence[float] | None,
    options: ScorerOptions,
    *,
    id: str | None = None,
    unconditional: torch.Tensor | Sequence[float] | None = None,
    keep_token_logprobs: bool = False,
) -> CMEResult:
    """One sample's result: its reduced reward (nats), or the floor with ``error`` set.

    ``token_logprobs`` ``[inp.n_scored]`` (nats) is ``None`` when the sample was not scored
    (``inp.error`` then says why). ``unconditional`` serves ``reduction="pmi"``.
    """
    if inp.error is not None or token_logprobs is None:
        return floored(inp.error or "not scored", options, id=id, truncated=inp.truncated)
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
    return CMEResult(
        cme=value,
        n_tokens=inp.n_scored,
        truncated=inp.truncated,
        error=None,
        id=id,
        token_logprobs=values,
    )


def group_floor(results: Sequence[CMEResult], groups: Sequence[Hashable], margin: float) -> None:
    """In place: each floored member of a group with scored members gets the worst scored
    member's reward minus ``margin`` (nats), so it ranks last without inflating the group's std."""
    for idx in group_members(groups).values():
        scored = [results[i].cme for i in idx if results[i].error is None]
        if not scored:
            continue
        for i in idx:
            if results[i].error is not None:
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
    """Aggregates of one training step's results, under the names every adapter logs.

    ``cme/mean``, ``cme/std`` (population), ``cme/min``, ``cme/max`` of the rewards of scored
    samples (nats; 0 when none was scored), ``cme/floored_frac``, ``cme/truncated_frac`` and
    ``cme/n_tokens_mean`` over all samples.
    """
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
