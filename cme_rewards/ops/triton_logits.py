"""Launcher of the per-row logits kernel (``logits_kernel``): checks, device guard, tuning.

The plain PyTorch counterpart is ``cme_rewards.ops.chunked.chunked_token_logprobs``.
"""

from __future__ import annotations

import math

import torch

from cme_rewards.ops.logits_kernel import token_logprobs_kernel
from cme_rewards.ops.tl_autotune import KernelConfig, Tuner, logits_candidates
from cme_rewards.ops.tl_utils import DTYPES, LOG2E, check_row_tensor, device_guard, n_bucket

TUNER = Tuner("logits")


def triton_token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The Triton path of :func:`cme_rewards.ops.token_logprobs` (same shapes and semantics; any
    row stride, a last dim that is not contiguous is copied); float32 ``[N]`` (nats).
    Raises ``ValueError`` on bad shapes, dtypes or devices."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, V], got shape {list(logits.shape)}")
    n_rows, vocab = logits.shape
    if logits.dtype not in DTYPES:
        raise ValueError(f"logits dtype must be bfloat16, float16 or float32, got {logits.dtype}")
    check_row_tensor("targets", targets, n_rows, logits.device)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if mask is not None:
        check_row_tensor("mask", mask, n_rows, logits.device)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    out = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    align = 16 // logits.element_size()
    args = (logits, targets, targets if mask is None else mask, out, vocab)
    strides = (logits.stride(0), targets.stride(0), 0 if mask is None else mask.stride(0))
    scales = (1.0 / temperature, LOG2E / temperature)
    flags = {"HAS_MASK": mask is not None, "ALIGN": align}

    def run(config: KernelConfig) -> None:
        block = config.kwargs["BLOCK_V"]
        n_body = max(0, (vocab - align + 1) // block * block)
        token_logprobs_kernel[(n_rows,)](
            *args, n_body, *strides, *scales, **flags, **config.kwargs, **config.launch_options()
        )

    aligned = logits.data_ptr() % 16 == 0 and (logits.stride(0) * logits.element_size()) % 16 == 0
    key = (str(logits.device), logits.dtype, vocab, aligned, mask is not None, n_bucket(n_rows))
    with device_guard(logits):
        run(TUNER.pick(key, logits_candidates(vocab), run))
    return out
