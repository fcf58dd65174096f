"""The ``cme`` manager with a remote verifier (vLLM / SGLang wire formats), as veRL drives it.

vLLM and SGLang cannot run on this CPU machine: a real uvicorn server on 127.0.0.1
(``wire_servers.py``) answers in their documented JSON shapes with log-probs from the real
SmolLM2-135M-Instruct verifier. Managers are built inside a running event loop, as veRL's own CPU
tests of reward managers do, and fed a real ``DataProto`` built with the SmolLM2 tokenizer.
"""

from __future__ import annotations

import asyncio

import pytest
from omegaconf import OmegaConf
from verl_data import (
    ANSWER,
    TOOL_CALL,
    TOOL_PROMPT,
    TOOL_RESULT,
    make_batch,
    padded_single,
    tool_conversation,
)
from wire_servers import LogprobModel, ServerThread, sglang_app, vllm_app

from cme_rewards.verl import EXTRA_INFO_KEYS, CMERewardManager, CMESettingsError

pytestmark = pytest.mark.slow

VERIFIER = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smollm(smollm_scorer):
    return LogprobModel(smollm_scorer.model, smollm_scorer.tokenizer)  # conftest's session verifier


@pytest.fixture(scope="module")
def batch(smollm_scorer):
    data, messages, texts = make_batch(smollm_scorer.tokenizer)
    return data, smollm_scorer.score(messages, texts)


def config(cme: dict, *, reward_model: bool = False, n: int = 1):
    custom = (
        {"path": "pkg://cme_rewards.verl", "name": "route_to_cme"}
        if reward_model
        else {"path": None}
    )
    return OmegaConf.create(
        {
            "actor_rollout_ref": {"rollout": {"n": n}},
            "reward": {
                "num_workers": 2,
                "reward_manager": {"source": "register", "name": "cme"},
                "reward_model": {"enable": reward_model, "model_path": "/models/smollm2"},
                "custom_reward_function": custom,
                "cme": cme,
            },
        }
    )


def run_manager(cfg, tokenizer, data, **kwargs) -> list[dict]:
    async def run():
        manager = CMERewardManager(cfg, tokenizer, None, **kwargs)
        outs = await asyncio.gather(
            *(manager.run_single(data[i : i + 1]) for i in range(len(data)))
        )
        await manager._remote.aclose()
        return outs

    return asyncio.run(run())


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
def test_remote_manager_matches_scorer(smollm, batch, backend):
    data, want = batch
    app = (
        vllm_app(smollm, "smollm2") if backend == "vllm" else sglang_app(smollm, "/models/smollm2")
    )
    with ServerThread(app) as server:
        cfg = config({"backend": backend, "url": server.url, "verifier": VERIFIER})
        outs = run_manager(cfg, smollm.tokenizer, data)
    for out, w in zip(outs, want, strict=True):
        assert out["reward_score"] == pytest.approx(w.cme, abs=1e-4)
        assert tuple(out["reward_extra_info"]) == EXTRA_INFO_KEYS
        assert out["reward_extra_info"]["n_tokens"] == w.n_tokens
        assert out["reward_extra_info"]["error"] == (w.error or "")


def test_router_address_of_verls_reward_model(smollm, batch):
    """veRL's own reward-model servers: no url, no verifier; veRL passes its router address and
    tokenizer (here the server's own address; test_verl_reward_loop.py puts veRL's real router in
    between)."""
    data, want = batch
    with ServerThread(vllm_app(smollm, "/models/smollm2")) as server:
        cfg = config({"backend": "vllm"}, reward_model=True)
        router = server.url.removeprefix("http://")  # veRL passes host:port
        outs = run_manager(
            cfg,
            smollm.tokenizer,
            data[:3],
            reward_router_address=router,
            reward_model_tokenizer=smollm.tokenizer,
        )
    assert [o["reward_score"] for o in outs] == pytest.approx([w.cme for w in want[:3]], abs=1e-4)


def test_remote_start_up_errors_name_the_key(smollm):
    async def build(cfg, **kwargs):
        return CMERewardManager(cfg, smollm.tokenizer, None, **kwargs)

    unreachable = config(
        {"backend": "vllm", "url": "http://127.0.0.1:9", "verifier": VERIFIER, "max_retries": 1}
    )
    with pytest.raises(
        CMESettingsError,
        match=r"^reward\.cme\.url: no vllm server answers at http://127\.0\.0\.1:9",
    ):
        asyncio.run(build(unreachable))
    no_server = config({"backend": "sglang", "verifier": VERIFIER})
    with pytest.raises(CMESettingsError, match=r"^reward\.cme\.url: backend=sglang needs a server"):
        asyncio.run(build(no_server))
    with ServerThread(vllm_app(smollm, "smollm2")) as server:
        wrong_model = config(
            {"backend": "vllm", "url": server.url, "verifier": VERIFIER, "model": "qwen"}
        )
        with pytest.raises(CMESettingsError, match=r"^reward\.cme\.model: 'qwen' is not served"):
            asyncio.run(build(wrong_model))
        no_tokenizer = config({"backend": "vllm", "url": server.url})
        with pytest.raises(
            CMESettingsError, match=r"^reward\.cme\.verifier: name the served verifier"
        ):
            asyncio.run(build(no_tokenizer))


def test_remote_group_floor_and_multi_turn(smollm, batch, smollm_scorer):
    """Groups of 3 (rollout.n): the empty sample 5 of group q1 gets just below q1's worst; a tool
    conversation is scored turn by turn through the server, observations unscored."""
    data, want = batch
    tok = smollm.tokenizer
    prompt_ids, response_ids, mask = tool_conversation(tok)
    tool = padded_single(tok, prompt_ids, response_ids, mask, raw_prompt=TOOL_PROMPT, uid="t")
    with ServerThread(vllm_app(smollm, "smollm2")) as server:
        cfg = config({"backend": "vllm", "url": server.url, "verifier": VERIFIER}, n=3)
        outs = run_manager(cfg, tok, data)
        [multi] = run_manager(
            config({"backend": "vllm", "url": server.url, "verifier": VERIFIER}), tok, tool
        )
    assert want[5].error == "empty response"
    assert outs[5]["reward_score"] == pytest.approx(min(want[3].cme, want[4].cme) - 0.1, abs=1e-4)
    assert outs[5]["reward_extra_info"]["error"] == "empty response"
    history = [*TOOL_PROMPT, {"role": "assistant", "content": TOOL_CALL}]
    first, second = smollm_scorer.score(
        [TOOL_PROMPT, [*history, {"role": "tool", "content": TOOL_RESULT}]], [TOOL_CALL, ANSWER]
    )
    n = first.n_tokens + second.n_tokens
    info = multi["reward_extra_info"]
    assert info["n_tokens"] == n and info["error"] == ""
    assert info["cme"] == pytest.approx(
        (first.cme * first.n_tokens + second.cme * second.n_tokens) / n, abs=1e-4
    )
