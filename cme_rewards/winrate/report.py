"""Readable tables and the machine-readable JSON document of a win-rate analysis."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from cme_rewards.winrate.load import Judgments
from cme_rewards.winrate.results import ComparisonResult, ConfidenceInterval
from cme_rewards.winrate.stats import Settings


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ci(ci: ConfidenceInterval | None) -> str:
    return "-" if ci is None else f"[{ci.low:.2f}, {ci.high:.2f}]"


def _p(p: float) -> str:
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _table(header: Sequence[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    return lines


def format_table(
    results: Sequence[ComparisonResult], judgments: Judgments, settings: Settings
) -> str:
    """Two tables per baseline (win rates; diagnostics), then the count of dropped rows."""
    level = f"{100 * settings.confidence_level:g}%"
    by_baseline: dict[str, list[ComparisonResult]] = defaultdict(list)
    for r in results:
        by_baseline[r.baseline].append(r)
    out: list[str] = []
    for baseline, rs in by_baseline.items():
        boot = (
            f"bootstrap over prompts, {settings.n_resamples:,} resamples, seed {settings.seed}"
            if settings.bootstrap
            else "no bootstrap"
        )
        out.append(f"Against baseline {baseline!r} (rates in %, {level} intervals; {boot})")
        rows = [
            [
                r.model,
                r.judge,
                str(r.n_prompts),
                f"{r.n_wins}/{r.n_wins_base}/{r.n_draws}",
                _f(r.discrete_win_rate),
                _ci(r.tie_adjusted.confidence_interval),
                _f(r.win_rate),
                _f(r.standard_error),
                _ci(r.mean_preference.normal_interval),
                _ci(r.mean_preference.confidence_interval),
                _f(r.length_controlled.statistic) if r.length_controlled else "-",
                _ci(r.length_controlled.confidence_interval) if r.length_controlled else "-",
            ]
            for r in rs
        ]
        header = ["model", "judge", "prompts", "W/L/T", "tie-adj", "tie-adj BCa", "mean-pref",
                  "SE", "pref normal", "pref BCa", "LC", "LC interval"]  # fmt: skip
        out += _table(header, rows)
        out.append("")
        diag = []
        for r in rs:
            st, pos = r.sign_test, r.position
            diag.append(
                [
                    r.model,
                    r.judge,
                    "-" if st is None else f"{st.n_model}/{st.n_baseline}/{st.n_tied}",
                    "-" if st is None else _p(st.pvalue),
                    "-" if pos is None else str(pos.n_pairs),
                    "-" if pos is None else _f(pos.consistency, 1),
                    "-" if pos is None else _f(pos.first_position_win_rate, 1),
                    _f(r.length_coefficient),
                    ", ".join(f"{k}={v}" for k, v in sorted(r.dropped.items())) or "0",
                ]
            )
        header = ["model", "judge", "sign W/L/T", "sign p", "both-order pairs", "consistent",
                  "1st-pos win", "len coef", "dropped"]  # fmt: skip
        out += _table(header, diag)
        out.append("")
    out.append(
        "tie-adj = (W + T/2)/N; mean-pref = mean P(model wins), SE = AlpacaEval's (judgments as "
        "independent); normal = mean-pref +- z*SE; BCa = cluster bootstrap over prompts; LC = "
        "length-controlled (logistic model at zero length difference). sign = exact sign test over "
        "prompts (W/L/T prompts)."
    )
    total_dropped = sum(judgments.dropped.values())
    if total_dropped:
        out.append(f"Dropped {total_dropped} rows in total (counted per row above).")
    notes = sorted({n for r in results for n in r.notes})
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def to_document(
    results: Sequence[ComparisonResult], judgments: Judgments, settings: Settings
) -> dict[str, Any]:
    """The ``--json`` document: settings, inputs, dropped-row counts and one entry per result."""
    return {
        "settings": {
            "confidence_level": settings.confidence_level,
            "n_resamples": settings.n_resamples if settings.bootstrap else 0,
            "lc_resamples": settings.lc_resamples,
            "seed": settings.seed,
            "units": "percent",
        },
        "files": list(judgments.files),
        "n_judgments": len(judgments.rows),
        "dropped": [
            {"model": m, "baseline": b, "judge": j, "reason": reason, "count": n}
            for (m, b, j, reason), n in sorted(judgments.dropped.items())
        ],
        "results": [r.to_dict() for r in results],
    }
