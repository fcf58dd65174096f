"""Triton kernels of cme_rewards.ops against float64 references.

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here
before the kernel modules are imported) on tiny shapes; with CUDA and no interpreter they run
compiled on the GPU, where realistic bf16 shapes and every tuned config are added.
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

from cme_rewards.ops import tl_autotune, triton_linear, triton_logits  # noqa: E402
from cme_rewards.ops.chunked import (  # noqa: E402
    chunked_linear_token_logprobs,
    chunked_token_logprobs,
)
from cme_rewards.ops.reference import (  # noqa: E402
    reference_linear_token_logprobs,
    reference_token_logprobs,
)
from cme_rewards.ops.tl_utils import interpreting  # noqa: E402
from cme_rewards.ops.triton_linear import chunk_rows, triton_linear_token_logprobs  # noqa: E402
from cme_rewards.ops.triton_logits import triton_token_logprobs  # noqa: E402

if not interpreting() and not torch.cuda.is_available():
    raise RuntimeError(
        "the Triton kernels were imported without TRITON_INTERPRET=1 on a machine without CUDA; "
        "set TRITON_INTERPRET=1 before anything imports cme_rewards.ops.tl_utils"
    )

DEVICE = torch.device("cpu" if interpreting() else "cuda")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REPO = Path(__file__).resolve().parents[1]
# The interpreter evaluates log2(0) = -inf (a vocabulary half-tile past the end) through numpy.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")


def ref_token_logprobs(logits, targets, temperature=1.0, keep=None):
    """float64 reference on CPU; rows with keep == False give 0 (what the kernel writes)."""
    out = reference_token_logprobs(logits, targets, temperature=temperature).cpu()
    if keep is not None:
        out = torch.where(keep.cpu(), out, torch.zeros_like(out))
    return out


def ref_linear_token_logprobs(hidden, weight, targets, **kwargs):
    """float64 reference through the output head, from the same (rounded) inputs, on CPU."""
    return reference_linear_token_logprobs(hidden, weight, targets, **kwargs).cpu()


def assert_close64(actual, expected, atol=2e-5, rtol=1e-6):
    """float32 result vs float64 reference; equal infinities and NaNs count as equal."""
    assert actual.dtype == torch.float32
    torch.testing.assert_close(
        actual.double().cpu(), expected.cpu(), atol=atol, rtol=rtol, equal_nan=True
    )


def make_logits(n, vocab, dtype, scale=4.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=gen) * scale).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    return logits.to(DEVICE), targets.to(DEVICE)


# ---------------------------------------------------------------- logits kernel

# V not a multiple of 8 (37, 300, 603) and a row longer than two interpreter blocks (603).
LOGIT_SHAPES = [(1, 300), (7, 603), (4, 1), (5, 37)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOGIT_SHAPES)
def test_logits_kernel_matches_float64(shape, dtype):
    logits, targets = make_logits(*shape, dtype)
    got = triton_token_logprobs(logits, targets)
    want = ref_token_logprobs(logits, targets)
    assert_close64(got, want)
    assert_close64(chunked_token_logprobs(logits, targets), want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_kernel_unaligned_rows_temperature(dtype):
    """Odd row stride and a base 3 elements past a 16-byte boundary: every row has its own head."""
    wide, targets = make_logits(6, 603, dtype, seed=1)
    logits = wide[:, 3:590]  # row stride 603, last dim contiguous, V = 587
    assert logits.stride() == (603, 1)
    targets = targets % 587
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
def test_logits_kernel_mask_skips_rows(dtype):
    logits, targets = make_logits(8, 300, dtype, seed=3)
    logits = logits.clone()
    keep = torch.tensor([0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool, device=DEVICE)
    logits[~keep] = float("nan")  # masked rows must never be read
    want = ref_token_logprobs(logits, targets, keep=keep)
    by_bool = triton_token_logprobs(logits, targets, mask=keep)
    assert_close64(by_bool, want)
    assert torch.equal(triton_token_logprobs(logits, targets, mask=keep.to(torch.int32)), by_bool)
    assert_close64(chunked_token_logprobs(logits, targets, mask=keep), want)


def test_logits_kernel_all_rows_masked_and_empty_input():
    logits, targets = make_logits(4, 300, torch.bfloat16, seed=4)
    logits = torch.full_like(logits, float("nan"))
    mask = torch.zeros(4, dtype=torch.bool, device=DEVICE)
    got = triton_token_logprobs(logits, targets, mask=mask)
    assert torch.equal(got, torch.zeros(4, device=DEVICE))
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
    assert torch.isnan(chunked_token_logprobs(logits, bad)[[2, 4]]).all()


def test_logits_kernel_rejects_bad_input():
    logits, targets = make_logits(3, 50, torch.float32)
    with pytest.raises(ValueError, match="logits must be"):
        triton_token_logprobs(logits[0], targets)
    with pytest.raises(ValueError, match="targets must be"):
        triton_token_logprobs(logits, targets[:2])
    with pytest.raises(ValueError, match="temperature"):
        triton_token_logprobs(logits, targets, temperature=0.0)
    with pytest.raises(ValueError, match="mask must"):
        triton_token_logprobs(logits, targets, mask=targets[:2])
    with pytest.raises(ValueError, match="dtype"):
        triton_token_logprobs(logits.double(), targets)


# ---------------------------------------------------------------- fused linear kernel

LINEAR_SHAPES = [(5, 48, 300), (1, 64, 64), (19, 32, 129)]  # N = 19: a partial row block


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
    if tma == "1" and dtype == torch.float32:
        pytest.skip("fp32 operands never use TMA")
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
    if dtype == torch.float32:  # the chunked path computes logits in the operands' dtype
        assert_close64(chunked_linear_token_logprobs(hidden, weight, targets, **kwargs), want)
    # a softcap far above the logits changes nothing beyond rounding
    plain = triton_linear_token_logprobs(hidden, weight, targets, bias=bias, logit_scale=0.75)
    capped = triton_linear_token_logprobs(
        hidden, weight, targets, bias=bias, logit_scale=0.75, softcap=1e4
    )
    torch.testing.assert_close(capped, plain, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", tl_autotune.LINEAR_INTERPRET_CONFIGS[1:], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_kernel_persistent_split_epilogue(config, dtype, monkeypatch):
    """Persistent programs striding over tiles, the tile folded in two column halves; V = 300 ends
    inside the first half of its last tile (the second half is all past the vocabulary)."""
    if DEVICE.type == "cuda":
        pytest.skip("interpreter config; the GPU configs are covered by test_every_linear_config")
    hidden, weight, targets, bias = make_head(37, 48, 300, dtype, seed=6, with_bias=True)
    kwargs = {"bias": bias, "softcap": 5.0}
    with triton_linear.TUNER.forced(config):
        got = triton_linear_token_logprobs(hidden, weight, targets, **kwargs)
    want = ref_linear_token_logprobs(hidden, weight, targets, **kwargs)
    assert_close64(got, want, atol=linear_tolerance(dtype, 48))


def test_linear_kernel_row_stride_chunks_and_determinism(monkeypatch):
    hidden, weight, targets, _ = make_head(21, 40, 200, torch.float32, seed=2)
    wide = torch.zeros(21, 56, device=DEVICE)
    wide[:, 8:48] = hidden
    strided = wide[:, 8:48]  # row stride 56 floats
    want = ref_linear_token_logprobs(hidden, weight, targets)
    whole = triton_linear_token_logprobs(strided, weight, targets)
    assert_close64(whole, want, atol=1e-4)
    assert torch.equal(whole, triton_linear_token_logprobs(strided, weight, targets))
    # a tiny partial-buffer budget splits the rows into equal chunks of 8 (8 + 8 + 5)
    monkeypatch.setattr(triton_linear, "PARTIAL_BUDGET_BYTES", 1)
    monkeypatch.setattr(triton_linear, "ROW_QUANTUM", 8)
    chunked = triton_linear_token_logprobs(strided, weight, targets)
    assert_close64(chunked, want, atol=1e-4)


def test_chunk_rows_splits_evenly():
    # 8192 rows x 262,144 vocabulary: 128-wide tiles need 64 MiB -> two equal chunks, not 7936 + 256
    assert chunk_rows(8192, 262144, 128) == 4096
    assert chunk_rows(8192, 262144, 256) == 8192  # 32 MiB: one chunk
    assert chunk_rows(8192, 151936, 128) == 8192
    assert chunk_rows(100, 262144, 128, budget=1) == 100  # fewer rows than one quantum
    rows = chunk_rows(10_000, 262144, 128, budget=2**20)
    assert rows % 256 == 0 and 2**20 // (4 * 2048) <= rows <= 10_000


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


# ---------------------------------------------------------------- GPU only: realistic shapes

if DEVICE.type == "cuda":

    @pytest.mark.parametrize("shape", [(64, 151936), (48, 262144), (33, 50257), (40, 151665)])
    def test_logits_kernel_realistic_vocab_on_gpu(shape):
        """bf16 rows of real vocabularies: aligned (151,936, 262,144), odd rows (50,257), and a
        slice of a 151,936-wide tensor to 151,665 columns (aligned rows, odd length)."""
        n, vocab = shape
        if vocab == 151665:
            wide, targets = make_logits(n, 151936, torch.bfloat16, seed=7)
            logits, targets = wide[:, :vocab], targets % vocab
        else:
            logits, targets = make_logits(n, vocab, torch.bfloat16, seed=7)
        keep = torch.arange(n, device=DEVICE) % 3 != 0
        got = triton_token_logprobs(logits, targets, mask=keep)
        assert_close64(got, ref_token_logprobs(logits, targets, keep=keep), atol=1e-5)

    @pytest.mark.parametrize("config", tl_autotune.LOGITS_CONFIGS, ids=str)
    def test_every_logits_config_on_gpu(config):
        logits, targets = make_logits(37, 50257, torch.bfloat16, seed=9)
        with triton_logits.TUNER.forced(config):
            got = triton_token_logprobs(logits, targets)
        assert_close64(got, ref_token_logprobs(logits, targets), atol=1e-5)

    @pytest.mark.parametrize(
        "shape,softcap", [((300, 640, 262144), 30.0), ((257, 4096, 151936), None)]
    )
    def test_linear_kernel_realistic_head_on_gpu(shape, softcap):
        """Tuned (TMA loads on sm90+): every config is timed on the first call."""
        hidden, weight, targets, _ = make_head(*shape, torch.bfloat16, seed=8)
        got = triton_linear_token_logprobs(hidden, weight, targets, softcap=softcap)
        want = ref_linear_token_logprobs(hidden, weight, targets, softcap=softcap)
        assert_close64(got, want, atol=5e-4)

    def test_linear_kernel_pointer_loads_and_bias_on_gpu(monkeypatch):
        monkeypatch.setenv("CME_TRITON_TMA", "0")
        hidden, weight, targets, bias = make_head(300, 640, 262144, torch.bfloat16, 8, True)
        kwargs = {"bias": bias, "softcap": 30.0}
        with triton_linear.TUNER.forced(tl_autotune.LINEAR_CONFIGS_16BIT[0]):
            got = triton_linear_token_logprobs(hidden, weight, targets, **kwargs)
        want = ref_linear_token_logprobs(hidden, weight, targets, **kwargs)
        assert_close64(got, want, atol=5e-4)

    @pytest.mark.parametrize(
        "dtype,config",
        [(torch.bfloat16, c) for c in tl_autotune.LINEAR_CONFIGS_16BIT]
        + [(torch.float32, c) for c in tl_autotune.LINEAR_CONFIGS_FP32],
        ids=str,
    )
    def test_every_linear_config_on_gpu(dtype, config):
        """Every config the tuner may pick, with a softcap, at a head of 20,001 columns."""
        hidden, weight, targets, _ = make_head(300, 640, 20001, dtype, seed=10)
        kwargs = {"softcap": 30.0, "logit_scale": 0.5}
        with triton_linear.TUNER.forced(config):
            got = triton_linear_token_logprobs(hidden, weight, targets, **kwargs)
        want = ref_linear_token_logprobs(hidden, weight, targets, **kwargs)
        assert_close64(got, want, atol=5e-4)

    def test_kernels_follow_the_tensor_device():
        """Launches go to the tensors' GPU, not the current device (cuda:k, k > 0)."""
        if torch.cuda.device_count() < 2:
            pytest.skip("one GPU")
        logits, targets = make_logits(8, 1000, torch.bfloat16)
        logits, targets = logits.to("cuda:1"), targets.to("cuda:1")
        got = triton_token_logprobs(logits, targets)
        assert got.device == logits.device
        assert_close64(got, ref_token_logprobs(logits, targets))


@pytest.mark.slow
def test_kernels_compile_for_h100():
    """Representative kernels compile for sm90 (H100) without spills or stack, on this machine."""
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
