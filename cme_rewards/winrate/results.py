"""Result objects of the win-rate analysis, in scipy.stats style (``statistic``, ``confidence_interval``,
``pvalue``). All rates are percentages (0-100)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class ConfidenceInterval(NamedTuple):
    """Lower and upper bound, in the unit of the statistic."""

    low: float
    high: float


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _ci(ci: ConfidenceInterval | None) -> list[float | None] | None:
    return None if ci is None else [_num(ci.low), _num(ci.high)]


@dataclass(frozen=True)
class Estimate:
    """A rate (percent) with its uncertainty.

    ``confidence_interval`` is the primary interval named by ``method`` (BCa bootstrap over prompts,
    or a cluster-robust Wald interval for the length-controlled rate); ``percentile_interval`` the
    bootstrap percentile interval; ``normal_interval`` ``statistic +- z * AlpacaEval SE`` (mean
    preference only); ``standard_error`` the bootstrap (or sandwich) standard error.
    """

    statistic: float
    confidence_interval: ConfidenceInterval | None
    standard_error: float | None
    method: str
    percentile_interval: ConfidenceInterval | None = None
    normal_interval: ConfidenceInterval | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistic": _num(self.statistic),
            "confidence_interval": _ci(self.confidence_interval),
            "standard_error": _num(self.standard_error),
            "method": self.method,
            "percentile_interval": _ci(self.percentile_interval),
            "normal_interval": _ci(self.normal_interval),
        }


@dataclass(frozen=True)
class SignTestResult:
    """Exact two-sided sign test on per-prompt outcomes (prompts netting to a tie excluded).

    ``statistic``: percent of decided prompts the model wins; ``confidence_interval``: exact
    (Clopper-Pearson) interval of that percentage; ``pvalue``: ``binomtest(k, n, 0.5)``.
    """

    statistic: float
    pvalue: float
    confidence_interval: ConfidenceInterval
    n_model: int
    n_baseline: int
    n_tied: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "statistic": _num(self.statistic),
            "pvalue": _num(self.pvalue),
            "confidence_interval": _ci(self.confidence_interval),
            "n_model": self.n_model,
            "n_baseline": self.n_baseline,
            "n_tied": self.n_tied,
        }


@dataclass(frozen=True)
class PositionResult:
    """Position bias over (prompt, judge) pairs judged in both orders.

    ``consistency``: percent of pairs whose verdict (model / baseline / tie) is the same in both
    orders. ``first_position_win_rate``: tie-adjusted percent of those judgments won by the answer
    shown first (50 = no position bias).
    """

    n_pairs: int
    consistency: float
    first_position_win_rate: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_pairs": self.n_pairs,
            "consistency": _num(self.consistency),
            "first_position_win_rate": _num(self.first_position_win_rate),
        }


@dataclass
class ComparisonResult:
    """Every figure for one model against one baseline under one judge (or all judges pooled).

    AlpacaEval's leaderboard fields (``win_rate``, ``standard_error``, ``n_wins``, ``n_wins_base``,
    ``n_draws``, ``n_total``, ``discrete_win_rate``) are computed exactly as AlpacaEval does, over
    judgments; the intervals resample prompts.
    """

    model: str
    baseline: str
    judge: str  # a judge's name, or "pooled"
    judges: list[str]
    n_prompts: int
    n_total: int
    n_wins: int
    n_wins_base: int
    n_draws: int
    win_rate: float  # 100 * mean preference
    standard_error: float  # AlpacaEval: 100 * sem(preference), judgments taken as independent
    discrete_win_rate: float  # tie-adjusted: 100 * (W + T/2) / N
    mean_preference: Estimate
    tie_adjusted: Estimate
    length_controlled: Estimate | None
    length_coefficient: (
        float | None
    )  # phi of the LC model: > 0 means the judge favours longer answers
    sign_test: SignTestResult | None
    position: PositionResult | None
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "baseline": self.baseline,
            "judge": self.judge,
            "judges": self.judges,
            "n_prompts": self.n_prompts,
            "n_total": self.n_total,
            "n_wins": self.n_wins,
            "n_wins_base": self.n_wins_base,
            "n_draws": self.n_draws,
            "win_rate": _num(self.win_rate),
            "standard_error": _num(self.standard_error),
            "discrete_win_rate": _num(self.discrete_win_rate),
            "mean_preference": self.mean_preference.to_dict(),
            "tie_adjusted": self.tie_adjusted.to_dict(),
            "length_controlled": None
            if self.length_controlled is None
            else self.length_controlled.to_dict(),
            "length_coefficient": _num(self.length_coefficient),
            "sign_test": None if self.sign_test is None else self.sign_test.to_dict(),
            "position": None if self.position is None else self.position.to_dict(),
            "dropped": dict(self.dropped),
            "notes": list(self.notes),
        }
