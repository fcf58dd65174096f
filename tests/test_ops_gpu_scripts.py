"""Plumbing of the GPU scripts on CPU (Triton interpreter, tiny shapes): the device run must not
fail on a detail after minutes of device time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

import device_run  # noqa: E402


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_bench_kernels_writes_and_merges_cases(tmp_path):
    for case in ("logits-151936", "hidden-640x262144"):
        _run(["benchmarks/bench_kernels.py", "--dry", "--case", case, "--out", str(tmp_path)])
    (path,) = tmp_path.glob("kernels_*.json")
    result = json.loads(path.read_text())
    cases = {row["case"] for row in result["rows"]}
    assert cases == {"logits-151936", "hidden-640x262144"}  # the second run kept the first's rows
    assert [t["case"] for t in result["targets"]] == ["logits-151936", "hidden-640x262144"]
    logits_checks = result["targets"][0]["checks"]
    assert logits_checks["max_abs_err"]["met"] is True
    assert logits_checks["half_masked_time_ratio"]["value"] is not None
    methods = {row["method"] for row in result["rows"]}
    assert "device copy of the same bytes (bandwidth limit)" in methods
    assert "bare cuBLAS matmul hidden @ weight.T (bf16 out)" in methods
    assert not list(tmp_path.glob("*.tmp"))
    out = _run(["benchmarks/render_kernels.py", str(path)]).stdout
    assert "| target check |" in out and path.with_suffix(".md").exists()


def test_check_scorer_dry(tmp_path):
    target = tmp_path / "e2e.json"
    args = ["--dry", "--families", "gemma3-like", "--dtypes", "bfloat16", "--json", str(target)]
    _run(["benchmarks/gpu/check_scorer.py", *args])
    (row,) = json.loads(target.read_text())["rows"]
    assert row["ok"] and row["vocab"] == 1001
    assert row["triton"]["token_vs_f64_head"] < 2e-3
    assert row["torch"]["token_vs_f64_head"] > row["triton"]["token_vs_f64_head"]


def test_parse_junit_falls_back_to_the_log(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text(
        "===== pytest (limit 150 s)\n"
        "tests/test_triton_kernels.py::test_a PASSED [ 10%]\n"
        "tests/test_triton_kernels.py::test_b[x] FAILED [ 20%]\n"
        "===== pytest: killed after 150 s\n"
    )
    summary = device_run.parse_junit(tmp_path / "missing.xml", log)
    assert summary["passed"] == 1 and summary["failed"] == [
        "tests/test_triton_kernels.py::test_b[x]"
    ]
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite tests="2" failures="1" errors="0" skipped="0">'
        '<testcase name="test_a" time="0.5"/>'
        '<testcase name="test_b" time="1.5"><failure message="boom">trace</failure></testcase>'
        "</testsuite></testsuites>"
    )
    summary = device_run.parse_junit(junit, log)
    assert summary["tests"] == 2 and summary["failed"][0]["test"] == "test_b"
    assert summary["slowest"][0] == (1.5, "test_b")


def test_step_budget_skips_when_time_is_short(tmp_path, monkeypatch):
    run = device_run.Run(tmp_path, budget=10, dry=True)
    record = run.step("pytest", [sys.executable, "-c", "print('never')"])
    assert record["skipped"].startswith("out of time")
    assert json.loads((tmp_path / "device_run.json").read_text())["steps"][0]["name"] == "pytest"
    assert len(list(tmp_path.iterdir())) == 2  # device_run.json and log.txt
    assert device_run.STEP_LIMITS["pytest"] + device_run.STEP_LIMITS["e2e"] < 540
    assert sum(device_run.STEP_LIMITS.values()) <= 540 - 15
