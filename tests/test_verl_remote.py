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
from verl_data import make_batch
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


def config(cme: dict, *, reward_model: bool = False):
    custom = (
        {"path": "pkg://cme_rewards.verl", "name": "route_to_cme"}
        if reward_model
        else {"path": None}
    )
    return OmegaConf.create(
        {
            "reward": {
                "num_workers": 2,
                "reward_manager": {"source": "register", "name": "cme"},
                "reward_model": {"enable": reward_model, "model_path": "/models/smollm2"},
                "custom_reward_function": custom,
                "cme": cme,
            }
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
    """veRL's own reward-model servers: no url, no verifier; veRL passes its router and tokenizer."""
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
