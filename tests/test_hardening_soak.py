"""A short soak (``benchmarks/soak_server.py``'s traffic for a few seconds) against the reward
server with the real SmolLM2 verifier: valid requests mixed with malformed, oversized,
unauthenticated and abandoned ones. Asserts the counts, never the timings: every valid request
answered with its own rewards, every hostile one refused as it should be, /health always up,
the queue empty at the end, nothing logged at ERROR."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import sys
from pathlib import Path

import pytest

from cme_rewards.batching import BatchLimits
from cme_rewards.openrlhf.protocol import PromptRecovery
from cme_rewards.server import ServerConfig, ServerOptions, create_app
from cme_rewards.server.background import BackgroundServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TOKEN = "ci-soak-token"


def soak_module():
    spec = importlib.util.spec_from_file_location(
        "soak_server", REPO / "benchmarks" / "soak_server.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def test_short_soak_loses_and_misattributes_nothing(smollm_scorer, caplog):
    soak = soak_module()
    workload = soak.make_workload(smollm_scorer, max_chars=100, limit=24)
    config = ServerConfig(
        limits=BatchLimits(max_wait_ms=20),
        server=ServerOptions(token=TOKEN, max_body_bytes=1 << 20, max_samples=64),
    )
    app = create_app(smollm_scorer, PromptRecovery(smollm_scorer.tokenizer), config)
    # One request in two is hostile, so the first eight (one per client) hold every kind.
    with caplog.at_level(logging.WARNING), BackgroundServer(app) as srv:
        r = asyncio.run(
            soak.soak(srv.url, TOKEN, workload, clients=8, duration=3.0, hostile_every=2)
        )
    assert r["valid_sent"] >= 1 and r["valid_answered"] == r["valid_sent"]
    assert r["lost"] == 0 and r["misattributed"] == 0 and r["retries_503"] == 0
    assert r["rewards_checked"] >= r["valid_answered"]
    assert all(n >= 1 for n in r["hostile"].values()), r["hostile"]
    assert r["hostile_unexpected"] == []
    assert r["health_polls"] >= 1 and r["health_failed"] == 0
    assert r["queue_depth_end"] == 0
    errors = r["server_metrics_end"]["errors"]
    assert "internal" not in errors and errors["unauthorized"] == r["hostile"]["unauthenticated"]
    assert errors.get("client_closed", 0) <= r["hostile"]["abandoned"]
    assert [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR] == []
