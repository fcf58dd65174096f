"""The reward server against hostile and malformed input, over real HTTP, with the real SmolLM2
verifier: bounded metrics, a responsive event loop, permanent errors for requests that can never
fit, abandoned work that leaves the queue, docs behind the token, and escaped logs.

Each test here failed on the server before it was hardened (commit 37b2344). None of them measures
time: a client timeout only turns a frozen server into a failure instead of a hang.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from cme_rewards.batching import BatchLimits
from cme_rewards.openrlhf.protocol import PromptRecovery, extra_logs
from cme_rewards.results import FLOOR_REWARD, CMEResult
from cme_rewards.server import ServerConfig, ServerOptions, create_app
from cme_rewards.server.app import ROUTES
from cme_rewards.server.background import BackgroundServer

pytestmark = pytest.mark.slow

TOKEN = "hardening-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUESTION, ANSWER = "What is the capital of France?", "The capital of France is Paris."
STUCK_S = 20.0  # a client gives up after this long: only a frozen server gets there


def serve(scorer, recovery=None, limits=None, **server_options) -> BackgroundServer:
    config = ServerConfig(
        limits=limits or BatchLimits(max_wait_ms=5), server=ServerOptions(**server_options)
    )
    return BackgroundServer(create_app(scorer, recovery, config))


def post_json(url: str, body, headers=AUTH, timeout: float = 120) -> httpx.Response:
    """POST ``body`` as ASCII JSON (lone surrogates as escapes, which httpx's ``json=`` cannot send)."""
    data = json.dumps(body).encode()
    return httpx.post(
        url, content=data, headers={**headers, "content-type": "application/json"}, timeout=timeout
    )


def poll_metrics(srv, until, headers=AUTH, timeout: float = STUCK_S) -> dict:
    """``/metrics`` once ``until(snapshot)`` holds (or the last one after ``timeout`` s)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = httpx.get(srv.url + "/metrics", headers=headers, timeout=STUCK_S).json()
        if until(snap) or time.monotonic() > deadline:
            return snap
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(smollm_scorer) -> float:
    return smollm_scorer.score([QUESTION], [ANSWER])[0].cme


@pytest.fixture(scope="module")
def guarded(smollm_scorer):
    """A server with a token and the default limits."""
    with serve(smollm_scorer, PromptRecovery(smollm_scorer.tokenizer), token=TOKEN) as srv:
        yield srv


# -- 1. metrics cannot be grown by clients ---------------------------------------------------------


def test_unauthenticated_unique_paths_do_not_grow_metrics(guarded):
    async def flood(n: int, offset: int) -> list[int]:
        async with httpx.AsyncClient(timeout=STUCK_S) as client:
            paths = [f"/x{offset + i:06d}" + "A" * 2000 for i in range(n)]
            replies = await asyncio.gather(*(client.get(guarded.url + p) for p in paths))
            replies.append(await client.post(guarded.url + "/get_reward/" + "B" * 2000, json={}))
            return [r.status_code for r in replies]

    statuses = asyncio.run(flood(300, 0))
    first = httpx.get(guarded.url + "/metrics", headers=AUTH).json()
    statuses += asyncio.run(flood(300, 300))
    second = httpx.get(guarded.url + "/metrics", headers=AUTH).json()
    for snap in (first, second):
        assert set(snap["requests"]) <= {*ROUTES, "other"}
        assert all(len(str(key)) < 40 for key in snap["errors"])
    # 301 more requests of 2 KB paths change a few counters' digits, never the table's size
    assert abs(len(json.dumps(second)) - len(json.dumps(first))) < 200
    assert len(json.dumps(second)) < 4096
    assert second["requests"]["other"] - first["requests"]["other"] == 301
    assert set(statuses) == {401}  # unknown paths too: the token is checked before routing
    assert second["errors"]["unauthorized"] - first["errors"]["unauthorized"] == 301


# -- 2. one request cannot freeze the others -------------------------------------------------------


def test_huge_prompt_is_answered_with_the_floor_and_health_meanwhile(guarded):
    """The issue's request, at two million characters: prompt recovery is linear (it was
    quadratic, and ran on the event loop), and a request with nothing to score answers 200."""
    body = {"query": ["zzz"], "prompts": ["ab" * 1_000_000], "labels": [""]}

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            big = asyncio.create_task(client.post(guarded.url + "/get_reward", json=body))
            health = []
            while not big.done():  # /health answers all along (a frozen loop: ReadTimeout)
                health.append(
                    (await client.get(guarded.url + "/health", timeout=STUCK_S)).status_code
                )
                await asyncio.sleep(0.05)
            return health, await big

    health, reply = asyncio.run(run())
    assert health and set(health) == {200}
    assert reply.status_code == 200, reply.text
    result = reply.json()
    assert result["rewards"] == [FLOOR_REWARD]
    assert result["results"][0]["error"] == "query does not start with the prompt"
    assert result["extra_logs"] == extra_logs([CMEResult(**result["results"][0])])


class GatedRecovery(PromptRecovery):
    """The real recovery, held at a gate: CPU work that takes as long as the test wants."""

    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer)
        self.entered, self.gate = threading.Event(), threading.Event()

    def recover(self, query, prompt, label=None):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return super().recover(query, prompt, label)


class GatedScorer:
    """The real scorer, except that tokenizing a sample waits at a gate."""

    def __init__(self, scorer) -> None:
        self.scorer = scorer
        self.entered, self.gate = threading.Event(), threading.Event()

    def __getattr__(self, name: str):  # options, verifier_name, device: the real scorer's
        return getattr(self.scorer, name)

    def encode(self, prompt, response):
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return self.scorer.encode(prompt, response)

    def score(self, prompts, responses, **kw):
        return self.scorer.score(prompts, responses, **kw)


def templated_payload(tok) -> dict:
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    return {"query": [prompt + ANSWER + "<|im_end|>"], "prompts": [prompt], "labels": [QUESTION]}


def test_recovery_and_tokenization_run_off_the_event_loop(smollm_scorer, reference):
    """While one request's recovery, then another's tokenization, is held, /health and /metrics
    still answer; on the event loop they would wait for the gate, which opens only afterwards."""
    tok = smollm_scorer.tokenizer
    recovery, gated = GatedRecovery(tok), GatedScorer(smollm_scorer)
    for scorer, gate, path, body in (
        (smollm_scorer, recovery, "/get_reward", templated_payload(tok)),
        (gated, gated, "/score", {"samples": [{"prompt": QUESTION, "response": ANSWER}]}),
    ):
        with serve(scorer, recovery if gate is recovery else None) as srv:

            async def run(srv=srv, gate=gate, path=path, body=body):
                async with httpx.AsyncClient(timeout=STUCK_S) as client:
                    held = asyncio.create_task(client.post(srv.url + path, json=body))
                    assert await asyncio.to_thread(gate.entered.wait, STUCK_S)
                    health = await client.get(srv.url + "/health")
                    snap = await client.get(srv.url + "/metrics")
                    gate.gate.set()
                    return health, snap, await held

            health, snap, reply = asyncio.run(run())
        assert health.status_code == 200 and snap.status_code == 200
        assert reply.status_code == 200, reply.text
        got = reply.json()["rewards" if path == "/get_reward" else "results"][0]
        assert (got if path == "/get_reward" else got["cme"]) == pytest.approx(reference, abs=1e-4)


def test_request_timeout_covers_recovery_and_the_body_upload(smollm_scorer):
    recovery = GatedRecovery(smollm_scorer.tokenizer)
    with serve(smollm_scorer, recovery, request_timeout=1.0) as srv:
        try:
            reply = httpx.post(
                srv.url + "/get_reward",
                json=templated_payload(smollm_scorer.tokenizer),
                timeout=STUCK_S,
            )
        finally:
            recovery.gate.set()
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        assert "not scored within request_timeout=1 s" in reply.json()["detail"]
        # a client that sends half its body and stalls is answered too, and disconnected
        with socket.create_connection((srv.host, srv.port), timeout=STUCK_S) as s:
            s.sendall(
                b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000\r\n\r\n" + b'{"samples": ['
            )
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 ") and b"request body not received" in answer
        snap = poll_metrics(srv, lambda m: "body_timeout" in m["errors"], headers={})
        assert snap["errors"]["timeout"] == 1 and snap["errors"]["body_timeout"] == 1
        assert snap["queue_depth"] == 0


# -- 3. requests that can never fit, and abandoned work --------------------------------------------


def test_requests_that_can_never_fit_get_413_and_the_queue_stays_free(smollm_scorer, reference):
    """The issue's case: a queue of 16 and a request of 20 samples (max_samples left at default)."""
    with serve(smollm_scorer, limits=BatchLimits(max_queue=16, max_wait_ms=5)) as srv:
        twenty = {"samples": [{"prompt": QUESTION, "response": ANSWER}] * 20}
        reply = httpx.post(srv.url + "/score", json=twenty, timeout=STUCK_S)
        assert reply.status_code == 413 and "max_queue=16" in reply.json()["detail"]
        many = {"query": ["ab"] * 40_000, "prompts": ["a"] * 40_000}
        reply = httpx.post(srv.url + "/get_reward", json=many, timeout=STUCK_S)
        assert reply.status_code == 413 and "40000 samples" in reply.json()["detail"]
        for _ in range(3):  # the queue is not left "full"
            one = {"samples": [{"prompt": QUESTION, "response": ANSWER}]}
            reply = httpx.post(srv.url + "/score", json=one, timeout=120)
            assert reply.status_code == 200
            assert reply.json()["results"][0]["cme"] == pytest.approx(reference, abs=1e-4)
        sixteen = {"samples": [{"prompt": QUESTION, "response": ANSWER}] * 16}
        reply = httpx.post(srv.url + "/score", json=sixteen, timeout=120)
        assert reply.status_code == 200 and len(reply.json()["results"]) == 16
        snap = httpx.get(srv.url + "/metrics").json()
        assert snap["queue_depth"] == 0 and snap["limits"]["max_samples"] == 16
        assert snap["errors"]["too_many_samples"] == 2 and "overloaded" not in snap["errors"]


def test_a_client_that_hangs_up_takes_its_samples_out_of_the_queue(smollm_scorer):
    """Samples wait up to a minute for company; the client leaves; they must not stay or run."""
    with serve(smollm_scorer, limits=BatchLimits(max_wait_ms=60_000)) as srv:
        body = json.dumps({"samples": [{"prompt": QUESTION, "response": ANSWER}] * 3}).encode()
        with socket.create_connection((srv.host, srv.port), timeout=STUCK_S) as s:
            s.sendall(
                b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            queued = poll_metrics(srv, lambda m: m["queue_depth"] == 3, headers={})
            assert queued["queue_depth"] == 3
        gone = poll_metrics(srv, lambda m: m["queue_depth"] == 0, headers={})
        assert gone["queue_depth"] == 0 and gone["batches"] == 0
        assert gone["errors"]["client_closed"] == 1 and gone["statuses"]["499"] == 1
        batcher = srv.server.config.app.state.batched.batcher
    assert batcher.items_run == 0  # after shutdown too: nothing was computed for nobody


# -- 4. API docs -----------------------------------------------------------------------------------


def test_docs_are_off_by_default_and_behind_the_token(smollm_scorer, guarded):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(guarded.url + path).status_code == 401
        assert httpx.get(guarded.url + path, headers=AUTH).status_code == 404
    assert httpx.get(guarded.url + "/health").status_code == 200  # the one open path
    with serve(smollm_scorer, token=TOKEN, docs=True) as srv:
        for path in ("/docs", "/openapi.json"):
            assert httpx.get(srv.url + path).status_code == 401
            assert httpx.get(f"{srv.url}{path}?token=wrong").status_code == 401
            assert httpx.get(srv.url + path, headers=AUTH).status_code == 200
        assert "/get_reward" in httpx.get(srv.url + "/openapi.json", headers=AUTH).json()["paths"]


# -- 5. logs and replies escape what came from the request -----------------------------------------


def test_ids_cannot_forge_log_lines_or_break_replies(guarded, caplog):
    evil = "x\nCRITICAL root: FORGED admin logged in\r\u2028\u202e"
    body = {
        "samples": [
            {"prompt": QUESTION, "response": "", "id": evil},
            {"prompt": QUESTION, "response": "\udc80", "id": "\ud800"},
            {"prompt": QUESTION, "response": ANSWER, "id": "ok"},
        ]
    }
    with caplog.at_level(logging.WARNING):
        reply = post_json(guarded.url + "/score", body)
    assert reply.status_code == 200, reply.text
    assert reply.content.isascii()  # lone surrogates come back as their JSON escapes
    results = reply.json()["results"]
    assert [r["id"] for r in results] == [evil, "\ud800", "ok"]
    assert [r["error"] for r in results[:2]] == ["empty response", "undecodable text in response"]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("cme_rewards")]
    assert any(repr(evil) in m for m in messages), messages
    for message in messages:
        assert not any(c in message for c in "\n\r\u2028\u202e"), message


def test_bad_fields_get_422_naming_them_without_echoing_the_input(guarded):
    cases = [
        ({"query": "\ud800" + "x" * 100_000}, ["body", "query"]),
        ({"samples": [{"prompt": QUESTION, "response": ANSWER, "id": 7}]}, ["body", "samples", 0]),
        ({"samples": [{"prompt": [{"role": "user"}], "response": "x"}]}, ["body", "samples", 0]),
    ]
    for body, loc in cases:
        path = "/get_reward" if "query" in body else "/score"
        reply = post_json(guarded.url + path, body)
        assert reply.status_code == 422 and len(reply.content) < 2000, reply.text
        assert reply.json()["detail"][0]["loc"][: len(loc)] == loc
    reply = httpx.post(
        guarded.url + "/score",
        content=b'{"samples": [{"prompt": "a", "response": "b", "group": ' + b"9" * 5000 + b"}]}",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert 400 <= reply.status_code < 500
