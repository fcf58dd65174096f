"""Per-token log-prob kernels side by side on one GPU: ours, PyTorch baselines and installed peers.

One run measures, on the same inputs, for each case: median ms (``triton.testing.do_bench``),
achieved GB/s (logits cases: bytes of scored logits read once) or TFLOP/s (hidden cases:
2*N*H*V), peak extra memory (MiB allocated beyond the inputs during one call, output included)
and max abs error vs a float64 reference. Peers are measured when importable (Liger
``fused_selective_log_softmax``, TRL ``selective_log_softmax_and_entropy`` and
``ChunkedLogProbFunction``, cut-cross-entropy ``linear_cross_entropy(reduction="none")``); a
peer that is missing or fails is recorded with its reason. Writes
``<out>/kernels_<gpu>.json``; ``benchmarks/render_kernels.py`` turns it into a markdown table
and a plot.

    python benchmarks/bench_kernels.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from cme_rewards.ops.triton_linear import triton_linear_token_logprobs
from cme_rewards.ops.triton_logits import triton_segment_means, triton_token_logprobs

MiB = 2**20

# Targets of issue 6 (H100, bf16): case -> (max ms, or max ratio to the bare matmul) and limits.
TARGETS = {
    "logits 8192x151936": {"ms": 0.83, "err": 1e-5, "extra_mib": 1.0},
    "logits 8192x262144": {"ms": 1.42},
    "hidden 8192x4096x151936": {"ratio": 1.10, "extra_mib": 64.0, "err": 5e-3},
    "hidden 8192x640x262144": {"ratio": 1.40},
}


@dataclass
class Row:
    case: str
    method: str
    ms: float | None = None
    gbps: float | None = None
    tflops: float | None = None
    extra_mib: float | None = None
    max_abs_err: float | None = None
    ratio_to_matmul: float | None = None
    note: str = ""
    error: str | None = None
    extra: dict = field(default_factory=dict)


def measure(fn: Callable[[], torch.Tensor], ref: torch.Tensor | None, rows_used: slice | None):
    """(median ms, peak extra MiB, max abs error) of ``fn``; the first call also warms up/tunes."""
    out = fn()
    torch.cuda.synchronize()
    del out
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / MiB
    err = None
    if ref is not None:
        got = out.double()
        want = ref if rows_used is None else ref[rows_used]
        err = (got - want).abs().max().item()
    del out
    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, extra, err


def run_method(case: str, method: str, fn, ref, rows_used=None, work=None, note="") -> Row:
    """Measure one method; a failure becomes a row with ``error`` set, the run goes on."""
    row = Row(case, method, note=note)
    try:
        row.ms, row.extra_mib, row.max_abs_err = measure(fn, ref, rows_used)
    except Exception as exc:  # a peer that breaks must not stop the comparison
        row.error = f"{type(exc).__name__}: {exc}"[:500]
        torch.cuda.empty_cache()
        print(f"  {method}: FAILED {row.error}", flush=True)
        return row
    if work is not None:
        kind, amount = work
        if kind == "bytes":
            row.gbps = amount / (row.ms * 1e-3) / 1e9
        else:
            row.tflops = amount / (row.ms * 1e-3) / 1e12
    err = "-" if row.max_abs_err is None else f"{row.max_abs_err:.2e}"
    print(f"  {method:58s} {row.ms:9.3f} ms  extra {row.extra_mib:9.1f} MiB  err {err}", flush=True)
    return row


def ref_logits(logits: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """float64 log softmax(logits)[target], a few rows at a time."""
    out = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    for s in range(0, logits.shape[0], chunk):
        z = logits[s : s + chunk].double()
        out[s : s + chunk] = z.gather(1, targets[s : s + chunk, None]).squeeze(1) - z.logsumexp(1)
    return out


def ref_linear(hidden, weight, targets, chunk: int = 256) -> torch.Tensor:
    """float64 log-probs through the head, a few rows at a time."""
    w64 = weight.double()
    out = torch.empty(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    for s in range(0, hidden.shape[0], chunk):
        z = hidden[s : s + chunk].double() @ w64.T
        out[s : s + chunk] = z.gather(1, targets[s : s + chunk, None]).squeeze(1) - z.logsumexp(1)
    del w64
    torch.cuda.empty_cache()
    return out


def naive_logprobs(logits, targets):
    """What most code does: float32 log_softmax of all logits, then gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def _gather_minus_lse(logits, targets):
    x = logits.float()
    return x.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)


compiled_logprobs = torch.compile(_gather_minus_lse, dynamic=False)


def peer_logits_methods(logits, targets):
    """(name, fn, rows_used, note) of the installed peers for materialised logits."""
    found, missing = [], []
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax

        # Liger scores row l of logits [B, L+1, V] against input_ids[:, l+1]: feed N rows and
        # ids shifted by one; it then scores rows 0..N-2.
        ids = torch.cat([targets[:1], targets[:-1]])[None]
        found.append(
            (
                "Liger fused_selective_log_softmax",
                lambda: fused_selective_log_softmax(logits[None], ids, temperature=1.0)[0],
                slice(0, logits.shape[0] - 1),
                "scores N-1 rows (shifted layout)",
            )
        )
    except Exception as exc:
        missing.append(("Liger fused_selective_log_softmax", exc))
    try:
        from trl.kernels import selective_log_softmax_and_entropy

        found.append(
            (
                "TRL selective_log_softmax_and_entropy",
                lambda: selective_log_softmax_and_entropy(logits, targets, 1.0, None)[0],
                None,
                "also computes the entropy",
            )
        )
    except Exception as exc:
        missing.append(("TRL selective_log_softmax_and_entropy", exc))
    return found, missing


def peer_linear_methods(hidden, weight, targets):
    found, missing = [], []
    try:
        from trl.kernels import ChunkedLogProbFunction

        found.append(
            (
                "TRL ChunkedLogProbFunction",
                lambda: ChunkedLogProbFunction.apply(
                    hidden, weight, None, targets, 1.0, 32768, None, 1.0, ()
                )[0],
                "cuBLAS tiles of 4096x32768 + Triton fold",
            )
        )
    except Exception as exc:
        missing.append(("TRL ChunkedLogProbFunction", exc))
    try:
        from cut_cross_entropy import linear_cross_entropy

        found.append(
            (
                "cut-cross-entropy linear_cross_entropy",
                lambda: -linear_cross_entropy(hidden, weight, targets, reduction="none"),
                "reduction none, negated",
            )
        )
    except Exception as exc:
        missing.append(("cut-cross-entropy linear_cross_entropy", exc))
    return found, missing


def bench_logits(n: int, vocab: int, rows: list[Row], with_masks: bool) -> None:
    case = f"logits {n}x{vocab}"
    print(f"{case} bf16", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(n, vocab, device="cuda", generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    ref = ref_logits(logits, targets)
    read = n * vocab * logits.element_size()
    work = ("bytes", read)
    full = run_method(
        case,
        "ours: triton_token_logprobs",
        lambda: triton_token_logprobs(logits, targets),
        ref,
        work=work,
    )
    rows.append(full)
    if with_masks:
        # prompt halves: rows (i mod 512) < 256 are masked, a typical prompt/response split
        keep = (torch.arange(n, device="cuda") % 512) >= 256
        seg = torch.where(keep, torch.arange(n, device="cuda") // 512, -1)
        ref_masked = torch.where(keep, ref, torch.zeros_like(ref))
        half = ("bytes", read * keep.float().mean().item())
        masked = run_method(
            case,
            "ours: half the rows masked",
            lambda: triton_token_logprobs(logits, targets, mask=keep),
            ref_masked,
            work=half,
            note="GB/s over the scored rows",
        )
        if masked.ms and full.ms:
            masked.extra["time_vs_all_rows"] = masked.ms / full.ms  # goal: about 0.5
        rows.append(masked)
        n_seq = (n + 511) // 512

        def with_means():
            lp = triton_token_logprobs(logits, targets, segment_ids=seg)
            return triton_segment_means(lp, seg, n_seq)[0]

        means_ref = torch.stack([ref[s * 512 + 256 : (s + 1) * 512].mean() for s in range(n_seq)])
        rows.append(
            run_method(
                case,
                f"ours: half masked + {n_seq} sequence means",
                with_means,
                means_ref,
                work=half,
            )
        )
    rows.append(
        run_method(
            case,
            "log_softmax(logits.float()).gather",
            lambda: naive_logprobs(logits, targets),
            ref,
            work=work,
        )
    )
    rows.append(
        run_method(
            case,
            "torch.compile gather - logsumexp (fp32)",
            lambda: compiled_logprobs(logits, targets),
            ref,
            work=work,
        )
    )
    found, missing = peer_logits_methods(logits, targets)
    for name, fn, used, note in found:
        rows.append(run_method(case, name, fn, ref, rows_used=used, work=work, note=note))
    for name, exc in missing:
        rows.append(Row(case, name, error=f"not available: {type(exc).__name__}: {exc}"[:300]))


def bench_linear(n: int, dim: int, vocab: int, rows: list[Row]) -> None:
    case = f"hidden {n}x{dim}x{vocab}"
    print(f"{case} bf16", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, dim, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(vocab, dim, device="cuda", generator=gen) * (2.0 / dim**0.5)).to(
        torch.bfloat16
    )
    targets = torch.randint(0, vocab, (n,), device="cuda", generator=gen)
    ref = ref_linear(hidden, weight, targets)
    work = ("flops", 2.0 * n * dim * vocab)
    matmul = run_method(
        case,
        "bare cuBLAS matmul hidden @ weight.T (bf16 out)",
        lambda: hidden @ weight.T,
        None,
        work=work,
    )
    rows.append(matmul)
    for tma in ("1", "0"):
        os.environ["CME_TRITON_TMA"] = tma
        label = "TMA loads" if tma == "1" else "pointer loads"
        rows.append(
            run_method(
                case,
                f"ours: triton_linear_token_logprobs ({label})",
                lambda: triton_linear_token_logprobs(hidden, weight, targets),
                ref,
                work=work,
            )
        )
    os.environ.pop("CME_TRITON_TMA")
    rows.append(
        run_method(
            case,
            "matmul + torch.compile gather - logsumexp",
            lambda: compiled_logprobs(hidden @ weight.T, targets),
            ref,
            work=work,
        )
    )
    found, missing = peer_linear_methods(hidden, weight, targets)
    for name, fn, note in found:
        rows.append(run_method(case, name, fn, ref, work=work, note=note))
    for name, exc in missing:
        rows.append(Row(case, name, error=f"not available: {type(exc).__name__}: {exc}"[:300]))
    if matmul.ms:
        for row in rows:
            if row.case == case and row.ms:
                row.ratio_to_matmul = row.ms / matmul.ms


def check_targets(rows: list[Row]) -> list[dict]:
    """Our rows against the issue's targets (meaningful on an H100 only)."""
    verdicts = []
    for row in rows:
        target = TARGETS.get(row.case)
        if (
            not target
            or row.ms is None
            or row.method
            not in (
                "ours: triton_token_logprobs",
                "ours: triton_linear_token_logprobs (TMA loads)",
                "ours: triton_linear_token_logprobs (pointer loads)",
            )
        ):
            continue
        checks = {}
        if "ms" in target:
            checks["ms"] = (row.ms, target["ms"], row.ms <= target["ms"])
        if "ratio" in target and row.ratio_to_matmul is not None:
            checks["ratio_to_matmul"] = (
                row.ratio_to_matmul,
                target["ratio"],
                row.ratio_to_matmul <= target["ratio"],
            )
        if "err" in target and row.max_abs_err is not None:
            checks["max_abs_err"] = (
                row.max_abs_err,
                target["err"],
                row.max_abs_err <= target["err"],
            )
        if "extra_mib" in target and row.extra_mib is not None:
            checks["extra_mib"] = (
                row.extra_mib,
                target["extra_mib"],
                row.extra_mib <= target["extra_mib"],
            )
        verdicts.append(
            {
                "case": row.case,
                "method": row.method,
                "checks": {
                    k: {"value": v, "limit": lim, "met": ok} for k, (v, lim, ok) in checks.items()
                },
            }
        )
    return verdicts


def peer_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("liger-kernel", "trl", "cut-cross-entropy", "transformers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results"), help="output folder"
    )
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_grad_enabled(False)
    n = 1024 if opts.quick else 8192
    rows: list[Row] = []
    for vocab in (49152, 151936, 262144):
        bench_logits(n, vocab, rows, with_masks=vocab == 151936)
        torch.cuda.empty_cache()  # the case's tensors died with its function
    for dim, vocab in ((4096, 151936), (640, 262144)):
        bench_linear(n, dim, vocab, rows)
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name()
    result = {
        "gpu": gpu,
        "capability": list(torch.cuda.get_device_capability()),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "peers": peer_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": opts.quick,
        "dtype": "bfloat16",
        "rows": [row.__dict__ for row in rows],
        "targets": check_targets(rows) if not opts.quick else [],
    }
    out_dir = Path(opts.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    path = out_dir / f"kernels_{slug}{'_quick' if opts.quick else ''}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
