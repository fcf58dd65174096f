"""Triton kernel, fused head pass 2: merge the per-tile logsumexps of pass 1 into log-probs.

Each program takes ``BLOCK_R`` rows and walks ``partial [T, N]`` ``BLOCK_T`` tiles at a time with
coalesced ``[BLOCK_T, BLOCK_R]`` loads, in a fixed order (bitwise reproducible).
"""

from __future__ import annotations

import triton
import triton.language as tl

from cme_rewards.ops.tl_utils import online_lse_update


@triton.jit
def lse_combine_kernel(
    partial_ptr,  # [T, N] float32, base-2 logsumexp of each (vocabulary tile, row)
    target_logit_ptr,  # [N] float32, base-2 target logit
    targets_ptr,  # [N] int
    out_ptr,  # [N] float32, nats
    N,
    V,
    T,
    stride_target,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[r] = ln 2 * (target_logit[r] - log2 sum_t 2^partial[t, r]); NaN for a bad target."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < N
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    ts = tl.arange(0, BLOCK_T)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + ts
        x = tl.load(
            partial_ptr + t[:, None].to(tl.int64) * N + rows[None, :],
            mask=(t[:, None] < T) & ok[None, :],
            other=float("-inf"),
        )
        m, s = online_lse_update(m, s, x, 1.0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    target = tl.load(targets_ptr + rows.to(tl.int64) * stride_target, mask=ok, other=0)
    z_t = tl.load(target_logit_ptr + rows, mask=ok, other=0.0)
    logprob = (z_t - m_ref - tl.log2(s)) * 0.6931471805599453
    valid = (target >= 0) & (target < V)
    tl.store(out_ptr + rows, tl.where(valid, logprob, float("nan")), mask=ok)
