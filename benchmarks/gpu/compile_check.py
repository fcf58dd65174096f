"""Compile every Triton kernel config of cme_rewards.ops for a GPU target, on a machine without one.

Uses Triton's own argument specialisation (the binder ``JITFunction.run`` uses) on CPU tensors, so
the compiled kernel is the one a launch on that GPU would build: it catches API misuse, register
spills and shared-memory overflow before any GPU time is spent. Prints one line per config and
writes JSON when ``--json`` is given.

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

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_check needs TRITON_INTERPRET unset or 0")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from cme_rewards.ops import triton_linear, triton_logits  # noqa: E402

SMEM_LIMIT = {90: 232448, 80: 166912, 100: 232448}  # bytes of shared memory per block


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


def resource_usage(cubin: bytes) -> dict:
    """Registers per thread and local-memory (spill) bytes of a cubin, read with cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        text = subprocess.run(
            [tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True
        ).stdout
    regs, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    return {
        "n_regs": int(regs.group(1)) if regs else None,
        "spill_bytes": int(local.group(1)) if local else None,
    }


def _report(name: str, kernel, seconds: float, arch: int) -> dict:
    meta = kernel.metadata
    ptx = kernel.asm.get("ptx", "")
    row = {
        "kernel": name,
        "shared_bytes": meta.shared,
        "fits_smem": meta.shared <= SMEM_LIMIT.get(arch, 232448),
        "num_warps": meta.num_warps,
        "num_stages": meta.num_stages,
        **resource_usage(kernel.asm["cubin"]),
        "wgmma": "wgmma" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
        "cp_async": "cp.async" in ptx,
        "compile_s": round(seconds, 2),
    }
    print(json.dumps(row), flush=True)
    return row


def logits_cases(quick: bool):
    """(name, fn, args, kwargs) for the per-row logits kernel and the segment-means kernel."""
    n, vocab = 64, 151936
    configs = triton_logits._LOGITS_CONFIGS[1:2] if quick else triton_logits._LOGITS_CONFIGS
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32):
        logits = torch.empty(n, vocab, dtype=dtype)
        targets = torch.zeros(n, dtype=torch.int64)
        sel = torch.zeros(n, dtype=torch.int64)
        out = torch.empty(n, dtype=torch.float32)
        for cfg in configs:
            for mode in (2,) if quick else (0, 1, 2):
                args = (logits, targets, sel, out, vocab, vocab, 1, 1, 1.0, 1.4426950408889634)
                kwargs = {"SELECT": mode, **cfg.kwargs, "num_warps": cfg.num_warps}
                kwargs["num_stages"] = cfg.num_stages
                name = (
                    f"logits {dtype} SELECT={mode} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                )
                yield name, triton_logits._token_logprobs_kernel, args, kwargs
    lp = torch.empty(n, dtype=torch.float32)
    seg = torch.zeros(n, dtype=torch.int64)
    args = (lp, seg, torch.empty(4), torch.empty(4, dtype=torch.int32), n, 1)
    yield "segment_means", triton_logits._segment_means_kernel, args, {"BLOCK": 1024}


def linear_cases(quick: bool):
    """(name, fn, args, kwargs) for every config of the fused linear kernel and the combine."""
    n, dim, vocab = 256, 4096, 151936
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    for dtype in dtypes:
        configs = (
            triton_linear._LINEAR_CONFIGS_FP32
            if dtype == torch.float32
            else triton_linear._LINEAR_CONFIGS
        )
        configs = configs[:1] if quick else configs
        hidden = torch.empty(n, dim, dtype=dtype)
        weight = torch.empty(vocab, dim, dtype=dtype)
        targets = torch.zeros(n, dtype=torch.int64)
        part = torch.empty(1187 * n, dtype=torch.float32)
        tl_ = torch.empty(n, dtype=torch.float32)
        for cfg in configs:
            for use_tma in (False, True):
                for softcap in (False, True) if not quick else (False,):
                    h_arg, w_arg = hidden, weight
                    kw = dict(cfg.kwargs)
                    if use_tma:
                        h_arg = TensorDescriptor.from_tensor(hidden, [kw["BLOCK_M"], kw["BLOCK_K"]])
                        w_arg = TensorDescriptor.from_tensor(weight, [kw["BLOCK_N"], kw["BLOCK_K"]])
                    args = (h_arg, w_arg, tl_, targets, part, tl_, n, vocab, dim, dim, 1, 1.4, 1.0)
                    kwargs = {
                        "H": dim,
                        "HAS_BIAS": False,
                        "HAS_SOFTCAP": softcap,
                        "USE_TMA": use_tma,
                        "INPUT_PRECISION": triton_linear._input_precision(dtype),
                        "DOT_UPCAST": False,
                        **kw,
                        "num_warps": cfg.num_warps,
                        "num_stages": cfg.num_stages,
                    }
                    name = f"linear {dtype} tma={use_tma} softcap={softcap} {kw} w{cfg.num_warps} s{cfg.num_stages}"
                    yield name, triton_linear._linear_lse_kernel, args, kwargs
    out = torch.empty(n, dtype=torch.float32)
    args = (part, tl_, targets, out, n, vocab, 1)
    yield "combine", triton_linear._combine_kernel, args, {"T": 1187, "BLOCK_R": 256}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one config per kernel")
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
            failures += 1
            print(json.dumps({"kernel": name, "error": f"{type(exc).__name__}: {exc}"[:2000]}))
            rows.append({"kernel": name, "error": str(exc)[:2000]})
            continue
        row = _report(name, kernel, time.perf_counter() - start, opts.arch)
        failures += not row["fits_smem"] or bool(row["spill_bytes"])
        rows.append(row)
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump({"arch": opts.arch, "triton": triton.__version__, "rows": rows}, fh, indent=1)
    print(f"{len(rows) - failures}/{len(rows)} configs compiled within limits for sm{opts.arch}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
