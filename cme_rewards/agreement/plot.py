"""Agreement with intervals per verifier x variant, one panel per file, controls marked
(matplotlib, an optional extra, imported only when plotting)."""

from __future__ import annotations

from pathlib import Path

from cme_rewards.agreement.measure import CONTROL, AgreementReport, is_random
from cme_rewards.plotting import pyplot
from cme_rewards.winrate.plot import save_figure


def _style(verifier: str) -> tuple[str, str, str]:
    """(colour, marker, legend label) of a row."""
    if verifier == CONTROL:
        return "dimgray", "s", "control (length, constant)"
    if is_random(verifier):
        return "tab:red", "x", "random-weight verifier"
    if "+" in verifier:
        return "tab:purple", "D", "ensemble"
    return "tab:blue", "o", "verifier"


def agreement_plot(report: AgreementReport, path: str | Path) -> None:
    """Write a PNG with one column per file. Top row: agreement (%) and its interval per
    (verifier, variant) row, a dashed line at 50% and a dotted one at the judge's share for the
    second answer (what "always the second" scores). Bottom row: the same after removing the
    per-generator median difference, where 50% is chance whatever the judge's base rate."""
    plt = pyplot()

    files = report.files
    keys = list(dict.fromkeys((row.verifier, row.variant) for row in report.rows))
    fig, axes = plt.subplots(
        2,
        len(files),
        figsize=(3.4 * len(files) + 2.6, 2 * (0.9 + 0.24 * len(keys))),
        sharey=True,
        squeeze=False,
    )
    level = report.settings.get("confidence_level", 0.95)
    panels = (
        ("agreement", lambda r: (r.agreement, r.agreement_ci)),
        ("centered agreement", lambda r: (r.agreement_centered, r.agreement_centered_ci)),
    )
    seen_labels: set[str] = set()
    for (title, get), ax_row in zip(panels, axes, strict=True):
        for ax, f in zip(ax_row, files, strict=True):
            rows = {(r.verifier, r.variant): r for r in report.rows if r.file == f.file}
            for i, key in enumerate(keys):
                row = rows.get(key)
                if row is None:
                    continue
                value, ci = get(row.result)
                colour, marker, label = _style(row.verifier)
                err = None if ci is None else [[value - ci.low], [ci.high - value]]
                ax.errorbar(
                    value,
                    len(keys) - 1 - i,
                    xerr=err,
                    fmt=marker,
                    color=colour,
                    capsize=2,
                    markersize=5,
                    label=None if label in seen_labels else label,
                )
                seen_labels.add(label)
            ax.axvline(50, color="grey", linestyle="--", linewidth=1)
            if title == "agreement":
                ax.axvline(f.second_wins, color="grey", linestyle=":", linewidth=1)
            ax.set_xlim(0, 100)
            ax.set_title(f"{f.file} ({f.n_pairs} pairs)", fontsize=9)
            ax.set_xlabel(f"{title} (%), {100 * level:g}% CI", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
    names = [f"{v.replace('smollm2-135m-instruct', 'smollm2')}: {var}" for v, var in keys]
    for ax_row in axes:
        ax_row[0].set_yticks(range(len(keys)))
        ax_row[0].set_yticklabels(names[::-1], fontsize=7)
    fig.legend(loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(
        "Does the reward prefer the answer the judge prefers? (dashed: chance; dotted: "
        "always the second)\nbottom: after removing the per-generator median difference",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_figure(plt, fig, path, dpi=110)
