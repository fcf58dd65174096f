"""The chunked PyTorch log-prob path against float64 references."""

from __future__ import annotations

import pytest
import torch

from cme_rewards.ops import (
    apply_head_transform,
    linear_token_logprobs,
    select_impl,
    token_logprobs,
)
from cme_rewards.ops.chunked import chunked_linear_token_logprobs, chunked_token_logprobs
from cme_rewards.ops.reference import reference_linear_token_logprobs, reference_token_logprobs

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_elements", [7, 64, 1 << 22])
def test_chunked_logits_match_float64(dtype, chunk_elements):
    torch.manual_seed(0)
    logits = (torch.randn(13, 301) * 4).to(dtype)
    logits[0, 5] = 1e4 if dtype != torch.float16 else 6e4
    logits[1, :100] = float("-inf")
    logits[2, 7] = -1e4
    targets = torch.randint(0, 301, (13,))
    targets[1] = 150  # a finite entry of the row with -inf entries
    got = chunked_token_logprobs(logits, targets, chunk_elements=chunk_elements)
    want = reference_token_logprobs(logits, targets)
    assert got.dtype == torch.float32 and got.shape == (13,)
    torch.testing.assert_close(got.double(), want, atol=TOL[dtype], rtol=1e-6)


def test_target_at_minus_inf_is_minus_inf_not_nan():
    logits = torch.zeros(2, 10)
    logits[0, 3] = float("-inf")
    got = chunked_token_logprobs(logits, torch.tensor([3, 4]), chunk_elements=4)
    assert got[0] == float("-inf") and torch.isfinite(got[1])


def test_temperature():
    torch.manual_seed(1)
    logits, targets = torch.randn(4, 50), torch.randint(0, 50, (4,))
    got = chunked_token_logprobs(logits, targets, temperature=0.7, chunk_elements=16)
    torch.testing.assert_close(
        got.double(), reference_token_logprobs(logits, targets, temperature=0.7)
    )


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_linear_matches_float64(softcap, with_bias):
    torch.manual_seed(2)
    hidden, weight = torch.randn(9, 32), torch.randn(257, 32) / 4
    bias = torch.randn(257) if with_bias else None
    targets = torch.randint(0, 257, (9,))
    kwargs = dict(bias=bias, logit_scale=0.5, softcap=softcap)
    got = chunked_linear_token_logprobs(hidden, weight, targets, chunk_elements=50, **kwargs)
    want = reference_linear_token_logprobs(hidden, weight, targets, **kwargs)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-6)


def test_chunked_linear_never_holds_full_logits(monkeypatch):
    """Every block of logits the chunked path makes is at most ``chunk_elements`` large."""
    sizes = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        sizes.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    hidden, weight = torch.randn(64, 16), torch.randn(1000, 16)
    chunked_linear_token_logprobs(
        hidden, weight, torch.zeros(64, dtype=torch.long), chunk_elements=4096
    )
    assert sizes and max(sizes) <= 4096 < 64 * 1000


def test_mask_skips_rows_and_bad_targets_give_nan():
    torch.manual_seed(3)
    logits, targets = torch.randn(6, 40), torch.randint(0, 40, (6,))
    keep = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    poisoned = logits.clone()
    poisoned[~keep] = float("nan")  # masked rows are never read
    got = chunked_token_logprobs(poisoned, targets, mask=keep, chunk_elements=16)
    want = torch.where(keep, reference_token_logprobs(logits, targets), torch.zeros(6).double())
    torch.testing.assert_close(got.double(), want)
    torch.testing.assert_close(token_logprobs(poisoned, targets, mask=keep, impl="torch"), got)
    bad = targets.clone()
    bad[0], bad[2] = 40, -1
    out = chunked_token_logprobs(logits, bad)
    assert torch.isnan(out[[0, 2]]).all() and torch.isfinite(out[[1, 3, 4, 5]]).all()
    assert torch.isnan(reference_token_logprobs(logits, bad)[[0, 2]]).all()
    hidden, weight = torch.randn(3, 8), torch.randn(20, 8)
    lin = chunked_linear_token_logprobs(hidden, weight, torch.tensor([0, 20, 5]))
    assert torch.isnan(lin[1]) and torch.isfinite(lin[[0, 2]]).all()


def test_blocked_float64_reference_matches_whole_logits(monkeypatch):
    from cme_rewards.ops import reference

    torch.manual_seed(4)
    hidden, weight, bias = torch.randn(5, 16), torch.randn(333, 16), torch.randn(333)
    targets = torch.randint(0, 333, (5,))
    logits = apply_head_transform((hidden.double() @ weight.double().T + bias), softcap=2.0)
    want = reference_token_logprobs(logits, targets)
    monkeypatch.setattr(reference, "_BLOCK_ELEMENTS", 16 * 50)  # blocks of 50 vocabulary rows
    got = reference_linear_token_logprobs(hidden, weight, targets, bias=bias, softcap=2.0)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_dispatch():
    assert select_impl("auto", torch.device("cpu")) == "torch"
    assert select_impl("torch", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="impl"):
        select_impl("cuda", torch.device("cpu"))
    logits, targets = torch.randn(3, 20), torch.tensor([1, 2, 3])
    torch.testing.assert_close(
        token_logprobs(logits, targets, impl="torch").double(),
        reference_token_logprobs(logits, targets),
    )
    hidden, weight = torch.randn(3, 8), torch.randn(20, 8)
    torch.testing.assert_close(
        linear_token_logprobs(hidden, weight, targets).double(),
        reference_linear_token_logprobs(hidden, weight, targets),
    )
