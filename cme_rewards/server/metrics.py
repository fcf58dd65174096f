"""Counters behind ``GET /metrics``: requests, samples, tokens/s, queue depth, batch sizes, errors."""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from typing import Any

from cme_rewards.batching import BatchStats

OTHER_PATHS = "other"
"""The ``requests`` key of every path the server does not serve."""

CLIENT_CLOSED = 499
"""Status recorded for a request whose client hung up before it was answered (as nginx does)."""

ERROR_KINDS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "too_large",
    422: "invalid",
    CLIENT_CLOSED: "client_closed",
    500: "internal",
    503: "unavailable",
}
"""``errors`` key of each status code (others count under the code itself)."""


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` in [0, 100] of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = min(len(sorted_values), max(1, math.ceil(q / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


class Metrics:
    """Thread-safe server counters; rates over the last ``window_s`` seconds and since start."""

    def __init__(
        self, window_s: float = 60.0, latency_samples: int = 4096, routes: tuple[str, ...] = ()
    ) -> None:
        self.window_s = window_s
        self.routes = frozenset(routes)
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # by route; unknown paths under OTHER_PATHS
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.samples = 0
        self.samples_floor = 0
        self.prompt_sources: Counter[str] = Counter()
        self.batches = 0
        self.batch_samples = 0
        self.batch_size_hist: Counter[int] = Counter()  # upper power-of-two bucket -> batches
        self.max_batch_size = 0
        self.tokens = 0  # verifier tokens (prompt + response) through the verifier
        self.busy_seconds = 0.0
        self._recent: deque[tuple[float, int, int]] = deque()  # (time, tokens, samples)
        self._latency: deque[float] = deque(maxlen=latency_samples)

    def record_batch(self, stats: BatchStats) -> None:
        """One verifier batch ran (called by the batcher)."""
        now = time.monotonic()
        with self._lock:
            self.batches += 1
            self.batch_samples += stats.size
            self.batch_size_hist[1 << (stats.size - 1).bit_length()] += 1
            self.max_batch_size = max(self.max_batch_size, stats.size)
            self.tokens += stats.tokens
            self.busy_seconds += stats.seconds
            self._recent.append((now, stats.tokens, stats.size))
            self._trim(now)

    def record_request(self, path: str, status: int, seconds: float) -> None:
        """One HTTP request finished with ``status`` after ``seconds``. Unknown paths count under
        ``OTHER_PATHS``, so a client cannot grow the tables."""
        route = path if path in self.routes else OTHER_PATHS
        with self._lock:
            self.requests[route] += 1
            self.statuses[status] += 1
            if status >= 400:
                self.errors[ERROR_KINDS.get(status, str(status))] += 1
            elif route in ("/get_reward", "/score"):
                self._latency.append(seconds)

    def record_samples(self, n: int, n_floor: int, sources: Counter[str] | None = None) -> None:
        """``n`` samples answered, ``n_floor`` of them with the floor reward."""
        with self._lock:
            self.samples += n
            self.samples_floor += n_floor
            if sources:
                self.prompt_sources.update(sources)

    def record_error(self, kind: str) -> None:
        """A named failure that is not a status code of its own (e.g. ``timeout``, ``overloaded``)."""
        with self._lock:
            self.errors[kind] += 1

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()

    def snapshot(self, queue_depth: int, busy: bool) -> dict[str, Any]:
        """All counters as JSON-ready data."""
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            uptime = now - self.started
            span = min(self.window_s, uptime) or 1e-9
            recent_tokens = sum(t for _, t, _ in self._recent)
            recent_samples = sum(s for _, _, s in self._recent)
            latency = sorted(self._latency)
            return {
                "uptime_s": uptime,
                "requests": dict(self.requests),
                "requests_total": sum(self.requests.values()),
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "errors": dict(self.errors),
                "samples": self.samples,
                "samples_floor": self.samples_floor,
                "prompt_sources": dict(self.prompt_sources),
                "queue_depth": queue_depth,
                "verifier_busy": busy,
                "tokens": self.tokens,
                "tokens_per_s": recent_tokens / span,
                "tokens_per_s_since_start": self.tokens / (uptime or 1e-9),
                "samples_per_s": recent_samples / span,
                "rate_window_s": self.window_s,
                "batches": self.batches,
                "batch_size_mean": self.batch_samples / self.batches if self.batches else 0.0,
                "batch_size_max": self.max_batch_size,
                "batch_size_hist": {f"<={k}": v for k, v in sorted(self.batch_size_hist.items())},
                "verifier_busy_s": self.busy_seconds,
                "latency_s": {
                    "n": len(latency),
                    "p50": _percentile(latency, 50),
                    "p99": _percentile(latency, 99),
                },
            }
