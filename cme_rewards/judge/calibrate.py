"""How far to trust a judge: its agreement with a reference judge on the same pairs, and its
position bias.

The reference is AlpacaEval's GPT-4-turbo judge (``preference`` of the shared annotations files).
A judgment agrees when its label (model / baseline / tie) equals the reference's label
(``reference > 1.5`` model, ``< 1.5`` baseline, ``= 1.5`` tie). Because the reference favours one
side on most AlpacaEval pairs, agreement is reported next to what a constant judge would reach
(``majority_agreement``) and as Cohen's kappa, which is 0 for a judge no better than chance.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cme_rewards.winrate.load import Judgment, judgment_from_record
from cme_rewards.winrate.results import ConfidenceInterval, Estimate, PositionResult, ToDict
from cme_rewards.winrate.stats import (
    Settings,
    bootstrap_estimates,
    position_bias,
    ratio_statistic,
    seeded_rng,
)


@dataclass
class CalibrationResult(ToDict):
    """Agreement of ``judge`` with the reference (percent; intervals resample prompts)."""

    judge: str
    n_prompts: int  # distinct instructions (the bootstrap's clusters)
    n_pairs: int  # distinct (instruction, model, baseline)
    n_judgments: int
    n_errors: int
    agreement: Estimate  # per judgment: label equals the reference's
    pair_agreement: Estimate  # per pair: the judge's net verdict over its judgments (both orders)
    soft_agreement: Estimate  # 100 * mean(1 - |q_judge - q_ref|), AlpacaEval's absolute rule
    majority_agreement: float  # a constant judge that always names the reference's commonest label
    cohen_kappa: float
    spearman: float | None  # per-prompt judge preference vs reference preference
    spearman_pvalue: float | None
    judge_win_rate: float  # tie-adjusted, by this judge, on these pairs
    reference_win_rate: float  # tie-adjusted, by the reference, on the same pairs
    position: PositionResult | None


def _kappa(judge: np.ndarray, ref: np.ndarray) -> float:
    labels = (-1, 0, 1)
    po = float(np.mean(judge == ref))
    pe = sum(float(np.mean(judge == k)) * float(np.mean(ref == k)) for k in labels)
    return (po - pe) / (1.0 - pe) if pe < 1.0 else float("nan")


def calibrate(
    records: Iterable[dict[str, Any]],
    reference: dict[tuple[str, str, str], float] | None = None,
    settings: Settings | None = None,
) -> list[CalibrationResult]:
    """One :class:`CalibrationResult` per judge found in ``records`` (judgment records).

    The reference preference (AlpacaEval scale, [1, 2]) of each record is its
    ``reference_preference`` field, or ``reference[(id, model, baseline)]``; records with neither
    are ignored. Records with an ``error`` are counted in ``n_errors``.
    """
    settings = settings or Settings()
    by_judge: dict[str, list[tuple[Judgment, float]]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    for rec in records:
        key = (rec.get("id"), rec.get("model"), rec.get("baseline"))
        ref = rec.get("reference_preference")
        if ref is None and reference is not None:
            ref = reference.get(key)
        if ref is None:
            continue
        judged = judgment_from_record(rec)
        if isinstance(judged, Judgment):
            by_judge[judged.judge].append((judged, float(ref) - 1.0))
        else:
            errors[judged[2]] += 1
    results = []
    for judge in sorted(set(by_judge) | set(errors)):
        rows = by_judge.get(judge, [])
        if not rows:
            raise ValueError(f"judge {judge!r}: every judgment is an error ({errors[judge]})")
        results.append(_calibrate_one(judge, rows, errors[judge], settings))
    return results


def _calibrate_one(
    judge: str, rows: list[tuple[Judgment, float]], n_errors: int, settings: Settings
) -> CalibrationResult:
    from scipy.stats import spearmanr

    # pairs: one (prompt, model, baseline); clusters for the bootstrap: one instruction, so the
    # judgments of every model on the same instruction move together
    pairs: dict[tuple, int] = {}
    clusters: dict[str, int] = {}
    for j, _ in rows:
        pairs.setdefault((j.prompt, j.model, j.baseline), len(pairs))
        clusters.setdefault(j.prompt, len(clusters))
    n_pairs, n = len(pairs), len(clusters)
    pair = np.array([pairs[(j.prompt, j.model, j.baseline)] for j, _ in rows])
    cluster = np.array([clusters[j.prompt] for j, _ in rows])
    pair_cluster = np.zeros(n_pairs, dtype=int)
    pair_cluster[pair] = cluster
    d = np.array([j.d for j, _ in rows])
    q = np.array([j.q for j, _ in rows])
    qref = np.array([r for _, r in rows])
    lab_j, lab_r = np.sign(d - 0.5), np.sign(qref - 0.5)  # 1 model, -1 baseline, 0 tie
    per_pair = np.bincount(pair, minlength=n_pairs).astype(float)
    # per pair: the judge's net verdict (mean discrete score) against the reference's label
    net = np.bincount(pair, weights=d, minlength=n_pairs) / per_pair
    ref_p = np.zeros(n_pairs)
    ref_p[pair] = qref
    p_agree = (np.sign(net - 0.5) == np.sign(ref_p - 0.5)).astype(float)
    per_judgment = np.bincount(cluster, minlength=n).astype(float)
    per_cluster_pairs = np.bincount(pair_cluster, minlength=n).astype(float)
    sums = np.stack(
        [
            np.bincount(cluster, weights=(lab_j == lab_r).astype(float), minlength=n),
            np.bincount(pair_cluster, weights=p_agree, minlength=n),
            np.bincount(cluster, weights=1.0 - np.abs(q - qref), minlength=n),
        ],
        axis=1,
    )
    counts = np.stack([per_judgment, per_cluster_pairs, per_judgment], axis=1)
    stat = ratio_statistic(sums, counts)
    point = stat(np.arange(n))
    if n >= 2:
        rng = seeded_rng(settings, judge, "calibration")
        agreement, pair_agreement, soft_agreement = bootstrap_estimates(
            stat, point, n, settings, settings.n_resamples, rng, "over instructions"
        )
    else:
        agreement, pair_agreement, soft_agreement = (
            Estimate(float(x), None, None, "none (fewer than 2 instructions)") for x in point
        )

    shares = [float(np.mean(lab_r == k)) for k in (-1, 0, 1)]
    mean_q = np.bincount(pair, weights=q, minlength=n_pairs) / per_pair
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant judge: the correlation is undefined (NaN)
        rho = spearmanr(mean_q, ref_p) if n_pairs >= 3 else None
    rho_stat = None if rho is None else float(rho.statistic)
    return CalibrationResult(
        judge=judge,
        n_prompts=n,
        n_pairs=n_pairs,
        n_judgments=len(rows),
        n_errors=n_errors,
        agreement=agreement,
        pair_agreement=pair_agreement,
        soft_agreement=soft_agreement,
        majority_agreement=100.0 * max(shares),
        cohen_kappa=_kappa(lab_j, lab_r),
        spearman=rho_stat if rho_stat is not None and np.isfinite(rho_stat) else None,
        spearman_pvalue=None if rho is None or not np.isfinite(rho.pvalue) else float(rho.pvalue),
        judge_win_rate=100.0 * float(d.mean()),
        reference_win_rate=100.0 * float(np.mean((lab_r + 1.0) / 2.0)),
        position=position_bias([j for j, _ in rows]),
    )


def _ci_text(ci: ConfidenceInterval | None) -> str:
    return "[no interval]" if ci is None else f"[{ci.low:.1f}, {ci.high:.1f}]"


def format_calibration(results: list[CalibrationResult], level: float) -> str:
    """A short readable report."""
    lines = []
    for r in results:
        ci = _ci_text(r.agreement.confidence_interval)
        pci = _ci_text(r.pair_agreement.confidence_interval)
        spearman = "-" if r.spearman is None else f"{r.spearman:.3f}"
        lines += [
            f"judge {r.judge}: {r.n_judgments} judgments of {r.n_pairs} pairs on {r.n_prompts} "
            f"instructions, {r.n_errors} errors",
            f"  agreement with reference: {r.agreement.statistic:.1f}% {ci} ({100 * level:g}%, per "
            f"judgment); per pair {r.pair_agreement.statistic:.1f}% {pci}",
            f"  a constant judge would agree {r.majority_agreement:.1f}%; Cohen's kappa "
            f"{r.cohen_kappa:.3f}; soft agreement {r.soft_agreement.statistic:.1f}%; Spearman "
            f"{spearman}",
            f"  win rate by this judge {r.judge_win_rate:.1f}% vs by the reference "
            f"{r.reference_win_rate:.1f}% on the same pairs",
        ]
        if r.position is not None:
            lines.append(
                f"  position bias: {r.position.n_pairs} pairs judged in both orders, consistent "
                f"{r.position.consistency:.1f}%, first answer wins {r.position.first_position_win_rate:.1f}%"
            )
    return "\n".join(lines)
