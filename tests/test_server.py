"""The reward server on 127.0.0.1 with the real SmolLM2 verifier: protocol, batching, faults, shutdown."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from cme_rewards.batching import BatchLimits
from cme_rewards.openrlhf.protocol import PromptRecovery, extra_logs
from cme_rewards.results import FLOOR_REWARD, CMEResult
from cme_rewards.server import ServerConfig, ServerOptions, create_app
from cme_rewards.server.background import BackgroundServer

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TOPICS = ["cats", "rain", "bread", "chess", "rivers", "the moon", "glass", "bees"]
STYLES = ["Describe {} in one sentence.", "Give one fact about {}.", "Why do people like {}?"]
REPLIES = ["{} are a common subject of study.", "I like {} very much.", "Here is a fact: {} exist."]


def dataset() -> list[tuple[str, str]]:
    """24 distinct (instruction, response) pairs."""
    return [
        (style.format(t), REPLIES[i % 3].format(t.capitalize()))
        for i, (t, style) in enumerate((t, s) for t in TOPICS for s in STYLES)
    ]


def templated(tok, instruction: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )


def openrlhf_payload(tok, instruction: str, response: str, label: str | None) -> dict:
    prompt = templated(tok, instruction)
    return {"query": [prompt + response + "<|im_end|>"], "prompts": [prompt], "labels": [label]}


@pytest.fixture(scope="module")
def samples(smollm_scorer):
    data = dataset()
    results = smollm_scorer.score([p for p, _ in data], [r for _, r in data])
    return [(p, r, res.cme) for (p, r), res in zip(data, results, strict=True)]


@pytest.fixture(scope="module")
def server(smollm_scorer):
    recovery = PromptRecovery(smollm_scorer.tokenizer)  # the policy is SmolLM2 too
    config = ServerConfig(
        limits=BatchLimits(max_wait_ms=30),
        server=ServerOptions(token=TOKEN, max_body_bytes=64 * 1024, max_samples=64),
    )
    with BackgroundServer(create_app(smollm_scorer, recovery, config)) as srv:
        yield srv


def post(srv, payload, path="/get_reward", headers=AUTH, **kw):
    return httpx.post(srv.url + path, json=payload, headers=headers, timeout=60, **kw)


def metrics(srv) -> dict:
    return httpx.get(srv.url + "/metrics", headers=AUTH, timeout=10).json()


async def wait_for_queue(client: httpx.AsyncClient, srv, depth: int, timeout: float = 20.0) -> dict:
    """Poll ``/metrics`` (no token) until the queue holds ``depth`` samples; returns the snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        snap = (await client.get(srv.url + "/metrics")).json()
        if snap["queue_depth"] == depth or time.monotonic() > deadline:
            return snap
        await asyncio.sleep(0.02)


def test_health_and_token(server, smollm_scorer, samples):
    assert httpx.get(server.url + "/health").json()["verifier"] == "smollm2-135m-instruct"
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert (
        httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )
    instr, resp, cme = samples[0]
    payload = openrlhf_payload(smollm_scorer.tokenizer, instr, resp, instr)
    assert post(server, payload, headers={}).status_code == 401
    # OpenRLHF's client sends no headers: the token may ride in the URL.
    r = httpx.post(f"{server.url}/get_reward?token={TOKEN}", json=payload, timeout=60)
    assert r.status_code == 200 and r.json()["rewards"][0] == pytest.approx(cme, abs=1e-4)
    assert metrics(server)["errors"]["unauthorized"] >= 3


def test_three_prompt_sources(server, smollm_scorer, samples):
    tok = smollm_scorer.tokenizer
    instr, resp, cme = samples[1]
    by_label = post(server, openrlhf_payload(tok, instr, resp, instr)).json()
    by_template = post(server, openrlhf_payload(tok, instr, resp, "")).json()
    assert by_label["rewards"][0] == pytest.approx(cme, abs=1e-4)
    assert by_template["rewards"][0] == pytest.approx(cme, abs=1e-4)
    n_scored = smollm_scorer.encode(instr, resp).n_scored
    assert by_label["results"][0] == {
        "cme": by_label["rewards"][0],
        "n_tokens": n_scored,
        "truncated": False,
        "error": None,
    }
    # No policy tokenizer: the templated prompt as it is (inside the verifier's own template).
    as_is = PromptRecovery(None)
    with BackgroundServer(create_app(smollm_scorer, as_is)) as plain:
        got = post(plain, openrlhf_payload(tok, instr, resp, None)).json()["rewards"][0]
    want = smollm_scorer.score([templated(tok, instr)], [resp])[0].cme
    assert got == pytest.approx(want, abs=1e-4) and abs(want - cme) > 1e-3
    assert metrics(server)["prompt_sources"]["label"] >= 1


def test_concurrent_requests_batched_and_attributed(server, smollm_scorer, samples):
    tok = smollm_scorer.tokenizer
    before = metrics(server)
    jobs = [samples[i % len(samples)] for i in range(48)]

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            reqs = [
                client.post(
                    server.url + "/get_reward", json=openrlhf_payload(tok, p, r, p if i % 2 else "")
                )
                for i, (p, r, _) in enumerate(jobs)
            ]
            return await asyncio.gather(*reqs)

    replies = asyncio.run(run())
    for (_, _, cme), reply in zip(jobs, replies, strict=True):
        assert reply.status_code == 200 and reply.json()["rewards"][0] == pytest.approx(
            cme, abs=1e-4
        )
    after = metrics(server)
    assert after["samples"] - before["samples"] == 48
    assert after["batch_size_max"] > 1 and after["batches"] - before["batches"] < 48
    assert after["tokens_per_s"] > 0 and after["queue_depth"] == 0


def test_native_score_with_groups(server, smollm_scorer, samples):
    chosen = samples[:4]
    body = {
        "samples": [
            {"prompt": p, "response": r, "id": f"s{i}", "group": i // 2}
            for i, (p, r, _) in enumerate(chosen)
        ]
    }
    results = post(server, body, path="/score").json()["results"]
    from cme_rewards import grpo_advantages

    advantages = grpo_advantages([c for _, _, c in chosen], [0, 0, 1, 1])
    for i, (res, (_, _, cme)) in enumerate(zip(results, chosen, strict=True)):
        assert res["id"] == f"s{i}" and res["cme"] == pytest.approx(cme, abs=1e-4)
        assert res["advantage"] == pytest.approx(advantages[i], abs=1e-3)
    chat = {
        "samples": [
            {"prompt": [{"role": "user", "content": chosen[0][0]}], "response": chosen[0][1]}
        ]
    }
    assert post(server, chat, path="/score").json()["results"][0]["cme"] == pytest.approx(
        chosen[0][2], abs=1e-4
    )


def test_malformed_schema_and_oversized(server, smollm_scorer, samples):
    url = server.url + "/get_reward"
    r = httpx.post(
        url, content=b'{"query": ["a"', headers={**AUTH, "content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    r = post(server, {"prompts": ["a"]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "query"]
    r = post(server, {"query": ["a", "b"], "prompts": ["a"]})
    assert r.status_code == 422 and "'prompts' has 1 items" in r.json()["detail"][0]["msg"]
    r = post(server, {"samples": [{"prompt": "x"}]}, path="/score")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == [
        "body",
        "samples",
        0,
        "response",
    ]
    big = {"query": ["x" * 70_000], "prompts": [""], "labels": [""]}
    assert post(server, big).status_code == 413  # Content-Length over the limit

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(20):
            yield b" " * 8192

    r = httpx.post(
        url, content=chunks(), headers={**AUTH, "content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 413
    instr, resp, cme = samples[2]
    assert post(server, openrlhf_payload(smollm_scorer.tokenizer, instr, resp, instr)).json()[
        "rewards"
    ][0] == (pytest.approx(cme, abs=1e-4))
    errors = metrics(server)["errors"]
    assert errors["invalid"] >= 4 and errors["too_large"] >= 2


def raw_request(srv, body: bytes, send_bytes: int) -> None:
    """Send a request with the first ``send_bytes`` of its body, then hang up."""
    with socket.create_connection((srv.host, srv.port), timeout=10) as s:
        head = (
            f"POST /get_reward?token={TOKEN} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        s.sendall(head + body[:send_bytes])


def test_client_disconnects_do_not_disturb_others(server, smollm_scorer, samples):
    tok = smollm_scorer.tokenizer
    jobs = samples[3:15]
    bodies = [json.dumps(openrlhf_payload(tok, p, r, p)).encode() for p, r, _ in jobs]

    async def run():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as client:
            json_type = {"content-type": "application/json"}
            reqs = [
                client.post(server.url + "/get_reward", content=b, headers=json_type)
                for b in bodies
            ]
            hangups = [
                asyncio.to_thread(raw_request, server, bodies[0], len(bodies[0]) // 2),  # mid-body
                asyncio.to_thread(
                    raw_request, server, bodies[1], len(bodies[1])
                ),  # before the answer
            ]
            return await asyncio.gather(*reqs, *hangups)

    replies = asyncio.run(run())[: len(jobs)]
    for (_, _, cme), reply in zip(jobs, replies, strict=True):
        assert reply.status_code == 200 and reply.json()["rewards"][0] == pytest.approx(
            cme, abs=1e-4
        )
    time.sleep(0.5)
    assert httpx.get(server.url + "/health").status_code == 200
    assert metrics(server)["queue_depth"] == 0


class FaultyScorer:
    """The real scorer, except that any batch holding a response with POISON raises."""

    def __init__(self, scorer):
        self.scorer, self.verifier_name, self.device = scorer, scorer.verifier_name, scorer.device
        self.options = scorer.options

    def encode(self, prompt, response):
        return self.scorer.encode(prompt, response)

    def score(self, prompts, responses, **kw):
        if any("POISON" in r for r in responses):
            raise RuntimeError("injected verifier fault")
        return self.scorer.score(prompts, responses, **kw)


def test_verifier_error_on_one_sample(smollm_scorer, samples):
    tok = smollm_scorer.tokenizer
    app = create_app(
        FaultyScorer(smollm_scorer),
        PromptRecovery(tok),
        ServerConfig(limits=BatchLimits(max_wait_ms=50)),
    )
    jobs = samples[:8]
    with BackgroundServer(app) as srv:

        async def run():
            async with httpx.AsyncClient(timeout=120) as client:
                good = [
                    client.post(srv.url + "/get_reward", json=openrlhf_payload(tok, p, r, p))
                    for p, r, _ in jobs
                ]
                bad = client.post(
                    srv.url + "/get_reward", json=openrlhf_payload(tok, "Hi", "POISON pill", "Hi")
                )
                empty = client.post(
                    srv.url + "/get_reward", json=openrlhf_payload(tok, "Hi", "", "Hi")
                )
                return await asyncio.gather(*good, bad, empty)

        *replies, bad, empty = asyncio.run(run())
        snap = httpx.get(srv.url + "/metrics").json()
    for (_, _, cme), reply in zip(jobs, replies, strict=True):
        assert reply.json()["rewards"][0] == pytest.approx(cme, abs=1e-4)
    for reply, reason in ((bad, "injected verifier fault"), (empty, "empty response")):
        body = reply.json()
        assert reply.status_code == 200 and body["rewards"] == [FLOOR_REWARD]
        assert reason in body["results"][0]["error"]
        assert body["extra_logs"] == extra_logs([CMEResult(**body["results"][0])])
    assert snap["samples_floor"] == 2 and snap["samples"] == 10


def test_overload_and_timeout_answer_503(smollm_scorer, samples):
    tok = smollm_scorer.tokenizer
    instr, resp, cme = samples[5]
    payload = openrlhf_payload(tok, instr, resp, instr)
    overload = ServerConfig(
        limits=BatchLimits(max_wait_ms=4000, max_queue=1), server=ServerOptions(max_samples=1)
    )
    with BackgroundServer(create_app(smollm_scorer, PromptRecovery(tok), overload)) as srv:

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                first = asyncio.create_task(client.post(srv.url + "/get_reward", json=payload))
                await wait_for_queue(
                    client, srv, 1
                )  # the first sample waits in the queue for company
                second = await client.post(srv.url + "/get_reward", json=payload)
                return await first, second

        first, second = asyncio.run(run())
        assert first.status_code == 200 and first.json()["rewards"][0] == pytest.approx(
            cme, abs=1e-4
        )
        assert second.status_code == 503 and second.headers["retry-after"] == "1"
        assert httpx.get(srv.url + "/metrics").json()["errors"]["overloaded"] == 1
    slow = ServerConfig(
        limits=BatchLimits(max_wait_ms=1500), server=ServerOptions(request_timeout=0.2)
    )
    with BackgroundServer(create_app(smollm_scorer, PromptRecovery(tok), slow)) as srv:
        r = httpx.post(srv.url + "/get_reward", json=payload, timeout=30)
        assert r.status_code == 503 and "not scored within request_timeout" in r.json()["detail"]
        snap = asyncio.run(
            wait_for_queue(httpx.AsyncClient(), srv, 0)
        )  # withdrawn: skipped, not scored
        assert snap["errors"]["timeout"] == 1 and snap["batches"] == 0


def test_graceful_shutdown_finishes_in_flight(smollm_scorer, samples):
    tok = smollm_scorer.tokenizer
    app = create_app(
        smollm_scorer, PromptRecovery(tok), ServerConfig(limits=BatchLimits(max_wait_ms=3000))
    )
    srv = BackgroundServer(app).start()
    jobs = samples[10:16]
    replies: dict[int, httpx.Response] = {}

    def call(i, p, r):
        replies[i] = httpx.post(
            srv.url + "/get_reward", json=openrlhf_payload(tok, p, r, p), timeout=60
        )

    threads = [threading.Thread(target=call, args=(i, p, r)) for i, (p, r, _) in enumerate(jobs)]
    for t in threads:
        t.start()
    asyncio.run(
        wait_for_queue(httpx.AsyncClient(), srv, len(jobs))
    )  # all queued, waiting for company
    srv.stop()
    for t in threads:
        t.join(30)
    assert not srv.thread.is_alive()
    for i, (_, _, cme) in enumerate(jobs):
        assert replies[i].status_code == 200 and replies[i].json()["rewards"][0] == pytest.approx(
            cme, abs=1e-4
        )
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=2)
