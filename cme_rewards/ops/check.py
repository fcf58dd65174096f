"""Load-time check and warm-up of the Triton path on the user's device.

A scorer checks the Triton kernels (:func:`check_triton_head`, :func:`warm_up_triton_head`) and
falls back to ``impl="torch"`` on ``ok=False``. Both compare with a float64 reference from the
same (rounded) inputs and report the torch path's distance beside it (bf16 rounds each logit:
1e-2 to 1e-1 nats, not bounded); any exception of the Triton path is a failed check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cme_rewards.ops.chunked import chunked_linear_token_logprobs, chunked_token_logprobs
from cme_rewards.ops.reference import reference_linear_token_logprobs, reference_token_logprobs

LOGITS_TOLERANCE = 1e-4


@dataclass(frozen=True)
class ImplCheck:
    """Outcome of a comparison of the Triton path with a float64 reference on one device.

    ``max_abs_diff`` is the max over rows of ``|triton - reference|`` (nats), ``inf`` when the
    Triton path failed or gave NaN / inf where the reference is finite; ``ok`` means it is within
    ``tol``. ``torch_max_abs_diff`` is the same for the torch path (``None`` if not run), ``error``
    the Triton path's exception as ``"Type: message"``, ``details`` one line per warmed-up row
    bucket (config chosen, its time, its difference).
    """

    ok: bool
    max_abs_diff: float
    tol: float
    torch_max_abs_diff: float | None = None
    error: str | None = None
    details: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for a log or warning, naming the difference and the bound."""
        torch_part = (
            "" if self.torch_max_abs_diff is None else f", torch path {self.torch_max_abs_diff:.3g}"
        )
        head = (
            f"Triton path {'agrees' if self.ok else 'DISAGREES'}: max |triton - float64| = "
            f"{self.max_abs_diff:.3g} nats (tolerance {self.tol:.3g}{torch_part})"
        )
        if self.error:
            head += f"; error: {self.error}"
        return head


def default_tolerance(dtype: torch.dtype) -> float:
    """Max abs per-token difference (nats) of the fused head vs float64 for operands of ``dtype``.

    fp32: ``1e-4`` with IEEE products, ``5e-2`` when torch allows TF32 matmuls; bf16 / fp16:
    ``2e-3`` (exact products; float32 accumulation over H and logsumexp over V, about 1e-5 to
    3e-4 at H = 4096). The logits op reads the rounded logits themselves: ``LOGITS_TOLERANCE``.
    """
    if dtype in (torch.float32, torch.float64):
        return 5e-2 if torch.backends.cuda.matmul.allow_tf32 else 1e-4
    return 2e-3


def max_abs_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max ``|got - want|`` over rows; NaN == NaN and equal infinities count as 0, a mismatch as inf."""
    got, want = got.double(), want.double()
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    diff = torch.where(same, torch.zeros_like(got), (got - want).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return float(diff.max().item()) if diff.numel() else 0.0


def _failure(exc: BaseException, tol: float, details: list[str] | None = None) -> ImplCheck:
    error = f"{type(exc).__name__}: {exc}"[:1000]
    return ImplCheck(False, math.inf, tol, error=error, details=tuple(details or ()))


def check_triton_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    tol: float | None = None,
) -> ImplCheck:
    """Run the fused Triton head and the torch head on ``hidden``'s device; compare with float64.

    ``hidden [N, H]`` probe rows (a few suffice), ``weight [V, H]`` of the same dtype and device,
    ``targets [N]`` in ``[0, V)``; ``bias``, ``logit_scale``, ``softcap`` as in
    ``linear_token_logprobs``. ``tol`` (nats) defaults to :func:`default_tolerance`.
    """
    tol = default_tolerance(hidden.dtype) if tol is None else tol
    args = (hidden, weight, targets)
    kwargs = {"bias": bias, "logit_scale": logit_scale, "softcap": softcap}
    with torch.inference_mode():
        want = reference_linear_token_logprobs(*args, **kwargs)
        torch_diff = max_abs_diff(chunked_linear_token_logprobs(*args, **kwargs), want)
        try:
            from cme_rewards.ops.triton_linear import triton_linear_token_logprobs

            diff = max_abs_diff(triton_linear_token_logprobs(*args, **kwargs), want)
        except Exception as exc:  # a compile or launch failure is a failed check
            return _failure(exc, tol)
    return ImplCheck(diff <= tol, diff, tol, torch_diff)


def check_triton_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    tol: float | None = None,
) -> ImplCheck:
    """Run the Triton and torch logits ops on ``logits [N, V]``'s device; compare with float64."""
    tol = LOGITS_TOLERANCE if tol is None else tol
    with torch.inference_mode():
        want = reference_token_logprobs(logits, targets, temperature=temperature)
        torch_got = chunked_token_logprobs(logits, targets, temperature=temperature)
        torch_diff = max_abs_diff(torch_got, want)
        try:
            from cme_rewards.ops.triton_logits import triton_token_logprobs

            got = triton_token_logprobs(logits, targets, temperature=temperature)
            diff = max_abs_diff(got, want)
        except Exception as exc:
            return _failure(exc, tol)
    return ImplCheck(diff <= tol, diff, tol, torch_diff)


def _row_counts(max_rows: int, row_bytes: int, budget: int = 2**31) -> list[int]:
    """One row count per tuning bucket up to ``max_rows``: the bucket's top, or fewer rows (still
    inside the bucket) when ``rows * row_bytes`` would exceed ``budget`` bytes."""
    from cme_rewards.ops.tl_utils import N_BUCKETS, n_bucket

    edges = [e for e in N_BUCKETS if e < max_rows]
    edges += [] if n_bucket(max_rows) in edges else [n_bucket(max_rows)]
    counts, previous = [], 0
    for edge in edges:
        counts.append(max(previous + 1, min(edge, max_rows, budget // max(1, row_bytes))))
        previous = edge
    return counts


def warm_up_triton_head(
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    max_rows: int = 16384,
    check_rows: int = 64,
    tol: float | None = None,
    seed: int = 0,
) -> ImplCheck:
    """Tune the fused head for every row bucket up to ``max_rows`` and check each chosen config.

    A new (head, row bucket) times every candidate config on its first call (seconds each when
    a process first compiles them); doing it here keeps that out of the first scoring batch.
    ``max_rows`` is the most scored tokens one call will see (e.g. the scorer's token budget);
    random ``[n, H]`` hidden states go through the tuned op and their first ``check_rows`` rows
    are compared with the float64 reference.
    """
    tol = default_tolerance(weight.dtype) if tol is None else tol
    gen = torch.Generator(device=weight.device).manual_seed(seed)
    vocab, dim = weight.shape
    details, worst = [], 0.0
    kwargs = {"bias": bias, "logit_scale": logit_scale, "softcap": softcap}
    try:
        from cme_rewards.ops import triton_linear

        for n in _row_counts(max(1, max_rows), dim * weight.element_size()):
            hidden = torch.randn(n, dim, generator=gen, device=weight.device).to(weight.dtype)
            targets = torch.randint(0, vocab, (n,), generator=gen, device=weight.device)
            with torch.inference_mode():
                got = triton_linear.triton_linear_token_logprobs(hidden, weight, targets, **kwargs)
                k = min(n, check_rows)
                want = reference_linear_token_logprobs(hidden[:k], weight, targets[:k], **kwargs)
            diff = max_abs_diff(got[:k], want)
            worst = max(worst, diff)
            details.append(f"N={n}: {triton_linear.TUNER.describe_last()}, max |diff| {diff:.2e}")
            del hidden, targets, got
    except Exception as exc:
        return _failure(exc, tol, details)
    return ImplCheck(worst <= tol, worst, tol, details=tuple(details))


def warm_up_triton_logits(
    vocab: int,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    max_rows: int = 16384,
    check_rows: int = 64,
    tol: float | None = None,
    seed: int = 0,
) -> ImplCheck:
    """Tune the logits kernel for ``[n, vocab]`` logits of ``dtype`` for every row bucket.

    For the scorer's full-logits fallback path; same contract as :func:`warm_up_triton_head`.
    """
    tol = LOGITS_TOLERANCE if tol is None else tol
    gen = torch.Generator(device=device).manual_seed(seed)
    details, worst = [], 0.0
    try:
        from cme_rewards.ops import triton_logits

        for n in _row_counts(max(1, max_rows), vocab * dtype.itemsize):
            logits = (torch.randn(n, vocab, generator=gen, device=device) * 4).to(dtype)
            targets = torch.randint(0, vocab, (n,), generator=gen, device=device)
            with torch.inference_mode():
                got = triton_logits.triton_token_logprobs(logits, targets)
                k = min(n, check_rows)
                want = reference_token_logprobs(logits[:k], targets[:k])
            diff = max_abs_diff(got[:k], want)
            worst = max(worst, diff)
            details.append(f"N={n}: {triton_logits.TUNER.describe_last()}, max |diff| {diff:.2e}")
            del logits, targets, got
    except Exception as exc:
        return _failure(exc, tol, details)
    return ImplCheck(worst <= tol, worst, tol, details=tuple(details))
