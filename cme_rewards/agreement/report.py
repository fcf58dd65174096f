"""The agreement report as a terminal table and as the ``--json`` document."""

from __future__ import annotations

import math
from typing import Any

from cme_rewards.agreement.measure import AgreementReport, Row
from cme_rewards.agreement.stats import SIMILAR_LENGTH
from cme_rewards.winrate.results import ConfidenceInterval


def _num(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def _ci(prefix: str, ci: ConfidenceInterval | None, digits: int = 4) -> dict[str, float | None]:
    low, high = (None, None) if ci is None else (_num(ci.low, digits), _num(ci.high, digits))
    return {f"{prefix}_low": low, f"{prefix}_high": high}


def row_record(row: Row) -> dict[str, Any]:
    """One row of ``--json``: the documented keys first, then the extra figures."""
    r = row.result
    return {
        "file": row.file,
        "verifier": row.verifier,
        "variant": row.variant,
        "n_pairs": r.n_pairs,
        "n_excluded": row.n_excluded,
        "agreement": _num(r.agreement, 2),
        **_ci("ci", r.agreement_ci, 2),
        "spearman": _num(r.spearman),
        "kendall": _num(r.kendall),
        **_ci("spearman_ci", r.spearman_ci),
        **_ci("kendall_ci", r.kendall_ci),
        "agreement_centered": _num(r.agreement_centered, 2),
        **_ci("centered_ci", r.agreement_centered_ci, 2),
        "similar_length": _num(r.similar_length, 2),
        **_ci("similar_length_ci", r.similar_length_ci, 2),
        "n_similar_length": r.n_similar_length,
        "mean_difference": _num(r.mean_difference, 6),
        "prefers_second": _num(r.prefers_second, 2),
        "length_bins": [
            {"bin": b.label, "n": b.n, "agreement": _num(b.agreement, 2)} for b in r.length_bins
        ],
    }


def to_document(report: AgreementReport) -> dict[str, Any]:
    """``{"rows": [...], "files": [...], "settings": {...}, "scoring": {...}}`` (JSON-ready)."""
    return {
        "rows": [row_record(row) for row in report.rows],
        "files": [
            {
                "file": f.file,
                "path": f.path,
                "comparisons": f.comparisons,
                "n_records": f.n_records,
                "n_no_verdict": f.n_no_verdict,
                "n_ties": f.n_ties,
                "n_pairs": f.n_pairs,
                "n_excluded": f.n_excluded,
                "judge_prefers_second": _num(f.second_wins, 2),
            }
            for f in report.files
        ],
        "settings": report.settings,
        "scoring": {"scored": report.scoring.scored, "from_cache": report.scoring.cached},
    }


def _interval(value: float | None, ci: ConfidenceInterval | None, fmt: str) -> str:
    if value is None:
        return "-"
    text = format(value, fmt)
    if ci is not None:
        text += f" [{format(ci.low, fmt)}, {format(ci.high, fmt)}]"
    return text


def format_table(report: AgreementReport) -> str:
    """One block per file: a line of counts, then one line per verifier x variant and control."""
    level = report.settings.get("confidence_level", 0.95)
    lines = [
        f"agreement with the judge (%), {100 * level:g}% prompt-bootstrap intervals; "
        "2nd: how often the reward prefers the second answer (%); centered: after removing the "
        "per-generator median difference (chance 50%); similar length: pairs "
        f"with length ratio {SIMILAR_LENGTH[0]:g}-{SIMILAR_LENGTH[1]:g}x"
    ]
    header = (
        f"{'verifier':<30} {'variant':<9} {'agreement':>20} {'2nd':>5} {'centered':>7} "
        f"{'similar length':>16} {'spearman':>22} {'kendall':>22}"
    )
    for f in report.files:
        lines += [
            "",
            f"{f.file}: {', '.join(f.comparisons)}: {f.n_pairs} pairs, judge prefers the second "
            f"in {f.second_wins:.1f}%; left out: {f.n_excluded} floored, {f.n_ties} ties, "
            f"{f.n_no_verdict} without verdict",
            header,
        ]
        for row in (r for r in report.rows if r.file == f.file):
            r = row.result
            similar = (
                "-"
                if r.similar_length is None
                else f"{r.similar_length:.1f} (n={r.n_similar_length})"
            )
            lines.append(
                f"{row.verifier[:30]:<30} {row.variant:<9} "
                f"{_interval(r.agreement, r.agreement_ci, '.1f'):>20} "
                f"{r.prefers_second:>5.1f} {r.agreement_centered:>7.1f} {similar:>16} "
                f"{_interval(r.spearman, r.spearman_ci, '.2f'):>22} "
                f"{_interval(r.kendall, r.kendall_ci, '.2f'):>22}"
            )
    s = report.scoring
    lines += ["", f"texts scored now: {s.scored}, taken from the cache: {s.cached}"]
    return "\n".join(lines)
