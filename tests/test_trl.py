"""CME reward callables for TRL: signature, names, hooks, floors, async, and a tiny GRPOTrainer run.

Most tests use tiny random-weight Llamas over the real SmolLM2 tokenizer (fast). The slow test
runs the README's command for integrations/trl/train_grpo_cme.py as written, with two real models:
policy SmolLM2-135M-Instruct (an instruct policy with a chat template, so the script's KL beta is
the paper's 0.01 and a reference model runs too) fed text prompts, and verifier Gemma-3-270M
(another family and tokenizer, as in the paper). The CME values TRL logged (its completions
tables) must equal a fresh ``CMEScorer`` on the same prompts and completions.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl.trainer import utils as trl_utils

from cme_rewards import FLOOR_REWARD, CMEScorer
from cme_rewards.io import InputError
from cme_rewards.models import cached_model_dir
from cme_rewards.options import OptionError
from cme_rewards.results import batch_metrics
from cme_rewards.trl import AsyncCMEReward, CMEReward, LengthPenalty, to_verifier_pair

PROMPTS = ["Name a primary colour.", "What is two plus two?"]
COMPLETIONS = ["Red is a primary colour.", "Four."]
CHAT_PROMPTS = [[{"role": "user", "content": p}] for p in PROMPTS]
CHAT_COMPLETIONS = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(cached_model_dir("smollm2-135m-instruct"))


def tiny_llama(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def scorer(tokenizer) -> CMEScorer:
    return CMEScorer(
        "tiny-verifier", model=tiny_llama(len(tokenizer), seed=1), tokenizer=tokenizer, device="cpu"
    )


def float64_cme(scorer: CMEScorer, prompt, response: str) -> float:
    """Mean log-prob of the scored tokens, computed in float64 from the model's full logits."""
    enc = scorer.encode(prompt, response)
    model = copy.deepcopy(scorer.model).double()
    with torch.no_grad():
        logits = model(torch.tensor([enc.input_ids])).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)[enc.n_prompt - 1 : -1]
    targets = torch.tensor(enc.input_ids[enc.n_prompt :])
    return logprobs.gather(1, targets[:, None]).mean().item()


class Hooks:
    """Records what a reward function sends to TRL's ``log_extra`` / ``log_metric``."""

    def __init__(self) -> None:
        self.extra: dict[str, list] = {}
        self.metrics: dict[str, float] = {}

    def log_extra(self, column: str, values: list) -> None:
        self.extra[column] = values

    def log_metric(self, name: str, value: float) -> None:
        self.metrics[name] = value


def test_to_verifier_pair_formats():
    assert to_verifier_pair("Hi", "Hello") == ("Hi", "Hello")
    chat = [{"role": "user", "content": "Hi"}]
    assert to_verifier_pair(chat, [{"role": "assistant", "content": "Hello"}]) == (chat, "Hello")
    blocks = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert to_verifier_pair(blocks, [{"role": "assistant", "content": "Yo"}]) == (chat, "Yo")
    tool_turns = [
        {"role": "assistant", "content": "", "tool_calls": [{"name": "add"}]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": "It is 4."},
    ]
    prompt, response = to_verifier_pair(chat, tool_turns)
    assert response == "It is 4."
    assert [m["role"] for m in prompt] == ["user", "assistant", "tool"]
    assert to_verifier_pair(chat, [{"role": "assistant", "content": None}]) == (chat, "")


def test_reward_matches_float64_reference_and_trl_sees_a_named_callable(scorer):
    reward = CMEReward(scorer=scorer)
    assert not isinstance(reward, nn.Module)
    assert trl_utils.get_callable_name(reward) == "cme"
    assert not trl_utils.is_async_callable(reward)
    values = reward(
        prompts=PROMPTS,
        completions=COMPLETIONS,
        completion_ids=[[1, 2], [3]],
        trainer_state=object(),
        some_dataset_column=["a", "b"],
    )
    assert len(values) == 2 and all(isinstance(v, float) for v in values)
    for value, prompt, completion in zip(values, PROMPTS, COMPLETIONS, strict=True):
        assert value == pytest.approx(float64_cme(scorer, prompt, completion), abs=1e-5)
    assert [r.cme for r in reward.last_results] == values


def test_conversational_equals_scoring_the_messages(scorer):
    values = CMEReward(scorer=scorer)(prompts=CHAT_PROMPTS, completions=CHAT_COMPLETIONS)
    direct = scorer.score(CHAT_PROMPTS, COMPLETIONS)
    assert values == [r.cme for r in direct]
    # the verifier's chat template wraps a string prompt the same way as one user message
    assert values == CMEReward(scorer=scorer)(prompts=PROMPTS, completions=COMPLETIONS)


def test_hooks_log_tokens_truncation_and_floors(scorer):
    hooks = Hooks()
    reward = CMEReward(scorer=scorer, name="cme_tiny")
    values = reward(
        prompts=PROMPTS + ["Say nothing."],
        completions=COMPLETIONS + [""],
        id=["p0", "p1", "p2"],
        log_extra=hooks.log_extra,
        log_metric=hooks.log_metric,
    )
    assert values[2] == FLOOR_REWARD and all(math.isfinite(v) for v in values)
    results = reward.last_results
    assert [r.id for r in results] == ["p0", "p1", "p2"]
    assert hooks.extra["cme_tiny/n_tokens"] == [r.n_tokens for r in results]
    assert (
        hooks.extra["cme_tiny/n_tokens"][2] == 0 and min(hooks.extra["cme_tiny/n_tokens"][:2]) > 0
    )
    assert hooks.extra["cme_tiny/truncated"] == [False, False, False]
    assert hooks.extra["cme_tiny/error"][:2] == [None, None] and hooks.extra["cme_tiny/error"][2]
    # batch_metrics under the reward's name: the same figures TRL and OpenRLHF log as cme/...
    assert hooks.metrics == {
        "cme_tiny/" + key.removeprefix("cme/"): value
        for key, value in batch_metrics(results).items()
    }
    assert hooks.metrics["cme_tiny/n_tokens_mean"] == pytest.approx(
        sum(r.n_tokens for r in results) / 3
    )
    assert hooks.metrics["cme_tiny/truncated_frac"] == 0.0
    assert hooks.metrics["cme_tiny/floored_frac"] == pytest.approx(1 / 3)
    assert hooks.metrics["cme_tiny/mean"] == pytest.approx((values[0] + values[1]) / 2)
    assert hooks.metrics["cme_tiny/min"] == min(values[:2])


def test_a_failed_completion_gets_its_prompts_group_floor(scorer):
    """TRL's completions of one prompt are a group: an empty one ranks just below the worst."""
    reward = CMEReward(scorer=scorer)
    values = reward(
        prompts=[PROMPTS[0]] * 3 + [PROMPTS[1]] * 2,
        completions=[COMPLETIONS[0], "Blue.", "", COMPLETIONS[1], ""],
    )
    assert values[2] == pytest.approx(min(values[:2]) - scorer.options.floor_margin)
    assert values[4] == pytest.approx(values[3] - scorer.options.floor_margin)
    assert [r.error is not None for r in reward.last_results] == [False, False, True, False, True]


def test_truncation_is_reported(tokenizer):
    model = tiny_llama(len(tokenizer), seed=1)
    short = CMEScorer("tiny", model=model, tokenizer=tokenizer, device="cpu", max_length=12)
    hooks = Hooks()
    CMEReward(scorer=short)(
        prompts=PROMPTS,
        completions=["word " * 40, "Four."],
        log_extra=hooks.log_extra,
        log_metric=hooks.log_metric,
    )
    assert hooks.extra["cme/truncated"] == [True, True]
    assert hooks.extra["cme/n_tokens"][0] == 11
    assert hooks.metrics["cme/truncated_frac"] == 1.0


def test_async_reward_is_awaited_and_equals_sync(scorer):
    reward = AsyncCMEReward(scorer=scorer, name="cme_async")
    assert trl_utils.is_async_callable(reward)
    assert trl_utils.get_callable_name(reward) == "cme_async"
    values = asyncio.run(reward(prompts=PROMPTS, completions=COMPLETIONS, trainer_state=None))
    assert values == CMEReward(scorer=scorer)(prompts=PROMPTS, completions=COMPLETIONS)


def test_lazy_construction_and_option_checks(monkeypatch, tokenizer):
    with pytest.raises(OptionError, match="^max_lenght: unknown option"):
        CMEReward(lazy=True, max_lenght=10)
    with pytest.raises(OptionError, match="^verifier: unknown verifier"):
        CMEReward("no-such-verifier", lazy=True)  # checked at construction, even when lazy
    with pytest.raises(OptionError, match="^max_length: must be at least 2"):
        CMEReward(lazy=True, max_length=1)
    built = []
    monkeypatch.setattr(
        "cme_rewards.trl.CMEScorer",
        lambda options: (
            built.append(options)
            or CMEScorer(
                model=tiny_llama(len(tokenizer), seed=2), tokenizer=tokenizer, options=options
            )
        ),
    )
    reward = CMEReward("gemma3-270m", lazy=True, device="cpu", max_length=64)
    assert built == [] and "not loaded" in repr(reward)
    reward(prompts=PROMPTS, completions=COMPLETIONS)
    reward(prompts=PROMPTS, completions=COMPLETIONS)
    assert [(o.verifier, o.device, o.max_length) for o in built] == [("gemma3-270m", "cpu", 64)]
    # the module-level reward that `trl grpo --reward_funcs cme_rewards.trl.cme` imports
    default = importlib.import_module("cme_rewards.trl").cme
    assert trl_utils.get_callable_name(default) == "cme" and "not loaded" in repr(default)


def test_length_penalty():
    penalty = LengthPenalty(8)
    assert trl_utils.get_callable_name(penalty) == "length_penalty"
    assert penalty(completion_ids=[[1] * 8, [], [1, 2]], prompts=["a", "b", "c"]) == [
        -1.0,
        0.0,
        -0.25,
    ]
    with pytest.raises(ValueError):
        LengthPenalty(0)


def load_script():
    """The integration script as a module (it is a file, not part of the package)."""
    if "train_grpo_cme" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "integrations" / "trl" / "train_grpo_cme.py"
        spec = importlib.util.spec_from_file_location("train_grpo_cme", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["train_grpo_cme"] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules["train_grpo_cme"]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_script_prompt_file(tmp_path):
    script = load_script()
    standard = write_jsonl(
        tmp_path / "s.jsonl", [{"prompt": "A", "id": 1}, {"prompt": "B", "id": 2}]
    )
    assert script.load_prompts(standard) == [{"prompt": "A", "id": "1"}, {"prompt": "B", "id": "2"}]
    chat = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "reference"}]
    rows = script.load_prompts(write_jsonl(tmp_path / "c.jsonl", [{"messages": chat}]))
    assert rows == [{"prompt": chat[:1]}]
    assert script.load_prompts(standard, limit=1) == [{"prompt": "A", "id": "1"}]
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "A"}, {"messages": chat}])
    with pytest.raises(
        InputError, match=r"m\.jsonl:2: conversational prompt, but line 1 is standard"
    ):
        script.load_prompts(mixed)
    missing = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "A"}, {"text": "B"}])
    with pytest.raises(
        InputError, match=r"x\.jsonl:2: expected a 'prompt' string or a 'messages' list"
    ):
        script.load_prompts(missing)
    assert script.main(["--policy", "p", "--prompts", str(missing)]) == 2


def test_script_defaults_are_the_papers(tmp_path):
    script = load_script()
    args, config = script.make_parser().parse_args_and_config(
        args=["--policy", "p", "--prompts", "x.jsonl", "--output_dir", str(tmp_path)]
    )
    assert (config.num_generations, config.temperature, config.learning_rate) == (8, 1.0, 3e-6)
    assert config.max_completion_length == 2048 and config.beta is None
    assert (config.loss_type, config.scale_rewards) == ("dapo", "group")  # TRL's, kept on purpose
    assert args.verifier is None and script.scorer_options(args).verifier == "smollm2-135m-instruct"

    class Tok:
        chat_template = None

    assert script.instruct_beta(Tok()) == 0.0
    Tok.chat_template = "{{ messages }}"
    assert script.instruct_beta(Tok()) == 0.01


def test_tiny_grpo_run_async_cme_plus_length_penalty(tmp_path, tokenizer, scorer):
    """A real GRPOTrainer (tiny random policy, conversational prompts) with async CME + length
    penalty: TRL's logged CME rewards and columns equal the scorer on the logged completions."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    policy = tiny_llama(len(tokenizer), seed=3)
    cme = AsyncCMEReward(scorer=scorer)
    config = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        reward_weights=[1.0, 0.5],
        logging_steps=1,
        log_completions=True,
        report_to="none",
        save_strategy="no",
    )
    dataset = Dataset.from_list(
        [{"prompt": p, "id": f"q{i}"} for i, p in enumerate(CHAT_PROMPTS * 2)]
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[cme, LengthPenalty(8)],
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    tables = sorted((tmp_path / "completions").glob("*.parquet"))
    assert len(tables) == 2
    weighted = []
    for table in map(pd.read_parquet, tables):
        prompts = [[dict(m) for m in p] for p in table["prompt"]]
        responses = [c[0]["content"] for c in table["completion"]]
        fresh = scorer.score(prompts, responses)
        assert any(r.error is None for r in fresh)
        assert table["cme"].tolist() == pytest.approx([r.cme for r in fresh], abs=1e-4)
        assert table["cme/n_tokens"].tolist() == [r.n_tokens for r in fresh]
        assert table["cme/truncated"].tolist() == [r.truncated for r in fresh]
        penalties = table["length_penalty"].to_numpy()
        assert ((penalties <= 0) & (penalties >= -1) & ((penalties * 8) % 1 == 0)).all()
        weighted.append((table["cme"] + 0.5 * table["length_penalty"]).mean())
    logged = [h for h in trainer.state.log_history if "rewards/cme/mean" in h]
    assert len(logged) == 2
    for step, table in zip(logged, map(pd.read_parquet, tables), strict=True):
        prompts = [[dict(m) for m in p] for p in table["prompt"]]
        fresh = scorer.score(prompts, [c[0]["content"] for c in table["completion"]])
        for key, value in batch_metrics(fresh).items():  # one process, one call per step
            assert step[key] == pytest.approx(value, abs=1e-4), key
    # TRL's "reward" is the reward_weights-weighted sum of CME and the length penalty
    assert [h["reward"] for h in logged] == pytest.approx(weighted, abs=1e-4)


def test_script_sends_text_prompts_to_an_instruct_policy_as_chat(tokenizer, caplog):
    script = load_script()
    rows = [{"prompt": "Name a colour.", "id": "a"}, {"prompt": "Say hi."}]
    wrapped = script.as_chat(rows, tokenizer)
    assert wrapped[0] == {"prompt": [{"role": "user", "content": "Name a colour."}], "id": "a"}
    assert "each of the 2 text prompts is sent as one user message" in caplog.text

    class BaseTokenizer:
        chat_template = None

    assert script.as_chat(rows, BaseTokenizer()) is rows
    chat = [{"prompt": [{"role": "user", "content": "Hi"}]}]
    assert script.as_chat(chat, tokenizer) is chat
    assert script.given(["--save_strategy=steps"], "save_strategy")
    assert not script.given(["--save_steps", "5"], "save_strategy")


TRL_COMMAND = (
    "python integrations/trl/train_grpo_cme.py --policy smollm2-135m-instruct --verifier gemma3-270m "
    "--prompts prompts.jsonl --output_dir runs/cme --max_steps 1 --num_generations 4 "
    "--max_completion_length 64 --log_completions true --save_model false"
)
"""The README's TRL command: the issue's new user (text prompts, an instruct policy), one step."""


@pytest.mark.slow
def test_grpo_readme_command_instruct_policy_text_prompts(tmp_path):
    """The README's command as written, from a folder holding prompts.jsonl with 16 AlpacaEval
    instructions as text: the instruct policy's first step has non-empty completions, TRL's CME
    values equal a fresh Gemma scorer, and --save_model false saves nothing."""
    repo = Path(__file__).resolve().parents[1]
    records = json.loads(
        (repo / "tests" / "data" / "winrate" / "claude-2.1_first40.annotations.json").read_text()
    )
    instructions = [r["instruction"] for r in records[:16]]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": i}) + "\n" for i in instructions)
    )
    (tmp_path / "integrations").symlink_to(repo / "integrations")
    argv = TRL_COMMAND.split()
    proc = subprocess.run(
        [sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each of the 16 text prompts is sent as one user message" in proc.stderr
    out = tmp_path / "runs" / "cme"
    assert sorted(p.name for p in out.iterdir()) == ["completions"]  # no model, no checkpoint

    tables = [pd.read_parquet(p) for p in sorted((out / "completions").glob("*.parquet"))]
    assert len(tables) == 1 and len(tables[0]) == 8  # step 1: 2 prompts x 4 completions
    prompts_seen = [[dict(m) for m in p] for t in tables for p in t["prompt"]]
    assert all(len(m) == 1 and m[0]["role"] == "user" for m in prompts_seen)  # sent as chat
    assert {m[0]["content"] for m in prompts_seen} <= set(instructions)
    first = [c[0]["content"] for c in tables[0]["completion"]]
    assert sum(bool(c.strip()) for c in first) >= 7, first  # raw text gave mostly empty ones

    verifier = CMEScorer("gemma3-270m", device="cpu")  # the script's defaults (dtype auto)
    for table in tables:  # each step is one reward call; a failed completion's group is its prompt
        step_prompts = [[dict(m) for m in p] for p in table["prompt"]]
        responses = [c[0]["content"] for c in table["completion"]]
        groups = [json.dumps(p, sort_keys=True) for p in step_prompts]
        fresh = verifier.score(step_prompts, responses, groups=groups)
        assert table["cme"].tolist() == pytest.approx([r.cme for r in fresh], abs=1e-3)
        assert table["cme/n_tokens"].tolist() == [r.n_tokens for r in fresh]
        assert all(-20 < r.cme < 0 for r in fresh if r.error is None)
