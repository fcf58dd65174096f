"""Compile every Triton kernel config of cme_rewards.ops for a GPU target, on a machine without one.

Uses Triton's own argument specialisation (the binder ``JITFunction.run`` uses) on CPU tensors, so
the compiled kernel is the one a launch on that GPU would build. For each config it reads the
cubin with ``cuobjdump`` (shipped with triton): registers, ``STACK`` (a stack frame: spilled
registers or arrays kept in local memory), ``LOCAL``, the number of local loads/stores in the
SASS (``LDL`` / ``STL``), shared memory, and what the main loops compiled to: global load widths,
``LDGSTS`` (cp.async, i.e. software pipelining of plain loads), ``UTMALDG`` (TMA) and ``HGMMA``
(wgmma). A config fails when it needs a stack frame, local memory or spills, or more shared memory
than the target has. Prints one JSON line per config and a summary; ``--json`` writes them all.

    TRITON_INTERPRET=0 python benchmarks/gpu/compile_check.py [--quick] [--arch 90] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_check needs TRITON_INTERPRET unset or 0")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from cme_rewards.ops import tl_autotune  # noqa: E402
from cme_rewards.ops.linear_lse_kernel import linear_lse_kernel  # noqa: E402
from cme_rewards.ops.logits_kernel import token_logprobs_kernel  # noqa: E402
from cme_rewards.ops.lse_combine_kernel import lse_combine_kernel  # noqa: E402
from cme_rewards.ops.triton_linear import _input_precision  # noqa: E402

SMEM_LIMIT = {80: 166912, 90: 232448, 100: 232448}  # bytes of shared memory per block
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_kernel(fn, target: GPUTarget, args: tuple, kwargs: dict):
    """Compile JIT function ``fn`` for ``target`` as a launch with ``args``/``kwargs`` would."""
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        return subprocess.run(
            [CUOBJDUMP, flag, path], capture_output=True, text=True, check=True
        ).stdout


def _load_width(opcode: str) -> int:
    """Bytes per thread of a global load opcode such as ``LDG.E.128.CONSTANT`` or ``LDG.E.U16``."""
    for token, width in ((".128", 16), (".64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if token in opcode:
            return width
    return 4


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack frame, local memory and SASS features of a cubin, read with cuobjdump."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    sass = _cuobjdump(cubin, "-sass")

    def field(name: str) -> int | None:
        found = re.search(rf"\b{name}:(\d+)", text)
        return int(found.group(1)) if found else None

    opcodes = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass, re.M)
    loads = Counter(_load_width(op) for op in opcodes if op.startswith("LDG."))
    return {
        "n_regs": field("REG"),
        "stack_bytes": field("STACK"),
        "local_bytes": field("LOCAL"),
        "local_ld_st": sum(op.startswith(("LDL", "STL")) for op in opcodes),
        "ldg_bytes": {str(w): n for w, n in sorted(loads.items(), reverse=True)},
        "cp_async": sum(op.startswith("LDGSTS") for op in opcodes),
        "tma": sum(op.startswith("UTMALDG") for op in opcodes),
        "wgmma": sum(op.startswith("HGMMA") for op in opcodes),
    }


def check(name: str, kernel, seconds: float, arch: int) -> dict:
    """One report row; ``ok`` is False for a stack frame, local memory, spills or too much smem."""
    meta = kernel.metadata
    row = {
        "kernel": name,
        "shared_bytes": meta.shared,
        "num_warps": meta.num_warps,
        "num_stages": meta.num_stages,
        **resource_usage(kernel.asm["cubin"]),
        "compile_s": round(seconds, 2),
    }
    row["ok"] = (
        meta.shared <= SMEM_LIMIT.get(arch, 232448)
        and not row["stack_bytes"]
        and not row["local_bytes"]
        and not row["local_ld_st"]
    )
    return row


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def logits_cases(quick: bool):
    """(name, fn, args, kwargs) for the per-row logits kernel: every config, dtype and row mode."""
    n = 64
    shapes = [(151936, 151936), (50257, 50257)]  # (V, row stride): aligned rows, odd rows
    for dname, dtype in DTYPES.items():
        if quick and dname != "bf16":
            continue
        align = 16 // torch.empty((), dtype=dtype).element_size()
        for vocab, stride in shapes:
            logits = torch.empty(n, stride, dtype=dtype)
            targets = torch.zeros(n, dtype=torch.int64)
            mask = torch.zeros(n, dtype=torch.uint8)
            out = torch.empty(n, dtype=torch.float32)
            configs = tl_autotune.LOGITS_CONFIGS
            if quick or vocab != stride:
                configs = [configs[3]]
            for config in configs:
                for has_mask in (False, True) if not quick else (True,):
                    block = config.kwargs["BLOCK_V"]
                    n_body = (vocab - align + 1) // block * block
                    args = (logits, targets, mask, out, vocab, n_body, stride, 1, 1, 1.0, 1.4427)
                    kwargs = {"HAS_MASK": has_mask, "ALIGN": align, **config.kwargs}
                    kwargs.update(num_warps=config.num_warps, num_stages=config.num_stages)
                    name = f"logits {dname} V={vocab} stride={stride} mask={has_mask} {config}"
                    yield name, token_logprobs_kernel, args, kwargs


def linear_cases(quick: bool):
    """(name, fn, args, kwargs) for every config of the fused head pass 1, and the combine pass."""
    n, dim, vocab = 256, 4096, 151936
    for dname, dtype in DTYPES.items():
        if quick and dname != "bf16":
            continue
        configs = (
            tl_autotune.LINEAR_CONFIGS_FP32
            if dtype == torch.float32
            else tl_autotune.LINEAR_CONFIGS_16BIT
        )
        if quick:
            configs = [configs[0], next(c for c in configs if c.kwargs["PERSISTENT"])]
        hidden = torch.empty(n, dim, dtype=dtype)
        weight = torch.empty(vocab, dim, dtype=dtype)
        targets = torch.zeros(n, dtype=torch.int64)
        bias = torch.empty(vocab, dtype=dtype)
        part = torch.empty(1187 * n, dtype=torch.float32)
        tlogit = torch.empty(n, dtype=torch.float32)
        tma_modes = (False,) if dtype == torch.float32 else (False, True)
        for config in configs:
            meta = config.kwargs
            for use_tma in tma_modes if not quick else (True,):
                for softcap, has_bias in ((False, False), (True, False), (True, True)):
                    if quick and has_bias:
                        continue
                    h_arg, w_arg = hidden, weight
                    if use_tma:
                        h_arg = TensorDescriptor.from_tensor(
                            hidden, [meta["BLOCK_M"], meta["BLOCK_K"]]
                        )
                        w_arg = TensorDescriptor.from_tensor(
                            weight, [meta["BLOCK_N"], meta["BLOCK_K"]]
                        )
                    args = (h_arg, w_arg, bias, targets, part, tlogit, n, vocab, dim, dim, 1)
                    args += (1.4, 1.0)
                    kwargs = {
                        "H": dim,
                        "HAS_BIAS": has_bias,
                        "HAS_SOFTCAP": softcap,
                        "USE_TMA": use_tma,
                        "INPUT_PRECISION": _input_precision(dtype),
                        "DOT_UPCAST": False,
                        **meta,
                        "num_warps": config.num_warps,
                        "num_stages": config.num_stages,
                    }
                    name = (
                        f"linear {dname} tma={use_tma} softcap={softcap} bias={has_bias} {config}"
                    )
                    yield name, linear_lse_kernel, args, kwargs
    out = torch.empty(n, dtype=torch.float32)
    args = (part, tlogit, torch.zeros(n, dtype=torch.int64), out, n, vocab, 1187, 1)
    kwargs = {
        "BLOCK_T": tl_autotune.COMBINE_BLOCK_T,
        "BLOCK_R": tl_autotune.COMBINE_BLOCK_R,
        "num_warps": tl_autotune.COMBINE_WARPS,
    }
    yield "combine", lse_combine_kernel, args, kwargs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few representative configs")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    parser.add_argument("--json", help="write the rows here")
    opts = parser.parse_args(argv)
    target = GPUTarget("cuda", opts.arch, 32)
    rows, failures = [], 0
    for name, fn, args, kwargs in [*logits_cases(opts.quick), *linear_cases(opts.quick)]:
        start = time.perf_counter()
        try:
            kernel = compile_kernel(fn, target, args, kwargs)
        except Exception as exc:  # report every failing config, then fail
            row = {"kernel": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        else:
            row = check(name, kernel, time.perf_counter() - start, opts.arch)
        failures += not row["ok"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"arch": opts.arch, "triton": triton.__version__, "rows": rows}, fh, indent=1)
    worst = max((r.get("n_regs") or 0) for r in rows)
    print(
        f"{len(rows) - failures}/{len(rows)} configs compiled within limits for sm{opts.arch} "
        f"(no stack frame, no local memory, no spills; max {worst} registers)"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
