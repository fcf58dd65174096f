"""How often a reward difference (second answer minus first, any unit) has the sign of the judge's
preference (AlpacaEval scale, [1, 2], ties left out): :func:`pair_scores`, averaged in percent, with
BCa intervals of a bootstrap over prompts (every pair of one prompt moves together), as in
:mod:`cme_rewards.winrate.stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cme_rewards.winrate.results import ConfidenceInterval
from cme_rewards.winrate.stats import Settings, bootstrap_estimates, ratio_statistic, seeded_rng

SIMILAR_LENGTH = (0.8, 1.25)
"""Length ratios (second / first, verifier tokens) counted as "similar length" (within 25%)."""
LENGTH_BINS = (
    ("<0.5x", 0.0, 0.5),
    ("0.5-0.8x", 0.5, SIMILAR_LENGTH[0]),
    ("0.8-1.25x", *SIMILAR_LENGTH),
    ("1.25-2x", SIMILAR_LENGTH[1], 2.0),
    (">2x", 2.0, math.inf),
)
"""Bins of the length ratio second / first: ``(label, low, high)``, low inclusive."""


@dataclass(frozen=True)
class LengthBin:
    """Agreement (percent) of the ``n`` pairs whose length ratio second / first is in ``label``."""

    label: str
    n: int
    agreement: float | None


@dataclass(frozen=True)
class AgreementResult:
    """Figures of one reward on one set of pairs.

    ``agreement`` (percent) with its interval; ``spearman`` and ``kendall``: rank correlations of
    ``diff`` with ``preference - 1.5`` (``None`` when ``diff`` is constant); ``agreement_centered``:
    agreement after subtracting each comparison's median difference, which removes what the two
    generators' answers score on average: half the pairs then lean each way, so a reward unrelated
    to the judge scores 50% whatever the judge's base rate; ``similar_length``: agreement on the
    ``n_similar_length`` pairs whose length ratio is within :data:`SIMILAR_LENGTH`;
    ``mean_difference``: mean ``diff`` (the reward's unit); ``prefers_second``: how often the
    reward prefers the second answer (percent, a zero difference counting one half), to set
    beside the judge's own share.
    """

    n_pairs: int
    agreement: float
    agreement_ci: ConfidenceInterval
    spearman: float | None
    spearman_ci: ConfidenceInterval | None
    kendall: float | None
    kendall_ci: ConfidenceInterval | None
    agreement_centered: float
    agreement_centered_ci: ConfidenceInterval
    similar_length: float | None
    similar_length_ci: ConfidenceInterval | None
    n_similar_length: int
    mean_difference: float
    prefers_second: float
    length_bins: tuple[LengthBin, ...]


def pair_scores(diff: np.ndarray, preference: np.ndarray) -> np.ndarray:
    """Per-pair agreement ``[n]``: 1 same sign as ``preference - 1.5``, 0.5 for ``diff == 0``, else 0."""
    judge = np.sign(np.asarray(preference, dtype=float) - 1.5)
    reward = np.sign(np.asarray(diff, dtype=float))
    return np.where(reward == 0, 0.5, (reward == judge).astype(float))


def _centered(diff: np.ndarray, comparison: np.ndarray) -> np.ndarray:
    out = np.array(diff, dtype=float)
    for c in np.unique(comparison):
        sel = comparison == c
        out[sel] -= np.median(out[sel])
    return out


def _correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy.stats import kendalltau, spearmanr

    if np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0, 0.0  # no association can be seen in a resample without spread
    return float(spearmanr(x, y).statistic), float(kendalltau(x, y).statistic)


def agreement_stats(
    diff: np.ndarray,
    preference: np.ndarray,
    clusters: np.ndarray,
    *,
    length_ratio: np.ndarray | None = None,
    comparison: np.ndarray | None = None,
    settings: Settings | None = None,
    rng_names: tuple[str, ...] = (),
) -> AgreementResult:
    """All figures of one reward over ``n`` pairs.

    Args:
        diff: ``[n]`` reward of the second answer minus the first.
        preference: ``[n]`` judge preference in [1, 2], none equal to 1.5.
        clusters: ``[n]`` prompt label of each pair (the unit of resampling).
        length_ratio: ``[n]`` length of the second answer / the first (for the bins).
        comparison: ``[n]`` label of the (model, baseline) comparison (for the centering).
        settings: confidence level, resamples and seed (:class:`winrate.stats.Settings`).
        rng_names: names mixed into the seed, so each row has its own stream.
    """
    settings = settings or Settings(n_resamples=2000)
    diff = np.asarray(diff, dtype=float)
    preference = np.asarray(preference, dtype=float)
    n = len(diff)
    if n == 0:
        raise ValueError("no pairs to measure")
    if np.any(preference == 1.5):
        raise ValueError("ties (preference 1.5) must be left out before measuring")
    comparison = np.zeros(n) if comparison is None else np.asarray(comparison)
    ratio = np.ones(n) if length_ratio is None else np.asarray(length_ratio, dtype=float)
    _, cluster = np.unique(np.asarray(clusters), return_inverse=True)
    m = int(cluster.max()) + 1
    scores = pair_scores(diff, preference)
    centered = pair_scores(_centered(diff, comparison), preference)
    similar = (ratio >= SIMILAR_LENGTH[0]) & (ratio < SIMILAR_LENGTH[1])
    n_similar = int(similar.sum())

    def per_cluster(values: np.ndarray) -> np.ndarray:
        return np.bincount(cluster, weights=values, minlength=m)

    sums = [per_cluster(scores), per_cluster(centered)]
    counts = [per_cluster(np.ones(n))] * 2
    if n_similar >= 5:
        sums.append(per_cluster(scores * similar))
        counts.append(per_cluster(similar.astype(float)))
    similar_rate = 100.0 * float(scores[similar].mean()) if n_similar else None
    rates = [100.0 * scores.mean(), 100.0 * centered.mean(), similar_rate]
    cis: list[ConfidenceInterval | None] = [None, None, None]
    if settings.bootstrap and m >= 2:
        estimates = bootstrap_estimates(
            ratio_statistic(np.stack(sums, axis=1), np.stack(counts, axis=1)),
            rates[: len(sums)],
            m,
            settings,
            settings.n_resamples,
            seeded_rng(settings, *rng_names, "agreement"),
        )
        cis[: len(estimates)] = [e.confidence_interval for e in estimates]

    spearman = kendall = None
    spearman_ci = kendall_ci = None
    if not np.all(diff == diff[0]):
        spearman, kendall = _correlations(diff, preference - 1.5)
        if settings.bootstrap and m >= 2:
            members = [np.flatnonzero(cluster == c) for c in range(m)]

            def statistic(idx: np.ndarray, axis: int = -1) -> np.ndarray:
                idx = np.asarray(idx)
                flat = idx.reshape(-1, idx.shape[-1])
                out = np.empty((2, flat.shape[0]))
                for r, row in enumerate(flat):
                    rows = np.concatenate([members[c] for c in row])
                    out[:, r] = _correlations(diff[rows], preference[rows] - 1.5)
                return out.reshape(2, *idx.shape[:-1])

            rng = seeded_rng(settings, *rng_names, "correlation")
            estimates = bootstrap_estimates(
                statistic, [spearman, kendall], m, settings, settings.n_resamples, rng
            )
            spearman_ci, kendall_ci = (e.confidence_interval for e in estimates)

    bins = []
    for label, low, high in LENGTH_BINS:
        sel = (ratio >= low) & (ratio < high)
        k = int(sel.sum())
        bins.append(LengthBin(label, k, 100.0 * float(scores[sel].mean()) if k else None))
    return AgreementResult(
        n_pairs=n,
        agreement=rates[0],
        agreement_ci=cis[0],
        spearman=spearman,
        spearman_ci=spearman_ci,
        kendall=kendall,
        kendall_ci=kendall_ci,
        agreement_centered=rates[1],
        agreement_centered_ci=cis[1],
        similar_length=similar_rate,
        similar_length_ci=cis[2] if n_similar >= 5 else None,
        n_similar_length=n_similar,
        mean_difference=float(diff.mean()),
        prefers_second=100.0 * float(np.mean(np.where(diff == 0, 0.5, diff > 0))),
        length_bins=tuple(bins),
    )
