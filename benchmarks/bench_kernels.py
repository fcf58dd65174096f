"""Per-token log-prob kernels side by side on one GPU: ours, PyTorch baselines and installed peers.

One run measures, on the same inputs, for each case: median ms (``triton.testing.do_bench``),
achieved GB/s (logits cases: bytes of the logits read once; the device copy: bytes read and
written) or TFLOP/s (hidden cases: 2*N*H*V), peak extra memory (MiB allocated beyond the inputs
during one call, output included) and max abs error vs a float64 reference. Peers are measured
when importable: Liger ``fused_selective_log_softmax``, TRL ``selective_log_softmax_and_entropy``
and ``ChunkedLogProbFunction``, cut-cross-entropy ``linear_cross_entropy(reduction="none")``; a
peer that is missing or fails is recorded with its reason. The target checks of issue 13 are
ratios within the run (fastest peer, copy bandwidth, bare matmul), so they hold on any GPU.

The JSON (``<out>/kernels_<gpu>.json``) is rewritten after every measured method, so a run that is
killed keeps every figure measured so far; ``--case`` runs one case and merges its rows into an
existing file (``benchmarks/gpu/device_run.py`` runs each case in its own time-bounded process).
``benchmarks/render_kernels.py`` turns the JSON into a markdown table and a plot.

    python3 benchmarks/bench_kernels.py [--case NAME ...] [--quick] [--out benchmarks/results]
    python3 benchmarks/bench_kernels.py --dry --out /tmp/x    # tiny shapes on CPU (interpreter)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

if "--dry" in sys.argv:  # the interpreter is chosen before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

MiB = 2**20

# Case name -> (kind, N, H, V). Full shapes are the issue's; --quick divides N by 8, --dry uses
# tiny shapes on CPU (plumbing only: the times mean nothing there).
CASES = {
    "logits-151936": ("logits", 8192, 0, 151936),
    "logits-262144": ("logits", 8192, 0, 262144),
    "hidden-4096x151936": ("hidden", 8192, 4096, 151936),
    "hidden-640x262144": ("hidden", 8192, 640, 262144),
}
DRY_SHAPES = {
    "logits-151936": (24, 0, 603),
    "logits-262144": (16, 0, 1001),
    "hidden-4096x151936": (24, 64, 603),
    "hidden-640x262144": (16, 32, 1001),
}

# Targets of issue 13 (bf16), as ratios within one run.
TARGETS = {
    "logits": {
        "speedup_vs_fastest_peer": (">=", 1.0),
        "fraction_of_copy_bandwidth": (">=", 0.9),
        "max_abs_err": ("<=", 1e-5),
        "extra_mib": ("<", 1.0),
        "half_masked_time_ratio": ("<=", 0.6),
    },
    "hidden-4096x151936": {
        "ratio_to_matmul": ("<=", 1.10),
        "max_abs_err": ("<=", 5e-3),
        "extra_mib": ("<=", 64.0),
    },
    "hidden-640x262144": {"ratio_to_matmul": ("<=", 1.40), "max_abs_err": ("<=", 5e-3)},
}
OURS = "ours"  # method names of our kernels start with this


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


class Recorder:
    """Holds the result and rewrites the JSON atomically after every row (and on ``flush``)."""

    def __init__(self, path: Path, header: dict, replace_cases: set[str]):
        self.path = path
        self.header = header
        self.old_rows: list[dict] = []  # other cases' rows from an earlier process: merged
        self.targets: list[dict] = []
        self.new_rows: list[Row] = []
        if path.exists():
            try:
                old = json.loads(path.read_text())
                self.old_rows = [r for r in old["rows"] if r["case"] not in replace_cases]
                self.targets = [t for t in old.get("targets", []) if t["case"] not in replace_cases]
            except (ValueError, KeyError):
                pass

    def rows(self) -> list[dict]:
        return self.old_rows + [asdict(r) for r in self.new_rows]

    def add(self, row: Row) -> Row:
        self.new_rows.append(row)
        self.flush()
        return row

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        result = {**self.header, "rows": self.rows(), "targets": self.targets}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(self.path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median ms: ``do_bench`` on a GPU (L2 flushed between runs), a few wall-clock runs on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(fn, ref, rows_used, device):
    """(median ms, peak extra MiB, max abs error) of ``fn``; the first call also warms up / tunes."""
    out = fn()
    _sync(device)
    del out
    extra = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    out = fn()
    _sync(device)
    if device.type == "cuda":
        extra = (torch.cuda.max_memory_allocated(device) - base) / MiB
    err = None
    if ref is not None:
        want = ref if rows_used is None else ref[rows_used]
        err = (out.double() - want).abs().max().item()
    del out
    return timed_ms(fn, device), extra, err


class Bench:
    """Runs methods of one case, records each row, stops starting methods past the deadline."""

    def __init__(self, recorder: Recorder, case: str, device, deadline: float):
        self.recorder, self.case, self.device, self.deadline = recorder, case, device, deadline

    def run(self, method, fn, ref, rows_used=None, work=None, note="") -> Row:
        row = Row(self.case, method, note=note)
        if time.monotonic() > self.deadline:
            row.error = "skipped: the case's time limit was reached"
            return self.recorder.add(row)
        try:
            row.ms, row.extra_mib, row.max_abs_err = measure(fn, ref, rows_used, self.device)
        except Exception as exc:  # a peer that breaks must not stop the comparison
            row.error = f"{type(exc).__name__}: {exc}"[:500]
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"  {method}: FAILED {row.error}", flush=True)
            return self.recorder.add(row)
        if work is not None:
            kind, amount = work
            if kind == "bytes":
                row.gbps = amount / (row.ms * 1e-3) / 1e9
            else:
                row.tflops = amount / (row.ms * 1e-3) / 1e12
        err = "-" if row.max_abs_err is None else f"{row.max_abs_err:.2e}"
        extra = "-" if row.extra_mib is None else f"{row.extra_mib:9.1f}"
        print(f"  {method:58s} {row.ms:9.3f} ms  extra {extra} MiB  err {err}", flush=True)
        return self.recorder.add(row)

    def missing(self, method: str, exc: BaseException) -> None:
        self.recorder.add(
            Row(self.case, method, error=f"not available: {type(exc).__name__}: {exc}"[:300])
        )


def load_peer(module: str, attr: str, relative_file: str):
    """``module.attr``; if the package's ``__init__`` fails to import (a dependency the GPU image
    lacks), load the one self-contained file that defines ``attr`` from the package folder."""
    import importlib
    import importlib.util

    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as first:
        top = module.split(".")[0]
        for folder in map(Path, sys.path):
            path = folder / top / relative_file
            if path.is_file():
                spec = importlib.util.spec_from_file_location(f"_cme_peer_{top}_{attr}", path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                return getattr(mod, attr)
        raise first


def ref_logits(logits, targets, chunk: int = 512):
    """float64 log softmax(logits)[target], a few rows at a time."""
    from cme_rewards.ops.reference import reference_token_logprobs

    return torch.cat(
        [
            reference_token_logprobs(logits[s : s + chunk], targets[s : s + chunk])
            for s in range(0, logits.shape[0], chunk)
        ]
    )


def _gather_minus_lse(logits, targets):
    x = logits.float()
    return x.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)


def bench_logits(bench: Bench, n: int, vocab: int, dtype: torch.dtype) -> None:
    from cme_rewards.ops.triton_logits import triton_token_logprobs

    device = bench.device
    gen = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, vocab, device=device, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=device, generator=gen)
    ref = ref_logits(logits, targets)
    read = n * vocab * logits.element_size()
    work = ("bytes", read)
    full = bench.run(
        "ours: triton_token_logprobs",
        lambda: triton_token_logprobs(logits, targets),
        ref,
        work=work,
    )
    # prompt halves: rows (i mod 512) < 256 are masked, a typical prompt/response split
    keep = (
        (torch.arange(n, device=device) % 512) >= 256
        if n >= 512
        else torch.arange(n, device=device) % 2 == 1
    )
    ref_masked = torch.where(keep, ref, torch.zeros_like(ref))
    masked = bench.run(
        "ours: half the rows masked",
        lambda: triton_token_logprobs(logits, targets, mask=keep),
        ref_masked,
        work=("bytes", read * keep.float().mean().item()),
        note="GB/s over the scored rows",
    )
    if masked.ms and full.ms:
        masked.extra["time_vs_all_rows"] = masked.ms / full.ms  # goal: about 0.5
        bench.recorder.flush()
    dst = torch.empty_like(logits)
    bench.run(
        "device copy of the same bytes (bandwidth limit)",
        lambda: dst.copy_(logits),
        None,
        work=("bytes", 2 * read),
        note="GB/s = bytes read + written",
    )
    bench.run(
        "log_softmax(logits.float()).gather",
        lambda: torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1),
        ref,
        work=work,
    )
    try:
        liger = load_peer(
            "liger_kernel.ops.grpo_loss", "fused_selective_log_softmax", "ops/grpo_loss.py"
        )
        # Liger scores row l of logits [B, L+1, V] against input_ids[:, l+1]: feed N rows and ids
        # shifted by one; it then scores rows 0..N-2.
        ids = torch.cat([targets[:1], targets[:-1]])[None]
        bench.run(
            "Liger fused_selective_log_softmax",
            lambda: liger(logits[None], ids, temperature=1.0)[0],
            ref,
            rows_used=slice(0, n - 1),
            work=work,
            note="scores N-1 rows (shifted layout)",
        )
    except Exception as exc:
        bench.missing("Liger fused_selective_log_softmax", exc)
    try:
        trl_fn = load_peer(
            "trl.kernels", "selective_log_softmax_and_entropy", "kernels/logprob_entropy.py"
        )
        bench.run(
            "TRL selective_log_softmax_and_entropy",
            lambda: trl_fn(logits, targets, 1.0, None)[0],
            ref,
            work=work,
            note="also computes the entropy",
        )
    except Exception as exc:
        bench.missing("TRL selective_log_softmax_and_entropy", exc)
    if device.type == "cuda":  # inductor's CPU build needs minutes on a small machine
        compiled = torch.compile(_gather_minus_lse, dynamic=False)
        bench.run(
            "torch.compile gather - logsumexp (fp32)",
            lambda: compiled(logits, targets),
            ref,
            work=work,
        )


def bench_hidden(bench: Bench, n: int, dim: int, vocab: int, dtype: torch.dtype, pointer: bool):
    from cme_rewards.ops.reference import reference_linear_token_logprobs
    from cme_rewards.ops.triton_linear import triton_linear_token_logprobs

    device = bench.device
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, dim, device=device, generator=gen).to(dtype)
    weight = (torch.randn(vocab, dim, device=device, generator=gen) * (2.0 / dim**0.5)).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=device, generator=gen)
    ref = reference_linear_token_logprobs(hidden, weight, targets)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    work = ("flops", 2.0 * n * dim * vocab)
    matmul = bench.run(
        "bare cuBLAS matmul hidden @ weight.T (bf16 out)",
        lambda: hidden @ weight.T,
        None,
        work=work,
    )
    methods = [("ours: triton_linear_token_logprobs (TMA auto)", "auto")]
    if pointer:
        methods.append(("ours: triton_linear_token_logprobs (pointer loads)", "0"))
    for method, tma in methods:
        os.environ["CME_TRITON_TMA"] = tma
        bench.run(
            method, lambda: triton_linear_token_logprobs(hidden, weight, targets), ref, work=work
        )
    os.environ.pop("CME_TRITON_TMA", None)
    try:
        cce = load_peer("cut_cross_entropy", "linear_cross_entropy", "linear_cross_entropy.py")
        bench.run(
            "cut-cross-entropy linear_cross_entropy",
            lambda: -cce(hidden, weight, targets, reduction="none"),
            ref,
            work=work,
            note="reduction none, negated",
        )
    except Exception as exc:
        bench.missing("cut-cross-entropy linear_cross_entropy", exc)
    try:
        chunked = load_peer("trl.kernels", "ChunkedLogProbFunction", "kernels/chunked_logprob.py")
        bench.run(
            "TRL ChunkedLogProbFunction",
            lambda: chunked.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, ())[0],
            ref,
            work=work,
            note="cuBLAS tiles + Triton fold",
        )
    except Exception as exc:
        bench.missing("TRL ChunkedLogProbFunction", exc)
    if device.type == "cuda":
        compiled = torch.compile(_gather_minus_lse, dynamic=False)
        bench.run(
            "matmul + torch.compile gather - logsumexp",
            lambda: compiled(hidden @ weight.T, targets),
            ref,
            work=work,
        )
    if matmul.ms:
        for row in bench.recorder.new_rows:
            if row.case == bench.case and row.ms:
                row.ratio_to_matmul = row.ms / matmul.ms
        bench.recorder.flush()


def _compare(value, op: str, limit: float) -> bool:
    return value >= limit if op == ">=" else value < limit if op == "<" else value <= limit


def check_targets(all_rows: list[dict], case: str) -> dict:
    """Our rows of ``case`` against issue 13's targets (ratios within this run)."""
    rows = [r for r in all_rows if r["case"] == case and r["ms"] is not None]
    ours = next((r for r in rows if r["method"].startswith(OURS)), None)
    measured: dict[str, float] = {}
    if ours is not None:
        measured["max_abs_err"] = ours["max_abs_err"]
        if ours["extra_mib"] is not None:
            measured["extra_mib"] = ours["extra_mib"]
        if ours["ratio_to_matmul"] is not None:
            measured["ratio_to_matmul"] = ours["ratio_to_matmul"]
        peers = [
            r["ms"]
            for r in rows
            if not r["method"].startswith(OURS)
            and not r["method"].startswith(("device copy", "bare cuBLAS"))
        ]
        if peers and case.startswith("logits"):
            measured["speedup_vs_fastest_peer"] = min(peers) / ours["ms"]
        copy = next((r for r in rows if r["method"].startswith("device copy")), None)
        if copy and ours["gbps"]:
            measured["fraction_of_copy_bandwidth"] = ours["gbps"] / copy["gbps"]
        masked = next((r for r in rows if r["method"] == "ours: half the rows masked"), None)
        if masked and masked["extra"].get("time_vs_all_rows") is not None:
            measured["half_masked_time_ratio"] = masked["extra"]["time_vs_all_rows"]
    targets = TARGETS["logits" if case.startswith("logits") else case]
    checks = {
        name: {
            "value": measured.get(name),
            "limit": f"{op} {limit}",
            "met": None if measured.get(name) is None else _compare(measured[name], op, limit),
        }
        for name, (op, limit) in targets.items()
    }
    return {"case": case, "method": ours["method"] if ours else None, "checks": checks}


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
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="default: all")
    parser.add_argument("--quick", action="store_true", help="N / 8: a smoke run")
    parser.add_argument("--dry", action="store_true", help="tiny shapes on CPU (interpreter)")
    parser.add_argument("--pointer", action="store_true", help="also time pointer loads (no TMA)")
    parser.add_argument("--time-limit", type=float, default=1e9, help="seconds per case")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    opts = parser.parse_args(argv)
    if not opts.dry and not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU (or --dry)", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cpu" if opts.dry else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_grad_enabled(False)
    gpu = "cpu-dry" if opts.dry else torch.cuda.get_device_name()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    suffix = "_quick" if opts.quick else ""
    path = Path(opts.out) / f"kernels_{slug}{suffix}.json"
    cases = opts.case or list(CASES)
    header = {
        "gpu": gpu,
        "capability": [] if opts.dry else list(torch.cuda.get_device_capability()),
        "gpu_memory_gib": None
        if opts.dry
        else round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "peers": peer_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": opts.quick,
        "dry": opts.dry,
        "dtype": "bfloat16",
        "target_source": "issue 13 (ratios within one run)",
    }
    recorder = Recorder(path, header, set(cases))
    for case in cases:
        kind, n, dim, vocab = CASES[case]
        if opts.dry:
            n, dim, vocab = DRY_SHAPES[case]
        elif opts.quick:
            n //= 8
        print(f"{case}: N={n} H={dim} V={vocab} bf16", flush=True)
        bench = Bench(recorder, case, device, time.monotonic() + opts.time_limit)
        if kind == "logits":
            bench_logits(bench, n, vocab, torch.bfloat16)
        else:
            bench_hidden(bench, n, dim, vocab, torch.bfloat16, opts.pointer)
        recorder.targets = [t for t in recorder.targets if t["case"] != case]
        recorder.targets.append(check_targets(recorder.rows(), case))
        recorder.flush()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
