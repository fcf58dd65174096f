"""Launch configurations of the Triton kernels and the tuner that picks one per problem.

The tuner times the whole op (for the fused head: both passes, partial buffer sized per config)
and caches the fastest per key: the problem's constants and a row bucket (``tl_utils.n_bucket``).
The interpreter times nothing and uses the first candidate. Every GPU config compiles for sm90
without spills, stack frames or shared-memory overflow (``benchmarks/gpu/compile_check.py``).
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
        if interpreting():
            return {}
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def __str__(self) -> str:
        meta = " ".join(f"{k}={v}" for k, v in self.meta)
        return f"{meta} warps={self.num_warps} stages={self.num_stages}"


# ---------------------------------------------------------------- per-row logits kernel
# NUM_STAGES pipelines the vocabulary loop (cp.async NUM_STAGES - 1 blocks ahead; 1 = plain
# vector loads). One-warp programs stream well when many rows run at once; wide ones cover the
# long rows of 262k vocabularies when few rows are scored.
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


def logits_candidates(vocab: int) -> list[KernelConfig]:
    """Configs worth timing for rows of ``vocab`` columns (no block over twice the row)."""
    pow2 = 1 << max(0, (vocab - 1).bit_length())
    if interpreting():
        block = max(min(256, pow2), 8)
        return [KernelConfig.make(num_warps=1, num_stages=1, BLOCK_V=block, NUM_STAGES=1)]
    limit = max(1024, 2 * pow2)
    return [c for c in LOGITS_CONFIGS if c.kwargs["BLOCK_V"] <= limit] or LOGITS_CONFIGS[:1]


# ---------------------------------------------------------------- fused head, pass 1
# 16-bit operands (wgmma on sm90). 128x256 tiles suit long K. Programs holding 128 float32
# accumulators per thread fold their tile in four column parts (EPILOGUE_SPLIT=4): whole, or in
# halves with softcap and bias, the fold needs over 255 registers (a stack frame on sm90).
# 128x128x64 tiles with 3 stages (96 KiB shared memory) let two programs share an SM, one's
# epilogue overlapping the other's main loop; PERSISTENT programs (one per SM, loops flattened)
# overlap a tile's epilogue with the next tile's loads (Triton's persistent TMA matmul tutorial).
# GROUP_M=64 keeps a short-K hidden in L2 while the vocabulary streams.
_LINEAR_FIELDS = "BLOCK_M BLOCK_N BLOCK_K GROUP_M num_warps num_stages EPILOGUE_SPLIT PERSISTENT"
_LINEAR_ROWS_16BIT = [
    (128, 256, 64, 8, 8, 3, 4, False),
    (128, 256, 64, 64, 8, 3, 4, False),
    (128, 256, 64, 8, 8, 4, 4, False),
    (128, 128, 64, 8, 8, 3, 1, False),
    (128, 128, 64, 64, 4, 3, 4, False),
    (128, 128, 128, 8, 8, 3, 1, False),
    (128, 128, 64, 8, 8, 4, 1, True),
    (128, 256, 64, 8, 8, 3, 4, True),
]
# fp32 operands (IEEE FMA, or TF32 when torch allows it): pointer loads only (the fp32 TMA build
# needs a stack frame on sm90), small tiles that compile in seconds; a correctness path.
_LINEAR_ROWS_FP32 = [(64, 128, 32, 8, 4, 3, 1, False), (128, 128, 32, 8, 8, 3, 1, False)]


def _linear_configs(rows: list[tuple[int | bool, ...]]) -> list[KernelConfig]:
    return [
        KernelConfig.make(**dict(zip(_LINEAR_FIELDS.split(), row, strict=True))) for row in rows
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


# ---------------------------------------------------------------- tuner


@dataclass
class Tuner:
    """Picks and caches the fastest config per key; thread-safe.

    ``pick(key, candidates, run)`` times ``run(config)`` (the whole op with that config) with
    ``triton.testing.do_bench`` for every candidate the first time a key is seen, skipping those
    that fail to compile or launch. ``CME_TRITON_PRINT_TUNING=1`` prints the timings to stderr.
    """

    name: str
    cache: dict[Hashable, KernelConfig] = field(default_factory=dict)
    timings: dict[Hashable, list[tuple[str, float | str]]] = field(default_factory=dict)
    last: tuple[Hashable, KernelConfig] | None = None
    _forced: KernelConfig | None = None
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def pick(
        self, key: Hashable, candidates: list[KernelConfig], run: Callable[[KernelConfig], object]
    ) -> KernelConfig:
        """The forced config, else the only candidate (the first when interpreting), else the
        fastest candidate for ``key``."""
        if self._forced is not None:
            config = self._forced
        elif len(candidates) == 1 or interpreting():
            config = candidates[0]
        else:
            with self._lock:
                if key not in self.cache:
                    self.cache[key] = self._fastest(key, candidates, run)
                config = self.cache[key]
        self.last = (key, config)
        return config

    def _fastest(self, key: Hashable, configs: list[KernelConfig], run: Callable) -> KernelConfig:
        from triton.testing import do_bench

        timings: list[tuple[str, float | str]] = []
        best, best_ms, last_error = None, float("inf"), None
        for config in configs:
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
        self.timings[key] = timings
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
