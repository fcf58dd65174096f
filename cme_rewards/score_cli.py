"""``cme-rewards score IN.jsonl -o OUT.jsonl``: the reward of every line of a JSONL file.

Each input line holds ``prompt`` (text, or a list of chat messages) or ``messages``, and
``response``; optional ``id`` and ``group``. Each output line keeps every input field and adds
``cme``, ``n_tokens``, ``truncated``, ``error`` (and ``advantage`` for lines with a ``group``).
Every option is checked, the input read and the output path tried before the verifier loads; the
output is written to a temporary file and renamed at the end, so a failed run leaves none.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from cme_rewards.io import InputError, atomic_write_jsonl, check_output_path, read_jsonl, shown
from cme_rewards.options import OptionError, ScorerOptions, add_arguments, flag, from_namespace


def _check_messages(value: Any, where: str, field: str) -> None:
    if not isinstance(value, list) or not value:
        raise InputError(f"{where}: field {field!r} must be a non-empty list of chat messages")
    for k, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and all(isinstance(message.get(key), str) for key in ("content", "role"))
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
        if field in record and (
            isinstance(record[field], bool) or not isinstance(record[field], str | int)
        ):
            raise InputError(f"{where}: field {field!r} must be a string or an integer")
    return prompt, record["response"]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``cme-rewards score``: the input, the output and every scorer option."""
    parser = argparse.ArgumentParser(
        prog="cme-rewards score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="input JSONL")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output JSONL")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_arguments(parser.add_argument_group("scorer options"), ScorerOptions)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``cme-rewards score``; 0 on success, 2 with a message naming the option, file or line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = from_namespace(ScorerOptions, args)
        options.check_here(flag)
        where = shown(args.input)
        recs, samples, ids = [], [], []
        for lineno, record in read_jsonl(args.input):  # the first bad line is the one named
            samples.append(parse_sample(record, f"{where}:{lineno}"))
            recs.append(record)
            ids.append(record.get("id", f"line {lineno}"))
        if not recs:
            raise InputError(f"{where}: no records")
        check_output_path(args.output)
        from cme_rewards.scorer import CMEScorer  # heavy import after the input is known to be good

        scorer = CMEScorer(options=options)
    except (OptionError, InputError, OSError) as exc:
        print(f"cme-rewards score: error: {exc}", file=sys.stderr)
        return 2
    results = scorer.score(
        [p for p, _ in samples],
        [r for _, r in samples],
        ids=ids,
        progress=not args.no_progress,
    )
    grouped = [i for i, r in enumerate(recs) if "group" in r]
    if grouped:  # group floor and advantages among the lines that carry a group
        from cme_rewards.results import finish_groups

        finish_groups([results[i] for i in grouped], [recs[i]["group"] for i in grouped], options)
    atomic_write_jsonl(
        args.output, ({**r, **res.to_dict()} for r, res in zip(recs, results, strict=True))
    )
    n_err = sum(res.error is not None for res in results)
    mean = sum(res.cme for res in results if res.error is None) / max(1, len(results) - n_err)
    print(
        f"scored {len(results)} samples with {shown(scorer.verifier_name)} -> {shown(args.output)} "
        f"(mean reward {mean:.4f} nats, {n_err} at the floor)",
        file=sys.stderr,
    )
    return 0
