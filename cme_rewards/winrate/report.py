"""Readable tables and the machine-readable JSON document of a win-rate analysis."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
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


def _sign(r: ComparisonResult) -> str:
    st = r.sign_test
    return "-" if st is None else f"{st.n_model}/{st.n_baseline}/{st.n_tied}"


def _position(r: ComparisonResult, name: str) -> str:
    """A position-bias figure: the pair count as is, percentages to one decimal."""
    if r.position is None:
        return "-"
    value = getattr(r.position, name)
    return str(value) if name == "n_pairs" else _f(value, 1)


_RATES: list[tuple[str, Callable[[ComparisonResult], str]]] = [
    ("model", lambda r: r.model),
    ("judge", lambda r: r.judge),
    ("prompts", lambda r: str(r.n_prompts)),
    ("W/L/T", lambda r: f"{r.n_wins}/{r.n_wins_base}/{r.n_draws}"),
    ("tie-adj", lambda r: _f(r.discrete_win_rate)),
    ("tie-adj BCa", lambda r: _ci(r.tie_adjusted.confidence_interval)),
    ("mean-pref", lambda r: _f(r.win_rate)),
    ("SE", lambda r: _f(r.standard_error)),
    ("pref normal", lambda r: _ci(r.mean_preference.normal_interval)),
    ("pref BCa", lambda r: _ci(r.mean_preference.confidence_interval)),
    ("LC", lambda r: _f(r.length_controlled.statistic) if r.length_controlled else "-"),
    ("LC interval", lambda r: _ci(r.length_controlled and r.length_controlled.confidence_interval)),
]
_DIAGNOSTICS: list[tuple[str, Callable[[ComparisonResult], str]]] = [
    ("model", lambda r: r.model),
    ("judge", lambda r: r.judge),
    ("sign W/L/T", _sign),
    ("sign p", lambda r: "-" if r.sign_test is None else _p(r.sign_test.pvalue)),
    ("both-order pairs", lambda r: _position(r, "n_pairs")),
    ("consistent", lambda r: _position(r, "consistency")),
    ("1st-pos win", lambda r: _position(r, "first_position_win_rate")),
    ("len coef", lambda r: _f(r.length_coefficient)),
    ("dropped", lambda r: ", ".join(f"{k}={v}" for k, v in sorted(r.dropped.items())) or "0"),
]


def _table(columns: list[tuple[str, Callable]], results: list[ComparisonResult]) -> list[str]:
    """Two columns left-aligned, the rest right-aligned, then a blank line."""
    header = [name for name, _ in columns]
    rows = [[get(r) for _, get in columns] for r in results]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*header), "  ".join("-" * w for w in widths)]
    return [*lines, *(fmt.format(*r) for r in rows), ""]


def format_table(
    results: Sequence[ComparisonResult], judgments: Judgments, settings: Settings
) -> str:
    """Two tables per baseline (win rates; diagnostics), then the count of dropped rows."""
    level = f"{100 * settings.confidence_level:g}%"
    by_baseline: dict[str, list[ComparisonResult]] = defaultdict(list)
    for r in results:
        by_baseline[r.baseline].append(r)
    boot = (
        f"bootstrap over prompts, {settings.n_resamples:,} resamples, seed {settings.seed}"
        if settings.bootstrap
        else "no bootstrap"
    )
    out: list[str] = []
    for baseline, rs in by_baseline.items():
        out.append(f"Against baseline {baseline!r} (rates in %, {level} intervals; {boot})")
        out += _table(_RATES, rs) + _table(_DIAGNOSTICS, rs)
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
