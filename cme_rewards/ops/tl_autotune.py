"""Launch configurations of the Triton kernels and the tuner that picks one per problem.

The tuner works at the level of the whole op, not of one kernel: for the fused head it times pass 1
*and* the combine pass with the partial buffer sized for the config being timed, so that a config
with a narrow vocabulary tile pays for its longer combine. Its cache key holds the problem's
constants and a bucket of the row count (``tl_utils.n_bucket``), so the first call's N does not
fix the config for every later size. In Triton's interpreter no timing happens: the first
interpreter config is used.

Every GPU config here compiles for sm90 without register spills, stack frames or shared-memory
overflow (``benchmarks/gpu/compile_check.py`` checks it on a machine without a GPU).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field

from cme_rewards.ops.tl_utils import interpreting


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration: constexpr block sizes (``meta``) plus warps and pipeline stages."""

    meta: tuple[tuple[str, int | bool], ...]
    num_warps: int
    num_stages: int

    @classmethod
    def make(cls, num_warps: int, num_stages: int, **meta: int | bool) -> KernelConfig:
        return cls(tuple(sorted(meta.items())), num_warps, num_stages)

    @property
    def kwargs(self) -> dict[str, int | bool]:
        return dict(self.meta)

    def launch_options(self) -> dict[str, int]:
        """``num_warps`` / ``num_stages`` for a compiled launch (the interpreter takes neither)."""
        return (
            {} if interpreting() else {"num_warps": self.num_warps, "num_stages": self.num_stages}
        )

    def __str__(self) -> str:
        meta = " ".join(f"{k}={v}" for k, v in self.meta)
        return f"{meta} warps={self.num_warps} stages={self.num_stages}"


# ---------------------------------------------------------------- per-row logits kernel
# BLOCK_V columns per loop iteration; NUM_STAGES is the software-pipeline depth of the vocabulary
# loop (``tl.range(..., num_stages=NUM_STAGES)``: cp.async copies NUM_STAGES - 1 blocks ahead;
# 1 = plain vectorised loads). Small one-warp programs stream well when many rows run at once;
# wider programs cover the long rows of 262k vocabularies when few rows are scored.
LOGITS_CONFIGS = [
    KernelConfig.make(num_warps=w, num_stages=1, BLOCK_V=bv, NUM_STAGES=st)
    for bv, w, st in [
        (1024, 1, 1),
        (2048, 1, 3),
        (2048, 2, 1),
        (2048, 2, 3),
        (4096, 4, 1),
        (4096, 4, 3),
        (8192, 8, 1),
        (8192, 8, 2),
    ]
]
LOGITS_INTERPRET_CONFIG = KernelConfig.make(num_warps=1, num_stages=1, BLOCK_V=256, NUM_STAGES=1)


def logits_candidates(vocab: int) -> list[KernelConfig]:
    """Configs worth timing for rows of ``vocab`` columns (no block over twice the row)."""
    if interpreting():
        block = min(LOGITS_INTERPRET_CONFIG.kwargs["BLOCK_V"], _next_pow2(vocab))
        return [KernelConfig.make(num_warps=1, num_stages=1, BLOCK_V=max(block, 8), NUM_STAGES=1)]
    limit = max(1024, 2 * _next_pow2(vocab))
    return [c for c in LOGITS_CONFIGS if c.kwargs["BLOCK_V"] <= limit] or LOGITS_CONFIGS[:1]


# ---------------------------------------------------------------- fused head, pass 1
# 16-bit operands (wgmma on sm90). 128x256 tiles suit long K. A program that holds 128 float32
# accumulators per thread (128x256 on 8 warps, 128x128 on 4) folds its tile in four column parts
# (EPILOGUE_SPLIT=4): folding it whole with a softcap needs more than 255 registers (a stack frame
# and local loads on sm90), in two halves with softcap and bias too. 128x128x64 tiles with 3 stages
# (96 KiB shared memory) let two programs share an SM, so that one program's softmax epilogue
# overlaps the other's main loop; PERSISTENT programs (one per SM, tiles strided by the grid,
# nested loops flattened) overlap the epilogue of a tile with the loads of the next within one
# program, the pattern of Triton's persistent TMA matmul tutorial. GROUP_M=64 keeps a short-K
# hidden in L2 while the vocabulary streams.
_LINEAR_ROWS_16BIT = [
    # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages, EPILOGUE_SPLIT, PERSISTENT
    (128, 256, 64, 8, 8, 3, 4, False),
    (128, 256, 64, 64, 8, 3, 4, False),
    (128, 256, 64, 8, 8, 4, 4, False),
    (128, 128, 64, 8, 8, 3, 1, False),
    (128, 128, 64, 64, 4, 3, 4, False),
    (128, 128, 128, 8, 8, 3, 1, False),
    (128, 128, 64, 8, 8, 4, 1, True),
    (128, 256, 64, 8, 8, 3, 4, True),
]
# fp32 operands (IEEE FMA, or TF32 when torch allows it), pointer loads only (the fp32 TMA build
# needs a 5.6 KiB stack frame on sm90): small tiles that compile in seconds; fp32 verifiers are a
# correctness path, not the fast one.
_LINEAR_ROWS_FP32 = [
    (64, 128, 32, 8, 4, 3, 1, False),
    (128, 128, 32, 8, 8, 3, 1, False),
]


def _linear_configs(rows) -> list[KernelConfig]:
    return [
        KernelConfig.make(
            num_warps=w,
            num_stages=st,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            GROUP_M=g,
            EPILOGUE_SPLIT=split,
            PERSISTENT=persistent,
        )
        for bm, bn, bk, g, w, st, split, persistent in rows
    ]


LINEAR_CONFIGS_16BIT = _linear_configs(_LINEAR_ROWS_16BIT)
LINEAR_CONFIGS_FP32 = _linear_configs(_LINEAR_ROWS_FP32)
LINEAR_INTERPRET_CONFIGS = _linear_configs(
    [
        (16, 64, 32, 2, 1, 1, 1, False),
        (16, 64, 32, 2, 1, 1, 2, True),
        (16, 64, 32, 2, 1, 1, 4, True),
    ]
)
"""Interpreter configs; the first is used, tests switch to the others with ``Tuner.forced``."""
COMBINE_BLOCK_T, COMBINE_BLOCK_R, COMBINE_WARPS = 64, 32, 4
"""Pass 2 tile: BLOCK_T partial logsumexps (vocabulary tiles) by BLOCK_R rows per step."""


def linear_candidates(is_fp32: bool, vocab: int) -> list[KernelConfig]:
    """Configs worth timing for the fused head (small heads, V < 16384, are not tuned)."""
    if interpreting():
        return LINEAR_INTERPRET_CONFIGS[:1]
    configs = LINEAR_CONFIGS_FP32 if is_fp32 else LINEAR_CONFIGS_16BIT
    if vocab < 16384:
        return [c for c in configs if c.kwargs["BLOCK_N"] == 128][:1]
    return configs


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------- tuner


@dataclass
class Tuner:
    """Picks and caches the fastest config per key; thread-safe.

    ``pick(key, candidates, run)`` times ``run(config)`` (a closure that launches the whole op
    for that config) with ``triton.testing.do_bench`` for every candidate, the first time a key is
    seen; a candidate that fails to compile or launch is skipped. ``CME_TRITON_PRINT_TUNING=1``
    prints each timing to stderr.
    """

    name: str
    cache: dict[Hashable, KernelConfig] = field(default_factory=dict)
    timings: dict[Hashable, list[tuple[str, float | str]]] = field(default_factory=dict)
    last: tuple[Hashable, KernelConfig] | None = None
    _forced: KernelConfig | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def pick(
        self,
        key: Hashable,
        candidates: list[KernelConfig],
        run: Callable[[KernelConfig], object],
    ) -> KernelConfig:
        if self._forced is not None:
            self.last = (key, self._forced)
            return self._forced
        if len(candidates) == 1 or interpreting():
            self.last = (key, candidates[0])
            return candidates[0]
        with self._lock:
            if key in self.cache:
                self.last = (key, self.cache[key])
                return self.cache[key]
            from triton.testing import do_bench

            timings: list[tuple[str, float | str]] = []
            best, best_ms, last_error = None, float("inf"), None
            for config in candidates:
                try:
                    ms = do_bench(lambda config=config: run(config), warmup=5, rep=20)
                except Exception as exc:  # out of resources, compile error: skip this config
                    last_error = exc
                    timings.append((str(config), f"{type(exc).__name__}: {exc}"[:200]))
                    continue
                timings.append((str(config), ms))
                if ms < best_ms:
                    best, best_ms = config, ms
            if os.environ.get("CME_TRITON_PRINT_TUNING", "0") not in ("", "0"):
                for text, ms in timings:
                    print(f"[cme tuning {self.name} {key}] {text}: {ms}", file=sys.stderr)
                print(f"[cme tuning {self.name} {key}] best: {best}", file=sys.stderr)
            if best is None:
                raise RuntimeError(f"{self.name}: no config ran for {key}") from last_error
            self.cache[key] = best
            self.timings[key] = timings
            self.last = (key, best)
            return best

    def describe_last(self) -> str:
        """The config of the latest pick, with its tuning time when it was timed."""
        if self.last is None:
            return "no call yet"
        key, config = self.last
        times = [ms for text, ms in self.timings.get(key, []) if text == str(config)]
        timed = f" ({times[0]:.3f} ms)" if times and isinstance(times[0], float) else ""
        return f"{config}{timed}"

    @contextlib.contextmanager
    def forced(self, config: KernelConfig) -> Iterator[None]:
        """Use ``config`` for every call inside the block (tests and benchmarks of one config)."""
        with self._lock:
            previous, self._forced = self._forced, config
            try:
                yield
            finally:
                self._forced = previous
