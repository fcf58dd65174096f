"""Forest plot of win rates with their intervals (matplotlib, imported only when plotting)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cme_rewards.plotting import pyplot
from cme_rewards.winrate.results import ComparisonResult


def forest_plot(
    results: Sequence[ComparisonResult], path: str | Path, confidence_level: float
) -> None:
    """One row per (model, judge): tie-adjusted and mean-preference win rates with their primary
    intervals, and the length-controlled rate where there is one; a dashed line at 50%."""
    plt = pyplot()

    labels = [f"{r.model} vs {r.baseline}\n{r.judge}" for r in results]
    series = [
        ("tie-adjusted", "tab:blue", lambda r: r.tie_adjusted),
        ("mean preference", "tab:orange", lambda r: r.mean_preference),
        ("length-controlled", "tab:green", lambda r: r.length_controlled),
    ]
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.7 * len(results)))
    for k, (name, color, get) in enumerate(series):
        ys, xs, lo, hi = [], [], [], []
        for i, r in enumerate(results):
            est = get(r)
            if est is None:
                continue
            ys.append(len(results) - 1 - i + (k - 1) * 0.22)
            xs.append(est.statistic)
            ci = est.confidence_interval
            lo.append(est.statistic - ci.low if ci else 0.0)
            hi.append(ci.high - est.statistic if ci else 0.0)
        if xs:
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", color=color, capsize=3, label=name)
    ax.axvline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(results)))
    ax.set_yticklabels(labels[::-1], fontsize=8)
    ax.set_xlabel(f"win rate against baseline (%), {100 * confidence_level:g}% intervals")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(plt, fig, path, dpi=120)


def save_figure(plt: Any, fig: Any, path: str | Path, dpi: int) -> None:
    """Write ``fig`` as a PNG to a temporary file beside ``path``, rename it into place, close it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
