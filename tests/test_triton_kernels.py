"""Triton kernels of cme_rewards.ops against float64 references.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernel modules are imported) on tiny shapes; with CUDA and no interpreter they run
compiled on the GPU, where a few realistic shapes are added.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cme_rewards.ops.reference import (  # noqa: E402
    reference_linear_token_logprobs,
    reference_token_logprobs,
)
from cme_rewards.ops.torch_linear import torch_linear_token_logprobs  # noqa: E402
from cme_rewards.ops.torch_logits import torch_segment_means, torch_token_logprobs  # noqa: E402
from cme_rewards.ops.triton_linear import triton_linear_token_logprobs  # noqa: E402
from cme_rewards.ops.triton_logits import (  # noqa: E402
    interpreting,
    triton_segment_means,
    triton_token_logprobs,
)

if not interpreting() and not torch.cuda.is_available():
    raise RuntimeError(
        "the Triton kernels were imported without TRITON_INTERPRET=1 on a machine without CUDA; "
        "set TRITON_INTERPRET=1 before anything imports cme_rewards.ops.triton_logits"
    )

DEVICE = torch.device("cpu" if interpreting() else "cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REPO = Path(__file__).resolve().parents[1]


def ref_token_logprobs(logits, targets, temperature=1.0, keep=None):
    """float64 reference on CPU; rows with keep == False give 0 (what the kernel writes)."""
    out = reference_token_logprobs(logits, targets, temperature=temperature)
    if keep is not None:
        out = torch.where(keep, out, torch.zeros_like(out))
    return out.cpu()


def ref_linear_token_logprobs(hidden, weight, targets, **kwargs):
    """float64 reference through the output head, from the same (rounded) inputs, on CPU."""
    return reference_linear_token_logprobs(hidden, weight, targets, **kwargs).cpu()


def assert_close64(actual, expected, atol=2e-5, rtol=1e-6):
    """float32 result vs float64 reference; equal infinities and NaNs count as equal."""
    assert actual.dtype == torch.float32
    torch.testing.assert_close(
        actual.double().cpu(), expected, atol=atol, rtol=rtol, equal_nan=True
    )


def make_logits(n, vocab, dtype, scale=4.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    return logits.to(DEVICE), targets.to(DEVICE)


# ---------------------------------------------------------------- logits kernel

LOGIT_SHAPES = [(1, 300), (7, 300), (4, 1), (5, 37)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOGIT_SHAPES)
def test_logits_kernel_matches_float64(shape, dtype):
    logits, targets = make_logits(*shape, dtype)
    got = triton_token_logprobs(logits, targets)
    assert_close64(got, ref_token_logprobs(logits, targets))
    assert_close64(torch_token_logprobs(logits, targets), ref_token_logprobs(logits, targets))


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_kernel_temperature_and_row_stride(dtype):
    wide, targets = make_logits(6, 345, dtype, seed=1)
    logits = wide[:, 3:303]  # row stride 345, last dim contiguous
    assert logits.stride() == (345, 1)
    targets = targets % 300
    got = triton_token_logprobs(logits, targets, temperature=0.7)
    assert_close64(got, ref_token_logprobs(logits, targets, temperature=0.7))


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_kernel_extreme_values(dtype):
    """+-1e4 logits, -inf entries, a row whose first vocabulary block is all -inf."""
    big = 1e4
    logits, _ = make_logits(5, 300, dtype, seed=2)
    logits = logits.clone()
    logits[0, 10], logits[0, 11] = big, -big
    logits[1, :] = -big
    logits[1, 299] = big
    logits[2, :260] = float("-inf")  # the first 256-wide block has only -inf
    logits[3, ::3] = float("-inf")
    targets = torch.tensor([10, 0, 270, 3, 5], device=DEVICE)  # row 3 targets a -inf logit
    got = triton_token_logprobs(logits, targets)
    want = ref_token_logprobs(logits, targets)
    assert want[3] == float("-inf") and torch.isfinite(want[[0, 1, 2, 4]]).all()
    assert_close64(got, want, atol=2e-5, rtol=2e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_kernel_masks_and_segment_means(dtype):
    logits, targets = make_logits(8, 300, dtype, seed=3)
    logits = logits.clone()
    segment_ids = torch.tensor([-1, 0, 0, -1, -1, 2, 2, 2], device=DEVICE)
    keep = segment_ids >= 0
    logits[~keep] = float("nan")  # masked rows must never be read
    want = ref_token_logprobs(logits, targets, keep=keep)
    by_segment = triton_token_logprobs(logits, targets, segment_ids=segment_ids)
    by_mask = triton_token_logprobs(logits, targets, mask=keep)
    assert_close64(by_segment, want)
    assert torch.equal(by_mask, by_segment)
    assert_close64(torch_token_logprobs(logits, targets, mask=keep), want)

    means, counts = triton_segment_means(by_segment, segment_ids, 4)
    assert counts.tolist() == [2, 0, 3, 0]
    want_means = torch.tensor([want[1:3].mean(), 0.0, want[5:8].mean(), 0.0], dtype=torch.float64)
    assert_close64(means, want_means)
    t_means, t_counts = torch_segment_means(by_segment, segment_ids, 4)
    assert torch.equal(t_counts, counts)
    assert_close64(t_means, want_means)


def test_logits_kernel_all_rows_masked_and_empty_input():
    logits, targets = make_logits(4, 300, torch.bfloat16, seed=4)
    logits = torch.full_like(logits, float("nan"))
    mask = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    got = triton_token_logprobs(logits, targets, mask=mask)
    assert torch.equal(got, torch.zeros(4, device=DEVICE))
    means, counts = triton_segment_means(got, torch.full((4,), -1, device=DEVICE), 2)
    assert means.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
    empty = triton_token_logprobs(logits[:0], targets[:0])
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_logits_kernel_is_deterministic_and_flags_bad_targets():
    logits, targets = make_logits(6, 300, torch.float32, seed=5)
    first = triton_token_logprobs(logits, targets)
    assert torch.equal(first, triton_token_logprobs(logits, targets))
    bad = targets.clone()
    bad[2], bad[4] = 300, -1
    got = triton_token_logprobs(logits, bad)
    assert torch.isnan(got[[2, 4]]).all()
    assert torch.equal(got[[0, 1, 3, 5]], first[[0, 1, 3, 5]])
    assert torch.isnan(torch_token_logprobs(logits, bad)[[2, 4]]).all()


def test_logits_kernel_rejects_bad_input():
    logits, targets = make_logits(3, 50, torch.float32)
    with pytest.raises(ValueError, match="logits must be"):
        triton_token_logprobs(logits[0], targets)
    with pytest.raises(ValueError, match="targets must be"):
        triton_token_logprobs(logits, targets[:2])
    with pytest.raises(ValueError, match="temperature"):
        triton_token_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="either mask or segment_ids"):
        triton_token_logprobs(logits, targets, mask=targets, segment_ids=targets)
    with pytest.raises(ValueError, match="dtype"):
        triton_token_logprobs(logits.double(), targets)


# ---------------------------------------------------------------- fused linear kernel

LINEAR_SHAPES = [(5, 48, 300), (1, 64, 64), (16, 32, 129)]


def make_head(n, dim, vocab, dtype, seed=0, with_bias=False):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5 * 4).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return move(hidden), move(weight), move(targets), move(bias)


def linear_tolerance(dtype, dim):
    """fp32 accumulation over H products; fp32 operands may use TF32 only where torch allows."""
    return 1e-5 * max(1.0, dim / 256) if dtype != torch.float32 else 1e-4


@pytest.mark.parametrize("tma", ["0", "1"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_kernel_matches_float64(shape, dtype, tma, monkeypatch):
    monkeypatch.setenv("CME_TRITON_TMA", tma)
    hidden, weight, targets, _ = make_head(*shape, dtype)
    got = triton_linear_token_logprobs(hidden, weight, targets)
    want = ref_linear_token_logprobs(hidden, weight, targets)
    assert_close64(got, want, atol=linear_tolerance(dtype, shape[1]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_kernel_bias_scale_softcap(dtype):
    hidden, weight, targets, bias = make_head(6, 48, 300, dtype, seed=1, with_bias=True)
    kwargs = {"bias": bias, "logit_scale": 0.75, "softcap": 3.0}
    got = triton_linear_token_logprobs(hidden, weight, targets, **kwargs)
    want = ref_linear_token_logprobs(hidden, weight, targets, **kwargs)
    assert_close64(got, want, atol=linear_tolerance(dtype, 48))
    assert_close64(torch_linear_token_logprobs(hidden, weight, targets, **kwargs), want, atol=1e-4)
    # a softcap far above the logits changes nothing beyond rounding
    plain = triton_linear_token_logprobs(hidden, weight, targets, bias=bias, logit_scale=0.75)
    capped = triton_linear_token_logprobs(
        hidden, weight, targets, bias=bias, logit_scale=0.75, softcap=1e4
    )
    torch.testing.assert_close(capped, plain, atol=1e-4, rtol=0)


def test_linear_kernel_row_stride_chunks_and_determinism(monkeypatch):
    from cme_rewards.ops import triton_linear

    hidden, weight, targets, _ = make_head(21, 40, 200, torch.float32, seed=2)
    wide = torch.zeros(21, 56, device=DEVICE)
    wide[:, 8:48] = hidden
    strided = wide[:, 8:48]  # row stride 56 floats = 224 bytes: still TMA-aligned
    want = ref_linear_token_logprobs(hidden, weight, targets)
    whole = triton_linear_token_logprobs(strided, weight, targets)
    assert_close64(whole, want, atol=1e-4)
    assert torch.equal(whole, triton_linear_token_logprobs(strided, weight, targets))
    # a tiny partial-buffer budget splits the rows into chunks of 8
    monkeypatch.setattr(triton_linear, "PARTIAL_BUDGET_BYTES", 1)
    monkeypatch.setattr(triton_linear, "_MIN_CHUNK_ROWS", 8)
    chunked = triton_linear_token_logprobs(strided, weight, targets)
    assert_close64(chunked, want, atol=1e-4)


def test_linear_kernel_flags_bad_targets_and_rejects_bad_input():
    hidden, weight, targets, _ = make_head(4, 32, 100, torch.float32, seed=3)
    bad = targets.clone()
    bad[1] = 100
    got = triton_linear_token_logprobs(hidden, weight, bad)
    assert torch.isnan(got[1]) and torch.isfinite(got[[0, 2, 3]]).all()
    with pytest.raises(ValueError, match="share one of"):
        triton_linear_token_logprobs(hidden.half(), weight, targets)
    with pytest.raises(ValueError, match="hidden \\[N, H\\]"):
        triton_linear_token_logprobs(hidden[:, :16], weight, targets)
    with pytest.raises(ValueError, match="softcap"):
        triton_linear_token_logprobs(hidden, weight, targets, softcap=-1.0)
    assert triton_linear_token_logprobs(hidden[:0], weight, targets[:0]).shape == (0,)


if DEVICE.type == "cuda":  # realistic shapes: the tuned GPU configs, bf16 only (compile time)

    @pytest.mark.parametrize("vocab", [151936, 262144])
    def test_logits_kernel_realistic_vocab_on_gpu(vocab):
        logits, targets = make_logits(64, vocab, torch.bfloat16, seed=7)
        keep = torch.arange(64, device=DEVICE) % 3 != 0
        got = triton_token_logprobs(logits, targets, mask=keep)
        assert_close64(got, ref_token_logprobs(logits, targets, keep=keep), atol=1e-5)

    @pytest.mark.parametrize("tma", ["0", "1"])
    @pytest.mark.parametrize("shape", [(300, 640, 262144), (257, 4096, 151936)])
    def test_linear_kernel_realistic_head_on_gpu(shape, tma, monkeypatch):
        monkeypatch.setenv("CME_TRITON_TMA", tma)
        hidden, weight, targets, _ = make_head(*shape, torch.bfloat16, seed=8)
        got = triton_linear_token_logprobs(hidden, weight, targets)
        assert_close64(got, ref_linear_token_logprobs(hidden, weight, targets), atol=5e-4)


@pytest.mark.slow
def test_kernels_compile_for_h100():
    """Every kernel compiles for sm90 (the H100 target) without spills, on this machine."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu" / "compile_check.py"), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "configs compiled within limits for sm90" in proc.stdout
