"""The op-level tuner: timing, caching per key, skipping configs that fail, forcing one config."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.testing  # noqa: E402

from cme_rewards.ops import tl_autotune, triton_linear  # noqa: E402
from cme_rewards.ops.tl_autotune import KernelConfig, Tuner  # noqa: E402
from cme_rewards.ops.tl_utils import N_BUCKETS, n_bucket  # noqa: E402

A = KernelConfig.make(num_warps=4, num_stages=3, BLOCK=128)
B = KernelConfig.make(num_warps=8, num_stages=2, BLOCK=256)
C = KernelConfig.make(num_warps=1, num_stages=1, BLOCK=64)


@pytest.fixture
def timed(monkeypatch):
    """Pretend to be compiled: do_bench 'times' a config by calling it and reading its cost."""
    monkeypatch.setattr(tl_autotune, "interpreting", lambda: False)
    costs = {A: 2.0, B: 1.0, C: 3.0}
    calls = []

    def fake_do_bench(fn, warmup, rep):
        return fn()

    def run(config):
        calls.append(config)
        if config == C:
            raise RuntimeError("out of resources: shared memory")
        return costs[config]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    return run, calls


def test_picks_fastest_and_caches_per_key(timed):
    run, calls = timed
    tuner = Tuner("t")
    assert tuner.pick(("v", 256), [A, B, C], run) == B
    assert calls == [A, B, C]
    assert tuner.pick(("v", 256), [A, B, C], run) == B and len(calls) == 3  # cached
    assert tuner.pick(("v", 2048), [A, C], run) == A and len(calls) == 5  # new bucket
    assert "out of resources" in dict(tuner.timings[("v", 256)])[str(C)]
    assert tuner.describe_last().startswith(str(A)) and "(2.000 ms)" in tuner.describe_last()


def test_all_configs_failing_raises(timed):
    run, _ = timed
    with pytest.raises(RuntimeError, match="no config ran"):
        Tuner("t").pick("k", [C, C], run)


def test_forced_config_and_single_candidate(timed):
    run, calls = timed
    tuner = Tuner("t")
    with tuner.forced(C):
        assert tuner.pick("k", [A, B], run) == C
    assert tuner.pick("k2", [A], run) == A
    assert calls == [] and "k" not in tuner.cache


def test_print_tuning(timed, monkeypatch, capsys):
    run, _ = timed
    monkeypatch.setenv("CME_TRITON_PRINT_TUNING", "1")
    Tuner("head").pick("k", [A, B], run)
    err = capsys.readouterr().err
    assert "[cme tuning head k] best: " + str(B) in err


def test_interpreter_uses_first_candidate(monkeypatch):
    monkeypatch.setattr(tl_autotune, "interpreting", lambda: True)
    assert Tuner("t").pick("k", [B, A], lambda c: 1 / 0) == B


def test_n_buckets():
    assert [n_bucket(n) for n in (1, 256, 257, 2048, 2049, 16384, 16385, 10**6)] == [
        256,
        256,
        2048,
        2048,
        16384,
        16384,
        32768,
        32768,
    ]
    assert N_BUCKETS == (256, 2048, 16384)


def test_config_tables_are_consistent():
    for config in tl_autotune.LINEAR_CONFIGS_16BIT + tl_autotune.LINEAR_CONFIGS_FP32:
        meta = config.kwargs
        assert triton_linear.ROW_QUANTUM % meta["BLOCK_M"] == 0
        assert meta["EPILOGUE_SPLIT"] in (1, 2, 4) and meta["BLOCK_N"] % meta["EPILOGUE_SPLIT"] == 0
    assert any(c.kwargs["PERSISTENT"] for c in tl_autotune.LINEAR_CONFIGS_16BIT)
    assert all(c.num_stages == 1 for c in tl_autotune.LOGITS_CONFIGS)  # NUM_STAGES pipelines
    assert {c.kwargs["NUM_STAGES"] for c in tl_autotune.LOGITS_CONFIGS} >= {1, 2, 3}
    assert len({str(c) for c in tl_autotune.LOGITS_CONFIGS}) == len(tl_autotune.LOGITS_CONFIGS)
