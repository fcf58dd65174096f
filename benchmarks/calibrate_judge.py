"""Calibrate the local SmolLM2 judge against AlpacaEval's GPT-4-turbo judge on shared pairs.

Runs ``cme-rewards judge --calibrate`` (local backend, both orders) over the first ``--per-file``
pairs of each shared AlpacaEval annotations file and writes the agreement report, with the machine
and the time taken, to ``benchmarks/results/winrate_judge_calibration.json``. The judgments go to a
resumable JSONL under ``--work-dir`` (not committed), so an interrupted run picks up where it
stopped. SmolLM2-135M on CPU takes a few seconds per judgment with ``--max-text-tokens 128``.

    python benchmarks/calibrate_judge.py [--per-file 34] [--judge smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alpaca_eval"
OUT = ROOT / "benchmarks" / "results" / "winrate_judge_calibration.json"


def machine() -> dict:
    import torch
    import transformers

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--judge", default="smollm2-135m-instruct", help="verifier-style name")
    p.add_argument("--per-file", type=int, default=34, help="pairs per shared file (3 files)")
    p.add_argument("--max-text-tokens", type=int, default=128)
    p.add_argument(
        "--work-dir", default=str(Path.home() / ".cache" / "cme_rewards" / "calibration")
    )
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    files = sorted(SHARED.glob("*.annotations.json"))
    if not files:
        print(f"error: no AlpacaEval files in {SHARED}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    from cme_rewards.judge.cli import main as judge_main

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    judgments = work / f"{args.judge.replace('/', '_')}_{args.per_file}x{len(files)}.jsonl"
    report = work / "report.json"
    start = time.perf_counter()
    rc = judge_main(
        [
            "--calibrate",
            *map(str, files),
            "--limit",
            str(args.per_file),
            "-o",
            str(judgments),
            "--backend",
            "local",
            "--judge",
            args.judge,
            "--max-text-tokens",
            str(args.max_text_tokens),
            "--report",
            str(report),
        ]  # fmt: skip
    )
    if rc != 0:
        return rc
    doc = json.loads(report.read_text())
    doc.update(
        {
            "description": "local judge (verdict-token probabilities after 'WINNER:') vs AlpacaEval's "
            "weighted GPT-4-turbo judge on the first pairs of each shared annotations file, both "
            "presentation orders; intervals: BCa bootstrap over instructions",
            "reference": "weighted_alpaca_eval_gpt4_turbo",
            "annotations": [f.name for f in files],
            "judge": args.judge,
            "max_text_tokens": args.max_text_tokens,
            "seconds_this_run": round(time.perf_counter() - start, 1),
            "note": "seconds_this_run excludes pairs judged by an earlier, interrupted run",
            "machine": machine(),
        }
    )
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
