"""``cme-rewards score IN.jsonl -o OUT.jsonl``: CME for every line of a JSONL file.

Each input line holds ``prompt`` (text, or a list of chat messages) or ``messages``, and
``response``; optional ``id`` and ``group``. Each output line keeps every input field and adds
``cme``, ``n_tokens``, ``truncated``, ``error`` (and ``advantage`` for lines with a ``group``).
The output is written to a temporary file and renamed at the end: a failed run leaves none.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from cme_rewards.io import InputError, atomic_write_jsonl, read_jsonl
from cme_rewards.models import BUILTIN_VERIFIERS, DEFAULT_VERIFIER, VerifierNotFoundError
from cme_rewards.reductions import grpo_advantages
from cme_rewards.results import FLOOR_REWARD


def _check_messages(value: Any, where: str, field: str) -> None:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: field {field!r} must be a non-empty list of chat messages")
    for k, message in enumerate(value):
        if (
            not isinstance(message, dict)
            or not isinstance(message.get("content"), str)
            or not isinstance(message.get("role"), str)
        ):
            raise InputError(
                f"{where}: field {field!r}[{k}] must be an object with string 'role' and 'content'"
            )


def parse_sample(record: dict[str, Any], where: str) -> tuple[Any, str]:
    """``(prompt, response)`` of one input record; ``InputError`` naming ``where`` and the field."""
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            _check_messages(prompt, where, "prompt")
    elif "messages" in record:
        prompt = record["messages"]
        _check_messages(prompt, where, "messages")
    else:
        raise InputError(f"{where}: missing field 'prompt' (or 'messages')")
    if "response" not in record:
        raise InputError(f"{where}: missing field 'response'")
    if not isinstance(record["response"], str):
        raise InputError(
            f"{where}: field 'response' must be a string, got {type(record['response']).__name__}"
        )
    for field in ("id", "group"):
        if field in record and not isinstance(record[field], str | int):
            raise InputError(f"{where}: field {field!r} must be a string or an integer")
    return prompt, record["response"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cme-rewards score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="input JSONL")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output JSONL")
    parser.add_argument(
        "--verifier",
        default=DEFAULT_VERIFIER,
        help=f"built-in ({', '.join(BUILTIN_VERIFIERS)}), .gguf path, folder, hub id or random:<...>",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, ..."
    )
    parser.add_argument(
        "--max-length", type=int, default=2048, help="most verifier tokens per sample"
    )
    parser.add_argument(
        "--token-budget",
        type=int,
        help="most padded tokens per micro-batch (default: 2048 on CPU, 16384 on GPU)",
    )
    parser.add_argument("--reduction", choices=("mean", "sum"), default="mean")
    parser.add_argument(
        "--min-tokens", type=int, default=1, help="shorter responses get the floor reward"
    )
    parser.add_argument(
        "--floor", type=float, default=FLOOR_REWARD, help="reward of unscorable samples"
    )
    parser.add_argument(
        "--score-eos", action="store_true", help="also score the verifier's EOS token"
    )
    parser.add_argument("--prompt-template", help="force a plain prompt format containing {prompt}")
    parser.add_argument(
        "--strip-special-tokens",
        nargs="*",
        default=(),
        metavar="TOKEN",
        help="generator special tokens to remove from responses",
    )
    parser.add_argument("--impl", choices=("auto", "torch", "triton"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="weight seed of a random: verifier")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        records = list(read_jsonl(args.input))
        if not records:
            raise InputError(f"{args.input}: no records")
        samples = [parse_sample(record, f"{args.input}:{lineno}") for lineno, record in records]
    except (InputError, OSError) as exc:
        print(f"cme-rewards score: error: {exc}", file=sys.stderr)
        return 2
    from cme_rewards.scorer import CMEScorer  # heavy import after the input is known to be good

    try:
        scorer = CMEScorer(
            args.verifier,
            device=args.device,
            dtype=args.dtype,
            max_length=args.max_length,
            token_budget=args.token_budget,
            reduction=args.reduction,
            min_tokens=args.min_tokens,
            floor=args.floor,
            score_eos=args.score_eos,
            prompt_template=args.prompt_template,
            strip_special_tokens=args.strip_special_tokens,
            impl=args.impl,
            seed=args.seed,
        )
    except (VerifierNotFoundError, ValueError) as exc:
        print(f"cme-rewards score: error: {exc}", file=sys.stderr)
        return 2
    recs = [record for _, record in records]
    grouped = [i for i, r in enumerate(recs) if "group" in r]
    results = scorer.score(
        [p for p, _ in samples],
        [r for _, r in samples],
        ids=[r.get("id", f"line {lineno}") for lineno, r in records],
        progress=not args.no_progress,
    )
    if grouped:  # advantages among the lines that carry a group
        values = [results[i].cme for i in grouped]
        for i, adv in zip(
            grouped, grpo_advantages(values, [recs[i]["group"] for i in grouped]), strict=True
        ):
            results[i].advantage = adv
    atomic_write_jsonl(
        args.output, ({**r, **res.to_dict()} for r, res in zip(recs, results, strict=True))
    )
    n_err = sum(res.error is not None for res in results)
    mean = sum(res.cme for res in results if res.error is None) / max(1, len(results) - n_err)
    print(
        f"scored {len(results)} samples with {scorer.verifier_name} -> {args.output} "
        f"(mean cme {mean:.4f} nats, {n_err} at the floor)",
        file=sys.stderr,
    )
    return 0
