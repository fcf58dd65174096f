"""OpenRLHF sample recovery on the real SmolLM2 policy tokenizer; file-mode configuration."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cme_rewards.openrlhf.cli import main as reward_file_main
from cme_rewards.openrlhf.protocol import (
    ChatTemplateStripper,
    PromptRecovery,
    openrlhf_reply,
    split_query,
)
from cme_rewards.openrlhf.runtime import FileModeConfig, reward_dict
from cme_rewards.results import CMEResult

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
    assert reply["extra_logs"]["failed"] == [0.0, 1.0]
    assert reply["results"][1]["error"] == "empty response"
    for value in reply["extra_logs"].values():
        torch.tensor([value])  # what OpenRLHF's samples generator does with each extra_logs value
    d = reward_dict(results)
    assert d["rewards"].shape == (2,) and d["rewards"].tolist() == [-1.5, -50.0]
    assert all(v.flatten()[0].item() == v[0].item() for v in d["extra_logs"].values())


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
