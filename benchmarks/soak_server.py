"""Soak test of ``cme-rewards serve`` under hostile traffic, on the embedded SmolLM2 verifier.

``--clients`` concurrent clients send requests for ``--duration`` seconds (closed loop: each sends
its next request when the last one is answered). Nine requests in ten are valid: OpenRLHF
``/get_reward`` with one sample (templated prompt + response + EOS, raw instruction as the label),
or a native ``/score`` of four samples with ids. Every answer is checked against its own request:
each reward must equal that sample's CME computed beforehand by ``CMEScorer`` (within 1e-4 nats),
else it is misattributed; a valid request that ends without its rewards (after retrying 503s five
times, as OpenRLHF does) is lost. The tenth request is, in turn, malformed (broken JSON, a bad
field), oversized (a body over ``--max-body-bytes``, or more samples than ``--max-samples``),
unauthenticated (no token, or a wrong one) or abandoned mid-flight (the client sends a valid
request and hangs up before the answer). Meanwhile ``/health`` is polled every 100 ms.

Figures: valid requests answered, lost and misattributed rewards (must be 0), hostile requests
and the status each got, ``/health`` latency p50/p99 (target p99 < 1 s), queue depth at the end
(must be 0), samples computed for abandoned requests, the server's resident memory growth from
after warm-up to the end (target < 50 MB), and its log lines at ERROR or above. Writes
``benchmarks/results/soak_<device>.json`` (with the machine and its load average) and a plot.

    python benchmarks/soak_server.py [--clients 64] [--duration 60] [--device cpu]

``tests/test_hardening_soak.py`` runs :func:`soak` for a few seconds against an in-process server
and asserts the counts (never the timings).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_server import load_samples, wait_ready  # noqa: E402  (the same samples and start-up)

TOLERANCE = 1e-4  # nats
HOSTILE_KINDS = ("malformed", "oversized", "unauthenticated", "abandoned")
EXPECTED_STATUS = {"malformed": {400, 422}, "oversized": {413}, "unauthenticated": {401}}
SCORE_BATCH = 4  # samples per native /score request


@dataclass
class Workload:
    """Valid samples (instruction, response), their OpenRLHF payloads and expected rewards."""

    samples: list[tuple[str, str]]
    payloads: list[dict[str, Any]]
    expected: list[float]


def make_workload(scorer: Any, max_chars: int = 200, limit: int | None = None) -> Workload:
    """Payloads as OpenRLHF sends them for a SmolLM2 policy, with rewards from ``scorer``."""
    samples = load_samples(max_chars)[:limit]
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
    return Workload(samples, payloads, expected)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` in [0, 100] (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered))) - 1))]


@dataclass
class Tally:
    """What the clients saw."""

    valid_sent: int = 0
    valid_answered: int = 0
    lost: int = 0
    misattributed: int = 0
    retries_503: int = 0
    rewards_checked: int = 0
    hostile: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HOSTILE_KINDS, 0))
    hostile_status: dict[str, dict[str, int]] = field(
        default_factory=lambda: {k: {} for k in HOSTILE_KINDS}
    )
    unexpected: list[str] = field(default_factory=list)  # hostile answers outside expectations
    latencies: list[float] = field(default_factory=list)  # valid requests, seconds
    health: list[tuple[float, float, int]] = field(default_factory=list)  # (t, seconds, status)


async def soak(
    url: str,
    token: str,
    workload: Workload,
    *,
    clients: int = 64,
    duration: float = 60.0,
    hostile_every: int = 10,
    max_body_bytes: int = 1 << 20,
    max_samples: int = 64,
    health_interval: float = 0.1,
    seed: int = 0,
    server_pid: int | None = None,
) -> dict[str, Any]:
    """Run the traffic against a server at ``url`` (which requires ``token``); returns the tally.

    New requests stop after ``duration`` seconds; requests in flight are awaited; then the queue
    is given up to 10 s to drain (it should already be empty). With ``server_pid``, the server's
    resident memory is sampled every second.
    """
    tally = Tally()
    rng = random.Random(seed)
    auth = {"Authorization": f"Bearer {token}"}
    host, port = url.removeprefix("http://").rsplit(":", 1)
    counter = 0
    start = time.monotonic()
    deadline = start + duration
    stop_health = asyncio.Event()

    def next_kind() -> str:
        nonlocal counter
        n, counter = counter, counter + 1
        if n % hostile_every == hostile_every - 1:
            return HOSTILE_KINDS[(n // hostile_every) % len(HOSTILE_KINDS)]
        return "score" if n % 5 == 2 else "get_reward"

    async def post_valid(session: aiohttp.ClientSession, path: str, body: dict) -> Any:
        """POST with OpenRLHF's retry policy (503 -> wait ``Retry-After``, five tries)."""
        for attempt in range(5):
            try:
                async with session.post(url + path, json=body, headers=auth) as resp:
                    if resp.status == 503 and attempt < 4:
                        tally.retries_503 += 1
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                        continue
                    return await resp.json() if resp.status == 200 else None
            except (aiohttp.ClientError, asyncio.TimeoutError):
                if attempt == 4:
                    return None
        return None

    async def valid(session: aiohttp.ClientSession, kind: str) -> None:
        tally.valid_sent += 1
        t0 = time.monotonic()
        if kind == "get_reward":
            i = rng.randrange(len(workload.payloads))
            reply = await post_valid(session, "/get_reward", workload.payloads[i])
            ok = reply is not None and len(reply.get("rewards") or []) == 1
            got = [(reply["rewards"][0], i)] if ok else []
        else:
            picks = rng.sample(range(len(workload.samples)), SCORE_BATCH)
            body = {
                "samples": [
                    {
                        "prompt": workload.samples[i][0],
                        "response": workload.samples[i][1],
                        "id": f"s{i}",
                    }
                    for i in picks
                ]
            }
            reply = await post_valid(session, "/score", body)
            results = (reply or {}).get("results") or []
            ok = len(results) == SCORE_BATCH
            got = []
            for res, i in zip(results, picks, strict=False):
                if res.get("id") != f"s{i}":
                    tally.misattributed += 1
                got.append((res.get("cme"), i))
        if not ok:
            tally.lost += 1
            return
        tally.valid_answered += 1
        tally.latencies.append(time.monotonic() - t0)
        for value, i in got:
            tally.rewards_checked += 1
            if not isinstance(value, float) or abs(value - workload.expected[i]) > TOLERANCE:
                tally.misattributed += 1

    async def hostile(session: aiohttp.ClientSession, kind: str) -> None:
        tally.hostile[kind] += 1
        payload = workload.payloads[rng.randrange(len(workload.payloads))]
        if kind == "abandoned":
            await abandon(payload)
            return
        if kind == "malformed":
            bad = [
                b'{"query": ["x"',
                b'{"prompts": ["a"]}',
                b'{"query": "not a list", "prompts": []}',
            ]
            data, path, headers = rng.choice(bad), "/get_reward", auth
        elif kind == "oversized":
            if rng.random() < 0.5:
                data = json.dumps({**payload, "labels": ["x" * (max_body_bytes + 1)]}).encode()
            else:
                data = json.dumps({k: v * (max_samples + 1) for k, v in payload.items()}).encode()
            path, headers = "/get_reward", auth
        else:  # unauthenticated
            data, path = (
                json.dumps(payload).encode(),
                rng.choice(["/get_reward", "/score", "/metrics"]),
            )
            headers = rng.choice([{}, {"Authorization": "Bearer wrong"}])
        try:
            async with session.post(
                url + path, data=data, headers={**headers, "content-type": "application/json"}
            ) as resp:
                status = str(resp.status)
                await resp.read()
        except aiohttp.ClientError as exc:  # the server may close a connection it refused
            status = type(exc).__name__
        counts = tally.hostile_status[kind]
        counts[status] = counts.get(status, 0) + 1
        expected = EXPECTED_STATUS[kind]
        if not (status.isdigit() and int(status) in expected) and not (
            kind == "oversized" and not status.isdigit()
        ):
            tally.unexpected.append(f"{kind} -> {status}")

    async def abandon(payload: dict) -> None:
        """Send a whole valid request, then hang up before the answer."""
        body = json.dumps(payload).encode()
        head = (
            f"POST /get_reward?token={token} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError as exc:
            tally.unexpected.append(f"abandoned -> {type(exc).__name__}")
            return
        writer.write(head + body)
        await writer.drain()
        await asyncio.sleep(rng.uniform(0.0, 0.5))
        writer.close()
        counts = tally.hostile_status["abandoned"]
        counts["hung up"] = counts.get("hung up", 0) + 1

    async def client() -> None:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while time.monotonic() < deadline:
                kind = next_kind()
                if kind in HOSTILE_KINDS:
                    await hostile(session, kind)
                else:
                    await valid(session, kind)

    async def health() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            while not stop_health.is_set():
                t0 = time.monotonic()
                try:
                    async with session.get(url + "/health") as resp:
                        await resp.read()
                        status = resp.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status = 0
                tally.health.append((t0 - start, time.monotonic() - t0, status))
                await asyncio.sleep(health_interval)

    rss_trace: list[tuple[float, float]] = []

    async def memory() -> None:
        while server_pid is not None and not stop_health.is_set():
            rss_trace.append((round(time.monotonic() - start, 1), round(rss_mib(server_pid), 1)))
            await asyncio.sleep(1.0)

    poller = asyncio.create_task(health())
    sampler = asyncio.create_task(memory())
    await asyncio.gather(*(client() for _ in range(clients)))
    finished = time.monotonic()
    stop_health.set()
    await poller
    await sampler
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def metrics() -> dict:
            async with session.get(url + "/metrics", headers=auth) as resp:
                return await resp.json()

        snap = await metrics()
        depth_immediate = snap["queue_depth"]
        settle = time.monotonic() + 10
        while snap["queue_depth"] and time.monotonic() < settle:
            await asyncio.sleep(0.1)
            snap = await metrics()
    health_s = [s for _, s, _ in tally.health]
    batch_samples = round(snap["batch_size_mean"] * snap["batches"])
    answered_samples = snap["samples"] - snap["samples_floor"]
    return {
        "clients": clients,
        "duration_s": duration,
        "hostile_every": hostile_every,
        "wall_s": finished - start,
        "valid_sent": tally.valid_sent,
        "valid_answered": tally.valid_answered,
        "valid_per_s": tally.valid_answered / (finished - start),
        "lost": tally.lost,
        "misattributed": tally.misattributed,
        "rewards_checked": tally.rewards_checked,
        "retries_503": tally.retries_503,
        "latency_p50_s": percentile(tally.latencies, 50),
        "latency_p99_s": percentile(tally.latencies, 99),
        "hostile": tally.hostile,
        "hostile_status": tally.hostile_status,
        "hostile_unexpected": tally.unexpected,
        "health_polls": len(health_s),
        "health_failed": sum(1 for _, _, status in tally.health if status != 200),
        "health_p50_s": percentile(health_s, 50),
        "health_p99_s": percentile(health_s, 99),
        "health_max_s": max(health_s, default=None),
        "queue_depth_immediate": depth_immediate,
        "queue_depth_end": snap["queue_depth"],
        "samples_computed_for_nobody": batch_samples - answered_samples,
        "server_metrics_end": snap,
        "health_trace": [(round(t, 3), round(s, 4), st) for t, s, st in tally.health],
        "rss_trace_mib": rss_trace,
        "latencies": tally.latencies,
    }


# -- the standalone benchmark ---------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` (MiB), from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def trend_per_minute(trace: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) samples, in MiB per minute."""
    if len(trace) < 2:
        return None
    n = len(trace)
    mt = sum(t for t, _ in trace) / n
    mm = sum(m for _, m in trace) / n
    var = sum((t - mt) ** 2 for t, _ in trace)
    return 60 * sum((t - mt) * (m - mm) for t, m in trace) / var if var else None


def start_server(port: int, token: str, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cme_rewards.server.cli", "--port", str(port)]
    cmd += ["--device", args.device, "--dtype", args.dtype, "--token", token]
    cmd += ["--policy-tokenizer", "smollm2-135m-instruct", "--log-level", "warning"]
    cmd += ["--max-body-bytes", str(args.max_body_bytes), "--max-samples", str(args.max_samples)]
    cmd += ["--max-wait-ms", str(args.max_wait_ms), "--request-timeout", str(args.request_timeout)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32: rewards comparable to 1e-4")
    ap.add_argument("--max-chars", type=int, default=200, help="response length cap (characters)")
    ap.add_argument("--max-body-bytes", type=int, default=1 << 20)
    ap.add_argument("--max-samples", type=int, default=64)
    ap.add_argument("--max-wait-ms", type=float, default=20.0)
    ap.add_argument("--request-timeout", type=float, default=170.0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from machine import describe_machine

    from cme_rewards import CMEScorer
    from cme_rewards.server.background import free_port

    scorer = CMEScorer("smollm2-135m-instruct", device=args.device, dtype=args.dtype)
    workload = make_workload(scorer, args.max_chars)
    del scorer
    token = "soak-" + os.urandom(8).hex()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = args.out or REPO / "benchmarks" / "results" / f"soak_{args.device.split(':')[0]}.json"
    log = out.with_suffix(".server.log")
    load_before = os.getloadavg()
    proc = start_server(port, token, args, log)
    try:
        wait_ready(url, proc)
        # Warm-up (not counted) at full concurrency: every code path once, and the largest
        # batches once, so the allocator holds their working set before memory is measured.
        warm = asyncio.run(
            soak(url, token, workload, clients=args.clients, duration=5.0, hostile_every=2, seed=1)
        )
        time.sleep(5.0)  # idle: memory is read between batches, as at the end
        rss_before = rss_mib(proc.pid)
        result = asyncio.run(
            soak(
                url,
                token,
                workload,
                clients=args.clients,
                duration=args.duration,
                max_body_bytes=args.max_body_bytes,
                max_samples=args.max_samples,
                server_pid=proc.pid,
            )
        )
        time.sleep(5.0)
        rss_after = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(120)
    log_text = log.read_text(errors="replace")
    log.unlink()
    error_lines = [
        line for line in log_text.splitlines() if " ERROR " in line or "Traceback" in line
    ]
    latencies, trace = result.pop("latencies"), result.pop("health_trace")
    rss_trace = result.pop("rss_trace_mib")
    document = {
        "benchmark": "soak: hostile traffic against cme-rewards serve (1 request in "
        f"{result['hostile_every']} malformed, oversized, unauthenticated or abandoned)",
        "machine": describe_machine(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "note": "the 2 cores are shared with other jobs: the load averages show the contention; "
        "latencies scale with it, counts do not",
        "verifier": "smollm2-135m-instruct",
        "device": args.device,
        "dtype": args.dtype,
        "server_options": {
            "max_body_bytes": args.max_body_bytes,
            "max_samples": args.max_samples,
            "max_wait_ms": args.max_wait_ms,
            "request_timeout_s": args.request_timeout,
        },
        "samples": len(workload.samples),
        "tolerance_nats": TOLERANCE,
        "warm_up": {k: warm[k] for k in ("valid_answered", "lost", "misattributed")},
        "result": result,
        "rss_mib_after_warm_up": rss_before,
        "rss_mib_end": rss_after,
        "rss_mib_min_during": min((m for _, m in rss_trace), default=None),
        "rss_mib_max_during": max((m for _, m in rss_trace), default=None),
        "rss_growth_mib": rss_after - rss_before,
        "rss_trend_mib_per_min": trend_per_minute(rss_trace),
        "rss_trace_mib": rss_trace,
        "memory_note": "the warm-up runs the same number of clients for 5 s (then its requests in "
        "flight finish), so the largest batches have run once; memory is read 5 s after the "
        "warm-up and 5 s after the soak, both idle; rss_trend is the least-squares slope of the "
        "trace sampled every second (a batch's activations come and go within it)",
        "server_error_log_lines": error_lines[:20],
        "server_error_log_count": len(error_lines),
        "targets": {
            "lost": 0,
            "misattributed": 0,
            "queue_depth_end": 0,
            "health_p99_s": 1.0,
            "rss_growth_mib": 50,
        },
        "met": {
            "lost": result["lost"] == 0,
            "misattributed": result["misattributed"] == 0,
            "queue_depth_end": result["queue_depth_end"] == 0,
            "health_p99_s": result["health_p99_s"] is not None and result["health_p99_s"] < 1.0,
            "rss_growth_mib": rss_after - rss_before < 50,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2))
    tmp.replace(out)
    plot(trace, latencies, document, out.with_suffix(".png"))
    r = result
    print(
        f"valid answered {r['valid_answered']}/{r['valid_sent']}, lost {r['lost']}, "
        f"misattributed {r['misattributed']}, hostile {r['hostile']}, "
        f"health p50 {r['health_p50_s']:.3f} s p99 {r['health_p99_s']:.3f} s, "
        f"queue at end {r['queue_depth_end']}, RSS growth {rss_after - rss_before:.1f} MiB; "
        f"wrote {out}"
    )


def plot(trace: list, latencies: list[float], document: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
    ax1.plot([t for t, _, _ in trace], [s * 1000 for _, s, _ in trace], lw=0.8)
    ax1.axhline(1000, color="red", ls="--", lw=0.8, label="target p99 (1 s)")
    ax1.set_yscale("log")
    ax1.set_xlabel("time since start (s)")
    ax1.set_ylabel("/health latency (ms)")
    r = document["result"]
    ax1.set_title(f"/health during the soak: p50 {r['health_p50_s'] * 1000:.0f} ms, "
                  f"p99 {r['health_p99_s'] * 1000:.0f} ms")  # fmt: skip
    ax1.legend()
    lat = sorted(latencies)
    ax2.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))])
    ax2.set_xlabel("valid request latency (s)")
    ax2.set_ylabel("fraction of requests")
    ax2.set_title(f"{r['valid_answered']} valid answered, {r['lost']} lost, "
                  f"{r['misattributed']} misattributed")  # fmt: skip
    rss = document["rss_trace_mib"]
    ax3.plot([t for t, _ in rss], [m for _, m in rss])
    ax3.axhline(document["rss_mib_after_warm_up"], color="grey", ls=":", label="after warm-up")
    ax3.set_xlabel("time since start (s)")
    ax3.set_ylabel("server resident memory (MiB)")
    ax3.set_title(f"memory: {document['rss_growth_mib']:+.0f} MiB over the soak")
    ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
