"""OpenRLHF sample recovery on the real SmolLM2 policy tokenizer; file-mode configuration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cme_rewards.openrlhf.cli import main as reward_file_main
from cme_rewards.openrlhf.cli import reward_file_path
from cme_rewards.openrlhf.protocol import (
    EXTRA_LOG_KEYS,
    ChatTemplateStripper,
    PromptRecovery,
    extra_logs,
    openrlhf_reply,
    split_query,
)
from cme_rewards.openrlhf.runtime import FileModeConfig, reward_dict
from cme_rewards.options import OptionError
from cme_rewards.results import CMEResult, batch_metrics

INSTRUCTION = "Name three primary colours.\nAnswer briefly."
RESPONSE = "Red, blue and yellow."


@pytest.fixture(scope="module")
def policy_tok():
    from transformers import AutoTokenizer

    from cme_rewards.models import cached_model_dir

    return AutoTokenizer.from_pretrained(cached_model_dir("smollm2-135m-instruct"))


def trainer_view(tok, messages, response):
    """(query, prompt) exactly as OpenRLHF builds them: templated prompt, then decode(ids)."""
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(text=prompt, add_special_tokens=False)["input_ids"]
    response_ids = tok(text=response, add_special_tokens=False)["input_ids"] + [
        tok.convert_tokens_to_ids("<|im_end|>")
    ]
    return tok.decode(prompt_ids + response_ids, skip_special_tokens=False), prompt


def test_three_prompt_sources(policy_tok):
    query, prompt = trainer_view(policy_tok, [{"role": "user", "content": INSTRUCTION}], RESPONSE)
    assert query.endswith("<|im_end|>")

    with_tok = PromptRecovery(policy_tok)
    by_label = with_tok.recover(query, prompt, INSTRUCTION)
    assert (by_label.source, by_label.prompt, by_label.response) == ("label", INSTRUCTION, RESPONSE)

    by_template = with_tok.recover(query, prompt, "")
    assert (by_template.source, by_template.prompt, by_template.response) == (
        "template",
        INSTRUCTION,
        RESPONSE,
    )
    assert with_tok.startup_warning() is None

    as_is = PromptRecovery(None)
    raw = as_is.recover(query, prompt, None)
    assert (raw.source, raw.prompt, raw.response) == ("templated", prompt, RESPONSE)
    assert "templated prompt as it is" in as_is.startup_warning()


def test_template_with_system_message_and_chat_label(policy_tok):
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": INSTRUCTION},
    ]
    query, prompt = trainer_view(policy_tok, messages, RESPONSE)
    rec = PromptRecovery(policy_tok).recover(query, prompt, "")
    assert rec.source == "template" and rec.prompt == messages and rec.response == RESPONSE
    rec = PromptRecovery(policy_tok).recover(query, prompt, messages)  # a chat-format label column
    assert rec.source == "label" and rec.prompt == messages
    assert ChatTemplateStripper(policy_tok).unwrap("no template here") is None


def test_prompt_source_forced_and_checked(policy_tok):
    query, prompt = trainer_view(policy_tok, [{"role": "user", "content": INSTRUCTION}], RESPONSE)
    assert (
        PromptRecovery(policy_tok, "templated").recover(query, prompt, INSTRUCTION).prompt == prompt
    )
    assert (
        PromptRecovery(policy_tok, "template").recover(query, prompt, INSTRUCTION).source
        == "template"
    )
    with pytest.raises(ValueError, match="prompt_source"):
        PromptRecovery(policy_tok, "labels")
    with pytest.raises(ValueError, match="policy tokenizer"):
        PromptRecovery(None, "template")


def test_split_query_cases(policy_tok):
    prompt = "<|im_start|>user\n" + "x " * 40 + "<|im_end|>\n<|im_start|>assistant\n"
    assert split_query(prompt + "resp", prompt) == "resp"
    assert split_query(prompt[25:] + "resp", prompt) == "resp"  # OpenRLHF cut the prompt's left
    assert split_query("something else entirely", prompt) is None
    rec = PromptRecovery(policy_tok).recover("something else entirely", prompt, "hi")
    assert rec.error == "query does not start with the prompt"


def test_special_tokens_removed_from_response(policy_tok):
    query, prompt = trainer_view(
        policy_tok, [{"role": "user", "content": "Hi"}], "Hello<|im_end|><|endoftext|>"
    )
    assert PromptRecovery(policy_tok).recover(query, prompt, "Hi").response == "Hello"
    assert PromptRecovery(None).recover(query, prompt, "Hi").response == "Hello"


def test_replies_are_numeric_where_openrlhf_makes_tensors():
    results = [CMEResult(-1.5, 4, False, None), CMEResult(-50.0, 0, False, "empty response")]
    reply = openrlhf_reply(results)
    assert reply["rewards"] == reply["scores"] == [-1.5, -50.0]
    assert reply["extra_logs"]["cme/floored_frac"] == [0.0, 1.0]
    assert reply["results"][1]["error"] == "empty response"
    for value in reply["extra_logs"].values():
        torch.tensor([value])  # what OpenRLHF's samples generator does with each extra_logs value
    d = reward_dict(results)
    assert d["rewards"].shape == (2,) and d["rewards"].tolist() == [-1.5, -50.0]
    assert all(v.flatten()[0].item() == v[0].item() for v in d["extra_logs"].values())


def test_extra_logs_average_to_the_step_metrics_and_clobber_nothing():
    """OpenRLHF 0.11.2 averages each extra_logs key over a step's samples; the keys whose average is
    a batch metric equal it, and no key is one of OpenRLHF's own names."""
    from dataclasses import fields

    from openrlhf.trainer.ppo_utils.experience import Experience

    results = [
        CMEResult(-1.5, 4, False, None),
        CMEResult(-2.5, 12, True, None),
        CMEResult(-2.6, 0, False, "empty response"),
        CMEResult(-0.5, 7, False, None),
    ]
    logs = extra_logs(results)
    assert set(logs) == set(EXTRA_LOG_KEYS) and all(k.startswith("cme/") for k in logs)
    step = {key: sum(values) / len(values) for key, values in logs.items()}  # OpenRLHF's mean
    exact = batch_metrics(results)
    for key in ("cme/floored_frac", "cme/truncated_frac", "cme/n_tokens_mean"):
        assert step[key] == pytest.approx(exact[key])
    assert step["cme/mean"] == pytest.approx(sum(r.cme for r in results) / 4)  # floors included
    # OpenRLHF's own per-sample names: Experience fields, the info keys it sets, its rollout stats.
    openrlhf_names = {f.name for f in fields(Experience)} | {
        "reward", "score", "response_clip_ratio", "kl", "logprobs_diff", "return",
        "group_reward_std", "policy_loss", "actor_lr", "actor_grad_norm", "ppo_clip_ratio",
    }  # fmt: skip
    assert "truncated" in openrlhf_names and not set(logs) & openrlhf_names


def test_file_mode_config_names_bad_variables():
    cfg = FileModeConfig.from_env({"CME_REWARDS_MAX_WAIT_MS": "3", "CME_REWARDS_DEVICE": "cpu"})
    assert cfg.batch.max_wait_ms == 3.0 and cfg.scorer.device == "cpu"
    bad = {
        "CME_REWARDS_MAX_BATCH_SIZE": "expected an integer, got 'many'",
        "CME_REWARDS_GPU_MEMORY_FRACTION": "must be in",
        "CME_REWARDS_PROMPT_SOURCE": "must be one of",
        "CME_REWARDS_MAX_BATCH_TOKENS": "must be at least 1",
        "CME_REWARDS_VERIFIER": "unknown verifier",
        "CME_REWARDS_DEVICE": "not a device",
        "CME_REWARDS_DTYPE": "must be one of",
    }
    values = {"CME_REWARDS_MAX_BATCH_SIZE": "many", "CME_REWARDS_GPU_MEMORY_FRACTION": "1.5",
              "CME_REWARDS_PROMPT_SOURCE": "x", "CME_REWARDS_MAX_BATCH_TOKENS": "0",
              "CME_REWARDS_VERIFIER": "no-such", "CME_REWARDS_DEVICE": "bogus",
              "CME_REWARDS_DTYPE": "float8"}  # fmt: skip
    for name, reason in bad.items():
        with pytest.raises(ValueError, match=f"^{name}: {reason}"):
            FileModeConfig.from_env({name: values[name]})


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        ("CME_REWARDS_VERIFIER", "no-such-verifier", "unknown verifier 'no-such-verifier'"),
        ("CME_REWARDS_DEVICE", "bogus", "not a device: 'bogus'"),
        ("CME_REWARDS_DTYPE", "float8", "must be one of auto, float32, bfloat16"),
        ("CME_REWARDS_MAX_BATCH_SIZE", "abc", "expected an integer, got 'abc'"),
        ("CME_REWARDS_GROUP_SIZE", "0", "must be at least 1, got 0"),
    ],
)
def test_openrlhf_loading_the_reward_file_fails_naming_a_bad_variable(
    monkeypatch, variable, value, reason
):
    """OpenRLHF's own SingleTurnAgentExecutor loads the file by path: a bad variable stops it there
    (not at every call, where OpenRLHF would log it at INFO and train on None rewards)."""
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    monkeypatch.setenv(variable, value)
    with pytest.raises(OptionError) as caught:
        SingleTurnAgentExecutor(str(reward_file_path()))
    assert str(caught.value).startswith(f"{variable}: {reason}")
    assert str(caught.value).count("CME_REWARDS_") == 1  # the prefix is not repeated


def test_openrlhf_reward_file_checks_the_device_on_this_machine(monkeypatch):
    from openrlhf.utils.agent import SingleTurnAgentExecutor

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    monkeypatch.setenv("CME_REWARDS_DEVICE", "cuda")
    with pytest.raises(OptionError, match="^CME_REWARDS_DEVICE: 'cuda' asked for, but no CUDA"):
        SingleTurnAgentExecutor(str(reward_file_path()))


def test_reward_file_command_prints_the_module(capsys, monkeypatch):
    assert reward_file_main([]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.name == "reward_func.py" and "def reward_func(queries" in path.read_text()
    monkeypatch.setenv("CME_REWARDS_MAX_RETRIES", "abc")
    assert reward_file_main(["--check"]) == 2
    err = capsys.readouterr().err
    assert "CME_REWARDS_MAX_RETRIES: expected an integer, got 'abc'" in err
    assert "CME_REWARDS_CME_REWARDS" not in err


def installed_train_ppo_flags() -> set[str]:
    """Every option of the installed ``openrlhf.cli.train_ppo_ray`` parser, read from its source.

    (Importing it needs Ray, DeepSpeed and vLLM; the source lists its ``add_argument`` calls.)
    """
    import importlib.util

    source = (
        Path(importlib.util.find_spec("openrlhf").origin)
        .parent.joinpath("cli", "train_ppo_ray.py")
        .read_text()
    )
    flags = set(re.findall(r'add_argument\(\s*"(--[\w.]+)"', source))
    for templ in re.findall(r'add_argument\(\s*f"--\{prefix\}(\.[\w.]+)"', source):
        flags.update(f"--{prefix}{templ}" for prefix in ("actor", "critic"))
    return flags


def test_launch_script_uses_real_openrlhf_flags():
    flags = installed_train_ppo_flags()
    assert {"--reward.remote_url", "--data.label_key", "--actor.adam.lr"} <= flags
    script = Path(__file__).resolve().parents[1] / "integrations" / "openrlhf" / "train_grpo_cme.sh"
    text = script.read_text().split("python3 -m openrlhf.cli.train_ppo_ray", 1)[1]
    used = set(re.findall(r"(?<![\w-])(--[a-z][\w.]*)", text))
    assert len(used) > 25 and used - flags == set()


def test_compose_weights_parts_and_never_returns_none(caplog):
    from cme_rewards.openrlhf.compose import compose

    def good(queries, prompts, labels):
        return {"rewards": torch.tensor([1.0, 2.0]), "extra_logs": {"hits": [1.0, 0.0]}}

    def broken(queries, prompts, labels):
        return [float("nan"), 1.0]

    def boom(queries, prompts, labels):
        raise RuntimeError("no \x1b[31mcolour")

    reward_func = compose((good, 0.5), (broken, 2.0), (boom, 1.0), on_error=-1.0)
    out = reward_func(["q1", "q2"], ["p1", "p2"], ["", ""])
    assert out["rewards"].tolist() == [0.5 - 2.0 - 1.0, 1.0 - 2.0 - 1.0]
    logs = {k: v.tolist() for k, v in out["extra_logs"].items()}
    assert logs == {
        "reward/good": [1.0, 2.0],
        "good/hits": [1.0, 0.0],
        "reward/broken": [-1.0, -1.0],
        "reward/boom": [-1.0, -1.0],
    }
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("'broken' failed" in e and "nan for sample 0" in e for e in errors)
    assert any("'boom' failed" in e and "\\x1b[31m" in e for e in errors)  # escaped
    with pytest.raises(ValueError, match="two parts are named 'good'"):
        compose((good, 1.0), (good, 1.0))
    with pytest.raises(ValueError, match="weight must be finite"):
        compose((good, float("inf")))
