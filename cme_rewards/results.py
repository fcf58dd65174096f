"""Per-sample scoring results with the field names every surface shares (SPEC.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FLOOR_REWARD = -50.0
"""Reward (nats) given to a sample that can never be scored; its ``error`` says why."""

RESULT_FIELDS = ("cme", "n_tokens", "truncated", "error")
"""Keys every scored sample carries; grouped input adds ``advantage``."""


@dataclass
class CMEResult:
    """CME of one response under the verifier.

    Attributes:
        cme: the reward in nats: the mean (or sum, by the scorer's ``reduction``) of the verifier's
            log-probs of the scored response tokens; ``FLOOR_REWARD`` when ``error`` is set. Always
            finite.
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
        """SPEC.md's output fields: ``cme``, ``n_tokens``, ``truncated``, ``error`` (+ ``advantage``)."""
        out: dict[str, Any] = {
            "cme": self.cme,
            "n_tokens": self.n_tokens,
            "truncated": self.truncated,
            "error": self.error,
        }
        if self.advantage is not None:
            out["advantage"] = self.advantage
        return out
