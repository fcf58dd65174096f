"""benchmarks/bench_floor.py: its command on a small case, and the committed figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "winrate" / "claude-2.1_first40.annotations.json"
COMMITTED = REPO / "benchmarks" / "results" / "floor.json"


@pytest.mark.slow
def test_bench_floor_on_two_groups(tmp_path):
    out = tmp_path / "floor.json"
    subprocess.run(
        [sys.executable, "benchmarks/bench_floor.py", "--prompts", "2", "--data", str(FIXTURE),
         "--out", str(out)],
        cwd=REPO, check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["settings"]["groups"] == 2 and report["settings"]["group_size"] == 8
    assert report["machine"]["cpu_cores"] and len(report["groups"][0]["rewards"]) == 8
    assert all(-20 < v < 0 for g in report["groups"] for v in g["rewards"])
    figures = report["figures"]
    for framework in ("verl", "trl", "openrlhf"):
        group, fixed = figures["group_floor"][framework], figures["fixed_-50"][framework]
        assert group["cases"] == fixed["cases"] == 16
        assert group["failed_ranks_last"] == fixed["failed_ranks_last"] == 1.0
        assert group["mean_abs_change"] < fixed["mean_abs_change"]
    # OpenRLHF file mode with a group size gives its failed sample the core's group floor.
    assert figures["openrlhf_group_size"]["openrlhf"] == figures["group_floor"]["openrlhf"]
    assert figures["openrlhf_no_group"]["openrlhf"] == figures["fixed_-50"]["openrlhf"]


def test_committed_floor_figures_meet_the_target():
    report = json.loads(COMMITTED.read_text())
    assert report["settings"]["groups"] >= 40 and report["machine"]["cpu"]
    figures = report["figures"]
    for framework in ("verl", "trl", "openrlhf"):
        assert figures["group_floor"][framework]["mean_abs_change"] <= 0.2
        assert figures["group_floor"][framework]["failed_ranks_last"] == 1.0
        assert figures["fixed_-50"][framework]["mean_abs_change"] > 0.6
    assert figures["openrlhf_group_size"]["openrlhf"]["mean_abs_change"] <= 0.2
