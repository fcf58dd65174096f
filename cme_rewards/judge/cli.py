"""``cme-rewards judge``: pairwise LLM-as-judge comparisons, written as judgment JSONL.

    cme-rewards judge MODEL.jsonl BASELINE.jsonl -o judgments.jsonl --backend openai \\
        --base-url http://127.0.0.1:8000/v1 --judge MODEL_NAME_ON_SERVER
    cme-rewards judge --calibrate annotations.json --limit 100 -o calib.jsonl \\
        --backend local --judge smollm2-135m-instruct --report calib.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cme_rewards.winrate.cli import add_settings_arguments, settings_from


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cme-rewards judge",
        description="Judge a model's outputs against a baseline's, both orders by default; write "
        "judgment JSONL (resumable). With --calibrate, judge AlpacaEval pairs and report agreement "
        "with their reference judge.",
    )
    p.add_argument("outputs", nargs="*", metavar="MODEL.jsonl BASELINE.jsonl",
                   help="outputs of the model and of the baseline (id or instruction, output)")  # fmt: skip
    p.add_argument("--calibrate", nargs="+", metavar="ANNOTATIONS.json",
                   help="judge the pairs of AlpacaEval annotations files instead, and report agreement")  # fmt: skip
    p.add_argument("-o", "--out", required=True, help="judgment JSONL (appended to; reruns resume)")
    p.add_argument("--backend", choices=("openai", "local"), default="openai")
    p.add_argument("--judge", required=True,
                   help="openai: the model name the server expects; local: a verifier name "
                   "(built-in, .gguf, folder, hub id)")  # fmt: skip
    p.add_argument("--judge-name", help="name recorded in the 'judge' field (default: --judge)")
    p.add_argument(
        "--model-name", help="name of the model (default: 'generator' field or file name)"
    )
    p.add_argument("--baseline-name", help="name of the baseline (default: as --model-name)")
    p.add_argument("--orders", choices=("both", "random"), default="both",
                   help="judge both presentation orders (default) or one seeded random order")  # fmt: skip
    add_settings_arguments(p, 10_000, "seed of --orders random and the bootstrap (default 0)")
    p.add_argument(
        "--limit", type=int, help="judge only the first N pairs (per file with --calibrate)"
    )
    p.add_argument(
        "--retry-errors", action="store_true", help="judge again pairs recorded as errors"
    )
    g = p.add_argument_group("openai backend")
    g.add_argument(
        "--base-url", help="server URL, e.g. http://127.0.0.1:8000/v1 (env OPENAI_BASE_URL)"
    )
    g.add_argument("--api-key", help="API key (env OPENAI_API_KEY; local servers accept any)")
    g.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    g.add_argument("--max-retries", type=int, default=3, help="transport retries with backoff")
    g.add_argument(
        "--verdict-retries", type=int, default=2, help="re-asks after an unparseable verdict"
    )
    g.add_argument("--max-tokens", type=int, default=16, help="reply length cap (default 16)")
    g = p.add_argument_group("local backend")
    g.add_argument("--device", default="cpu")
    g.add_argument("--max-text-tokens", type=int, default=512,
                   help="cut the instruction and each answer to this many tokens (default 512)")  # fmt: skip
    p.add_argument("--report", help="with --calibrate: also write the calibration result as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def _backend(args):
    from cme_rewards.judge.backends import LocalJudge, OpenAIJudge

    if args.backend == "openai":
        names = ("base_url", "api_key", "concurrency", "timeout", "max_retries", "verdict_retries")
        return OpenAIJudge(
            args.judge, max_tokens=args.max_tokens, **{n: getattr(args, n) for n in names}
        )
    return LocalJudge(args.judge, device=args.device, max_text_tokens=args.max_text_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.calibrate) == bool(args.outputs) or (args.outputs and len(args.outputs) != 2):
        parser.error("give MODEL.jsonl BASELINE.jsonl, or --calibrate ANNOTATIONS.json")
    from cme_rewards.io import InputError
    from cme_rewards.judge.backends import JudgeUnavailableError
    from cme_rewards.judge.pairs import make_tasks, pairs_from_annotations, pairs_from_outputs
    from cme_rewards.judge.runner import existing_records, record_key, run_judge

    try:
        if args.calibrate:
            pairs = pairs_from_annotations(args.calibrate, limit=args.limit)
        else:
            pairs = pairs_from_outputs(*args.outputs, args.model_name, args.baseline_name)
            pairs = pairs[: args.limit] if args.limit else pairs
        tasks = make_tasks(pairs, args.orders, args.seed)
        settings = settings_from(args)
        backend = _backend(args)
        judge = args.judge_name or args.judge
        counts = run_judge(
            tasks, backend, args.out, judge=judge, retry_errors=args.retry_errors,
            progress=not args.no_progress,
        )  # fmt: skip
    except (InputError, JudgeUnavailableError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{counts['judged']} judged ({counts['errors']} errors), {counts['skipped']} already in "
        f"{args.out}",
        file=sys.stderr,
    )
    if args.calibrate:
        from cme_rewards.judge.calibrate import calibrate, format_calibration

        wanted = {t.key(judge) for t in tasks}
        records = [r for r in existing_records(Path(args.out)) if record_key(r) in wanted]
        results = calibrate(records, settings=settings)
        print(format_calibration(results, settings.confidence_level))
        if args.report:
            doc = {
                "annotations": args.calibrate,
                "limit": args.limit,
                "orders": args.orders,
                "results": [r.to_dict() for r in results],
            }
            Path(args.report).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return 0
