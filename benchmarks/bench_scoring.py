"""CMEScorer against the hand-written scorer most users write, on the same samples and token ids.

Baseline (as the seed code and most users write it): the samples right-padded into one batch, a full
forward (logits at every position), ``log_softmax(logits.float())``, gather, masked mean. Ours:
``CMEScorer`` (output head only at scored positions, chunked float32 log-softmax). Each method runs
in its own subprocess so its peak memory (ru_maxrss above the RSS after loading the model) is its
own. Samples: the shipped AlpacaEval pairs, answers cut to ``--response-chars`` characters (600, as in
the shared CME test vectors), so prompts and responses both fit. Writes
``benchmarks/results/scoring_cpu.json``.

    python benchmarks/bench_scoring.py [--verifier gemma3-270m] [--samples 16] [--response-chars 600]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jsonlines
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive_cme(model, batch: list) -> list[float]:
    """The hand-written baseline: one padded batch, full logits, float32 log-softmax, masked mean."""
    width = max(len(x.input_ids) for x in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    scored = torch.zeros((len(batch), width), dtype=torch.bool)
    for b, x in enumerate(batch):
        ids[b, : len(x.input_ids)] = torch.tensor(x.input_ids)
        attn[b, : len(x.input_ids)] = 1
        scored[b, x.n_prompt : len(x.input_ids)] = True
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=attn).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_lp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = scored[:, 1:].float()
        return ((token_lp * mask).sum(-1) / mask.sum(-1)).tolist()


def run_one(method: str, verifier: str, samples: int, response_chars: int, repeats: int) -> dict:
    """Child process: load, time ``repeats`` runs of one method, report values and memory."""
    from cme_rewards import CMEScorer

    rows = list(jsonlines.open(REPO / "examples" / "alpaca_pairs.jsonl"))[:samples]
    scorer = CMEScorer(verifier, device="cpu", dtype="float32")
    prompts, responses = [r["prompt"] for r in rows], [r["response"][:response_chars] for r in rows]
    inputs = [scorer.encode(p, r) for p, r in zip(prompts, responses, strict=True)]
    base_rss = rss_mib()
    call = (
        (lambda: naive_cme(scorer.model, inputs))
        if method == "naive"
        else (lambda: [r.cme for r in scorer.score(prompts, responses)])
    )
    values, times = call(), []  # warm-up run
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return {
        "values": values,
        "seconds": times,
        "extra_peak_mib": peak_rss_mib() - base_rss,
        "tokens": sum(len(x.input_ids) for x in inputs),
        "scored_tokens": sum(x.n_scored for x in inputs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--verifier", default="gemma3-270m")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--response-chars", type=int, default=600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("naive", "cme"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "scoring_cpu.json"
    )
    args = parser.parse_args()
    if args.child:
        print(
            json.dumps(
                run_one(args.child, args.verifier, args.samples, args.response_chars, args.repeats)
            )
        )
        return
    from machine import describe_machine

    from cme_rewards import cached_model_dir

    cached_model_dir(args.verifier)  # convert once, outside the timed children
    results = {}
    for method in ("naive", "cme"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            method,
            "--verifier",
            args.verifier,
            "--samples",
            str(args.samples),
            "--response-chars",
            str(args.response_chars),
            "--repeats",
            str(args.repeats),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
        print(method, {k: v for k, v in results[method].items() if k != "values"}, file=sys.stderr)
    naive, ours = results["naive"], results["cme"]
    t_naive, t_ours = statistics.median(naive["seconds"]), statistics.median(ours["seconds"])
    report = {
        "benchmark": "CMEScorer vs hand-written padded full-logits scorer (CPU)",
        "command": "python benchmarks/bench_scoring.py " + " ".join(sys.argv[1:]),
        "machine": describe_machine(),
        "verifier": args.verifier,
        "samples": args.samples,
        "response_chars": args.response_chars,
        "tokens": ours["tokens"],
        "scored_tokens": ours["scored_tokens"],
        "naive": {
            "median_s": t_naive,
            "samples_per_s": args.samples / t_naive,
            "extra_peak_mib": naive["extra_peak_mib"],
        },
        "cme_scorer": {
            "median_s": t_ours,
            "samples_per_s": args.samples / t_ours,
            "extra_peak_mib": ours["extra_peak_mib"],
        },
        "throughput_ratio": t_naive / t_ours,
        "memory_ratio": ours["extra_peak_mib"] / naive["extra_peak_mib"],
        "max_abs_reward_diff": max(
            abs(a - b) for a, b in zip(naive["values"], ours["values"], strict=True)
        ),
        "targets": {
            "throughput_ratio": ">= 1.1",
            "memory_ratio": "<= 0.25",
            "max_abs_reward_diff": "<= 1e-4",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        json.dumps(
            {k: report[k] for k in ("throughput_ratio", "memory_ratio", "max_abs_reward_diff")}
        )
    )


if __name__ == "__main__":
    main()
