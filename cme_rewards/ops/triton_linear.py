"""Launcher of the fused output head; PyTorch counterpart: ``chunked_linear_token_logprobs``.

Pass 1 (``linear_lse_kernel``) leaves one logsumexp per (vocabulary tile, row) in a ``[T, N]``
float32 buffer (``T = cdiv(V, BLOCK_N)``, under ``PARTIAL_BUDGET_BYTES`` by taking rows in equal
chunks), pass 2 (``lse_combine_kernel``) merges them in a fixed order: bitwise reproducible.
"""

from __future__ import annotations

import math
import os

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from cme_rewards.ops.linear_lse_kernel import linear_lse_kernel
from cme_rewards.ops.lse_combine_kernel import lse_combine_kernel
from cme_rewards.ops.tl_autotune import (
    COMBINE_BLOCK_R,
    COMBINE_BLOCK_T,
    COMBINE_WARPS,
    KernelConfig,
    Tuner,
    linear_candidates,
)
from cme_rewards.ops.tl_utils import (
    DTYPES,
    LOG2E,
    check_row_tensor,
    device_guard,
    interpreting,
    n_bucket,
)

PARTIAL_BUDGET_BYTES = 56 * 2**20
"""Largest ``[T, rows]`` float32 partial buffer; with the [N] outputs, extra memory stays < 64 MiB."""
ROW_QUANTUM = 256
"""Rows per chunk are a multiple of this (whole row blocks of every config)."""

TUNER = Tuner("linear")


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 only where torch itself allows it for matmuls (default: IEEE)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def tma_usable(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether pass 1 loads its operands through TMA descriptors (``CME_TRITON_TMA``: auto, 0, 1).

    TMA needs sm90+, 16-byte aligned bases and row strides and a contiguous last dim; only 16-bit
    operands use it (fp32 needs a stack frame on sm90). ``1`` forces it (also when interpreting).
    """
    choice = os.environ.get("CME_TRITON_TMA", "auto")
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"CME_TRITON_TMA must be auto, 0 or 1, got {choice!r}")
    if choice == "0" or hidden.dtype == torch.float32:
        return False
    aligned = all(
        t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(1) == 1
        for t in (hidden, weight)
    )
    if choice == "1":
        if not aligned:
            raise ValueError("CME_TRITON_TMA=1 needs 16-byte aligned rows of hidden and weight")
        return True
    return (
        aligned
        and hidden.is_cuda
        and not interpreting()
        and torch.cuda.get_device_capability(hidden.device)[0] >= 9
    )


def chunk_rows(n_rows: int, vocab: int, block_n: int, budget: int = -1) -> int:
    """Rows per chunk so that the ``[cdiv(V, block_n), rows]`` float32 buffer fits ``budget``;
    equal chunks (up to ``ROW_QUANTUM``): 8192 rows that do not fit become 2 x 4096."""
    budget = PARTIAL_BUDGET_BYTES if budget < 0 else budget
    tiles = triton.cdiv(vocab, block_n)
    max_rows = max(ROW_QUANTUM, budget // (4 * tiles) // ROW_QUANTUM * ROW_QUANTUM)
    if n_rows <= max_rows:
        return n_rows
    n_chunks = triton.cdiv(n_rows, max_rows)
    return min(max_rows, triton.cdiv(triton.cdiv(n_rows, n_chunks), ROW_QUANTUM) * ROW_QUANTUM)


def triton_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """The Triton path of :func:`cme_rewards.ops.linear_token_logprobs` (same shapes and
    semantics), bf16 / fp16 / fp32 operands of one dtype; float32 ``[N]`` (nats).
    Raises ``ValueError`` on bad shapes, dtypes, devices or scales."""
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden [N, H] and weight [V, H], got {list(hidden.shape)} and {list(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or hidden.dtype not in DTYPES:
        raise ValueError(
            f"hidden and weight must share one of bf16/fp16/fp32, got {hidden.dtype} and {weight.dtype}"
        )
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    check_row_tensor("targets", targets, n_rows, hidden.device)
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must be [{vocab}], got {list(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, hidden on {hidden.device}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale must be finite, got {logit_scale}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be positive and finite, got {softcap}")
    if vocab == 0 or dim == 0:
        raise ValueError(f"empty vocabulary or hidden size: weight {list(weight.shape)}")
    out = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
    if n_rows == 0:
        return out
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if softcap is None:
        out_scale, cap_log2 = logit_scale * LOG2E, 1.0
    else:
        out_scale, cap_log2 = logit_scale / softcap, softcap * LOG2E
    use_tma = tma_usable(hidden, weight)
    flags = {
        "H": dim,
        "HAS_BIAS": bias is not None,
        "HAS_SOFTCAP": softcap is not None,
        "USE_TMA": use_tma,
        "INPUT_PRECISION": _input_precision(hidden.dtype),
        # bf16 products are exact in fp32: the upcast changes only the order of the fp32 sums
        "DOT_UPCAST": interpreting() and hidden.dtype == torch.bfloat16,
    }
    n_sms = 4  # persistent programs in the interpreter
    if hidden.is_cuda:
        n_sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
    combine_meta = {"BLOCK_T": COMBINE_BLOCK_T, "BLOCK_R": COMBINE_BLOCK_R}
    if not interpreting():
        combine_meta["num_warps"] = COMBINE_WARPS
    buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def run(config: KernelConfig) -> None:
        meta, launch = config.kwargs, config.launch_options()
        block_m, block_n = meta["BLOCK_M"], meta["BLOCK_N"]
        chunk = chunk_rows(n_rows, vocab, block_n)
        tiles_n = triton.cdiv(vocab, block_n)
        if block_n not in buffers:
            buffers.clear()  # at most one config's buffers alive at a time
            buffers[block_n] = (
                torch.empty(tiles_n * chunk, dtype=torch.float32, device=hidden.device),
                torch.empty(chunk, dtype=torch.float32, device=hidden.device),
            )
        partial, target_logit = buffers[block_n]
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            h_part, t_part, rows = hidden[start:stop], targets[start:stop], stop - start
            h_arg, w_arg = h_part, weight
            if use_tma:
                h_arg = TensorDescriptor.from_tensor(h_part, [block_m, meta["BLOCK_K"]])
                w_arg = TensorDescriptor.from_tensor(weight, [block_n, meta["BLOCK_K"]])
            tiles = triton.cdiv(rows, block_m) * tiles_n
            grid = (min(tiles, n_sms),) if meta["PERSISTENT"] else (tiles,)
            pointers = (h_arg, w_arg, out if bias is None else bias, t_part, partial, target_logit)
            strides = (h_part.stride(0), weight.stride(0), t_part.stride(0))
            linear_lse_kernel[grid](
                *pointers, rows, vocab, *strides, out_scale, cap_log2, **flags, **meta, **launch
            )
            combine = (partial, target_logit, t_part, out[start:stop], rows, vocab, tiles_n)
            lse_combine_kernel[(triton.cdiv(rows, COMBINE_BLOCK_R),)](
                *combine, t_part.stride(0), **combine_meta
            )

    key = (str(hidden.device), hidden.dtype, vocab, *flags.values(), n_bucket(n_rows))
    candidates = linear_candidates(hidden.dtype == torch.float32, vocab)
    with device_guard(hidden):
        run(TUNER.pick(key, candidates, run))
    return out
