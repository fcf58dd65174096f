"""Triton kernels: per-token log-probs from materialised logits, and per-sequence masked means.

``triton_token_logprobs`` reads each scored row of ``logits [N, V]`` once, keeping an online
logsumexp in float32 (one program per row, a loop over vocabulary blocks), and returns
``log softmax(logits / temperature)[row, target]`` in nats. Rows switched off by ``mask`` or a
negative ``segment_ids`` entry (prompt positions) return at once without reading their logits
and give 0.0. ``triton_segment_means`` is the one more tiny launch that turns those log-probs into
per-sequence means. Both are deterministic: every sum has a fixed order, there are no atomics.

The plain PyTorch reference of the same functions is ``cme_rewards.ops.torch_logits``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

LN2 = math.log(2.0)
LOG2E = 1.0 / LN2

# Selection modes of rows (constexpr SELECT of the kernel).
_SELECT_ALL, _SELECT_MASK, _SELECT_SEGMENT = 0, 1, 2


@triton.jit
def _token_logprobs_kernel(
    logits_ptr,
    targets_ptr,
    select_ptr,
    out_ptr,
    V: tl.constexpr,
    stride_row,
    stride_target,
    stride_select,
    inv_temp,
    scale_log2,
    SELECT: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per row: out[row] = (x[t] - max) / T - ln(sum_v exp((x[v] - max) / T))."""
    row = tl.program_id(0).to(tl.int64)
    if SELECT != 0:
        flag = tl.load(select_ptr + row * stride_select)
        skip = (flag == 0) if SELECT == 1 else (flag < 0)
        if skip:  # a prompt position: no read of its logits
            tl.store(out_ptr + row, 0.0)
            return
    base = logits_ptr + row * stride_row
    # m: running max of the raw logits (exact); s: sum of exp((x - m_ref) / T) with m_ref = m,
    # or 0 while m is -inf (so that no -inf - -inf appears).
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(
            base + cols, mask=cols < V, other=float("-inf"), eviction_policy="evict_first"
        ).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_new_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        # exp2(-inf) = 0 drops the old sum when m was -inf (then s is 0 anyway).
        s = s * tl.exp2((m - m_new_ref) * scale_log2) + tl.sum(
            tl.exp2((x - m_new_ref) * scale_log2), axis=0
        )
        m = m_new
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    target = tl.load(targets_ptr + row * stride_target).to(tl.int64)
    valid = (target >= 0) & (target < V)
    x_t = tl.load(base + tl.where(valid, target, 0)).to(tl.float32)
    logprob = (x_t - m_ref) * inv_temp - tl.log2(s) * 0.6931471805599453
    tl.store(out_ptr + row, tl.where(valid, logprob, float("nan")))


def interpreting() -> bool:
    """True when this module's kernels run in Triton's CPU interpreter.

    Triton decides at import (decoration) time: ``TRITON_INTERPRET=1`` must be set before
    ``cme_rewards.ops.triton_logits`` is first imported.
    """
    return isinstance(_token_logprobs_kernel, InterpretedFunction)


def _prune_block_sizes(configs, named_args, **kwargs):
    """Drop configs whose vocabulary block is more than twice the next power of two of V."""
    limit = max(1024, 2 * triton.next_power_of_2(named_args["V"]))
    kept = [c for c in configs if c.kwargs["BLOCK_V"] <= limit]
    return kept or configs[:1]


# H100 candidates: small one-warp programs with deep load pipelines stream best when many rows
# run at once; wider blocks with more warps cover the long rows of 262k vocabularies.
_LOGITS_CONFIGS = [
    triton.Config({"BLOCK_V": bv}, num_warps=w, num_stages=st)
    for bv, w, st in [
        (1024, 1, 4),
        (2048, 1, 4),
        (2048, 2, 3),
        (4096, 2, 4),
        (4096, 4, 3),
        (8192, 4, 2),
        (8192, 8, 3),
    ]
]
_token_logprobs_tuned = triton.autotune(
    configs=_LOGITS_CONFIGS,
    key=["V", "SELECT"],
    prune_configs_by={"early_config_prune": _prune_block_sizes},
)(_token_logprobs_kernel)


def _row_selection(
    n_rows: int, mask: torch.Tensor | None, segment_ids: torch.Tensor | None, device: torch.device
) -> tuple[int, torch.Tensor | None]:
    """Check ``mask`` / ``segment_ids`` ([N] each) and return (SELECT mode, tensor to read)."""
    if mask is not None and segment_ids is not None:
        raise ValueError("give either mask or segment_ids, not both")
    sel, mode, name = (
        (mask, _SELECT_MASK, "mask")
        if mask is not None
        else (segment_ids, _SELECT_SEGMENT, "segment_ids")
    )
    if sel is None:
        return _SELECT_ALL, None
    if sel.shape != (n_rows,):
        raise ValueError(f"{name} must have shape [{n_rows}], got {list(sel.shape)}")
    if sel.device != device:
        raise ValueError(f"{name} is on {sel.device}, logits on {device}")
    if sel.dtype == torch.bool:
        sel = sel.view(torch.uint8)
    if sel.is_floating_point():
        raise ValueError(f"{name} must be an integer or bool tensor, got {sel.dtype}")
    return mode, sel


def triton_token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probabilities (nats, float32 ``[N]``) of ``targets`` under ``logits / temperature``.

    Args:
        logits: ``[N, V]`` bfloat16, float16 or float32; the last dim should be contiguous (a copy is
            made otherwise); any row stride.
        targets: ``[N]`` integer token ids. An id outside ``[0, V)`` gives NaN for its row (no
            out-of-bounds read, no host synchronisation to check it).
        mask: optional ``[N]`` bool/int; rows where it is 0 are not read and give 0.0.
        segment_ids: optional ``[N]`` int, the sequence of each row; negative ids (prompt
            positions) are not read and give 0.0. Mutually exclusive with ``mask``.
        temperature: positive divisor of the logits.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, V], got shape {list(logits.shape)}")
    n_rows, vocab = logits.shape
    if logits.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"logits dtype must be bfloat16, float16 or float32, got {logits.dtype}")
    if targets.shape != (n_rows,) or targets.is_floating_point():
        raise ValueError(
            f"targets must be integer [{n_rows}], got {targets.dtype} {list(targets.shape)}"
        )
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device}, logits on {logits.device}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    mode, sel = _row_selection(n_rows, mask, segment_ids, logits.device)
    out = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    args = (
        logits,
        targets,
        targets if sel is None else sel,
        out,
        vocab,
        logits.stride(0),
        targets.stride(0),
        0 if sel is None else sel.stride(0),
        1.0 / temperature,
        LOG2E / temperature,
    )
    if interpreting():
        block = min(256, triton.next_power_of_2(vocab))
        _token_logprobs_kernel[(n_rows,)](*args, SELECT=mode, BLOCK_V=block)
    else:
        _token_logprobs_tuned[(n_rows,)](*args, SELECT=mode)
    return out


@triton.jit
def _segment_means_kernel(
    logprobs_ptr, segment_ptr, means_ptr, counts_ptr, N, stride_segment, BLOCK: tl.constexpr
):
    """One program per segment s: mean of logprobs[i] over rows with segment[i] == s (0 if none)."""
    seg = tl.program_id(0)
    total = tl.zeros([BLOCK], tl.float32)
    count = tl.zeros([BLOCK], tl.int32)
    start = 0
    while start < N:  # a while loop: N changes every call and must not force a recompile
        idx = start + tl.arange(0, BLOCK)
        ids = tl.load(segment_ptr + idx.to(tl.int64) * stride_segment, mask=idx < N, other=-1)
        hit = ids == seg
        values = tl.load(logprobs_ptr + idx, mask=hit, other=0.0)
        total += tl.where(hit, values, 0.0)
        count += hit.to(tl.int32)
        start += BLOCK
    n = tl.sum(count, axis=0)
    mean = tl.sum(total, axis=0) / tl.maximum(n, 1).to(tl.float32)
    tl.store(means_ptr + seg, mean)
    tl.store(counts_ptr + seg, n)


def triton_segment_means(
    logprobs: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence masked means of per-token log-probs.

    Args:
        logprobs: ``[N]`` float32 (nats), e.g. from :func:`triton_token_logprobs`.
        segment_ids: ``[N]`` int; row i belongs to sequence ``segment_ids[i]`` in
            ``[0, num_segments)``; negative ids (prompt positions) are ignored.
        num_segments: number of sequences S.

    Returns:
        ``(means [S] float32, counts [S] int32)``; a sequence with no scored row has mean 0.0 and
        count 0 (the caller applies its floor policy). Cost O(S * N) reads of int ids, one program
        per sequence, deterministic.
    """
    if logprobs.ndim != 1 or logprobs.dtype != torch.float32:
        raise ValueError(
            f"logprobs must be float32 [N], got {logprobs.dtype} {list(logprobs.shape)}"
        )
    n_rows = logprobs.shape[0]
    if segment_ids.shape != (n_rows,) or segment_ids.is_floating_point():
        raise ValueError(f"segment_ids must be integer [{n_rows}], got {segment_ids.dtype}")
    if segment_ids.device != logprobs.device:
        raise ValueError(f"segment_ids are on {segment_ids.device}, logprobs on {logprobs.device}")
    if num_segments < 0:
        raise ValueError(f"num_segments must be >= 0, got {num_segments}")
    means = torch.empty(num_segments, dtype=torch.float32, device=logprobs.device)
    counts = torch.empty(num_segments, dtype=torch.int32, device=logprobs.device)
    if num_segments == 0:
        return means, counts
    logprobs = logprobs.contiguous()
    block = 128 if interpreting() else 1024
    _segment_means_kernel[(num_segments,)](
        logprobs, segment_ids, means, counts, n_rows, segment_ids.stride(0), BLOCK=block
    )
    return means, counts
