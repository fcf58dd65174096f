"""Per-token log-prob ops behind one dispatch point, plus the load-time check of the Triton path.

``impl="auto"`` (default: ``$CME_REWARDS_IMPL``): Triton kernels for CUDA tensors when triton
imports, else the chunked PyTorch path; ``"torch"`` / ``"triton"`` forces one (Triton on CPU needs
``TRITON_INTERPRET=1``). Triton modules are imported only when used; layout: ``docs/gpu.md``.
"""

from __future__ import annotations

import os

import torch

from cme_rewards.ops.check import (
    ImplCheck,
    check_triton_head,
    check_triton_logits,
    default_tolerance,
    warm_up_triton_head,
    warm_up_triton_logits,
)
from cme_rewards.ops.chunked import (
    apply_head_transform,
    chunked_linear_token_logprobs,
    chunked_token_logprobs,
)

IMPLS = ("auto", "torch", "triton")

__all__ = [
    "IMPLS",
    "ImplCheck",
    "apply_head_transform",
    "check_triton_head",
    "check_triton_logits",
    "default_tolerance",
    "linear_token_logprobs",
    "select_impl",
    "token_logprobs",
    "warm_up_triton_head",
    "warm_up_triton_logits",
]


def select_impl(impl: str, device: torch.device) -> str:
    """Resolve ``auto`` (or ``$CME_REWARDS_IMPL``) to ``torch`` or ``triton`` for tensors on ``device``."""
    if impl == "auto":
        impl = os.environ.get("CME_REWARDS_IMPL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto" or device.type != "cuda":
        return "torch" if impl == "auto" else impl
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "triton"


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    impl: str = "auto",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-prob (nats, float32) of ``targets[i]`` under ``softmax(logits[i] / temperature)``.

    Shapes: logits ``[N, V]`` (bf16 / fp16 / fp32, last dim contiguous), targets ``[N]`` -> ``[N]``.
    Rows where ``mask [N]`` (bool / int) is 0 are not read and give 0.0, so ``[B * T, V]`` logits
    can be scored in place. A target outside ``[0, V)`` gives NaN.
    """
    if select_impl(impl, logits.device) == "triton":
        from cme_rewards.ops.triton_logits import triton_token_logprobs

        return triton_token_logprobs(logits, targets, temperature=temperature, mask=mask)
    return chunked_token_logprobs(logits, targets, temperature=temperature, mask=mask)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Log-prob (nats, float32) of ``targets`` through the output head, logits never held whole.

    Logits are ``(hidden @ weight.T + bias) * logit_scale``, then ``softcap * tanh(x / softcap)``.
    Shapes: hidden ``[N, H]``, weight ``[V, H]``, bias ``[V]``, targets ``[N]`` -> ``[N]``.
    A target outside ``[0, V)`` gives NaN.
    """
    if select_impl(impl, hidden.device) == "triton":
        from cme_rewards.ops.triton_linear import triton_linear_token_logprobs

        return triton_linear_token_logprobs(
            hidden, weight, targets, bias=bias, logit_scale=logit_scale, softcap=softcap
        )
    return chunked_linear_token_logprobs(
        hidden, weight, targets, bias=bias, logit_scale=logit_scale, softcap=softcap
    )
