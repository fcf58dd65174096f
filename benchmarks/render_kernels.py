"""Render a ``bench_kernels.py`` JSON into a markdown table (stdout and ``<json>.md``) and a plot.

The first table has one row per (case, method); the second checks our kernels against the targets
of issue 13, which are ratios within the run (fastest peer, copy bandwidth, bare matmul).

    python3 benchmarks/render_kernels.py benchmarks/results/kernels_nvidia_h100_80gb_hbm3.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(result: dict) -> str:
    """One table over all cases: ms, throughput, ratio to the bare matmul, extra memory, error."""
    lines = [
        f"Measured on {result['gpu']} (sm{''.join(map(str, result['capability'])) or '-'}), "
        f"torch {result['torch']} (CUDA {result['cuda']}), triton {result['triton']}, "
        f"{result['date']}; bf16 inputs; peers: "
        + ", ".join(f"{k} {v}" for k, v in result["peers"].items() if v)
        + ".",
        "",
        "| case | method | ms (median) | GB/s | TFLOP/s | x bare matmul | extra MiB | max abs err vs fp64 | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in result["rows"]:
        note = row["note"]
        if row.get("error"):
            note = f"not measured: {row['error']}".replace("|", "/")[:160]
        if row.get("extra", {}).get("time_vs_all_rows") is not None:
            note = f"{note}; time vs all rows {row['extra']['time_vs_all_rows']:.2f}"
        lines.append(
            f"| {row['case']} | {row['method']} | {_fmt(row['ms'], '.3f')} | {_fmt(row['gbps'], '.0f')} "
            f"| {_fmt(row['tflops'], '.0f')} | {_fmt(row['ratio_to_matmul'], '.2f')} "
            f"| {_fmt(row['extra_mib'], '.1f')} | {_fmt(row['max_abs_err'], '.1e')} | {note} |"
        )
    if result.get("targets"):
        lines += [
            "",
            "| target check | method | measured | target | met |",
            "| --- | --- | ---: | ---: | --- |",
        ]
        for verdict in result["targets"]:
            for name, check in verdict["checks"].items():
                met = {True: "yes", False: "NO", None: "not measured"}[check["met"]]
                lines.append(
                    f"| {verdict['case']} {name} | {verdict['method'] or '-'} "
                    f"| {_fmt(check['value'], '.4g')} | {check['limit']} | {met} |"
                )
    return "\n".join(lines) + "\n"


def render_plot(result: dict, path: Path) -> None:
    """Horizontal bars of median ms per method, one panel per case."""
    cases = list(dict.fromkeys(row["case"] for row in result["rows"]))
    fig, axes = plt.subplots(
        len(cases), 1, figsize=(10, 2.2 + 0.45 * len(result["rows"])), squeeze=False
    )
    for ax, case in zip(axes[:, 0], cases, strict=True):
        rows = [r for r in result["rows"] if r["case"] == case and r["ms"] is not None]
        names = [r["method"] for r in rows]
        times = [r["ms"] for r in rows]
        colors = ["tab:blue" if n.startswith("ours") else "tab:gray" for n in names]
        ax.barh(names, times, color=colors)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(f"{case} ({result['gpu']})", fontsize=9)
        ax.tick_params(labelsize=7)
        for y, t in enumerate(times):
            ax.text(t, y, f" {t:.3g} ms", va="center", fontsize=7)
    axes[-1, 0].set_xlabel("median ms (log scale, lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", type=Path)
    opts = parser.parse_args(argv)
    result = json.loads(opts.json_path.read_text())
    markdown = render_markdown(result)
    opts.json_path.with_suffix(".md").write_text(markdown)
    render_plot(result, opts.json_path.with_suffix(".png"))
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
