"""Load test of ``cme-rewards serve`` on 127.0.0.1: micro-batching against batch size 1, same run.

Two servers run side by side (same verifier, same options; one with ``--max-batch-size 1``). For
each round, each server in turn gets ``--clients`` concurrent clients sending one-sample OpenRLHF
``/get_reward`` requests (templated prompt + response + EOS, raw instruction as the label, as the
recipe says) for ``--duration`` seconds. Every answer is checked against its own request: the reward
must equal the sample's CME computed beforehand by ``CMEScorer`` (within 1e-4 nats), else it counts as
misattributed. Samples: AlpacaEval instructions with two models' answers (tests/data), answers cut to
``--max-chars`` characters. Writes ``benchmarks/results/server_<device>.json`` and a plot.

    python benchmarks/bench_server.py [--clients 64] [--duration 30] [--rounds 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
DATA = REPO / "tests" / "data" / "winrate" / "claude-2.1_first40.annotations.json"
TOLERANCE = 1e-4  # nats


def load_samples(max_chars: int) -> list[tuple[str, str]]:
    """(instruction, response) pairs: both answers of each AlpacaEval record, cut to ``max_chars``."""
    records = json.loads(DATA.read_text())
    pairs = []
    for rec in records:
        for key in ("output_1", "output_2"):
            text = rec[key].strip()[:max_chars]
            if text:
                pairs.append((rec["instruction"], text))
    return pairs


def start_server(port: int, device: str, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cme_rewards.server.cli", "--port", str(port), "--device", device]
    cmd += ["--policy-tokenizer", "smollm2-135m-instruct", "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server {url} did not start")


async def load(
    url: str, payloads: list[dict], expected: list[float], clients: int, duration: float
) -> dict:
    """``clients`` coroutines post one sample at a time for ``duration`` s; every answer is checked."""
    latencies: list[float] = []
    done = failed = wrong = 0
    errors: dict[str, int] = {}
    start = time.monotonic()
    deadline = start + duration
    last = start

    async def client(k: int) -> None:
        nonlocal done, failed, wrong, last
        i = (k * 7) % len(payloads)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as session:
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    async with session.post(url + "/get_reward", json=payloads[i]) as resp:
                        body = await resp.json() if resp.status == 200 else None
                        status = resp.status
                except Exception as exc:  # counted, never hidden
                    body, status = None, type(exc).__name__
                t1 = time.monotonic()
                last = max(last, t1)
                if body is None:
                    failed += 1
                    errors[str(status)] = errors.get(str(status), 0) + 1
                elif abs(body["rewards"][0] - expected[i]) > TOLERANCE:
                    wrong += 1
                else:
                    done += 1
                    latencies.append(t1 - t0)
                i = (i + 1) % len(payloads)

    await asyncio.gather(*(client(k) for k in range(clients)))
    latencies.sort()
    return {
        "seconds": last - start,
        "completed": done,
        "failed": failed,
        "misattributed": wrong,
        "errors": errors,
        "requests_per_s": done / (last - start),
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
        if latencies
        else None,
        "latencies": latencies,
    }


def server_metrics(url: str) -> dict:
    return httpx.get(url + "/metrics", timeout=10).json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per server per round")
    ap.add_argument(
        "--rounds", type=int, default=2, help="alternate the two servers this many times"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-chars", type=int, default=200, help="response length cap (characters)")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="server option (s)")
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from machine import describe_machine

    from cme_rewards import CMEScorer
    from cme_rewards.server.background import free_port

    samples = load_samples(args.max_chars)
    scorer = CMEScorer("smollm2-135m-instruct", device=args.device)
    tok = scorer.tokenizer
    expected = [r.cme for r in scorer.score([p for p, _ in samples], [r for _, r in samples])]
    payloads = []
    for instruction, response in samples:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
        )
        payloads.append(
            {
                "query": [prompt + response + "<|im_end|>"],
                "prompts": [prompt],
                "labels": [instruction],
            }
        )
    n_tokens = [scorer.encode(p, r).n_scored for p, r in samples]
    del scorer

    configs = {
        "batch_size_1": ["--max-batch-size", "1"],
        "micro_batched": [
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-wait-ms",
            str(args.max_wait_ms),
        ],
    }
    procs, urls = {}, {}
    load_before = os.getloadavg()
    try:
        for name, extra in configs.items():
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            procs[name] = start_server(
                port, args.device, [*extra, "--request-timeout", str(args.request_timeout)]
            )
        for name in configs:
            wait_ready(urls[name], procs[name])
            asyncio.run(load(urls[name], payloads, expected, 8, 3.0))  # warm-up, not counted
        runs: dict[str, list[dict]] = {name: [] for name in configs}
        for r in range(args.rounds):
            for name in configs:
                before = server_metrics(urls[name])
                result = asyncio.run(
                    load(urls[name], payloads, expected, args.clients, args.duration)
                )
                after = server_metrics(urls[name])
                batches = after["batches"] - before["batches"]
                result["mean_batch_size"] = (
                    (after["samples"] - before["samples"]) / batches if batches else 0.0
                )
                result["max_batch_size"] = after["batch_size_max"]
                result["round"] = r
                runs[name].append(result)
                print(
                    f"round {r} {name:>14}: {result['requests_per_s']:.2f} req/s, p50 {result['latency_p50_s']:.2f} s, "
                    f"p99 {result['latency_p99_s']:.2f} s, mean batch {result['mean_batch_size']:.1f}, "
                    f"failed {result['failed']}, misattributed {result['misattributed']}",
                    flush=True,
                )
        final_metrics = {name: server_metrics(urls[name]) for name in configs}
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(60)

    summary = {}
    for name, rs in runs.items():
        lat = sorted(x for run in rs for x in run["latencies"])
        total = sum(run["completed"] for run in rs)
        summary[name] = {
            "requests_per_s": total / sum(run["seconds"] for run in rs),
            "completed": total,
            "failed": sum(run["failed"] for run in rs),
            "misattributed": sum(run["misattributed"] for run in rs),
            "latency_p50_s": statistics.median(lat) if lat else None,
            "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
            "mean_batch_size": statistics.fmean(run["mean_batch_size"] for run in rs),
        }
    speedup = summary["micro_batched"]["requests_per_s"] / max(
        summary["batch_size_1"]["requests_per_s"], 1e-9
    )
    result = {
        "benchmark": "server micro-batching vs batch size 1 (OpenRLHF /get_reward, one sample per request)",
        "machine": describe_machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": "the 2 cores are shared with other jobs: load averages above show the contention",
        "verifier": "smollm2-135m-instruct",
        "device": args.device,
        "clients": args.clients,
        "duration_s_per_run": args.duration,
        "measurement": "closed loop: each client sends its next request when the last is answered; "
        "new requests stop after the duration, in-flight ones are awaited; throughput = completed / "
        "(last answer - start)",
        "rounds": args.rounds,
        "samples": len(samples),
        "scored_tokens_per_sample_mean": statistics.fmean(n_tokens),
        "tolerance_nats": TOLERANCE,
        "summary": summary,
        "speedup_requests_per_s": speedup,
        "target_speedup": 5.0 if args.device.startswith("cuda") else 1.3,
        "runs": {
            name: [{k: v for k, v in run.items() if k != "latencies"} for run in rs]
            for name, rs in runs.items()
        },
        "server_metrics_final": final_metrics,
    }
    out = args.out or REPO / "benchmarks" / "results" / f"server_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(out)
    plot(runs, summary, speedup, out.with_suffix(".png"))
    print(f"speedup {speedup:.2f}x (target {result['target_speedup']}x); wrote {out}")


def plot(runs: dict, summary: dict, speedup: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(summary)
    ax1.bar(names, [summary[n]["requests_per_s"] for n in names], color=["grey", "tab:blue"])
    ax1.set_ylabel("requests / s (one sample each)")
    ax1.set_title(f"throughput: {speedup:.2f}x with micro-batching")
    for n in names:
        lat = sorted(x for run in runs[n] for x in run["latencies"])
        if lat:
            ax2.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=n)
    ax2.set_xlabel("latency (s)")
    ax2.set_ylabel("fraction of requests")
    ax2.set_title("latency CDF")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
