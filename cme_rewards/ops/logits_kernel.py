"""Triton kernel: per-row log-prob of the target from materialised logits (one pass over each row).

One program per row keeps an online base-2 logsumexp in float32. For unmasked, 16-byte aligned
vector loads at any vocabulary size and row stride, a row is read as a head up to its first 16-byte
boundary, ``N_BODY`` columns of whole ``BLOCK_V`` blocks (the same for every row, pipelined
``NUM_STAGES`` deep), then a masked tail block and a masked edge of ``ALIGN`` columns. A row
switched off by ``mask`` is not read and gives 0.0. No atomics: deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from cme_rewards.ops.tl_utils import online_lse_update

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def token_logprobs_kernel(
    logits_ptr,  # [N, V] bf16 / fp16 / fp32, last dim contiguous
    targets_ptr,  # [N] int
    mask_ptr,  # [N] int / uint8 (read only when HAS_MASK)
    out_ptr,  # [N] float32, nats
    V,
    N_BODY,  # columns of the unmasked main loop: a multiple of BLOCK_V, <= V - ALIGN + 1
    stride_row,
    stride_target,
    stride_mask,
    inv_temp,  # 1 / T
    scale_log2,  # log2(e) / T
    HAS_MASK: tl.constexpr,
    ALIGN: tl.constexpr,  # elements per 16 bytes
    BLOCK_V: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """out[row] = (x[t] - max) / T - ln(sum_v exp((x[v] - max) / T)), or 0.0 for a masked row."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_MASK:  # noqa: SIM102 (a constexpr test first: no load at all without a mask)
        if tl.load(mask_ptr + row * stride_mask) == 0:  # a prompt position: no read of its logits
            tl.store(out_ptr + row, 0.0)
            return
    row_start = row * stride_row  # element offset of the row
    skip = (ALIGN - row_start % ALIGN) % ALIGN  # columns before the first 16-byte boundary
    # m: running max of the raw logits; s: sum of 2^((x - m) * scale_log2).
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([], tl.float32)
    edge = tl.arange(0, ALIGN)
    if skip > 0:  # head: columns [0, skip)
        x = tl.load(logits_ptr + row_start + edge, mask=(edge < skip) & (edge < V), other=NEG_INF)
        m, s = online_lse_update(m, s, x.to(tl.float32), scale_log2)
    # body: N_BODY columns from the boundary, whole blocks, no mask
    body = logits_ptr + tl.multiple_of(row_start + skip, ALIGN)
    cols = tl.arange(0, BLOCK_V)
    for k in tl.range(0, N_BODY, BLOCK_V, num_stages=NUM_STAGES):
        x = tl.load(body + k + cols, eviction_policy="evict_first")
        m, s = online_lse_update(m, s, x.to(tl.float32), scale_log2)
    # tail: fewer than BLOCK_V + ALIGN columns, in one masked block and one masked edge
    tail = skip + N_BODY
    if tail < V:
        x = tl.load(
            logits_ptr + row_start + tail + cols,
            mask=tail + cols < V,
            other=NEG_INF,
            eviction_policy="evict_first",
        )
        m, s = online_lse_update(m, s, x.to(tl.float32), scale_log2)
    tail += BLOCK_V
    if tail < V:
        x = tl.load(logits_ptr + row_start + tail + edge, mask=tail + edge < V, other=NEG_INF)
        m, s = online_lse_update(m, s, x.to(tl.float32), scale_log2)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    target = tl.load(targets_ptr + row * stride_target).to(tl.int64)
    valid = (target >= 0) & (target < V)
    x_t = tl.load(logits_ptr + row_start + tl.where(valid, target, 0)).to(tl.float32)
    logprob = (x_t - m_ref) * inv_temp - tl.log2(s) * 0.6931471805599453
    tl.store(out_ptr + row, tl.where(valid, logprob, float("nan")))
