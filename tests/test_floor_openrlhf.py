"""The floor reward under OpenRLHF 0.11.2's own GRPO normalisation, and file mode's group floor.

OpenRLHF's advantage code cannot be imported on CPU (its modules import vLLM, DeepSpeed and
flash-attn), so :func:`openrlhf_advantages` runs the installed source of
``RemoteExperienceMaker.compute_advantages_and_returns``, ``get_cumulative_returns`` and
``compute_reward``, taken out of OpenRLHF's files with ``ast`` (its own lines, not a copy), on real
``Experience`` objects. The file-mode tests drive OpenRLHF's own ``SingleTurnAgentExecutor`` the way
``LLMRayActor.generate_responses`` does: the samples of one prompt generated concurrently, each
calling ``reward_func`` from a thread when its generation ends (an empty response first).
"""

from __future__ import annotations

import ast
import asyncio
import functools
import importlib.util
import itertools
import logging
import threading
import time
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from openrlhf.trainer.ppo_utils.experience import Experience
from openrlhf.trainer.ppo_utils.length_penalty import apply_length_penalties
from openrlhf.utils import agent

from cme_rewards import CMEScorer
from cme_rewards.models import cached_model_dir
from cme_rewards.openrlhf import runtime
from cme_rewards.openrlhf.cli import reward_file_path
from cme_rewards.openrlhf.grouping import GroupBoard, GroupOptions, group_key
from cme_rewards.options import OptionError
from cme_rewards.reductions import grpo_advantages
from cme_rewards.results import CMEResult

OPENRLHF = Path(importlib.util.find_spec("openrlhf").origin).parent

# Seven CME rewards (nats) of one AlpacaEval group under SmolLM2 (benchmarks/results/floor.json,
# the group of instruction 16).
VALID = [-2.47398, -2.08024, -2.36915, -2.1604, -3.23318, -3.15355, -2.27096]


def installed_source(relative: str, name: str) -> str:
    """Source of function or method ``name`` in OpenRLHF's installed file ``relative``."""
    path = OPENRLHF / relative
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(path.read_text(), node)
    raise LookupError(f"{name} not in {path}")


@functools.cache
def openrlhf_functions() -> dict:
    namespace = {
        "torch": torch,
        "itertools": itertools,
        "List": list,
        "Tuple": tuple,
        "Union": __import__("typing").Union,
        "Experience": Experience,
        "apply_length_penalties": apply_length_penalties,
        "logger": logging.getLogger("openrlhf"),
    }
    for relative, name in [
        ("models/utils.py", "compute_reward"),
        ("trainer/ppo_utils/experience_maker.py", "get_cumulative_returns"),
        ("trainer/ppo_utils/experience_maker.py", "compute_advantages_and_returns"),
    ]:
        source = installed_source(relative, name)
        exec(
            compile(__import__("textwrap").dedent(source), str(OPENRLHF / relative), "exec"),
            namespace,
        )
    return namespace


def openrlhf_advantages(
    rewards: list[float], n: int, estimator: str = "group_norm", clip=(-10.0, 10.0)
) -> list[float]:
    """Each sample's advantage as OpenRLHF 0.11.2 computes it (``rewards``: groups of ``n`` in a row)."""
    fns = openrlhf_functions()
    args = SimpleNamespace(
        algo=SimpleNamespace(
            advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=1.0, no_std_norm=False)
        ),
        rollout=SimpleNamespace(n_samples_per_prompt=n),
        reward=SimpleNamespace(clip_range=clip),
    )
    maker = SimpleNamespace(
        strategy=SimpleNamespace(args=args),
        kl_ctl=SimpleNamespace(value=0.0),
        advantage_estimator=estimator,
    )
    maker.get_cumulative_returns = functools.partial(fns["get_cumulative_returns"], maker)
    experiences = [
        Experience(
            rewards=torch.tensor([r]),
            index=[i],
            kl=torch.zeros(1, 3),
            action_mask=torch.ones(1, 3, dtype=torch.bool),
            info={},
        )
        for i, r in enumerate(rewards)
    ]
    out = fns["compute_advantages_and_returns"](maker, experiences)
    return [float(e.advantages[0, 0]) for e in out]


def mean_change(valid_with_failed: list[float], without: list[float]) -> float:
    """Mean absolute change of the valid members' advantages when a failed member joins."""
    pairs = zip(valid_with_failed, without, strict=True)
    return sum(abs(a - b) for a, b in pairs) / len(without)


def test_openrlhf_normalises_the_raw_floor_and_clips_afterwards():
    """In 0.11.2 the floor enters its group's mean and std as it is (the clip comes later)."""
    plain = openrlhf_advantages(VALID, n=7)
    assert plain == pytest.approx(grpo_advantages(VALID, [0] * 7), abs=1e-5)
    floored = openrlhf_advantages([*VALID, -50.0], n=8)
    clipped_first = openrlhf_advantages([*VALID, -10.0], n=8)
    assert floored != pytest.approx(clipped_first, abs=0.05)  # -50 is not seen as -10
    # The seven valid members all end near +1/sqrt(8): their ranking signal is gone.
    assert all(0.3 < a < 0.4 for a in floored[:7]) and mean_change(floored[:7], plain) > 0.6
    # Under reinforce (no group baseline) the clip does apply to the raw reward: -50 acts as -10.
    assert openrlhf_advantages([*VALID, -50.0], n=8, estimator="reinforce") == pytest.approx(
        openrlhf_advantages([*VALID, -10.0], n=8, estimator="reinforce")
    )


def test_group_floor_ranks_last_without_wrecking_the_group():
    plain = openrlhf_advantages(VALID, n=7)
    group = openrlhf_advantages([*VALID, min(VALID) - 0.1], n=8)
    fixed = openrlhf_advantages([*VALID, -50.0], n=8)
    assert group[7] == min(group)  # the failed sample ranks last
    assert mean_change(group[:7], plain) < 0.3 < 0.6 < mean_change(fixed[:7], plain)


def scored(cme: float) -> CMEResult:
    return CMEResult(cme, 5, False, None)


def failed() -> CMEResult:
    return CMEResult(-50.0, 0, False, "empty response")


def test_group_board_waits_for_the_group_then_floors():
    board = GroupBoard(size=4, wait_s=30, margin=0.1, max_waiting=2)
    out: list[CMEResult] = []
    group = board.arrive("k", failed())
    waiter = threading.Thread(target=lambda: out.append(board.settle(group, failed())))
    waiter.start()
    for value in (-1.0, -2.5, -1.7):
        time.sleep(0.05)
        assert not out  # still waiting for the group
        board.arrive("k", scored(value))
    waiter.join(5)
    assert out[0].cme == pytest.approx(-2.6) and out[0].error == "empty response"
    assert board.open_groups() == 0
    # The same prompt again opens a new group.
    board.arrive("k", scored(-1.0))
    assert board.open_groups() == 1


def test_group_board_limits_waiting_and_takes_what_arrived():
    board = GroupBoard(size=8, wait_s=0.2, margin=0.5, max_waiting=0)
    board.arrive("a", scored(-2.0))
    group = board.arrive("a", failed())
    assert board.settle(group, failed()).cme == pytest.approx(-2.5)  # no wait: cap reached
    lonely = GroupBoard(size=8, wait_s=0.2, margin=0.5, max_waiting=1)
    group = lonely.arrive("b", failed())
    started = time.monotonic()
    assert lonely.settle(group, failed()).cme == -50.0  # nobody scored: the fixed floor
    assert time.monotonic() - started >= 0.2
    assert lonely.settle(lonely.arrive("c", scored(-1.0)), scored(-1.0)).cme == -1.0


def test_group_options_are_checked_at_load():
    config = runtime.FileModeConfig.from_env(
        {"CME_REWARDS_GROUP_SIZE": "8", "CME_REWARDS_GROUP_WAIT_S": "60"}
    )
    assert config.group == GroupOptions(group_size=8, group_wait_s=60.0)
    with pytest.raises(
        OptionError, match=r"^CME_REWARDS_GROUP_SIZE: expected an integer, got 'x'$"
    ):
        runtime.FileModeConfig.from_env({"CME_REWARDS_GROUP_SIZE": "x"})
    with pytest.raises(OptionError, match=r"^CME_REWARDS_GROUP_WAIT_S: must be greater than 0"):
        runtime.FileModeConfig.from_env({"CME_REWARDS_GROUP_WAIT_S": "0"})


# -- file mode through OpenRLHF's own client ---------------------------------------------------------

INSTRUCTION = "Name a primary colour."
RESPONSES = ["", "Red.", "Blue is a primary colour.", "Yellow, like the sun, is one of them."]


@pytest.fixture(scope="module")
def tiny_scorer():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(cached_model_dir("smollm2-135m-instruct"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    return CMEScorer("tiny", model=model, tokenizer=tok, device="cpu")


class GroupEngine:
    """Stands in for vLLM: the samples of one prompt get these responses, each after a delay that
    grows with its length (so the empty one finishes first, as in vLLM)."""

    def __init__(self, tok, responses: list[str]) -> None:
        eos = tok.convert_tokens_to_ids("<|im_end|>")
        self.pending = [
            tok(text=r, add_special_tokens=False)["input_ids"] + [eos] for r in responses
        ]

    async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
        ids = self.pending.pop(0)
        await asyncio.sleep(0.05 * len(ids))
        out = SimpleNamespace(token_ids=ids, text="", finish_reason="stop", logprobs=None)
        return SimpleNamespace(outputs=[out])


def generate_group(executor, tok, responses):
    """What ``LLMRayActor.generate_responses`` does for one prompt: gather its samples."""
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": INSTRUCTION}], tokenize=False, add_generation_prompt=True
    )
    engine = GroupEngine(tok, responses)
    params = SimpleNamespace(max_tokens=64, logprobs=None)

    async def go():
        return await asyncio.gather(
            *(
                executor.execute(prompt, INSTRUCTION, deepcopy(params), 512, tok, engine)
                for _ in responses
            )
        )

    return asyncio.run(go())


@pytest.mark.parametrize("group_size", [None, 4])
def test_file_mode_floor_through_openrlhf_client(tiny_scorer, monkeypatch, group_size):
    if group_size is not None:
        monkeypatch.setenv("CME_REWARDS_GROUP_SIZE", str(group_size))
    monkeypatch.setenv("CME_REWARDS_MAX_WAIT_MS", "5")
    rt = runtime.FileModeRuntime(runtime.FileModeConfig.from_env(), scorer=tiny_scorer)
    monkeypatch.setattr(runtime, "_runtime", rt)
    executor = agent.SingleTurnAgentExecutor(str(reward_file_path()))
    tok = tiny_scorer.tokenizer
    outputs = generate_group(executor, tok, RESPONSES)
    rt.close()
    rewards = [float(o["reward"]) for o in outputs]
    logs = [{k: float(v) for k, v in o["extra_logs"].items()} for o in outputs]
    assert [entry["cme/floored_frac"] for entry in logs] == [1.0, 0.0, 0.0, 0.0]
    direct = [r.cme for r in tiny_scorer.score([INSTRUCTION] * 3, RESPONSES[1:])]
    assert rewards[1:] == pytest.approx(direct, abs=1e-4)
    plain = openrlhf_advantages(rewards[1:], n=3)
    advantages = openrlhf_advantages(rewards, n=4)
    if group_size is None:  # no group known: the fixed floor, which OpenRLHF normalises as it is
        assert rewards[0] == -50.0
        assert all(0.45 < a < 0.55 for a in advantages[1:])  # 1/sqrt(4): the ranking is gone
    else:
        assert rewards[0] == pytest.approx(min(direct) - 0.1, abs=1e-5)
        assert advantages[0] == min(advantages)
        fixed = openrlhf_advantages([-50.0, *direct], n=4)
        assert mean_change(advantages[1:], plain) < mean_change(fixed[1:], plain)
        assert rt.groups.open_groups() == 0
    # OpenRLHF's samples generator turns each value into a tensor: all are numbers under cme/.
    assert all(key.startswith("cme/") for key in logs[0])
    assert logs[1]["cme/n_tokens_mean"] > 0 and logs[0]["cme/n_tokens_mean"] == 0


def test_group_key_tells_labels_apart():
    assert group_key("p", "a") != group_key("p", "b")
    assert group_key("p", [{"role": "user", "content": "x"}]) == group_key(
        "p", [{"content": "x", "role": "user"}]
    )
