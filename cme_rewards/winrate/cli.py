"""``python -m cme_rewards.winrate RESULTS [RESULTS ...]`` (also ``cme-rewards winrate``), and
the bootstrap options shared with ``cme-rewards judge`` and ``cme-rewards agreement``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from cme_rewards.io import InputError

if TYPE_CHECKING:
    from cme_rewards.winrate.stats import Settings


def add_settings_arguments(p: argparse.ArgumentParser, n_resamples: int, seed_help: str) -> None:
    """``--seed``, ``--confidence-level`` and ``--n-resamples`` (see :func:`settings_from`)."""
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--confidence-level", type=float, default=0.95, help="default %(default)s")
    p.add_argument("--n-resamples", type=int, default=n_resamples, help="default %(default)s")


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    """The :class:`~cme_rewards.winrate.stats.Settings` of parsed arguments; raises
    :class:`InputError` for a confidence level outside (0, 1) or fewer than 1 resample."""
    from cme_rewards.winrate.stats import Settings

    if not 0 < args.confidence_level < 1:
        raise InputError("--confidence-level must be in (0, 1)")
    if args.n_resamples < 1:
        raise InputError("--n-resamples must be >= 1")
    return Settings(
        confidence_level=args.confidence_level,
        n_resamples=args.n_resamples,
        seed=args.seed,
        **extra,
    )


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
    add_settings_arguments(p, 10_000, "bootstrap seed (default 0)")
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
    from cme_rewards.winrate.stats import compare

    try:
        if args.lc_resamples < 0:
            raise InputError("--lc-resamples must be >= 0")
        settings = settings_from(
            args, lc_resamples=args.lc_resamples, bootstrap=not args.no_bootstrap
        )
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
