"""Triton kernel, fused head pass 1: matmul tiles folded into per-tile logsumexps (logits never stored).

Each ``BLOCK_M x BLOCK_N`` tile of ``z = (hidden @ weight.T + bias) * scale`` (then softcapped),
accumulated in float32, is folded in its epilogue into one base-2 logsumexp per (vocabulary tile,
row) in ``partial [T, N]``, plus the base-2 target logit from the tile that holds it. Tiles go in
groups of ``GROUP_M`` row blocks (weight tiles shared in L2); ``PERSISTENT`` grids stride one
program per SM over the tiles with the loops flattened; ``USE_TMA`` loads through descriptors.
"""

from __future__ import annotations

import triton
import triton.language as tl

from cme_rewards.ops.tl_utils import tanh_f32


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, vocabulary tile) of linear tile index ``tile``, grouped by GROUP_M row blocks."""
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (tile // pids_per_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile % pids_per_group) % group_size_m
    pid_n = (tile % pids_per_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _fold_columns(
    acc,
    cols,
    targets,
    bias_ptr,
    V,
    out_scale,
    cap_log2,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
):
    """Base-2 logsumexp over the columns of one accumulator (sub)tile (``-inf`` when every
    ``cols >= V``), and the picked target logit."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    z = cap_log2 * tanh_f32(acc * out_scale) if HAS_SOFTCAP else acc * out_scale
    z = tl.where(cols[None, :] < V, z, float("-inf"))
    m = tl.max(z, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    lse = m + tl.log2(tl.sum(tl.exp2(z - m[:, None]), axis=1))
    picked = tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    return lse, picked


@triton.jit
def _halves(x, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """The left and right column halves of a ``[ROWS, WIDTH]`` tile."""
    return tl.split(tl.permute(tl.reshape(x, (ROWS, 2, WIDTH // 2)), (0, 2, 1)))


@triton.jit
def _merge_lse2(a, b):
    """log2(2^a + 2^b), elementwise; -inf when both are -inf."""
    top = tl.maximum(a, b)
    top = tl.where(top == float("-inf"), 0.0, top)
    return top + tl.log2(tl.exp2(a - top) + tl.exp2(b - top))


@triton.jit
def _fold_tile(
    acc,
    col0,
    targets,
    bias_ptr,
    V,
    out_scale,
    cap_log2,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,
):
    """Fold a ``[BLOCK_M, BLOCK_N]`` tile whole, or in 2 or 4 column parts one after the other
    (fewer live registers: the tanh and exp2 temporaries of one part at a time)."""
    if EPILOGUE_SPLIT == 1:
        cols = col0 + tl.arange(0, BLOCK_N)
        lse, picked = _fold_columns(
            acc, cols, targets, bias_ptr, V, out_scale, cap_log2, HAS_BIAS, HAS_SOFTCAP
        )
    elif EPILOGUE_SPLIT == 2:
        a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
        c0 = col0 + tl.arange(0, BLOCK_N // 2)
        lse, picked = _fold_columns(
            a0, c0, targets, bias_ptr, V, out_scale, cap_log2, HAS_BIAS, HAS_SOFTCAP
        )
        l1, p1 = _fold_columns(
            a1, c0 + BLOCK_N // 2, targets, bias_ptr, V, out_scale, cap_log2, HAS_BIAS, HAS_SOFTCAP
        )
        lse = _merge_lse2(lse, l1)
        picked += p1
    else:
        a0, a1 = _halves(acc, BLOCK_M, BLOCK_N)
        a00, a01 = _halves(a0, BLOCK_M, BLOCK_N // 2)
        a10, a11 = _halves(a1, BLOCK_M, BLOCK_N // 2)
        c0 = col0 + tl.arange(0, BLOCK_N // 4)
        lse, picked = _fold_columns(
            a00, c0, targets, bias_ptr, V, out_scale, cap_log2, HAS_BIAS, HAS_SOFTCAP
        )
        l1, p1 = _fold_columns(
            a01, c0 + BLOCK_N // 4, targets, bias_ptr, V, out_scale, cap_log2, HAS_BIAS, HAS_SOFTCAP
        )
        lse = _merge_lse2(lse, l1)
        picked += p1
        l1, p1 = _fold_columns(
            a10, c0 + BLOCK_N // 2, targets, bias_ptr, V, out_scale, cap_log2, HAS_BIAS, HAS_SOFTCAP
        )
        lse = _merge_lse2(lse, l1)
        picked += p1
        c3 = c0 + 3 * (BLOCK_N // 4)
        l1, p1 = _fold_columns(
            a11, c3, targets, bias_ptr, V, out_scale, cap_log2, HAS_BIAS, HAS_SOFTCAP
        )
        lse = _merge_lse2(lse, l1)
        picked += p1
    return lse, picked


@triton.jit
def linear_lse_kernel(
    h,  # [N, H] pointer, or a TMA descriptor with block [BLOCK_M, BLOCK_K]
    w,  # [V, H] pointer, or a TMA descriptor with block [BLOCK_N, BLOCK_K]
    bias_ptr,  # [V] (read only when HAS_BIAS)
    targets_ptr,  # [N] int
    partial_ptr,  # [T, N] float32: base-2 logsumexp of each (vocabulary tile, row)
    target_logit_ptr,  # [N] float32: base-2 scaled target logit
    N,
    V,
    stride_hn,
    stride_wv,
    stride_target,
    out_scale,  # logit_scale * log2(e) (no softcap) or logit_scale / softcap (softcap)
    cap_log2,  # softcap * log2(e)
    H: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    USE_TMA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,  # interpreter only: its tl.dot multiplies bf16 bit patterns
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,  # 1, 2 or 4: fold the tile in column parts (fewer registers)
    PERSISTENT: tl.constexpr,
):
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(V, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    # The epilogue recomputes its tile's coordinates from its own counter: a value used both
    # before and after the K loop trips the pipeliner of a flattened loop nest.
    tile_c = tl.program_id(0) - tl.num_programs(0)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=PERSISTENT):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if USE_TMA:
            for k in range(0, H, BLOCK_K):
                a = h.load([row0, k])
                b = w.load([col0, k])
                if DOT_UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
        else:
            # Rows and columns past the end wrap around (valid addresses); the epilogue drops them.
            offs_m = (row0 + tl.arange(0, BLOCK_M)) % N
            offs_n = (col0 + tl.arange(0, BLOCK_N)) % V
            offs_k = tl.arange(0, BLOCK_K)
            a_ptrs = h + offs_m[:, None].to(tl.int64) * stride_hn + offs_k[None, :]
            b_ptrs = w + offs_n[None, :].to(tl.int64) * stride_wv + offs_k[:, None]
            for k in range(0, H, BLOCK_K):
                if H % BLOCK_K == 0:
                    a = tl.load(a_ptrs)
                    b = tl.load(b_ptrs)
                else:
                    a = tl.load(a_ptrs, mask=offs_k[None, :] < H - k, other=0.0)
                    b = tl.load(b_ptrs, mask=offs_k[:, None] < H - k, other=0.0)
                if DOT_UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K

        tile_c += tl.num_programs(0)
        pid_m, pid_n = _tile_coords(tile_c, num_pid_m, num_pid_n, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        targets = tl.load(targets_ptr + rows.to(tl.int64) * stride_target, mask=row_ok, other=-1)
        lse, picked = _fold_tile(
            acc,
            pid_n * BLOCK_N,
            targets,
            bias_ptr,
            V,
            out_scale,
            cap_log2,
            BLOCK_M,
            BLOCK_N,
            HAS_BIAS,
            HAS_SOFTCAP,
            EPILOGUE_SPLIT,
        )
        tl.store(partial_ptr + pid_n.to(tl.int64) * N + rows, lse, mask=row_ok)
        col0 = pid_n * BLOCK_N
        mine = row_ok & (targets >= col0) & (targets < col0 + BLOCK_N)
        tl.store(target_logit_ptr + rows, picked, mask=mine)
