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
import os
import re
import subprocess
import sys
from copy import deepcopy
from pathlib import Path
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
    assert out[0]["rewards"].tolist() == [-50.0]
    assert out[0]["extra_logs"]["cme/floored_frac"].tolist() == [1.0]
    # A prompt the policy tokenizer refuses (a lone surrogate): the floor with its error, no raise.
    bad = templated(tok, "Hi \udc80")
    out = asyncio.run(executor._fetch_rewards_via_func([bad + "Hello"], [bad], [None]))
    assert out[0]["rewards"].tolist() == [-50.0]
    assert [r.error for r in rt.score([bad + "Hello"], [bad], [None])] == [
        "undecodable text in prompt"
    ]
    rt.close()


def test_composed_reward_file_sums_weighted_parts_and_logs_each(
    smollm_scorer, expected, monkeypatch
):
    """integrations/openrlhf/composed_reward.py (CME + 0.1 x brevity) loaded by OpenRLHF's client."""
    tok = smollm_scorer.tokenizer
    rt = runtime.FileModeRuntime(runtime.FileModeConfig.from_env(), scorer=smollm_scorer)
    monkeypatch.setattr(runtime, "_runtime", rt)
    path = Path(__file__).resolve().parents[1] / "integrations" / "openrlhf" / "composed_reward.py"
    executor = agent.SingleTurnAgentExecutor(str(path))
    queries = [templated(tok, i) + r + "<|im_end|>" for i, r in CASES[:3]]
    prompts = [templated(tok, i) for i, _ in CASES[:3]]
    outs = asyncio.run(
        executor._fetch_rewards_via_func(queries, prompts, [i for i, _ in CASES[:3]])
    )
    rt.close()
    for out, query, prompt, cme in zip(outs, queries, prompts, expected, strict=False):
        brevity = -(len(query) - len(prompt)) / 4000
        logs = {k: v.item() for k, v in out["extra_logs"].items()}
        assert logs["reward/cme"] == pytest.approx(cme, abs=1e-4)
        assert logs["reward/brevity"] == pytest.approx(brevity)
        assert out["rewards"].item() == pytest.approx(cme + 0.1 * brevity, abs=1e-4)
        assert out["scores"].item() == out["rewards"].item()
        assert logs["cme/mean"] == pytest.approx(cme, abs=1e-4) and logs["cme/floored_frac"] == 0


CLI = Path(sys.executable).with_name("cme-rewards")


def check_command(**env: str) -> subprocess.CompletedProcess:
    """``cme-rewards openrlhf-reward-file --check`` as the launch script runs it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CME_REWARDS_")}
    return subprocess.run(
        [str(CLI), "openrlhf-reward-file", "--check"],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=600,
    )


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("CME_REWARDS_MAX_BATCH_SIZE", "abc", "expected an integer, got 'abc'"),
        ("CME_REWARDS_VERIFIER", "no-such-verifier", "unknown verifier 'no-such-verifier'"),
        ("CME_REWARDS_DTYPE", "float8", "must be one of auto, float32"),
    ],
)
def test_check_command_names_a_bad_variable(variable, value, reason):
    proc = check_command(**{variable: value})
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"error: {variable}: {reason}" in proc.stderr
    assert proc.stderr.count("CME_REWARDS_") == 1


def test_check_command_loads_the_verifier_and_scores_the_probe():
    proc = check_command(
        CME_REWARDS_VERIFIER="smollm2-135m-instruct",
        CME_REWARDS_DEVICE="cpu",
        CME_REWARDS_GROUP_SIZE="8",  # the probe must not wait for a group
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == reward_file_path()
    match = re.search(r"'smollm2-135m-instruct' scores the probe: cme (-[\d.]+) nats", proc.stderr)
    assert match and -3 < float(match.group(1)) < 0
