"""Triton kernel: per-token log-probs through the output head, without writing the logits.

``triton_linear_token_logprobs(hidden [N, H], weight [V, H], targets [N])`` computes, in nats,
``log softmax(z)[target]`` with ``z = (hidden @ weight.T + bias) * logit_scale``, then
``z = softcap * tanh(z / softcap)`` when ``softcap`` is set.

Pass 1 (``_linear_lse_kernel``) is a tiled matmul, one program per (row block, vocabulary tile),
ordered in groups of row blocks so that the tiles in flight share the weight tile in L2. Its
epilogue folds the float32 accumulator tile into one base-2 logsumexp per (tile, row) in a
``[T, N]`` float32 buffer and stores the float32 target logit from the one tile that holds it.
Pass 2 (``_combine_kernel``) merges the T partial logsumexps of each row in a fixed order. No
atomics, so results are bitwise reproducible. Extra memory: ``4 * T * N`` bytes (T = V / BLOCK_N;
the launcher processes rows in chunks so that it stays under ``PARTIAL_BUDGET_BYTES``).

On Hopper and newer GPUs the operands are loaded through TMA tensor descriptors; elsewhere (and in
the interpreter unless asked) through pointers. The PyTorch reference is
``cme_rewards.ops.torch_linear``.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from cme_rewards.ops.triton_logits import LOG2E, interpreting

PARTIAL_BUDGET_BYTES = 64 * 2**20 - 2**20  # [T, rows] float32 partial buffer per chunk of rows
_MIN_BLOCK_N = 128  # smallest vocabulary tile of the GPU configs: sizes the partial buffer
_MIN_CHUNK_ROWS = 256  # rows per chunk are a multiple of this (whole row blocks)


@triton.jit
def _tanh(x):
    """float32 tanh to a few ulp: odd Taylor series below |x| = 0.3, (1 - e^-2|x|) / (1 + e^-2|x|) above."""
    a = tl.abs(x)
    a2 = a * a
    series = a * (
        1.0
        + a2
        * (
            -0.3333333333333333
            + a2
            * (
                0.13333333333333333
                + a2
                * (-0.05396825396825397 + a2 * (0.021869488536155203 + a2 * -0.008863235529902197))
            )
        )
    )
    e = tl.exp2(a * -2.8853900817779268)  # exp(-2|x|), no overflow
    t = tl.where(a < 0.3, series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def _linear_lse_kernel(
    h,  # [N, H] pointer, or a TMA descriptor with block [BLOCK_M, BLOCK_K]
    w,  # [V, H] pointer, or a TMA descriptor with block [BLOCK_N, BLOCK_K]
    bias_ptr,
    targets_ptr,
    partial_ptr,  # [T, N] float32: base-2 logsumexp of each (vocab tile, row)
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
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(N, BLOCK_M)
    num_pid_n = tl.cdiv(V, BLOCK_N)
    # Groups of GROUP_M row blocks walk the vocabulary together: concurrent programs share tiles.
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (pid // pids_per_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % pids_per_group) % group_size_m
    pid_n = (pid % pids_per_group) // group_size_m
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

    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    # z: logits in base-2 units (natural logit * log2 e), float32.
    z = cap_log2 * _tanh(acc * out_scale) if HAS_SOFTCAP else acc * out_scale
    z = tl.where(cols[None, :] < V, z, float("-inf"))
    m = tl.max(z, axis=1)
    lse = m + tl.log2(tl.sum(tl.exp2(z - m[:, None]), axis=1))
    row_ok = rows < N
    tl.store(partial_ptr + pid_n.to(tl.int64) * N + rows, lse, mask=row_ok)
    target = tl.load(targets_ptr + rows.to(tl.int64) * stride_target, mask=row_ok, other=-1)
    picked = tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    mine = row_ok & (target >= col0) & (target < col0 + BLOCK_N)
    tl.store(target_logit_ptr + rows, picked, mask=mine)


@triton.jit
def _combine_kernel(
    partial_ptr,
    target_logit_ptr,
    targets_ptr,
    out_ptr,
    N,
    V,
    stride_target,
    T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[r] = ln 2 * (target_logit[r] - log2 sum_t 2^partial[t, r]), in a fixed order of t."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < N
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    for t in range(0, T):
        x = tl.load(partial_ptr + t * N + rows, mask=ok, other=0.0)
        m_new = tl.maximum(m, x)
        s = s * tl.exp2(m - m_new) + tl.exp2(x - m_new)
        m = m_new
    target = tl.load(targets_ptr + rows.to(tl.int64) * stride_target, mask=ok, other=0)
    z_t = tl.load(target_logit_ptr + rows, mask=ok, other=0.0)
    logprob = (z_t - m - tl.log2(s)) * 0.6931471805599453
    valid = (target >= 0) & (target < V)
    tl.store(out_ptr + rows, tl.where(valid, logprob, float("nan")), mask=ok)


def _set_descriptor_blocks(nargs: dict) -> None:
    """Autotune pre-hook: the TMA block shapes follow the config being tried."""
    if isinstance(nargs["h"], TensorDescriptor):
        nargs["h"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["w"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


def _configs(rows: list[tuple[int, ...]]) -> list[triton.Config]:
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g},
            num_warps=w,
            num_stages=st,
            pre_hook=_set_descriptor_blocks,
        )
        for bm, bn, bk, g, w, st in rows
    ]


# H100 candidates for bf16/fp16 (all compile for sm90 without spills, see
# benchmarks/gpu/compile_check.py): 128x256 wgmma tiles for long K; 128x128x64 tiles with 3
# stages (96 KiB shared memory) let two programs share an SM so that one program's softmax
# epilogue overlaps the other's main loop; GROUP_M=64 keeps all of a short-K hidden in L2.
_LINEAR_CONFIGS = _configs(
    [
        (128, 256, 64, 8, 8, 3),
        (128, 256, 64, 8, 8, 4),
        (128, 256, 64, 64, 8, 3),
        (128, 128, 64, 8, 8, 3),
        (128, 128, 64, 64, 4, 3),
        (128, 128, 128, 8, 8, 3),
        (256, 128, 64, 8, 8, 3),
    ]
)
# fp32 operands (IEEE FMA path, or TF32 when torch allows it): small tiles that fit shared memory
# and compile in seconds; fp32 verifiers are a correctness path, not the fast one.
_LINEAR_CONFIGS_FP32 = _configs([(64, 128, 32, 8, 4, 3), (128, 128, 32, 8, 8, 3)])


def _prune_small_vocab(configs, named_args, **kwargs):
    """Small heads (V < 16384) are not worth tuning: keep the first 128-wide config."""
    if named_args["V"] >= 16384:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_N"] == 128][:1]


def _tuned(configs: list[triton.Config]):
    return triton.autotune(
        configs=configs,
        key=["V", "H", "HAS_SOFTCAP", "USE_TMA", "INPUT_PRECISION"],
        prune_configs_by={"early_config_prune": _prune_small_vocab},
    )(_linear_lse_kernel)


_linear_lse_tuned = _tuned(_LINEAR_CONFIGS)
_linear_lse_tuned_fp32 = _tuned(_LINEAR_CONFIGS_FP32)
_INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 operands use TF32 only where torch itself allows it for matmuls (default: IEEE)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _tma_usable(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA needs sm90+, 16-byte aligned bases and row strides, and a contiguous last dim."""
    choice = os.environ.get("CME_TRITON_TMA", "auto")
    if choice not in ("auto", "0", "1"):
        raise ValueError(f"CME_TRITON_TMA must be auto, 0 or 1, got {choice!r}")
    if choice == "0":
        return False
    aligned = all(
        t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 and t.stride(1) == 1
        for t in (hidden, weight)
    )
    if choice == "1":
        if not aligned:
            raise ValueError("CME_TRITON_TMA=1 needs 16-byte aligned rows of hidden and weight")
        return True
    return (  # auto: 16-bit operands only (the fp32 TMA build is unproven on a GPU)
        aligned
        and hidden.dtype != torch.float32
        and hidden.is_cuda
        and not interpreting()
        and torch.cuda.get_device_capability(hidden.device)[0] >= 9
    )


def triton_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Per-token log-probs (nats, float32 ``[N]``) of ``targets`` through the output head.

    Args:
        hidden: ``[N, H]`` final hidden states of the scored rows only (bf16 / fp16 / fp32).
        weight: ``[V, H]`` output-head weight, same dtype as ``hidden``; last dims contiguous.
        targets: ``[N]`` integer token ids; an id outside ``[0, V)`` gives NaN for its row.
        bias: optional ``[V]`` output-head bias.
        logit_scale: multiplies ``hidden @ weight.T + bias`` (e.g. 1 / temperature).
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (Gemma-2 style).
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"need hidden [N, H] and weight [V, H], got {list(hidden.shape)} and {list(weight.shape)}"
        )
    if hidden.dtype != weight.dtype or hidden.dtype not in (
        torch.bfloat16,
        torch.float16,
        torch.float32,
    ):
        raise ValueError(
            f"hidden and weight must share one of bf16/fp16/fp32, got {hidden.dtype} and {weight.dtype}"
        )
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    if targets.shape != (n_rows,) or targets.is_floating_point():
        raise ValueError(
            f"targets must be integer [{n_rows}], got {targets.dtype} {list(targets.shape)}"
        )
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must be [{vocab}], got {list(bias.shape)}")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
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
    use_tma = _tma_usable(hidden, weight)
    precision = _input_precision(hidden.dtype)
    block_min = _INTERPRET_CONFIG["BLOCK_N"] if interpreting() else _MIN_BLOCK_N
    tiles_max = triton.cdiv(vocab, block_min)
    chunk = PARTIAL_BUDGET_BYTES // (4 * tiles_max) // _MIN_CHUNK_ROWS * _MIN_CHUNK_ROWS
    chunk = max(_MIN_CHUNK_ROWS, chunk)
    partial = torch.empty(tiles_max * min(chunk, n_rows), dtype=torch.float32, device=hidden.device)
    target_logit = torch.empty(min(chunk, n_rows), dtype=torch.float32, device=hidden.device)
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        h_part, t_part, rows = hidden[start:stop], targets[start:stop], stop - start
        h_arg, w_arg = h_part, weight
        if use_tma:  # placeholder block shapes; the autotune pre-hook sets the real ones
            h_arg = TensorDescriptor.from_tensor(h_part, [16, 16])
            w_arg = TensorDescriptor.from_tensor(weight, [16, 16])
        args = (
            h_arg,
            w_arg,
            bias if bias is not None else out,
            t_part,
            partial,
            target_logit,
            rows,
            vocab,
            h_part.stride(0),
            weight.stride(0),
            t_part.stride(0),
            out_scale,
            cap_log2,
        )
        flags = {
            "H": dim,
            "HAS_BIAS": bias is not None,
            "HAS_SOFTCAP": softcap is not None,
            "USE_TMA": use_tma,
            "INPUT_PRECISION": precision,
            # bf16 x bf16 products are exact in fp32, so the upcast changes no result bits beyond
            # the order of the fp32 sums.
            "DOT_UPCAST": interpreting() and hidden.dtype == torch.bfloat16,
        }
        if interpreting():
            cfg = _INTERPRET_CONFIG
            if use_tma:
                _set_descriptor_blocks({"h": h_arg, "w": w_arg, **cfg})
            grid = (triton.cdiv(rows, cfg["BLOCK_M"]) * triton.cdiv(vocab, cfg["BLOCK_N"]),)
            _linear_lse_kernel[grid](*args, **flags, **cfg)
            block_n = cfg["BLOCK_N"]
        else:

            def grid(meta, rows=rows):
                return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(vocab, meta["BLOCK_N"]),)

            tuned = _linear_lse_tuned_fp32 if hidden.dtype == torch.float32 else _linear_lse_tuned
            tuned[grid](*args, **flags)
            block_n = tuned.best_config.kwargs["BLOCK_N"]
        block_r = 64 if interpreting() else 256
        _combine_kernel[(triton.cdiv(rows, block_r),)](
            partial,
            target_logit,
            t_part,
            out[start:stop],
            rows,
            vocab,
            t_part.stride(0),
            T=triton.cdiv(vocab, block_n),
            BLOCK_R=block_r,
        )
    return out
