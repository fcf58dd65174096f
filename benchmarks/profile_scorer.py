"""Where the scorer's time goes: ``torch.profiler`` around ``CMEScorer.score`` with the defaults.

The batches are :func:`bench_scorer.make_batch`'s (the same inputs as ``bench_scorer.py``); batch
(b) is cut to its first 32 samples to keep the run short. Self CPU time is summed per kind of op:
matmuls (``aten::mm`` and friends: linear layers and the head), attention (SDPA kernels),
copies (cache gather, concatenation, casts) and the rest (elementwise).

    python benchmarks/profile_scorer.py [--batches a,c] [--verifier smollm2-135m-instruct]

Writes ``benchmarks/results/profile_scorer_cpu.json``: per batch, the share of each kind and the
top ops.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

COPIES = {
    "aten::copy_", "aten::index_select", "aten::cat", "aten::index", "aten::clone",
    "aten::contiguous", "aten::to", "aten::_to_copy",
}  # fmt: skip


def kind(op: str) -> str:
    """The kind of a profiler op name."""
    if op in COPIES:
        return "copies"
    if "attention" in op:
        return "attention"
    if op in ("aten::mm", "aten::bmm", "aten::addmm", "aten::matmul", "aten::linear"):
        return "matmul"
    return "elementwise and other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="a,c")
    parser.add_argument("--verifier", default="smollm2-135m-instruct")
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks/results/profile_scorer_cpu.json"
    )
    args = parser.parse_args()
    from bench_scorer import make_batch
    from machine import describe_machine

    from cme_rewards import CMEScorer

    scorer = CMEScorer(args.verifier, progress=False)
    result = {
        "benchmark": "profile of CMEScorer.score with the defaults (self CPU time per kind of op)",
        "command": "python benchmarks/profile_scorer.py " + " ".join(sys.argv[1:]),
        "machine": describe_machine(),
        "verifier": args.verifier,
        "dtype": str(next(scorer.model.parameters()).dtype),
        "share_prefix": scorer.options.share_prefix,
        "batches": {},
    }
    for name in args.batches.split(","):
        prompts, responses = make_batch(name, scorer.tokenizer)
        if name == "b":
            prompts, responses = prompts[:32], responses[:32]
        with torch.inference_mode():
            scorer.score(prompts[:2], responses[:2])  # warm-up
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                scorer.score(prompts, responses, groups=prompts)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        shares: collections.Counter[str] = collections.Counter()
        for e in events:
            shares[kind(e.key)] += e.self_cpu_time_total
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
        result["batches"][name] = {
            "percent": {k: round(100 * v / total, 1) for k, v in shares.most_common()},
            "top_ops_percent": {e.key: round(100 * e.self_cpu_time_total / total, 1) for e in top},
        }
        print(name, json.dumps(result["batches"][name]))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
