"""``python -m cme_rewards.winrate RESULTS [RESULTS ...]`` (also ``cme-rewards winrate``)."""

from __future__ import annotations

import argparse
import json
import sys

from cme_rewards.io import InputError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cme-rewards winrate",
        description="Tie-adjusted win rates with cluster-bootstrap intervals from pairwise "
        "judgments (judgment JSONL, or AlpacaEval annotations.json files).",
    )
    p.add_argument(
        "results", nargs="+", help="judgment .jsonl files and/or AlpacaEval annotations .json"
    )
    p.add_argument("--json", action="store_true", help="print a JSON document instead of tables")
    p.add_argument("--plot", metavar="FILE.png", help="write a forest plot of the win rates")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--confidence-level", type=float, default=0.95, help="default 0.95")
    p.add_argument(
        "--n-resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)"
    )
    p.add_argument(
        "--lc-resamples",
        type=int,
        default=0,
        help="bootstrap resamples for the length-controlled interval (each refits the model); "
        "0 (default) uses the analytic cluster-robust interval",
    )
    p.add_argument("--no-bootstrap", action="store_true", help="skip the bootstrap intervals")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cme_rewards.winrate.load import load_judgments
    from cme_rewards.winrate.report import format_table, to_document
    from cme_rewards.winrate.stats import Settings, compare

    settings = Settings(
        confidence_level=args.confidence_level,
        n_resamples=args.n_resamples,
        lc_resamples=args.lc_resamples,
        seed=args.seed,
        bootstrap=not args.no_bootstrap,
    )
    try:
        if not 0 < args.confidence_level < 1:
            raise InputError("--confidence-level must be in (0, 1)")
        if args.n_resamples < 1 or args.lc_resamples < 0:
            raise InputError("--n-resamples must be >= 1 and --lc-resamples >= 0")
        judgments = load_judgments(args.results)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results = compare(judgments, settings)
    if args.json:
        print(json.dumps(to_document(results, judgments, settings), indent=2, allow_nan=False))
    else:
        print(format_table(results, judgments, settings))
    if args.plot:
        from cme_rewards.winrate.plot import forest_plot

        forest_plot(results, args.plot, settings.confidence_level)
    return 0
