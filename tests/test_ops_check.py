"""Load-time check and warm-up of the Triton path (interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cme_rewards.ops import (  # noqa: E402
    ImplCheck,
    check_triton_head,
    check_triton_logits,
    default_tolerance,
    triton_linear,
    triton_logits,
    warm_up_triton_head,
    warm_up_triton_logits,
)
from cme_rewards.ops import check as check_module  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter evaluates log2(0) = -inf (a vocabulary half-tile past the end) through numpy.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")


def head(dtype, n=6, dim=32, vocab=301, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen).to(dtype).to(DEVICE)
    weight = (torch.randn(vocab, dim, generator=gen) / 2).to(dtype).to(DEVICE)
    targets = torch.randint(0, vocab, (n,), generator=gen).to(DEVICE)
    return hidden, weight, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_triton_head_agrees(dtype):
    hidden, weight, targets = head(dtype)
    result = check_triton_head(hidden, weight, targets, softcap=10.0, logit_scale=0.5)
    assert isinstance(result, ImplCheck)
    assert result.ok and result.error is None, result.describe()
    assert result.max_abs_diff <= result.tol == default_tolerance(dtype)
    assert result.torch_max_abs_diff is not None and result.torch_max_abs_diff < 0.1
    assert "agrees" in result.describe()


def test_check_triton_head_reports_a_wrong_kernel(monkeypatch):
    hidden, weight, targets = head(torch.float32)
    real = triton_linear.triton_linear_token_logprobs

    def off_by_a_bit(*args, **kwargs):
        return real(*args, **kwargs) + 1e-3

    monkeypatch.setattr(triton_linear, "triton_linear_token_logprobs", off_by_a_bit)
    result = check_triton_head(hidden, weight, targets)
    assert not result.ok and result.error is None
    assert result.max_abs_diff == pytest.approx(1e-3, rel=1e-2)
    assert "DISAGREES" in result.describe() and "tolerance 0.0001" in result.describe()
    assert check_triton_head(hidden, weight, targets, tol=1e-2).ok


def test_check_triton_head_catches_compile_failures(monkeypatch):
    hidden, weight, targets = head(torch.float32)

    def broken(*args, **kwargs):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(triton_linear, "triton_linear_token_logprobs", broken)
    result = check_triton_head(hidden, weight, targets)
    assert not result.ok and math.isinf(result.max_abs_diff)
    assert result.error == "RuntimeError: PTX assembly failed"
    assert "PTX assembly failed" in result.describe()


def test_check_triton_head_flags_nan_where_reference_is_finite(monkeypatch):
    hidden, weight, targets = head(torch.float32)
    monkeypatch.setattr(
        triton_linear,
        "triton_linear_token_logprobs",
        lambda h, *a, **k: torch.full((h.shape[0],), float("nan"), device=h.device),
    )
    result = check_triton_head(hidden, weight, targets)
    assert not result.ok and math.isinf(result.max_abs_diff)


def test_check_triton_logits():
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 603, generator=gen) * 4).to(torch.bfloat16).to(DEVICE)
    targets = torch.randint(0, 603, (5,), generator=gen).to(DEVICE)
    result = check_triton_logits(logits, targets, temperature=0.8)
    assert result.ok, result.describe()
    assert result.torch_max_abs_diff is not None and result.torch_max_abs_diff < 1e-4


def test_warm_up_triton_head_runs_each_bucket(monkeypatch):
    monkeypatch.setattr(check_module, "_row_counts", lambda max_rows, row_bytes: [3, 40])
    _, weight, _ = head(torch.bfloat16, vocab=131)
    result = warm_up_triton_head(weight, softcap=20.0, max_rows=40, check_rows=8)
    assert result.ok, result.describe()
    assert [line.split(":")[0] for line in result.details] == ["N=3", "N=40"]
    assert "BLOCK_N=" in result.details[0]


def test_warm_up_triton_logits_runs_each_bucket(monkeypatch):
    monkeypatch.setattr(check_module, "_row_counts", lambda max_rows, row_bytes: [2, 9])
    result = warm_up_triton_logits(77, dtype=torch.float16, device=DEVICE, max_rows=9)
    assert result.ok, result.describe()
    assert len(result.details) == 2 and "BLOCK_V=" in result.details[1]


def test_warm_up_reports_failures(monkeypatch):
    monkeypatch.setattr(check_module, "_row_counts", lambda max_rows, row_bytes: [2])

    def broken(*args, **kwargs):
        raise ValueError("out of resources")

    monkeypatch.setattr(triton_logits, "triton_token_logprobs", broken)
    result = warm_up_triton_logits(50, dtype=torch.float32, device=DEVICE)
    assert not result.ok and result.error == "ValueError: out of resources"


def test_row_counts_cover_each_bucket_once():
    rows = check_module._row_counts
    assert rows(16384, 8) == [256, 2048, 16384]
    assert rows(300, 8) == [256, 300]
    assert rows(100, 8) == [100]
    assert rows(40000, 8) == [256, 2048, 16384, 32768]
    # a 2 GiB cap on the rows of 262,144 bf16 logits keeps each bucket but fewer rows
    assert rows(16384, 262144 * 2) == [256, 2048, 4096]


def test_max_abs_diff_semantics():
    nan, inf = float("nan"), float("inf")
    diff = check_module.max_abs_diff
    assert diff(torch.tensor([1.0, nan, -inf]), torch.tensor([1.5, nan, -inf])) == 0.5
    assert diff(torch.tensor([nan]), torch.tensor([0.0])) == inf
    assert diff(torch.tensor([-inf]), torch.tensor([0.0])) == inf
    assert diff(torch.tensor([]), torch.tensor([])) == 0.0


def test_default_tolerance():
    assert default_tolerance(torch.bfloat16) == default_tolerance(torch.float16) == 2e-3
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert default_tolerance(torch.float32) == 1e-4
        torch.backends.cuda.matmul.allow_tf32 = True
        assert default_tolerance(torch.float32) == 5e-2
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
