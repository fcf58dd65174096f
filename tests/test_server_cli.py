"""``cme-rewards serve`` as a real process: options, token from the environment, SIGTERM drains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cme_rewards.server import ServerOptions
from cme_rewards.server.background import free_port
from cme_rewards.server.cli import build_parser, main, parse_options

QUESTION = "What is the capital of France?"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-batch-size", "0"], "--max-batch-size: must be at least 1, got 0"),
        (["--request-timeout", "0"], "--request-timeout: must be greater than 0, got 0.0"),
        (["--max-samples", "5000"], "--max-samples: 5000 is more than --max-queue 4096"),
        (["--verifier", "no-such-verifier"], "--verifier: unknown verifier 'no-such-verifier'"),
        (["--device", "cuda"], "--device: 'cuda' asked for, but no CUDA device"),
        (["--floor", "inf"], "--floor: must be a finite number"),
        (["--min-tokens", "0"], "--min-tokens: must be at least 1"),
        (["--prompt-source", "x"], "--prompt-source: must be one of auto, label"),
    ],
)
def test_bad_options_fail_naming_them(capsys, flags, message):
    assert main([*flags, "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_smaller_queue_alone_bounds_the_samples_of_a_request():
    """``--max-queue 16`` needs no ``--max-samples``: the smaller limit holds (413 above it)."""
    _, limits, _, server = parse_options(build_parser().parse_args(["--max-queue", "16"]))
    assert limits.max_queue == 16 and server.max_samples == ServerOptions().max_samples
    _, _, _, server = parse_options(build_parser().parse_args(["--docs", "--token", "t"]))
    assert server.docs and server.token == "t"


@pytest.mark.slow
def test_serve_process_answers_and_drains_on_sigterm(smollm_scorer):
    prompt = smollm_scorer.tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CME_REWARDS_TOKEN": "from-env"}
    cmd = [sys.executable, "-m", "cme_rewards.server.cli", "--port", str(port), "--device", "cpu"]
    cmd += ["--dtype", "float32"]
    cmd += [
        "--policy-tokenizer",
        "smollm2-135m-instruct",
        "--max-wait-ms",
        "5000",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.25)
        headers = {"Authorization": "Bearer from-env"}
        assert httpx.get(url + "/metrics", timeout=5).status_code == 401
        answers = ["Paris.", "The capital is Paris.", "Lyon."]
        replies: dict[int, httpx.Response] = {}

        def call(i: int) -> None:
            body = {
                "query": [prompt + answers[i] + "<|im_end|>"],
                "prompts": [prompt],
                "labels": [""],
            }
            replies[i] = httpx.post(url + "/get_reward", json=body, headers=headers, timeout=60)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(answers))]
        for t in threads:
            t.start()
        queued_by = time.monotonic() + 4.0  # within the 5 s the first sample waits for company
        while httpx.get(url + "/metrics", headers=headers, timeout=5).json()["queue_depth"] < 3:
            assert time.monotonic() < queued_by, "requests did not reach the queue in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # all three are waiting in the queue
        for t in threads:
            t.join(60)
        # uvicorn re-raises the signal after its graceful shutdown, so the exit status says SIGTERM.
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    want = smollm_scorer.score([QUESTION] * 3, answers)
    for i, w in enumerate(want):
        assert replies[i].status_code == 200 and replies[i].json()["rewards"][0] == pytest.approx(
            w.cme, abs=1e-4
        )
