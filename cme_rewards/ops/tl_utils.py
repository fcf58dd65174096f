"""Shared Triton helpers of ``cme_rewards.ops``: ``@triton.jit`` helpers the kernels inline, and the
host helpers of every launcher. Importing it imports triton: set ``TRITON_INTERPRET=1`` first to
run the kernels on CPU tensors.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

LOG2E = 1.0 / math.log(2.0)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
"""Operand dtypes of the kernels."""

N_BUCKETS = (256, 2048, 16384)
"""Upper edges of the row-count buckets that key the tuning caches (a 4th bucket is above)."""


def n_bucket(n_rows: int) -> int:
    """The tuning bucket of ``n_rows``: the first edge of ``N_BUCKETS`` >= it, else ``2 * last``."""
    return next((edge for edge in N_BUCKETS if n_rows <= edge), 2 * N_BUCKETS[-1])


@triton.jit
def _probe_kernel(x_ptr):  # only decorated to find out whether triton interprets
    tl.store(x_ptr, 0.0)


def interpreting() -> bool:
    """True when the kernels run in Triton's CPU interpreter (decided when this module loads)."""
    return isinstance(_probe_kernel, interpreter.InterpretedFunction)


def _patch_interpreter_scalar_index() -> None:
    """Let the interpreter run loops whose bounds are runtime scalars (e.g. ``tl.range(0, n)``).

    Triton 3.6's interpreter turns a scalar (a 1-element numpy array) into a loop bound with
    ``int(array)``, which numpy >= 2.4 rejects for rank 1; ``__index__`` reads the element instead.
    A no-op where Triton changed; compiled kernels are unaffected.
    """
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_cme_scalar_index", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._cme_scalar_index = True
    interpreter._patch_lang_tensor = patched


if interpreting():
    _patch_interpreter_scalar_index()


def check_row_tensor(name: str, t: torch.Tensor, n_rows: int, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``t`` is a bool / integer ``[n_rows]`` tensor on ``device``."""
    if t.shape != (n_rows,) or t.is_floating_point():
        raise ValueError(f"{name} must be integer [{n_rows}], got {t.dtype} {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the other operands on {device}")


def device_guard(tensor: torch.Tensor):
    """``torch.cuda.device(tensor.device)`` for CUDA tensors: Triton launches on the *current*
    device, so without it a tensor on ``cuda:1`` would be read by a kernel on ``cuda:0``."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


@triton.jit
def online_lse_update(m, s, x, scale):
    """Merge block ``x`` into a running base-2 logsumexp along axis 0; returns the new ``(m, s)``.

    ``m``: running max of the raw values, ``s``: running ``sum 2^((v - m) * scale)``. ``-inf`` is
    allowed everywhere: while ``m`` is ``-inf`` the reference point is 0 (no ``-inf - -inf``).
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp2((m - m_ref) * scale) + tl.sum(tl.exp2((x - m_ref) * scale), axis=0)
    return m_new, s


@triton.jit
def tanh_f32(x):
    """float32 tanh to a few ulp: odd Taylor series below |x| = 0.3, (1 - e^-2|x|) / (1 + e^-2|x|) above."""
    a = tl.abs(x)
    a2 = a * a
    p = 0.021869488536155203 + a2 * -0.008863235529902197  # Horner, innermost term first
    p = -0.05396825396825397 + a2 * p
    p = 0.13333333333333333 + a2 * p
    p = -0.3333333333333333 + a2 * p
    series = a * (1.0 + a2 * p)
    e = tl.exp2(a * -2.8853900817779268)  # exp(-2|x|), no overflow
    t = tl.where(a < 0.3, series, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)
