"""Driver of the one GPU run of issue 13: correctness first, then the benchmarks, all time-bounded.

Steps, each a subprocess with its own time limit cut to what is left of ``--budget``:

1. ``env``: Python / torch / triton / transformers versions, the GPU, which peers import;
2. ``pytest``: ``tests/test_triton_kernels.py`` and ``tests/test_ops_check.py`` with compiled
   kernels (realistic bf16 shapes, every tuned config), JUnit parsed into the summary;
3. ``e2e``: ``benchmarks/gpu/check_scorer.py``, ``CMEScorer(impl="triton")`` on three random-weight
   families in float32 and bf16 against a float64 forward;
4. ``bench:<case>``: ``benchmarks/bench_kernels.py --case <case>``, one process per case;
5. ``bench_scorer``: ``benchmarks/bench_scorer.py --device cuda --config qwen2.5-0.5b --batches c
   --repeats 1`` (random weights of a Qwen2.5-0.5B-like config) with the time left; all batches
   and the Llama-3.2-1B-like config are a device run of their own (``docs/throughput.md``).

Everything goes to ``--out`` (at most 5 files): ``device_run.json`` (this summary, rewritten after
every step), ``log.txt`` (every step's output, appended as it runs), ``e2e.json`` and
``kernels_<gpu>.json`` (each rewritten after every case by its own script), and the newest JSON
that ``bench_scorer.py`` wrote, copied as ``scorer_<name>.json``. ``--dry`` runs the same steps on
CPU with tiny shapes (Triton interpreter) to prove the plumbing.

    python3 benchmarks/gpu/device_run.py --out "$OUT" [--budget 525] [--dry]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
BENCH_CASES = ["logits-151936", "logits-262144", "hidden-4096x151936", "hidden-640x262144"]
# (name, seconds allowed when time is plentiful); the order is the order of importance.
STEP_LIMITS = {
    "env": 25,
    "pytest": 150,
    "e2e": 100,
    **{f"bench:{case}": 50 for case in BENCH_CASES},
    "bench_scorer": 50,  # batch (c) only; the full scorer benchmark is a run of its own
}
TOKENIZER_DIR = REPO / "benchmarks" / "gpu" / "wheels" / "smollm2-tokenizer"
"""SmolLM2's tokenizer for bench_scorer's random-weight configs (carried with the wheels: the GPU
machine has no verifier package); ``python benchmarks/bench_scorer.py --save-tokenizer`` it."""
MIN_STEP_S = 15  # a step that would get less than this is skipped
RESERVE_S = 5  # kept for the final write

ENV_PROBE = r"""
import json, os, platform, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in ("torch", "triton", "transformers", "tokenizers", "numpy"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:
        info[name] = f"missing: {exc}"
import torch
info["cuda_runtime"] = torch.version.cuda
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": p.name, "capability": list(torch.cuda.get_device_capability()),
                   "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                   "count": torch.cuda.device_count()}
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
peers = {}
for mod, attr in (("liger_kernel.ops.grpo_loss", "fused_selective_log_softmax"),
                  ("trl.kernels", "ChunkedLogProbFunction"),
                  ("cut_cross_entropy", "linear_cross_entropy")):
    try:
        getattr(__import__(mod, fromlist=[attr]), attr)
        peers[mod] = "ok"
    except Exception as exc:
        peers[mod] = f"{type(exc).__name__}: {exc}"[:300]
info["peers"] = peers
for mod in ("cme_rewards.scorer", "cme_rewards.ops.triton_linear"):
    try:
        __import__(mod)
        info[f"import {mod}"] = "ok"
    except Exception as exc:
        info[f"import {mod}"] = f"{type(exc).__name__}: {exc}"[:300]
print("ENV_JSON " + json.dumps(info))
"""


class Run:
    def __init__(self, out: Path, budget: float, dry: bool):
        self.out, self.dry = out, dry
        self.deadline = time.monotonic() + budget
        self.summary: dict = {
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dry": dry,
            "budget_s": budget,
            "steps": [],
        }
        self.log = out / "log.txt"
        out.mkdir(parents=True, exist_ok=True)
        self.log.write_text(f"device_run {self.summary['started']} dry={dry}\n")
        self.write()

    def write(self) -> None:
        tmp = self.out / "device_run.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1))
        tmp.replace(self.out / "device_run.json")

    def env(self) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CME_TRITON_PRINT_TUNING": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        )
        if self.dry:
            env["TRITON_INTERPRET"] = "1"
        else:
            env.pop("TRITON_INTERPRET", None)
        return env

    def step(self, name: str, cmd: list[str]) -> dict:
        """Run ``cmd`` with its share of the time left; output appended to log.txt."""
        left = self.deadline - time.monotonic() - RESERVE_S
        limit = min(STEP_LIMITS[name], left)
        shown = ["<env probe>" if arg == ENV_PROBE else arg for arg in cmd[1:]]
        record = {"name": name, "cmd": " ".join(shown)}
        if limit < MIN_STEP_S:
            record.update(rc=None, skipped=f"out of time ({left:.0f} s left)")
            self.summary["steps"].append(record)
            self.write()
            return record
        start = time.monotonic()
        with self.log.open("a") as fh:
            fh.write(f"\n===== {name} (limit {limit:.0f} s): {record['cmd']}\n")
            fh.flush()
            try:
                proc = subprocess.run(
                    cmd, cwd=REPO, env=self.env(), stdout=fh, stderr=subprocess.STDOUT,
                    timeout=limit,
                )  # fmt: skip
                record["rc"] = proc.returncode
            except subprocess.TimeoutExpired:
                record.update(rc=None, timed_out=True)
                fh.write(f"\n===== {name}: killed after {limit:.0f} s\n")
        record["seconds"] = round(time.monotonic() - start, 1)
        record["limit_s"] = round(limit)
        self.summary["steps"].append(record)
        self.write()
        print(f"{name}: rc={record.get('rc')} {record['seconds']} s", flush=True)
        return record


def parse_junit(path: Path, log: Path) -> dict:
    """Counts and the first lines of every failure of a JUnit XML file; when pytest was killed
    before writing it, the verdicts its ``-v`` lines had printed to the log so far."""
    if not path.exists():
        text = log.read_text().split("===== pytest", 1)[-1]
        lines = [ln for ln in text.splitlines() if ln.startswith("tests/") and "::" in ln]
        verdicts = {
            v: [ln.split(" ")[0] for ln in lines if f" {v}" in ln]
            for v in ("PASSED", "FAILED", "ERROR", "SKIPPED")
        }
        return {
            "error": "no JUnit file (pytest did not finish)",
            **{v.lower(): len(names) for v, names in verdicts.items()},
            "failed": verdicts["FAILED"] + verdicts["ERROR"],
        }
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in suite.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                text = (node.get("message") or "") + "\n" + (node.text or "")
                failures.append({"test": case.get("name"), "kind": kind, "message": text[:1500]})
    slowest = sorted(
        ((float(c.get("time", 0)), c.get("name")) for c in suite.iter("testcase")), reverse=True
    )[:5]
    return {**counts, "failed": failures, "slowest": slowest}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=525.0, help="seconds for all steps")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes, interpreter")
    parser.add_argument("--peers-log", type=Path, help="pip log of the peer wheels, for log.txt")
    opts = parser.parse_args(argv)
    run = Run(opts.out, opts.budget, opts.dry)
    if opts.peers_log and opts.peers_log.exists():
        with run.log.open("a") as fh:
            fh.write("\n===== peer wheels\n" + opts.peers_log.read_text()[-4000:])

    env_step = run.step("env", [PY, "-c", ENV_PROBE])
    for line in run.log.read_text().splitlines():
        if line.startswith("ENV_JSON {"):
            run.summary["env"] = json.loads(line[len("ENV_JSON ") :])
            run.write()
    if env_step.get("rc") != 0:
        print("env probe failed: see log.txt", flush=True)

    junit = Path("/tmp/cme_device_junit.xml")
    junit.unlink(missing_ok=True)
    tests = ["tests/test_triton_kernels.py", "tests/test_ops_check.py"]
    run.step(
        "pytest",
        [PY, "-m", "pytest", *tests, "-v", "-rfE", "-p", "no:cacheprovider", "-m", "not slow",
         "--durations=10", f"--junitxml={junit}"],
    )  # fmt: skip
    run.summary["pytest"] = parse_junit(junit, run.log)
    run.write()

    e2e = [PY, "benchmarks/gpu/check_scorer.py", "--json", str(opts.out / "e2e.json")]
    run.step("e2e", [*e2e, "--dry"] if opts.dry else e2e)

    for case in BENCH_CASES:
        cmd = [PY, "benchmarks/bench_kernels.py", "--case", case, "--out", str(opts.out)]
        cmd += ["--time-limit", str(STEP_LIMITS[f"bench:{case}"] - 10)]
        run.step(f"bench:{case}", [*cmd, "--dry"] if opts.dry else cmd)

    script = REPO / "benchmarks" / "bench_scorer.py"
    if script.exists():
        results = REPO / "benchmarks" / "results"
        before = time.time()
        args = (
            ["--help"]
            if opts.dry
            else ["--device", "cuda", "--config", "qwen2.5-0.5b", "--batches", "c"]
        )
        args += [] if opts.dry else ["--repeats", "1", "--tokenizer", str(TOKENIZER_DIR)]
        run.step("bench_scorer", [PY, str(script.relative_to(REPO)), *args])
        fresh = sorted(
            (p for p in results.glob("*.json") if p.stat().st_mtime >= before),
            key=lambda p: p.stat().st_mtime,
        )
        if fresh:
            target = opts.out / f"scorer_{fresh[-1].name}"
            shutil.copyfile(fresh[-1], target)
            run.summary["bench_scorer_json"] = target.name
    else:
        run.summary["steps"].append({"name": "bench_scorer", "skipped": "no bench_scorer.py"})

    for stray in opts.out.glob("*.tmp"):
        stray.unlink()
    run.summary["files"] = sorted(p.name for p in opts.out.iterdir())
    run.summary["seconds"] = round(opts.budget - (run.deadline - time.monotonic()), 1)
    failed = [
        s["name"]
        for s in run.summary["steps"]
        if s.get("rc") not in (0, None) or s.get("timed_out")
    ]
    run.summary["failed_steps"] = failed
    run.write()
    print(f"done in {run.summary['seconds']} s; failed steps: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
