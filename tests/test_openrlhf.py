"""OpenRLHF 0.11.2's own client code scoring real samples against our server and our reward_func file.

``SingleTurnAgentExecutor.execute`` runs as in the trainer's rollout actors: it tokenizes the
templated prompt with the policy tokenizer (SmolLM2 here), takes the generated token ids from the
engine, builds ``query = decode(prompt_ids + response_ids, skip_special_tokens=False)`` and fetches
the reward over HTTP (``_fetch_rewards_via_http``) or from the file (``_fetch_rewards_via_func``).
vLLM is not installable on CPU, so the engine hands back the policy's token ids for fixed responses
(ending with the policy's EOS, as vLLM returns them).
"""

from __future__ import annotations

import asyncio
from copy import deepcopy
from types import SimpleNamespace

import pytest
import torch
from openrlhf.utils import agent  # OpenRLHF 0.11.2, installed --no-deps

from cme_rewards.batching import BatchLimits
from cme_rewards.openrlhf import runtime
from cme_rewards.openrlhf.cli import reward_file_path
from cme_rewards.openrlhf.protocol import PromptRecovery
from cme_rewards.server import ServerConfig, ServerOptions, create_app
from cme_rewards.server.background import BackgroundServer

pytestmark = pytest.mark.slow


CASES = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Name a fruit that is yellow.", "A banana is yellow."),
    ("Write a greeting.", "Hello, and welcome!"),
    ("What is 3 + 4?", "3 + 4 = 7."),
    ("Name a colour of the sky.", "The sky is often blue."),
    ("Say something about dogs.", "Dogs are loyal companions."),
]


class CannedEngine:
    """Stands in for vLLM: answers each templated prompt with the policy's ids for its response."""

    def __init__(self, tok, answers: dict[str, str]) -> None:
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        self.by_prompt = {
            tuple(tok(text=p, add_special_tokens=False)["input_ids"]): tok(
                text=r, add_special_tokens=False
            )["input_ids"]
            + [eos]
            for p, r in answers.items()
        }

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        ids = self.by_prompt[tuple(prompt_token_ids)]
        out = SimpleNamespace(token_ids=ids, text="", finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


def templated(tok, instruction: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )


def run_rollouts(executor, tok, use_labels: bool) -> list[float]:
    """Every case through ``executor.execute`` concurrently, as the rollout actor does."""
    engine = CannedEngine(tok, {templated(tok, i): r for i, r in CASES})
    params = SimpleNamespace(max_tokens=64, logprobs=None)

    async def go():
        return await asyncio.gather(
            *(
                executor.execute(
                    templated(tok, i), i if use_labels else "", deepcopy(params), 512, tok, engine
                )
                for i, _ in CASES
            )
        )

    outputs = asyncio.run(go())
    rewards = []
    for out in outputs:
        assert out["reward"] is not None and out["scores"] is not None
        # What OpenRLHF's samples generator does with them (a str or None here would crash it).
        for value in (out["reward"], out["scores"]):
            torch.tensor([value])
        for value in out["extra_logs"].values():
            torch.tensor([value.flatten()[0].item() if isinstance(value, torch.Tensor) else value])
        rewards.append(float(torch.as_tensor(out["reward"]).flatten()[0]))
    return rewards


@pytest.fixture(scope="module")
def expected(smollm_scorer) -> list[float]:
    return [r.cme for r in smollm_scorer.score([i for i, _ in CASES], [r for _, r in CASES])]


def test_openrlhf_client_against_server(smollm_scorer, expected):
    tok = smollm_scorer.tokenizer  # SmolLM2 is the policy as well as the verifier here
    app = create_app(
        smollm_scorer,
        PromptRecovery(tok),
        ServerConfig(limits=BatchLimits(max_wait_ms=30), server=ServerOptions(token="t0k")),
    )
    with BackgroundServer(app) as srv:
        executor = agent.SingleTurnAgentExecutor(f"{srv.url}/get_reward?token=t0k")
        with_labels = run_rollouts(executor, tok, use_labels=True)
        stripped = run_rollouts(executor, tok, use_labels=False)
        # Several samples in one call: OpenRLHF sends them in one request.
        queries = [templated(tok, i) + r + "<|im_end|>" for i, r in CASES[:3]]
        prompts = [templated(tok, i) for i, _ in CASES[:3]]
        (reply,) = asyncio.run(
            executor._fetch_rewards_via_http(queries, prompts, [i for i, _ in CASES[:3]])
        )
        sources = app.state.metrics.snapshot(0, False)["prompt_sources"]
    assert with_labels == pytest.approx(expected, abs=1e-4)
    assert stripped == pytest.approx(expected, abs=1e-4)
    assert reply["rewards"] == pytest.approx(expected[:3], abs=1e-4)
    assert sources == {"label": len(CASES) + 3, "template": len(CASES)}


def test_openrlhf_client_against_reward_func_file(smollm_scorer, expected, monkeypatch):
    tok = smollm_scorer.tokenizer
    monkeypatch.setenv("CME_REWARDS_MAX_WAIT_MS", "30")
    monkeypatch.setenv("CME_REWARDS_POLICY_TOKENIZER", "smollm2-135m-instruct")
    # One runtime per process; here it reuses the session's loaded verifier instead of a second copy.
    rt = runtime.FileModeRuntime(runtime.FileModeConfig.from_env(), scorer=smollm_scorer)
    monkeypatch.setattr(runtime, "_runtime", rt)
    executor = agent.SingleTurnAgentExecutor(str(reward_file_path()))  # loads reward_func by path
    assert executor.reward_func.__name__ == "reward_func"
    assert rt._batched is None  # nothing loaded until the first call
    with_labels = run_rollouts(executor, tok, use_labels=True)
    stripped = run_rollouts(executor, tok, use_labels=False)
    assert runtime.get_runtime() is rt and rt.config.batch.max_wait_ms == 30
    assert with_labels == pytest.approx(expected, abs=1e-4)
    assert stripped == pytest.approx(expected, abs=1e-4)
    batcher = rt._batched.batcher
    assert (
        batcher.items_run == 2 * len(CASES) and batcher.batches_run < batcher.items_run
    )  # calls were batched
    # A sample that can never be scored: the floor reward, never None.
    out = asyncio.run(
        executor._fetch_rewards_via_func(
            [templated(tok, "Hi") + "<|im_end|>"], [templated(tok, "Hi")], ["Hi"]
        )
    )
    assert out[0]["rewards"].tolist() == [-50.0] and out[0]["extra_logs"]["failed"].tolist() == [
        1.0
    ]
    rt.close()
