"""Every scorer option through every surface: the same default, and the same message for a bad value.

Surfaces: Python (``ScorerOptions``, ``CMEScorer``, TRL's ``CMEReward``), ``cme-rewards score`` and
``cme-rewards serve`` flags, OpenRLHF file mode's ``CME_REWARDS_*`` variables, veRL's ``reward.cme.*``
keys (composed by Hydra), and the TRL script's ``--cme_*`` arguments. Nothing here loads a model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import typing
from pathlib import Path

import pytest
import verl
from hydra import compose, initialize_config_dir

from cme_rewards.cli import main as cli_main
from cme_rewards.openrlhf.runtime import FileModeConfig, env_key
from cme_rewards.options import OptionError, ScorerOptions, flag
from cme_rewards.server.cli import build_parser as serve_parser
from cme_rewards.server.cli import parse_options as serve_options
from cme_rewards.trl import CMEReward
from cme_rewards.verl.settings import CMESettings, config_key

REPO = Path(__file__).resolve().parents[1]
VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
OPTIONS = [f.name for f in dataclasses.fields(ScorerOptions)]

# One bad value per option, as a user would type it, and the reason every surface must give.
BAD = {
    "verifier": ("no-such-verifier", "unknown verifier 'no-such-verifier'"),
    "device": ("bogus", "not a device: 'bogus'"),
    "dtype": ("float8", "must be one of auto, float32, bfloat16, float16, float64; got 'float8'"),
    "max_length": ("1", "must be at least 2, got 1"),
    "token_budget": ("0", "must be at least 1, got 0"),
    "reduction": ("median", "must be one of mean, sum, min_k, pmi, pmi_sum; got 'median'"),
    "min_k_percent": ("0", "must be in (0, 100], got 0.0"),
    "min_tokens": ("zero", "expected an integer, got 'zero'"),
    "floor": ("nan", "must be a finite number, got nan"),
    "floor_margin": ("-1", "must be at least 0, got -1.0"),
    "score_eos": ("maybe", "expected true or false, got 'maybe'"),
    "prompt_template": ("no field", "must contain the field {prompt}"),
    "chat_template": ("{% if %}", "is not a valid Jinja template"),
    "strip_special_tokens": ('["<a>", 1]', "expected list of strings"),
    "impl": ("cuda", "must be one of auto, torch, triton; got 'cuda'"),
    "share_prefix": ("sometimes", "expected true or false, got 'sometimes'"),
    "seed": ("1.5", "expected an integer, got '1.5'"),
}


def test_every_option_has_a_bad_value_case():
    assert set(BAD) == set(OPTIONS)


def load_trl_script():
    path = REPO / "integrations" / "trl" / "train_grpo_cme.py"
    spec = importlib.util.spec_from_file_location("train_grpo_cme_options", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


TRL = load_trl_script()
TRL_BASE = ["--policy", "p", "--prompts", "p.jsonl", "--output_dir", "/tmp/unused"]


def trl_options(*args: str) -> ScorerOptions:
    script_args, _ = TRL.make_parser().parse_args_and_config(args=[*TRL_BASE, *args])
    return TRL.scorer_options(script_args)


def verl_options(*overrides: str) -> ScorerOptions:
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=list(overrides))
    return CMESettings.from_verl_config(config).scorer


def test_the_same_defaults_on_every_surface(tmp_path):
    default = ScorerOptions()
    assert default.dtype == "auto" and default.reduction == "mean" and default.floor == -50.0
    assert serve_options(serve_parser().parse_args([]))[0] == default
    assert FileModeConfig.from_env({}).scorer == default
    assert verl_options("reward.reward_manager.name=cme") == default
    assert trl_options() == default
    assert CMEReward(lazy=True).options == default
    from cme_rewards.options import from_namespace
    from cme_rewards.score_cli import build_parser as score_parser

    args = score_parser().parse_args([str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "o")])
    assert from_namespace(ScorerOptions, args) == default


HINTS = typing.get_type_hints(ScorerOptions)


def typed(name: str, raw: str):
    """The value as Python code or a YAML file would hold it (a number where one is meant)."""
    from cme_rewards.options import _base_type, _from_string

    if name == "strip_special_tokens":
        return json.loads(raw)  # a list, as YAML or Python would hold it
    try:
        return _from_string(_base_type(HINTS[name])[0], raw)
    except ValueError:
        return raw


@pytest.mark.parametrize("name", OPTIONS)
def test_the_same_message_for_a_bad_value_on_every_surface(name, tmp_path, capsys, monkeypatch):
    raw, reason = BAD[name]
    messages: dict[str, str] = {}

    def caught(surface: str, call) -> None:
        with pytest.raises(OptionError) as exc:
            call()
        messages[surface] = str(exc.value)

    caught("python", lambda: ScorerOptions.from_kwargs(**{name: typed(name, raw)}))
    caught("trl-python", lambda: CMEReward(lazy=True, **{name: typed(name, raw)}))
    # Flags of booleans take no value, and any words are tokens: no bad value to type there.
    on_the_command_line = name not in ("score_eos", "share_prefix", "strip_special_tokens")
    if on_the_command_line:
        caught("serve", lambda: serve_options(serve_parser().parse_args([flag(name), raw])))
    caught("env", lambda: FileModeConfig.from_env({env_key(name): raw}))
    caught("verl", lambda: CMESettings.from_mapping({name: typed(name, raw)}))
    caught(
        "trl-script",
        lambda: trl_options(f"--cme_{name}" if name != "verifier" else "--verifier", raw),
    )
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "Hi", "response": "Hello"}\n')
    if on_the_command_line:
        assert cli_main(["score", str(src), "-o", str(tmp_path / "o.jsonl"), flag(name), raw]) == 2
        messages["score"] = (
            capsys.readouterr().err.strip().removeprefix("cme-rewards score: error: ")
        )
    spelled = {
        "python": name,
        "trl-python": name,
        "serve": flag(name),
        "score": flag(name),
        "env": env_key(name),
        "verl": config_key(name),
        "trl-script": "--" + TRL.script_name(name),
    }
    for surface, message in messages.items():
        assert message.startswith(f"{spelled[surface]}: "), (surface, message)
        assert reason in message, (surface, message)
    reasons = {m.split(": ", 1)[1] for m in messages.values()}
    if name == "strip_special_tokens":  # a list shows as a list, a text as a text
        reasons = {r.split(", got")[0] for r in reasons}
    assert len(reasons) == 1, messages  # the very same text after the option's name


def test_verl_keys_compose_with_hydra_and_reach_the_scorer():
    got = verl_options(
        "reward.reward_manager.name=cme",
        "++reward.cme.max_length=1024",
        "++reward.cme.reduction=min_k",
        "++reward.cme.share_prefix=false",
        "++reward.cme.strip_special_tokens=['<a>','<b>']",
    )
    assert (got.max_length, got.reduction, got.share_prefix) == (1024, "min_k", False)
    assert got.strip_special_tokens == ("<a>", "<b>")


def test_docs_options_table_is_generated_from_the_declarations():
    spec = importlib.util.spec_from_file_location(
        "render_docs", REPO / "scripts" / "render_docs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (REPO / "docs" / "options.md").read_text() == module.render(), (
        "docs/options.md is stale: run python scripts/render_docs.py"
    )
