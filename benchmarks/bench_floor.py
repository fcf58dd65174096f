"""How the reward of a sample that cannot be scored moves GRPO's advantages of the rest of its group.

Groups: AlpacaEval instructions, evenly spaced over the 805, each with 8 responses: the 4 answers of
the shared annotation files (GPT-4-turbo's, Claude 2.1's, GPT-3.5-turbo's, OpenHermes-2.5's), each
cut at a word boundary to 600 and to 250 characters (with fewer answers, more cut lengths). Rewards
come from the real verifier (SmolLM2-135M-Instruct by default). For every group and every member in
turn, that member fails (an empty response): the seven valid members' advantages in the group of 8
are compared with their advantages in the group of the seven alone. Per case: the mean absolute
change of the seven; reported: its mean over all cases (the issue's target: at most 0.2), 90th
percentile and maximum, and how often the failed member ranks last in its group.

Floors (each under the advantage formula of every framework that uses it):

- ``fixed_-50``: the fixed floor every surface gave before (``ScorerOptions.floor``);
- ``group_floor``: the worst scored member's reward minus ``floor_margin`` (0.1 nats), through
  ``cme_rewards.results.finish_groups`` (veRL, TRL, the CLI's and the server's groups);
- ``openrlhf_group_size``: OpenRLHF file mode with ``CME_REWARDS_GROUP_SIZE`` (the failed sample
  waits for its group: ``cme_rewards.openrlhf.grouping.GroupBoard``);
- ``openrlhf_no_group``: OpenRLHF without a group size: the fixed floor;
- alternatives considered for OpenRLHF without a group: ``fixed_-10`` (what OpenRLHF's default
  ``--reward.clip_range`` would make of -50 if it clipped before normalising; 0.11.2 does not),
  ``uniform`` (-ln V, the reward of a verifier that knows nothing) and ``rollout_min`` (the lowest
  reward of the other groups of the same 64-sample rollout, minus the margin).

Advantage formulas: veRL's GRPO ``(r - mean) / (std + 1e-6)``, OpenRLHF 0.11.2's ``group_norm``
``(r - mean) / (std + 1e-9)`` (``experience_maker.py``, before its clip), TRL 1.16's
``(r - mean) / (std + 1e-4)``; all with the unbiased std.

    python benchmarks/bench_floor.py [--prompts 48] [--verifier smollm2-135m-instruct] [--out FILE]

Writes ``benchmarks/results/floor.json`` (the machine, settings, every group's rewards, figures).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

SHARED = REPO.parent / "shared" / "data" / "alpaca_eval"
FIXTURE = REPO / "tests" / "data" / "winrate" / "claude-2.1_first40.annotations.json"
GROUP = 8
CUT_LENGTHS = (600, 250, 400, 120)
ROLLOUT_GROUPS = 8  # groups per simulated rollout for rollout_min (64 samples)
EPS = {"verl": 1e-6, "openrlhf": 1e-9, "trl": 1e-4}


def cut(text: str, chars: int) -> str:
    """``text`` cut to at most ``chars`` characters at a word boundary."""
    if len(text) <= chars:
        return text
    space = text.rfind(" ", 0, chars)
    return text[: space if space > chars // 2 else chars]


def load_groups(files: list[Path], prompts: int) -> list[dict]:
    """``prompts`` evenly spaced instructions, each with :data:`GROUP` responses."""
    tables = [json.loads(f.read_text()) for f in files]
    n = min(len(t) for t in tables)
    groups = []
    for k in range(min(prompts, n)):
        i = k * n // prompts
        answers = [tables[0][i]["output_1"]] + [t[i]["output_2"] for t in tables]
        per_answer = math.ceil(GROUP / len(answers))
        responses = [cut(a, c) for a in answers for c in CUT_LENGTHS[:per_answer]][:GROUP]
        groups.append(
            {"index": i, "instruction": tables[0][i]["instruction"], "responses": responses}
        )
    return groups


def advantages(values: list[float], eps: float) -> list[float]:
    """GRPO's group-normalised advantages, unbiased std (see the module docstring)."""
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [(v - mean) / (std + eps) for v in values]


def change(valid: list[float], floor: float, eps: float) -> tuple[float, bool]:
    """(mean |change| of the valid members' advantages when a member with ``floor`` joins,
    whether that member ranks last)."""
    alone = advantages(valid, eps)
    joined = advantages([*valid, floor], eps)
    moved = sum(abs(a - b) for a, b in zip(joined[:-1], alone, strict=True)) / len(valid)
    return moved, floor < min(valid)


def summarize(cases: list[tuple[float, bool]]) -> dict:
    moved = sorted(m for m, _ in cases)
    return {
        "mean_abs_change": round(statistics.fmean(moved), 4),
        "p90_abs_change": round(moved[int(0.9 * (len(moved) - 1))], 4),
        "max_abs_change": round(moved[-1], 4),
        "failed_ranks_last": round(sum(last for _, last in cases) / len(cases), 4),
        "cases": len(cases),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=48, help="groups (AlpacaEval instructions)")
    parser.add_argument("--verifier", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--data",
        type=Path,
        nargs="*",
        help="AlpacaEval annotation files (default: the shared ones, else the test fixture)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "floor.json")
    args = parser.parse_args(argv)

    import torch
    from machine import describe_machine

    from cme_rewards import CMEScorer
    from cme_rewards.openrlhf.grouping import GroupBoard
    from cme_rewards.results import finish_groups, floored

    files = args.data or (
        sorted(SHARED.glob("*.annotations.json")) if SHARED.is_dir() else [FIXTURE]
    )
    groups = load_groups(files, args.prompts)
    started = time.perf_counter()
    scorer = CMEScorer(args.verifier, device="cpu", dtype=args.dtype)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    results = scorer.score(
        [g["instruction"] for g in groups for _ in g["responses"]],
        [r for g in groups for r in g["responses"]],
        groups=[g["index"] for g in groups for _ in g["responses"]],
        progress=True,
    )
    score_s = time.perf_counter() - started
    options = scorer.options
    for k, g in enumerate(groups):
        g["rewards"] = [r.cme for r in results[k * GROUP : (k + 1) * GROUP]]
        if any(r.error for r in results[k * GROUP : (k + 1) * GROUP]):
            raise SystemExit(f"group {g['index']}: a response could not be scored")
    uniform = -math.log(scorer.model.config.get_text_config().vocab_size)

    cases: dict[str, dict[str, list]] = {}
    logging.getLogger("cme_rewards").setLevel(logging.ERROR)  # every case floors one sample

    def record(policy: str, framework: str, valid: list[float], floor: float) -> None:
        cases.setdefault(policy, {}).setdefault(framework, []).append(
            change(valid, floor, EPS[framework])
        )

    for k, g in enumerate(groups):
        rollout = groups[
            (k // ROLLOUT_GROUPS) * ROLLOUT_GROUPS : (k // ROLLOUT_GROUPS + 1) * ROLLOUT_GROUPS
        ]
        others = [v for h in rollout if h is not g for v in h["rewards"]]
        for f in range(GROUP):
            valid = g["rewards"][:f] + g["rewards"][f + 1 :]
            # The core's group floor, through the function every grouped surface calls.
            members = [
                dataclasses.replace(r, advantage=None)
                for j, r in enumerate(results[k * GROUP : (k + 1) * GROUP])
                if j != f
            ]
            members.append(floored("empty response", options, id=f"{g['index']}-{f}"))
            finish_groups(members, ["g"] * GROUP, options)
            group_floor = members[-1].cme
            # OpenRLHF file mode with a group size: the failed sample arrives first and waits.
            board = GroupBoard(GROUP, wait_s=5, margin=options.floor_margin)
            failed = floored("empty response", options)
            entry = board.arrive("prompt", failed)
            for r in members[:-1]:
                board.arrive("prompt", r)
            openrlhf_floor = board.settle(entry, failed).cme
            for framework in ("verl", "trl", "openrlhf"):
                record("fixed_-50", framework, valid, options.floor_reward())
                record("group_floor", framework, valid, group_floor)
            record("openrlhf_group_size", "openrlhf", valid, openrlhf_floor)
            record("openrlhf_no_group", "openrlhf", valid, options.floor_reward())
            record("fixed_-10", "openrlhf", valid, -10.0)
            record("uniform", "openrlhf", valid, uniform)
            record("rollout_min", "openrlhf", valid, min(others) - options.floor_margin)

    figures = {
        policy: {framework: summarize(c) for framework, c in by_framework.items()}
        for policy, by_framework in cases.items()
    }
    every = [v for g in groups for v in g["rewards"]]
    report = {
        "benchmark": "floor",
        "command": "python benchmarks/bench_floor.py " + " ".join(argv or sys.argv[1:]),
        "machine": describe_machine(),
        "settings": {
            "verifier": args.verifier,
            "dtype": str(next(scorer.model.parameters()).dtype).removeprefix("torch."),
            "data": [f.name for f in files],
            "groups": len(groups),
            "group_size": GROUP,
            "cut_lengths_chars": list(CUT_LENGTHS[: math.ceil(GROUP / (len(files) + 1))]),
            "floor": options.floor_reward(),
            "floor_margin": options.floor_margin,
            "uniform_floor": round(uniform, 4),
            "rollout_groups": ROLLOUT_GROUPS,
            "eps": EPS,
        },
        "rewards": {
            "min": round(min(every), 4),
            "max": round(max(every), 4),
            "mean": round(statistics.fmean(every), 4),
            "within_group_std_median": round(
                statistics.median(statistics.stdev(g["rewards"]) for g in groups), 4
            ),
            "group_mean_std": round(
                statistics.stdev(statistics.fmean(g["rewards"]) for g in groups), 4
            )
            if len(groups) > 1
            else 0.0,
        },
        "target": "mean_abs_change <= 0.2 (mean change of the seven valid advantages)",
        "figures": figures,
        "seconds": {"load": round(load_s, 1), "score": round(score_s, 1)},
        "torch_threads": torch.get_num_threads(),
        "groups": [
            {"index": g["index"], "rewards": [round(v, 5) for v in g["rewards"]]} for g in groups
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for policy, by_framework in figures.items():
        for framework, s in by_framework.items():
            print(
                f"{policy:<20} {framework:<9} mean |dA| {s['mean_abs_change']:.3f}  "
                f"p90 {s['p90_abs_change']:.3f}  max {s['max_abs_change']:.3f}  "
                f"ranks last {s['failed_ranks_last']:.1%}"
            )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
