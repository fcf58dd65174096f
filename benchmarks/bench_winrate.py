"""Time ``python -m cme_rewards.winrate`` end to end: 805 prompts x 2 orders x 2 judges, 10,000
bootstrap resamples, every figure on (BCa + percentile, sign test, position bias, LC).

Each variant runs as a fresh subprocess (cold start included: interpreter, imports, reading the
file, the analysis, printing), once untimed, then ``--repeats`` times; the median wall time is the
figure. Side by side in the same run: the analysis without the bootstrap and the bare import
costs, so the time can be attributed. A phase breakdown from one in-process run is
included. The judgments use the real AlpacaEval outputs of claude-2.1 and gpt4_1106_preview (so the
file has realistic size) when ../shared is present, with verdicts simulated from GPT-4-turbo's
preference. Writes ``benchmarks/results/winrate_bench.json``.

    python benchmarks/bench_winrate.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "alpaca_eval" / "claude-2.1.annotations.json"
OUT = ROOT / "benchmarks" / "results" / "winrate_bench.json"
TARGET_S = 2.0

PHASES = """
import json, time
t0 = time.perf_counter()
import numpy
t1 = time.perf_counter()
import scipy.stats
t2 = time.perf_counter()
from cme_rewards.winrate import Settings, compare, load_judgments
from cme_rewards.winrate.report import format_table
t3 = time.perf_counter()
j = load_judgments([{path!r}])
t4 = time.perf_counter()
s = Settings()
r = compare(j, s)
t5 = time.perf_counter()
format_table(r, j, s)
t6 = time.perf_counter()
print(json.dumps({{"import numpy": t1 - t0, "import scipy.stats": t2 - t1, "import cme_rewards.winrate": t3 - t2,
        "read 3,220 judgments": t4 - t3, "compare (bootstrap, LC, sign, position)": t5 - t4,
        "format table": t6 - t5}}))
"""


def make_judgments(path: Path, n_prompts: int = 805, seed: int = 0) -> str:
    """Write 805 x 2 orders x 2 judges judgment records; returns where the outputs came from."""
    rng = np.random.default_rng(seed)
    if SHARED.exists():
        recs = json.loads(SHARED.read_text())[:n_prompts]
        source = f"real outputs and GPT-4-turbo preferences from {SHARED.name}"
    else:
        recs = [{"instruction": f"instruction {i}", "output_1": "b" * int(rng.integers(200, 3000)),
                 "output_2": "m" * int(rng.integers(200, 3000)), "preference": 1 + rng.random()}
                for i in range(n_prompts)]  # fmt: skip
        source = "synthetic outputs (../shared missing)"
    with path.open("w") as fh:
        for i, r in enumerate(recs):
            q = float(r["preference"]) - 1
            for judge in ("judge-a", "judge-b"):
                for order in ("model_first", "baseline_first"):
                    bias = 0.1 if order == "model_first" else -0.1  # a judge favouring position A
                    u = rng.random()
                    winner = (
                        "model"
                        if u < q + bias - 0.03
                        else "tie"
                        if u < q + bias + 0.03
                        else "baseline"
                    )
                    fh.write(json.dumps({
                        "id": str(i), "instruction": r["instruction"], "model": "claude-2.1",
                        "baseline": "gpt4_1106_preview", "output_model": r["output_2"],
                        "output_baseline": r["output_1"], "judge": judge, "order": order,
                        "winner": winner, "preference": None, "error": None}) + "\n")  # fmt: skip
    return source


def timed(cmd: list[str], repeats: int) -> dict:
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)  # untimed warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
        walls.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return {
        "median_wall_s": round(statistics.median(walls), 3),
        "median_cpu_s": round(statistics.median(cpus), 3),
        "wall_s": [round(w, 3) for w in walls],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "judgments.jsonl"
        source = make_judgments(path)
        variants = {
            "python -m cme_rewards.winrate FILE (all figures, 10,000 resamples)":
                [py, "-m", "cme_rewards.winrate", str(path)],
            "same, --no-bootstrap": [py, "-m", "cme_rewards.winrate", str(path), "--no-bootstrap"],
            "python -c 'import scipy.stats'": [py, "-c", "import scipy.stats"],
            "python -c 'import cme_rewards'": [py, "-c", "import cme_rewards"],
            "python -c 'pass'": [py, "-c", "pass"],
        }  # fmt: skip
        results = {name: timed(cmd, args.repeats) for name, cmd in variants.items()}
        for name, r in results.items():
            print(f"{r['median_wall_s']:7.3f} s wall  {r['median_cpu_s']:7.3f} s cpu  {name}")
        phase_code = PHASES.format(path=str(path))
        phases = subprocess.run(
            [py, "-c", phase_code], check=True, capture_output=True, text=True, cwd=ROOT
        )
        breakdown = {k: round(v, 3) for k, v in json.loads(phases.stdout).items()}
        print("phases (one in-process run):", breakdown)
        n_lines = sum(1 for _ in path.open())
        size = path.stat().st_size
    headline = results["python -m cme_rewards.winrate FILE (all figures, 10,000 resamples)"]
    doc = {
        "benchmark": "python -m cme_rewards.winrate, cold start, 805 prompts x 2 orders x 2 judges",
        "input": {"judgments": n_lines, "bytes": size, "source": source},
        "settings": "defaults: 10,000 resamples, BCa + percentile, sign test, position bias, LC (analytic interval)",
        "target_s": TARGET_S,
        "median_wall_s": headline["median_wall_s"],
        "meets_target": headline["median_wall_s"] < TARGET_S,
        "repeats": args.repeats,
        "variants": results,
        "phases_s": breakdown,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "numpy": np.__version__,
            "scipy": __import__("scipy").__version__,
        },
    }
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
