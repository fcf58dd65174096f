"""benchmarks/bench_scorer.py end to end on a tiny random-weight config: the plumbing of the GPU
run (``--device cuda --config ...``), proved on CPU. The figures themselves are not asserted
(timings do not belong in tests); the rewards every method computes are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
METHODS = ("hand_written", "before", "bf16", "share_prefix", "all")


@pytest.mark.slow
def test_bench_scorer_tiny_config_runs_every_method(tmp_path):
    out = tmp_path / "scorer.json"
    subprocess.run(
        [sys.executable, "benchmarks/bench_scorer.py", "--config", "tiny", "--batches", "c",
         "--repeats", "1", "--no-float64", "--out", str(out)],
        cwd=REPO, check=True, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["verifier"] == "tiny" and report["weights"].startswith("random")
    assert report["machine"]["cpu_cores"] >= 1
    batch = report["batches"]["c"]
    assert abs(batch["response_tokens"] - 4 * 8 * 128) < 0.05 * 4 * 8 * 128  # re-tokenized
    methods = batch["methods"]
    assert set(methods) == set(METHODS)
    for name, row in methods.items():
        assert row["tokens_per_s"] > 0 and len(row["seconds"]) == 1, name
        assert row["speedup_vs_before"] > 0 and row["speedup_vs_hand_written"] > 0, name
    # float32 paths compute the same rewards: sharing the prompt changes nothing but the cost
    assert methods["share_prefix"]["max_abs_diff_vs_before_nats"] < 1e-4
    assert methods["hand_written"]["max_abs_diff_vs_before_nats"] < 1e-4
    assert methods["bf16"]["dtype"] == "torch.bfloat16"
    assert methods["bf16"]["max_abs_diff_vs_before_nats"] < 0.1  # bf16 moves rewards a little
