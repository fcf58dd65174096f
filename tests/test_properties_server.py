"""Property tests of the reward server's input surface, over real HTTP (hypothesis).

Whatever a client sends to ``/score`` or ``/get_reward`` (any JSON value, any bytes, any Unicode
in any field: lone surrogates, control characters, right-to-left marks, megabyte strings), the
server answers a clean 4xx or a 200 whose rewards are finite, one per sample, each the same as
scoring that sample alone (nothing lost, nothing misattributed); it never answers 500, never logs
a line break that came from the request, and stays healthy with an empty queue.

A tiny random-weight Llama with SmolLM2's tokenizer keeps the hundreds of examples quick; the
real verifier goes through the same code in ``tests/test_hardening_server.py``.
"""

from __future__ import annotations

import json
import logging
import math

import httpx
import pytest
from conftest import tiny_llama
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cme_rewards.batching import BatchLimits
from cme_rewards.openrlhf.protocol import PromptRecovery
from cme_rewards.results import CMEResult, finish_groups, floored
from cme_rewards.server import ServerConfig, ServerOptions, create_app
from cme_rewards.server.background import BackgroundServer

MEGA = 1_000_000
SPECIAL = (
    "\ud800", "\udfff", "\udc80", "\x00", "\x1b[31m", "\n", "\r\n", "\x85", "\u2028", "\u2029",
    "\u202e", "\u200f", "\u200b", "\ufeff", "\u0301", "\U0001f600", "<|im_end|>", "<|im_start|>",
    "</s>", "<|endoftext|>", "{prompt}", "{", "%s", "\\", '"', " ",
)  # fmt: skip
"""Characters and strings that break naive code: surrogates, controls, line separators,
bidirectional marks, combining marks, special tokens, format fields, quotes."""

LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what str.splitlines() splits on

PROPS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MANY = settings(PROPS, max_examples=150)  # for the cheap properties (no scoring oracle)

chars = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from(SPECIAL))
hostile_text = st.lists(chars, max_size=24).map("".join)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | hostile_text
)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(hostile_text, kids, max_size=4),
    max_leaves=10,
)
roles = st.sampled_from(["user", "system", "assistant"]) | hostile_text
messages = st.lists(
    st.fixed_dictionaries({"role": roles, "content": hostile_text}), min_size=1, max_size=3
)
prompts = hostile_text | messages
groups = st.integers(min_value=-3, max_value=3) | hostile_text


def dumps(value) -> bytes:
    """JSON as a client may send it: lone surrogates as ``\\u`` escapes (ASCII)."""
    return json.dumps(value).encode()


def wire(value):
    """``value`` as the server reads it (a high + low surrogate escape pair is one character)."""
    return json.loads(dumps(value))


@pytest.fixture(scope="module")
def tiny_scorer():
    from transformers import AutoTokenizer

    from cme_rewards import CMEScorer
    from cme_rewards.models import cached_model_dir

    tok = AutoTokenizer.from_pretrained(cached_model_dir("smollm2-135m-instruct"))
    return CMEScorer(model=tiny_llama(), tokenizer=tok, device="cpu", max_length=128)


class LogLines(logging.Handler):
    """Every message the package logs while the server runs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("cme_rewards"):
            self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def logs():
    handler = LogLines()
    logger = logging.getLogger("cme_rewards")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def recovery(tiny_scorer):
    return PromptRecovery(tiny_scorer.tokenizer)


@pytest.fixture(scope="module")
def server(tiny_scorer, recovery, logs):
    config = ServerConfig(
        limits=BatchLimits(max_wait_ms=1),
        server=ServerOptions(max_samples=64, max_body_bytes=8 * MEGA),
    )
    with (
        BackgroundServer(create_app(tiny_scorer, recovery, config)) as srv,
        httpx.Client(base_url=srv.url, timeout=120) as client,
    ):
        srv.client = client
        yield srv


def post(srv, path: str, data: bytes) -> httpx.Response:
    return srv.client.post(path, content=data, headers={"content-type": "application/json"})


def check_clean(srv, logs, reply: httpx.Response) -> None:
    """No 5xx, nothing forged in the logs, and the server is healthy with an empty queue."""
    assert reply.status_code < 500, reply.text[:500]
    assert reply.status_code in (200, 400, 413, 422), reply.text[:500]
    for message in logs.messages:
        assert not any(c in message for c in LINE_BREAKS), message[:500]
    logs.messages.clear()
    assert srv.client.get("/health").status_code == 200
    assert srv.client.get("/metrics").json()["queue_depth"] == 0


def same_result(got: dict, want: CMEResult) -> None:
    assert isinstance(got["cme"], float) and math.isfinite(got["cme"])
    assert got["error"] == want.error and got["n_tokens"] == want.n_tokens
    assert got["truncated"] == want.truncated
    assert got["cme"] == pytest.approx(want.cme, abs=1e-4)
    if want.advantage is not None:
        assert got["advantage"] == pytest.approx(want.advantage, abs=1e-3)


# -- any body at all -------------------------------------------------------------------------------


@MANY
@given(
    body=json_values
    | st.fixed_dictionaries({"samples": json_values})
    | st.fixed_dictionaries(
        {"query": json_values, "prompts": json_values}, optional={"labels": json_values}
    ),
    path=st.sampled_from(["/score", "/get_reward"]),
)
@example(body={"samples": [{"prompt": "\ud800", "response": "x"}] * 65}, path="/score")
@example(body={"query": ["a"] * 65, "prompts": ["a"] * 65}, path="/get_reward")
def test_any_json_body_gets_a_clean_answer(server, logs, body, path):
    reply = post(server, path, dumps(body))
    check_clean(server, logs, reply)
    if reply.status_code == 200:
        n = len(body["samples"] if path == "/score" else body["query"])
        results = reply.json()["results"]
        assert len(results) == n
        assert all(isinstance(r["cme"], float) and math.isfinite(r["cme"]) for r in results)
    if reply.status_code == 413:
        assert "max_samples=64" in reply.json()["detail"]


@MANY
@given(data=st.binary(max_size=200), path=st.sampled_from(["/score", "/get_reward"]))
@example(data=b"[" * 100_000, path="/score")
@example(data=b'{"samples": [{"prompt": "a", "response": "b", "group": ' + b"9" * 5000 + b"}]}",
         path="/score")  # fmt: skip
@example(data=b'{"query": ["a"], "prompts": ["a"], "labels": [NaN]}', path="/get_reward")
@example(data='{"query": ["\udc80"], "prompts": [""]}'.encode("utf-8", "surrogatepass"),
         path="/get_reward")  # fmt: skip
def test_any_bytes_get_a_clean_answer(server, logs, data, path):
    check_clean(server, logs, post(server, path, data))


# -- well-formed bodies with hostile strings in every field ----------------------------------------

score_bodies = st.lists(
    st.fixed_dictionaries(
        {"prompt": prompts, "response": hostile_text}, optional={"id": hostile_text}
    ),
    min_size=1,
    max_size=6,
)


@PROPS
@given(samples=score_bodies, labels=st.none() | st.lists(groups, min_size=6, max_size=6))
@example(samples=[{"prompt": "hi", "response": "\ud800" * MEGA}], labels=None)
@example(samples=[{"prompt": [{"role": "user", "content": "a" * MEGA}], "id": "\n" * 1000,
                   "response": "\u202e" * (MEGA // 3)}], labels=["\u2028"] * 6)  # fmt: skip
def test_every_sample_scored_as_if_alone(server, logs, tiny_scorer, samples, labels):
    samples, labels = wire(samples), wire(labels)
    body = [{**s, "group": labels[i]} if labels else s for i, s in enumerate(samples)]
    reply = post(server, "/score", dumps({"samples": body}))
    check_clean(server, logs, reply)
    assert reply.status_code == 200, reply.text[:500]
    results = reply.json()["results"]
    assert [r["id"] for r in results] == [s.get("id") for s in samples]
    want = [tiny_scorer.score([s["prompt"]], [s["response"]])[0] for s in samples]
    if labels:
        finish_groups(want, labels[: len(samples)], tiny_scorer.options)
    for got, w in zip(results, want, strict=True):
        same_result(got, w)


get_reward_bodies = st.integers(min_value=1, max_value=5).flatmap(
    lambda n: st.tuples(
        st.lists(hostile_text, min_size=n, max_size=n),
        st.lists(hostile_text, min_size=n, max_size=n),
        st.none() | st.lists(hostile_text | messages | json_values, min_size=n, max_size=n),
    )
)


@PROPS
@given(parts=get_reward_bodies, prefix=st.booleans())
@example(parts=(["zzz"], ["ab" * (MEGA // 2)], [""]), prefix=False)
@example(parts=(["x" + "</s>" * 100_000], ["x"], ["Say hi."]), prefix=False)
@example(parts=(["\u202e\x00" * (MEGA // 4)], ["\u202e"], None), prefix=False)
def test_get_reward_rewards_are_finite_and_as_if_alone(server, logs, tiny_scorer, recovery, parts,
                                                       prefix):  # fmt: skip
    queries, prompts_, labels = wire(parts)
    if prefix:  # OpenRLHF's shape: each query starts with its prompt
        queries = [p + q for p, q in zip(prompts_, queries, strict=True)]
    body = {"query": queries, "prompts": prompts_, "labels": labels}
    reply = post(server, "/get_reward", dumps(body))
    check_clean(server, logs, reply)
    assert reply.status_code == 200, reply.text[:500]
    got = reply.json()
    assert len(got["rewards"]) == len(queries) == len(got["results"])
    assert got["rewards"] == [r["cme"] for r in got["results"]]
    for i, query in enumerate(queries):
        try:
            rec = recovery.recover(query, prompts_[i], None if labels is None else labels[i])
        except Exception:  # the policy tokenizer refuses a prompt with a lone surrogate
            assert not is_text(prompts_[i])
            want = floored("undecodable text in prompt", tiny_scorer.options)
        else:
            want = (
                floored(rec.error, tiny_scorer.options)
                if rec.error is not None
                else tiny_scorer.score([rec.prompt], [rec.response])[0]
            )
        same_result(got["results"][i], want)


def is_text(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)
