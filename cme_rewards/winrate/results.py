"""Result objects of the win-rate analysis, in scipy.stats style (``statistic``, ``confidence_interval``,
``pvalue``). All rates are percentages (0-100)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, NamedTuple


class ConfidenceInterval(NamedTuple):
    """Lower and upper bound, in the unit of the statistic."""

    low: float
    high: float


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _plain(value: Any) -> Any:
    """JSON-ready copy: non-finite floats become None, intervals ``[low, high]``, dataclasses dicts."""
    if isinstance(value, ConfidenceInterval):
        return [_num(value.low), _num(value.high)]
    if isinstance(value, float):
        return _num(value)
    if is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class ToDict:
    """Gives a result dataclass ``to_dict()``: its fields in order, JSON-ready (see :func:`_plain`)."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(self)


@dataclass(frozen=True)
class Estimate(ToDict):
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


@dataclass(frozen=True)
class SignTestResult(ToDict):
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


@dataclass(frozen=True)
class PositionResult(ToDict):
    """Position bias over (prompt, judge) pairs judged in both orders.

    ``consistency``: percent of pairs whose verdict (model / baseline / tie) is the same in both
    orders. ``first_position_win_rate``: tie-adjusted percent of those judgments won by the answer
    shown first (50 = no position bias).
    """

    n_pairs: int
    consistency: float
    first_position_win_rate: float


@dataclass
class ComparisonResult(ToDict):
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
    length_coefficient: float | None  # phi of the LC model: > 0, the judge favours longer answers
    sign_test: SignTestResult | None
    position: PositionResult | None
    dropped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
