"""``cme-rewards agreement FILE... --verifier NAME ...``: does a verifier's reward agree with a judge?"""

from __future__ import annotations

import argparse
import json
import sys

from cme_rewards.io import InputError
from cme_rewards.options import OptionError, ScorerOptions, add_arguments, from_namespace
from cme_rewards.winrate.cli import add_settings_arguments, settings_from

EXCLUDED_OPTIONS = ("verifier", "reduction", "seed")
"""Scorer options replaced here: ``--verifier`` repeats, ``--variants`` replaces ``--reduction``,
and ``--weight-seed`` is the scorer's ``seed`` (``--seed`` seeds the sample and the bootstrap)."""


def build_parser() -> argparse.ArgumentParser:
    from cme_rewards.agreement.measure import VARIANTS
    from cme_rewards.models import cache_root

    p = argparse.ArgumentParser(
        prog="cme-rewards agreement",
        description="How often a verifier's reward prefers the answer a judge prefers, per reward "
        "variant, with controls (longer / shorter answer, always the second, random-weight "
        "verifier) and prompt-bootstrap intervals. Input: AlpacaEval annotations.json files and "
        "judgment JSONL from `cme-rewards judge` (with output_model and output_baseline).",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="annotations .json or judgment .jsonl")
    p.add_argument(
        "--verifier",
        action="append",
        dest="verifiers",
        metavar="NAME",
        help="a verifier (repeat for several; random:NAME adds a random-weight control) "
        "[default: smollm2-135m-instruct]",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        metavar="VARIANT",
        help=f"reward variants: {', '.join(VARIANTS)} [default: all; ensemble with two or more "
        "verifiers that are not random:]",
    )
    p.add_argument("--sample", type=int, metavar="N", help="keep N seeded prompts per file")
    add_settings_arguments(p, 2000, "seed of --sample and the bootstrap [0]")
    p.add_argument("--json", action="store_true", help="print the JSON document, not the table")
    p.add_argument("--plot", metavar="PATH.png", help="write the agreement plot here")
    p.add_argument(
        "--cache",
        metavar="DIR",
        default=str(cache_root() / "agreement"),
        help="token log-probs kept between runs [default: %(default)s]",
    )
    p.add_argument("--no-cache", action="store_true", help="score everything, keep nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--weight-seed", type=int, default=0, help="weight seed of random: verifiers [0]"
    )
    add_arguments(p.add_argument_group("scorer options"), ScorerOptions, exclude=EXCLUDED_OPTIONS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cme_rewards.agreement.measure import measure, plan_variants
    from cme_rewards.agreement.pairs import load_pairs, sample_prompts
    from cme_rewards.agreement.report import format_table, to_document
    from cme_rewards.verifier_names import DEFAULT_VERIFIER

    verifiers = list(dict.fromkeys(args.verifiers or [DEFAULT_VERIFIER]))
    try:
        if args.sample is not None and args.sample < 1:
            raise ValueError("--sample must be at least 1")
        settings = settings_from(args)
        plan_variants(verifiers, args.variants)
        for name in verifiers:  # every name checked before any file is read or model loaded
            try:
                ScorerOptions(verifier=name)
            except OptionError as exc:
                raise OptionError("--verifier", exc.reason) from None
        options = from_namespace(ScorerOptions, args, seed=args.weight_seed)
        options.check_here(lambda n: "--" + n.replace("_", "-"))
        if args.plot:  # before hours of scoring, not after
            from cme_rewards.plotting import pyplot

            pyplot()
        files = sample_prompts([load_pairs(f) for f in args.files], args.sample, args.seed)
        if not any(p.decided for f in files for p in f.pairs):
            raise InputError(f"no pair with a judge's preference (not a tie) in {args.files}")
    except (InputError, ValueError, ImportError) as exc:  # OptionError: "--max-length: reason"
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = measure(
        files,
        verifiers,
        options,
        variants=args.variants,
        cache_dir=None if args.no_cache else args.cache,
        settings=settings,
        progress=not args.no_progress,
    )
    report.settings.update(sample=args.sample, sample_seed=args.seed)
    if args.json:
        print(json.dumps(to_document(report), indent=1, allow_nan=False))
    else:
        print(format_table(report))
    if args.plot:
        from cme_rewards.agreement.plot import agreement_plot

        agreement_plot(report, args.plot)
    return 0
