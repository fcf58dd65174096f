"""Win rates with honest uncertainty: prompts are the unit of resampling.

Judgments are first summed per prompt (preference, discrete score, count; per judge and pooled), so
every judgment of a prompt moves together in the bootstrap. Each rate is ``sum over prompts / number
of judgments``, the per-judgment mean AlpacaEval reports. One vectorised ``scipy.stats.bootstrap``
call resamples prompts for every judge and the pool at once (see :func:`ratio_statistic`).
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from cme_rewards.winrate import lc
from cme_rewards.winrate.load import Judgment, Judgments
from cme_rewards.winrate.results import (
    ComparisonResult,
    ConfidenceInterval,
    Estimate,
    PositionResult,
    SignTestResult,
)

POOLED = "pooled"


@dataclass(frozen=True)
class Settings:
    """How intervals are computed. ``lc_resamples=0`` gives the analytic (sandwich) LC interval."""

    confidence_level: float = 0.95
    n_resamples: int = 10_000
    lc_resamples: int = 0
    seed: int = 0
    bootstrap: bool = True


@dataclass
class _Group:
    """Per-prompt aggregates of one judge (or the pool) over the comparison's prompts ``[n]``."""

    judge: str
    judges: list[str]
    rows: list[Judgment]
    sum_q: np.ndarray
    sum_d: np.ndarray
    count: np.ndarray
    fields: dict[
        str, float | int
    ]  # AlpacaEval's figures over the judgments (:func:`_alpaca_fields`)


def seeded_rng(settings: Settings, *names: str) -> np.random.Generator:
    """A generator that depends only on the seed and the names, so adding a model or a judge does
    not change anyone else's interval."""
    return np.random.default_rng([settings.seed, *(zlib.crc32(n.encode()) for n in names)])


def ratio_statistic(sums: np.ndarray, counts: np.ndarray) -> Callable[..., np.ndarray]:
    """Vectorised statistic ``100 * sum(sums) / sum(counts)`` over resampled prompt indices.

    ``sums``, ``counts``: ``[n_prompts, k]``. The statistic maps indices ``[..., m]`` to ``[k, ...]``.
    """
    n, k = sums.shape
    table = np.concatenate([sums, counts], axis=1)

    def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.asarray(idx)
        lead, m = idx.shape[:-1], idx.shape[-1]
        flat = idx.reshape(-1, m).astype(np.intp, copy=False)
        drawn = np.empty((flat.shape[0], n))  # how often each prompt is drawn, per resample
        for row, draws in enumerate(flat):
            drawn[row] = np.bincount(draws, minlength=n)
        totals = drawn @ table
        with np.errstate(invalid="ignore", divide="ignore"):
            rates = 100.0 * (totals[:, :k] / totals[:, k:])
        return np.moveaxis(rates.reshape(*lead, k), -1, 0)

    return statistic


def bootstrap_estimates(
    statistic: Callable[..., np.ndarray],
    point: Sequence[float],
    n: int,
    settings: Settings,
    n_resamples: int,
    rng: np.random.Generator,
    over: str = "over prompts",
) -> list[Estimate]:
    """One :class:`Estimate` per component of a vector statistic of resampled indices ``[n]``.

    ``point``: the statistic on the data, ``[k]``. BCa intervals, or the percentile interval where
    BCa is undefined (a degenerate bootstrap distribution); ``method`` names which, and ``over``.
    """
    from scipy.stats import bootstrap

    data = (np.arange(n),)
    common = dict(vectorized=True, confidence_level=settings.confidence_level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning: handled below
        bca = bootstrap(data, statistic, n_resamples=n_resamples, method="BCa", rng=rng, **common)
        pct = bootstrap(
            data, statistic, n_resamples=0, method="percentile", bootstrap_result=bca, **common
        )
    lo, hi, plo, phi = map(np.atleast_1d, (*bca.confidence_interval, *pct.confidence_interval))
    se = np.atleast_1d(bca.standard_error)
    out = []
    for i, stat in enumerate(point):
        bca_ok = bool(np.isfinite(lo[i]) and np.isfinite(hi[i]))
        out.append(
            Estimate(
                statistic=float(stat),
                confidence_interval=ConfidenceInterval(
                    float(lo[i] if bca_ok else plo[i]), float(hi[i] if bca_ok else phi[i])
                ),
                standard_error=float(se[i]),
                method=f"{'BCa' if bca_ok else 'percentile (BCa undefined)'} bootstrap {over} "
                f"({n_resamples} resamples)",
                percentile_interval=ConfidenceInterval(float(plo[i]), float(phi[i])),
            )
        )
    return out


def _sign_test(group: _Group, confidence_level: float) -> SignTestResult | None:
    from scipy.stats import binomtest

    seen = group.count > 0
    twice, count = 2.0 * group.sum_d[seen], group.count[seen]
    k, losses = int(np.sum(twice > count)), int(np.sum(twice < count))
    if k + losses == 0:
        return None
    res = binomtest(k, k + losses, 0.5, alternative="two-sided")
    ci = res.proportion_ci(confidence_level=confidence_level, method="exact")
    return SignTestResult(
        statistic=100.0 * res.statistic,
        pvalue=float(res.pvalue),
        confidence_interval=ConfidenceInterval(100.0 * ci.low, 100.0 * ci.high),
        n_model=k,
        n_baseline=losses,
        n_tied=int(seen.sum()) - k - losses,
    )


def position_bias(rows: Sequence[Judgment]) -> PositionResult | None:
    """Consistency and first-position win rate over the pairs judged in both orders, or None."""
    by_pair: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.order is not None:
            by_pair[(r.prompt, r.model, r.baseline, r.judge)][r.order].append(r.d)
    n_pairs = consistent = 0
    first_scores: list[float] = []
    for orders in by_pair.values():
        if len(orders) < 2:
            continue
        mf, bf = orders["model_first"], orders["baseline_first"]
        n_pairs += 1
        consistent += np.sign(np.mean(mf) - 0.5) == np.sign(np.mean(bf) - 0.5)
        first_scores.extend(mf)
        first_scores.extend(1.0 - d for d in bf)
    if n_pairs == 0:
        return None
    return PositionResult(
        n_pairs=n_pairs,
        consistency=100.0 * consistent / n_pairs,
        first_position_win_rate=100.0 * float(np.mean(first_scores)),
    )


def _lc_sandwich(
    s: np.ndarray, c: np.ndarray, x: np.ndarray, theta: float, phi: float, level: float
) -> tuple[ConfidenceInterval, float]:
    """Cluster-robust (prompt) Wald interval of ``100 * sigmoid(theta)``, built on the logit scale."""
    from scipy.special import expit, ndtri

    p = expit(theta + phi * x)
    w = c * p * (1.0 - p)
    design = np.stack([np.ones_like(x), x], axis=1)  # [n, 2]
    bread = design.T @ (w[:, None] * design) + lc.RIDGE * c.sum() * np.eye(2)
    scores = (s - c * p)[:, None] * design
    meat = scores.T @ scores * (len(s) / (len(s) - 1))
    inv = np.linalg.inv(bread)
    se_theta = float(math.sqrt(max((inv @ meat @ inv)[0, 0], 0.0)))
    z = float(ndtri(0.5 + level / 2))
    ci = ConfidenceInterval(
        100.0 * float(expit(theta - z * se_theta)), 100.0 * float(expit(theta + z * se_theta))
    )
    # delta method for the standard error on the percent scale
    return ci, 100.0 * float(expit(theta) * (1 - expit(theta))) * se_theta


def _length_controlled(
    group: _Group, len_diff: np.ndarray | None, settings: Settings, rng_names: tuple[str, ...]
) -> tuple[Estimate | None, float | None, str | None]:
    if len_diff is None:
        note = "length-controlled rate needs output_model/output_baseline on every judgment"
        return None, None, note
    seen = group.count > 0
    s, c, delta = group.sum_q[seen], group.count[seen], len_diff[seen]
    if len(s) < 3:
        return None, None, "length-controlled rate needs at least 3 prompts"
    x = lc.length_feature(delta)
    theta, phi = (float(v) for v in lc.fit_logistic(s, c, x))
    rate = 100.0 / (1.0 + math.exp(-theta))
    if settings.lc_resamples > 0 and settings.bootstrap:

        def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            idx = np.asarray(idx).astype(np.intp)
            return lc.lc_win_rate(s[idx], c[idx], x[idx], (theta, phi))

        rng = seeded_rng(settings, *rng_names, "lc")
        (est,) = bootstrap_estimates(
            statistic,
            [rate],
            len(s),
            settings,
            settings.lc_resamples,
            rng,
            "of refits over prompts",
        )
    else:
        ci, se = _lc_sandwich(s, c, x, theta, phi, settings.confidence_level)
        method = "cluster-robust Wald on the logit scale (prompts as clusters)"
        est = Estimate(statistic=rate, confidence_interval=ci, standard_error=se, method=method)
    return est, phi, None


def _groups(rows: list[Judgment], prompts: dict[str, int]) -> list[_Group]:
    n = len(prompts)
    by_judge: dict[str, list[Judgment]] = defaultdict(list)
    for r in rows:
        by_judge[r.judge].append(r)

    def aggregate(judge: str, judges: list[str], sub: list[Judgment]) -> _Group:
        idx = np.fromiter((prompts[r.prompt] for r in sub), dtype=np.intp, count=len(sub))
        q = np.fromiter((r.q for r in sub), dtype=float, count=len(sub))
        d = np.fromiter((r.d for r in sub), dtype=float, count=len(sub))
        return _Group(
            judge=judge,
            judges=judges,
            rows=sub,
            sum_q=np.bincount(idx, weights=q, minlength=n),
            sum_d=np.bincount(idx, weights=d, minlength=n),
            count=np.bincount(idx, minlength=n).astype(float),
            fields=_alpaca_fields(q, d),
        )

    judges = sorted(by_judge)
    groups = [aggregate(j, [j], by_judge[j]) for j in judges]
    if len(judges) > 1:
        groups.append(aggregate(POOLED, judges, rows))
    return groups


def _length_diff(rows: list[Judgment], prompts: dict[str, int]) -> np.ndarray | None:
    """Mean of ``len_model - len_baseline`` per prompt (characters), or None if any is unknown."""
    if any(r.len_model is None or r.len_baseline is None for r in rows):
        return None
    n = len(prompts)
    idx = np.fromiter((prompts[r.prompt] for r in rows), dtype=np.intp, count=len(rows))
    diff = np.fromiter((r.len_model - r.len_baseline for r in rows), dtype=float, count=len(rows))
    counts = np.bincount(idx, minlength=n)
    return np.bincount(idx, weights=diff, minlength=n) / np.maximum(counts, 1)


def _alpaca_fields(q: np.ndarray, d: np.ndarray) -> dict[str, float | int]:
    n = len(q)
    wins, losses = int(np.sum(d == 1.0)), int(np.sum(d == 0.0))
    se = float(np.std(q, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return dict(
        n_total=n,
        n_wins=wins,
        n_wins_base=losses,
        n_draws=n - wins - losses,
        win_rate=100.0 * float(q.mean()),
        standard_error=100.0 * se,
        discrete_win_rate=100.0 * (wins + 0.5 * (n - wins - losses)) / n,
    )


def compare(judgments: Judgments, settings: Settings | None = None) -> list[ComparisonResult]:
    """All figures for every (model, baseline) pair, per judge and pooled over judges.

    Results are ordered by baseline, then model, then judge (the pool last).
    """
    settings = settings or Settings()
    by_pair: dict[tuple[str, str], list[Judgment]] = defaultdict(list)
    for r in judgments.rows:
        by_pair[(r.model, r.baseline)].append(r)
    out: list[ComparisonResult] = []
    for baseline, model in sorted((b, m) for m, b in by_pair):
        out.extend(_compare_pair(model, baseline, by_pair[(model, baseline)], judgments, settings))
    return out


def _compare_pair(
    model: str, baseline: str, rows: list[Judgment], judgments: Judgments, settings: Settings
) -> list[ComparisonResult]:
    from scipy.special import ndtri

    prompts: dict[str, int] = {}
    for r in rows:
        prompts.setdefault(r.prompt, len(prompts))
    groups = _groups(rows, prompts)
    len_diff = _length_diff(rows, prompts)
    # judge -> (mean preference, tie-adjusted) estimates without the normal interval
    intervals: dict[str, tuple[Estimate, Estimate]] = {}
    notes_all: list[str] = []
    if settings.bootstrap and len(prompts) >= 2:
        # One bootstrap per set of groups that share the same prompts (usually all of them).
        by_cover: dict[bytes, list[_Group]] = defaultdict(list)
        for g in groups:
            by_cover[(g.count > 0).tobytes()].append(g)
        for members in by_cover.values():
            seen = members[0].count > 0
            sums = [g.sum_q[seen] for g in members] + [g.sum_d[seen] for g in members]
            counts = [g.count[seen] for g in members] * 2
            point = [g.fields[f] for f in ("win_rate", "discrete_win_rate") for g in members]
            estimates = bootstrap_estimates(
                ratio_statistic(np.stack(sums, axis=1), np.stack(counts, axis=1)),
                point,
                int(seen.sum()),
                settings,
                settings.n_resamples,
                seeded_rng(settings, model, baseline, *(g.judge for g in members)),
            )
            for j, g in enumerate(members):
                intervals[g.judge] = (estimates[j], estimates[len(members) + j])
    elif settings.bootstrap:
        notes_all.append("bootstrap needs at least 2 prompts")
    z = float(ndtri(0.5 + settings.confidence_level / 2))
    results = []
    for g in groups:
        rate, se = g.fields["win_rate"], g.fields["standard_error"]
        normal = ConfidenceInterval(rate - z * se, rate + z * se) if math.isfinite(se) else None
        mean_pref, tie_adj = intervals.get(g.judge) or (
            Estimate(rate, None, None, "none"),
            Estimate(g.fields["discrete_win_rate"], None, None, "none"),
        )
        lc_est, lc_phi, lc_note = _length_controlled(
            g, len_diff, settings, (model, baseline, g.judge)
        )
        dropped: dict[str, int] = defaultdict(int)
        for (m, b, j, reason), cnt in judgments.dropped.items():
            if m == model and b == baseline and j in g.judges:
                dropped[reason] += cnt
        results.append(
            ComparisonResult(
                model=model,
                baseline=baseline,
                judge=g.judge,
                judges=g.judges,
                n_prompts=int((g.count > 0).sum()),
                mean_preference=replace(mean_pref, normal_interval=normal),
                tie_adjusted=tie_adj,
                length_controlled=lc_est,
                length_coefficient=lc_phi,
                sign_test=_sign_test(g, settings.confidence_level),
                position=position_bias(g.rows),
                dropped=dict(dropped),
                notes=[*notes_all, lc_note] if lc_note else list(notes_all),
                **g.fields,
            )
        )
    return results
