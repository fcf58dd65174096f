"""Remote verifiers against vLLM's and SGLang's documented wire formats.

vLLM and SGLang cannot run on this CPU machine, so each test starts a real uvicorn server on
127.0.0.1 (``wire_servers.py``) that answers in exactly the JSON shape the server documents,
computing the log-probs with the real SmolLM2-135M-Instruct verifier; the client's CME must equal
``CMEScorer``'s for the same model. The servers' own conventions are reproduced there too: vLLM's
``-9999.0`` for a ``-inf`` log-prob, SGLang's ``null`` for it and its ``0`` for input ids at or above
``vocab_size - 1``, vLLM's ``/tokenize`` and ``max_model_len``.
"""

from __future__ import annotations

import asyncio

import pytest
from wire_servers import LogprobModel, ServerThread, sglang_app, vllm_app

from cme_rewards import FLOOR_REWARD
from cme_rewards.options import OptionError, ScorerOptions
from cme_rewards.remote import (
    PROBE_TEXT,
    RemoteConfigError,
    RemoteOptions,
    RemoteVerifierUnavailable,
    SGLangVerifier,
    VLLMVerifier,
    load_verifier_tokenizer,
)

pytestmark = pytest.mark.slow

VERIFIER = "smollm2-135m-instruct"
PROMPTS = [
    "What is the capital of France?",
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a primary colour."},
    ],
    "Write a haiku about rain.",
]
RESPONSES = [
    "The capital of France is Paris.",
    "Red.",
    "Soft rain on the roof,\nthe garden drinks quietly,\nclouds walk to the sea.",
]


@pytest.fixture(scope="module")
def smollm(smollm_scorer):
    return LogprobModel(smollm_scorer.model, smollm_scorer.tokenizer)  # conftest's session verifier


@pytest.fixture(scope="module")
def reference(smollm_scorer):
    return smollm_scorer.score(PROMPTS, RESPONSES)


@pytest.fixture(scope="module")
def tokenizer():
    return load_verifier_tokenizer(VERIFIER)


def test_vllm_prompt_logprobs_match_scorer(smollm, reference, tokenizer):
    with ServerThread(vllm_app(smollm, "smollm2")) as server:

        async def run():
            client = VLLMVerifier(tokenizer, remote=RemoteOptions(url=server.url))
            await client.check()
            assert client.model == "smollm2"  # taken from /v1/models
            try:
                return await client.score_many(PROMPTS, RESPONSES)
            finally:
                await client.aclose()

        results = asyncio.run(run())
    for got, want in zip(results, reference, strict=True):
        assert got.error is None and want.error is None
        assert got.n_tokens == want.n_tokens
        assert got.cme == pytest.approx(want.cme, abs=1e-4)
    assert results[0].cme > results[2].cme - 5  # real values, not a constant


def test_sglang_input_token_logprobs_match_scorer(smollm, reference, tokenizer):
    with ServerThread(sglang_app(smollm, "/models/smollm2")) as server:

        async def run():
            client = SGLangVerifier(  # host:port works
                tokenizer, remote=RemoteOptions(url=server.url.removeprefix("http://"))
            )
            await client.check()
            try:
                return await client.score_many(PROMPTS, RESPONSES)
            finally:
                await client.aclose()

        results = asyncio.run(run())
    for got, want in zip(results, reference, strict=True):
        assert got.n_tokens == want.n_tokens
        assert got.cme == pytest.approx(want.cme, abs=1e-4)


def test_vllm_retries_503_and_floors_a_rejected_sample(smollm, reference, tokenizer):
    app = vllm_app(smollm, "smollm2", max_model_len=64, fail_first=2)
    with ServerThread(app) as server:

        async def run():
            client = VLLMVerifier(tokenizer, remote=RemoteOptions(url=server.url, model="smollm2"))
            try:
                short = await client.score(PROMPTS[0], RESPONSES[0])
                long = await client.score(PROMPTS[2], RESPONSES[2] * 4, id="s-long")
                empty = await client.score(PROMPTS[0], "")
            finally:
                await client.aclose()
            return short, long, empty

        short, long, empty = asyncio.run(run())
        assert (
            app.state.counters["requests"] == 4
        )  # two 503s retried, then 2 answers; "" sends nothing
    assert short.error is None and short.cme == pytest.approx(reference[0].cme, abs=1e-4)
    assert (
        long.cme == FLOOR_REWARD
        and "HTTP 400" in long.error
        and "maximum context length" in long.error
    )
    assert empty.cme == FLOOR_REWARD and empty.error == "empty response" and empty.n_tokens == 0
    assert set(short.to_dict()) == set(long.to_dict()) == set(empty.to_dict())


def test_unreachable_or_wrong_server_fails_at_check(smollm, tokenizer):
    async def check(client):
        try:
            await client.check()
        finally:
            await client.aclose()

    dead = VLLMVerifier(tokenizer, remote=RemoteOptions(url="http://127.0.0.1:9", max_retries=2))
    with pytest.raises(
        RemoteConfigError, match=r"^url: no vllm server answers at http://127.0.0.1:9"
    ) as exc:
        asyncio.run(check(dead))
    assert exc.value.option == "url"
    with ServerThread(vllm_app(smollm, "smollm2")) as server:
        wrong_model = VLLMVerifier(tokenizer, remote=RemoteOptions(url=server.url, model="llama"))
        with pytest.raises(RemoteConfigError, match=r"^model: 'llama' is not served"):
            asyncio.run(check(wrong_model))
        not_sglang = SGLangVerifier(tokenizer, remote=RemoteOptions(url=server.url, max_retries=1))
        with pytest.raises(RemoteConfigError, match="url"):
            asyncio.run(check(not_sglang))


def test_server_down_mid_run_raises_not_floors(tokenizer):
    client = VLLMVerifier(
        tokenizer, remote=RemoteOptions(url="http://127.0.0.1:9", model="m", max_retries=2)
    )

    async def run():
        try:
            return await client.score("hi", "hello")
        finally:
            await client.aclose()

    with pytest.raises(RemoteVerifierUnavailable, match="failed 2 times"):
        asyncio.run(run())


def run_client(client, calls):
    async def run():
        try:
            return [await call(client) for call in calls]
        finally:
            await client.aclose()

    return asyncio.run(run())


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_neg_inf_logprob_floors_as_the_local_scorer_does(smollm_scorer, tokenizer, backend):
    """vLLM sends -inf as -9999.0 and SGLang as null; both read back as -inf: the local scorer's
    "non-finite log-prob from verifier" floor, while the other samples keep their values."""
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    masked = LogprobModel(smollm_scorer.model, tokenizer, neg_inf_ids=tuple(paris))
    app = vllm_app(masked, "m") if backend == "vllm" else sglang_app(masked, "/models/m")
    cls = VLLMVerifier if backend == "vllm" else SGLangVerifier
    with ServerThread(app) as server:
        client = cls(tokenizer, remote=RemoteOptions(url=server.url, model="m"))
        got = run_client(
            client,
            [
                lambda c: c.score(PROMPTS[0], RESPONSES[0], id="paris"),
                lambda c: c.score(*PROMPTS[1:2], RESPONSES[1]),
            ],
        )
    assert tokenizer.decode(paris) == " Paris" and len(paris) == 1
    assert got[0].error == "non-finite log-prob from verifier" and got[0].cme == FLOOR_REWARD
    assert got[1].error is None and got[1].cme > FLOOR_REWARD  # no " Paris" in it


def test_sglang_reports_the_last_vocab_ids_as_zero_and_the_score_stands(
    smollm, smollm_scorer, tokenizer
):
    response = "The signal is undetectable."
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert smollm.vocab_size - 1 in ids  # SGLang shows this id as 0
    want = smollm_scorer.score([PROMPTS[0]], [response])[0]
    with ServerThread(sglang_app(smollm, "/models/smollm2")) as server:
        client = SGLangVerifier(tokenizer, remote=RemoteOptions(url=server.url))
        [got] = run_client(client, [lambda c: c.score(PROMPTS[0], response)])
    assert got.error is None and got.cme == pytest.approx(want.cme, abs=1e-4)


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_a_tokenizer_that_is_not_the_served_models_fails_at_check(smollm, backend):
    other = load_verifier_tokenizer(VERIFIER)
    other.add_tokens(["Paris."])  # a fine-tune's tokenizer: one added token changes the split
    assert other(PROBE_TEXT)["input_ids"] != smollm.tokenizer(PROBE_TEXT)["input_ids"]
    app = (
        vllm_app(smollm, "smollm2") if backend == "vllm" else sglang_app(smollm, "/models/smollm2")
    )
    cls = VLLMVerifier if backend == "vllm" else SGLangVerifier
    with ServerThread(app) as server:
        client = cls(other, remote=RemoteOptions(url=server.url))
        with pytest.raises(RemoteConfigError) as exc:
            run_client(client, [lambda c: c.check()])
        served = "smollm2" if backend == "vllm" else "/models/smollm2"
        ok = cls(smollm.tokenizer, remote=RemoteOptions(url=server.url))
        run_client(ok, [lambda c: c.check()])  # the served model's own tokenizer passes
    assert exc.value.option == "verifier"
    assert f"the tokenizer of {VERIFIER!r} (client side)" in str(exc.value)
    assert f"the model {served!r} served at {server.url}" in str(exc.value)


def test_max_length_is_fitted_to_the_served_context(smollm, smollm_scorer, tokenizer):
    """A sample longer than vLLM's max_model_len is never sent to be rejected: max_length is
    lowered at start-up and the sample is cut from the left, as the local scorer cuts it."""
    long_prompt = "Tell me about rain. " * 30
    want = smollm_scorer.score([long_prompt], [RESPONSES[2]], progress=False)[0]
    with ServerThread(vllm_app(smollm, "smollm2", max_model_len=64)) as server:
        client = VLLMVerifier(
            tokenizer, ScorerOptions(max_length=2048), RemoteOptions(url=server.url)
        )
        _, got = run_client(
            client, [lambda c: c.check(), lambda c: c.score(long_prompt, RESPONSES[2])]
        )
    cut = smollm_scorer.__class__(
        model=smollm_scorer.model, tokenizer=tokenizer, max_length=63
    ).score([long_prompt], [RESPONSES[2]])[0]
    assert client.max_model_len == 64 and client.options.max_length == 63
    assert got.error is None and got.truncated and not want.truncated
    assert got.cme == pytest.approx(cut.cme, abs=1e-4) and got.n_tokens == cut.n_tokens


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"timeout_s": 0}, r"^timeout_s: must be greater than 0, got 0\.0$"),
        ({"timeout_s": "soon"}, r"^timeout_s: expected a number, got 'soon'$"),
        ({"max_retries": 0}, r"^max_retries: must be at least 1, got 0$"),
        ({"url": 8000}, r"^url: expected a string, got 8000$"),
    ],
)
def test_remote_options_name_the_bad_field(changes, message):
    """A bad connection setting is refused when the options are made, naming the field."""
    with pytest.raises(OptionError, match=message):
        RemoteOptions(**changes)
