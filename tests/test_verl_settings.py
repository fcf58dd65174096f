"""The ``reward.cme`` settings: from veRL's command line and from a YAML file, checked at start-up.

Every command the veRL docs show (``integrations/verl/README.md`` and the README's veRL section) is
composed here as written, by Hydra in this process, and the shell ones also by running them with
``--cfg job``; the plugin's status is checked in fresh interpreters, as a trainer imports veRL.
"""

from __future__ import annotations

import asyncio
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import verl
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls

from cme_rewards.verl import CMERewardManager, CMESettings, CMESettingsError, route_to_cme
from cme_rewards.verl.settings import default_block, options_table, yaml_block
from cme_rewards.verl.status import IMPORTLIB_FALLBACK, plugin_status

REPO = Path(__file__).resolve().parents[1]
VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
INTEGRATION_DIR = REPO / "integrations" / "verl"


def test_command_line_overrides_reach_the_settings():
    overrides = [
        "reward.reward_manager.name=cme",
        "+reward.cme.verifier=smollm2-135m-instruct",
        "+reward.cme.num_gpus=0.25",
        "+reward.cme.max_length=1024",
        "+reward.cme.floor=-20",
        "+reward.cme.reduction=sum",
    ]
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
    s = CMESettings.from_verl_config(config)
    got = (s.scorer.verifier, s.verl.num_gpus, s.scorer.max_length, s.scorer.floor)
    assert got == ("smollm2-135m-instruct", 0.25, 1024, -20.0) and s.scorer.reduction == "sum"
    assert s.verl.backend == "local" and s.scorer.token_budget is None  # defaults for the rest
    assert resolve_reward_manager_cls(config) is CMERewardManager  # veRL's own lookup by name


def test_integration_yaml_composes_over_ppo_trainer():
    with initialize_config_dir(config_dir=str(INTEGRATION_DIR / "config"), version_base=None):
        config = compose(config_name="cme_grpo", overrides=["reward.cme.max_length=4096"])
    s = CMESettings.from_verl_config(config)
    assert s.scorer.verifier == "google/gemma-3-1b-it" and s.scorer.max_length == 4096
    assert s.scorer.dtype == "bfloat16"
    assert config.actor_rollout_ref.rollout.n == 8 and config.algorithm.adv_estimator == "grpo"
    assert config.actor_rollout_ref.actor.optim.lr == pytest.approx(3e-6)
    assert resolve_reward_manager_cls(config) is CMERewardManager
    assert "critic" in config  # the rest of veRL's ppo_trainer config is there


V = "smollm2-135m-instruct"


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"verifier": "no-such-verifier"}, r"reward\.cme\.verifier: unknown verifier 'no-such"),
        ({"verifier": "random:"}, r"reward\.cme\.verifier: random: needs a verifier name"),
        (
            {"verifier": V, "max_lenght": 10},
            r"reward\.cme\.max_lenght: unknown option; known options: verifier,",
        ),
        (
            {"verifier": V, "max_length": "long"},
            r"reward\.cme\.max_length: expected an integer, got 'long'",
        ),
        ({"verifier": V, "max_length": 1}, r"reward\.cme\.max_length: must be at least 2"),
        ({"verifier": V, "num_gpus": True}, r"reward\.cme\.num_gpus: expected a number"),
        ({"verifier": V, "backend": "tgi"}, r"reward\.cme\.backend: must be one of"),
        ({"verifier": V, "reduction": "median"}, r"reward\.cme\.reduction: must be one of"),
        ({"verifier": V, "floor": math.nan}, r"reward\.cme\.floor: must be a finite number"),
        ({"verifier": V, "device": "gpu0"}, r"reward\.cme\.device: not a device: 'gpu0'"),
        ({"verifier": V, "max_wait_ms": -1}, r"reward\.cme\.max_wait_ms: must be at least 0"),
        (
            {"verifier": V, "combine_with": ["accuracy"]},
            r"reward\.cme\.combine_with: 'accuracy' is not \[WEIGHT\*\]NAME",
        ),
        (
            {"verifier": V, "combine_with": ["length_penalty", "2*length_penalty"]},
            r"reward\.cme\.combine_with: two terms, or a term and a cme field, share",
        ),
        ({"verifier": V, "cme_weight": math.inf}, r"reward\.cme\.cme_weight: must be a finite"),
        ({"verifier": V, "group_wait_s": -5}, r"reward\.cme\.group_wait_s: must be at least 0"),
    ],
)
def test_bad_settings_name_the_key(block, message):
    with pytest.raises(CMESettingsError, match=message):
        CMESettings.from_verl_config(OmegaConf.create({"reward": {"cme": block}}))


def test_missing_block_takes_the_defaults():
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        config = compose(config_name="ppo_trainer", overrides=["reward.reward_manager.name=cme"])
    s = CMESettings.from_verl_config(config)
    assert s.scorer.verifier == "smollm2-135m-instruct" and s.scorer.dtype == "auto"
    assert not s.verifier_given


def test_routing_trap_fails_at_start_up_and_the_fix_loads():
    """With veRL's reward model on and no custom reward function, veRL would bypass the manager."""
    config = OmegaConf.create(
        {
            "reward": {
                "reward_manager": {"source": "register", "name": "cme"},
                "reward_model": {"enable": True},
                "custom_reward_function": {"path": None, "name": "compute_score"},
                "cme": {"backend": "vllm", "url": "http://127.0.0.1:9"},
            }
        }
    )

    async def build():
        return CMERewardManager(config, tokenizer=None)

    with pytest.raises(
        CMESettingsError, match=r"reward\.custom_reward_function\.path=pkg://cme_rewards\.verl"
    ):
        asyncio.run(build())
    config.reward.custom_reward_function = {
        "path": "pkg://cme_rewards.verl",
        "name": "route_to_cme",
    }
    fn = get_custom_reward_fn(config)  # veRL's own loader accepts the documented fix
    assert fn.func.__name__ == "_call_with_kwargs" and fn.args[0] is route_to_cme


def compose_cme_grpo(*overrides: str):
    with initialize_config_dir(config_dir=str(INTEGRATION_DIR / "config"), version_base=None):
        return compose(config_name="cme_grpo", overrides=list(overrides))


def compose_ppo_trainer(*overrides: str):
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def test_the_yaml_declares_every_key_and_the_generated_block_matches():
    config = compose_cme_grpo()
    assert set(config.reward.cme) == set(default_block())
    assert yaml.safe_load(yaml_block()) == {"reward": {"cme": default_block()}}


def test_plain_overrides_over_the_yaml_and_plus_plus_everywhere():
    s = CMESettings.from_verl_config(
        compose_cme_grpo(
            "reward.cme.backend=vllm",
            "reward.cme.url=http://10.0.0.5:8000",
            "reward.cme.max_wait_ms=5",
        )
    )
    assert (s.verl.backend, s.remote.url, s.batch.max_wait_ms) == (
        "vllm",
        "http://10.0.0.5:8000",
        5,
    )
    with pytest.raises(ConfigCompositionException, match="already at"):
        compose_cme_grpo("+reward.cme.backend=vllm")  # why the docs say ++
    with pytest.raises(ConfigCompositionException, match="Could not override 'reward.cme.url'"):
        compose_ppo_trainer("reward.cme.url=http://10.0.0.5:8000")
    for config in (
        compose_cme_grpo("++reward.cme.backend=sglang"),
        compose_ppo_trainer("++reward.cme.backend=sglang"),
    ):
        assert CMESettings.from_verl_config(config).verl.backend == "sglang"


def test_the_readme_options_table_is_generated_from_the_declarations():
    assert options_table() in (INTEGRATION_DIR / "README.md").read_text(), (
        "integrations/verl/README.md is stale: paste `python -m cme_rewards.verl table`"
    )


def bash_commands(text: str) -> list[str]:
    """The commands of a Markdown text's ```bash blocks, continuation lines joined."""
    out, block, current = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block or (not current and line.lstrip().startswith("#")):
            continue
        current += line.strip().removesuffix("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            out.append(current.strip())
            current = ""
    return out


def doc_commands() -> list[tuple[str, str]]:
    """``(doc, command)`` for every veRL command in the veRL README and the README's veRL section."""
    readme = (REPO / "README.md").read_text()
    start = readme.find("### veRL")
    section = readme[start : readme.find("\n### ", start + 1)] if start >= 0 else ""
    found = [
        ("integrations/verl/README.md", c)
        for c in bash_commands((INTEGRATION_DIR / "README.md").read_text())
    ]
    found += [("README.md", c) for c in bash_commands(section)]
    return [(d, c) for d, c in found if "verl" in c or "cme_grpo" in c]


def test_the_docs_show_the_commands_this_module_checks():
    commands = [c for _, c in doc_commands()]
    main_ppo = [c for c in commands if "verl.trainer.main_ppo" in c]
    assert len(main_ppo) >= 6 and any("run_cme_grpo.sh" in c for c in commands)
    assert any("reward.reward_manager.source=importlib" in c for c in main_ppo)
    assert any(c.startswith("python integrations/verl/prepare_ultrafeedback.py") for c in commands)


@pytest.mark.parametrize(
    ("doc", "command"),
    [c for c in doc_commands() if "verl.trainer.main_ppo" in c[1]],
    ids=lambda v: v if v.endswith(".md") else v[-60:],
)
def test_every_documented_main_ppo_command_composes(doc, command):
    args = shlex.split(command.replace("$PWD", str(REPO)))
    args = args[args.index("verl.trainer.main_ppo") + 1 :]
    path = next(
        (a.split("=", 1)[1] for a in args if a.startswith("--config-path=")), VERL_CONFIG_DIR
    )
    name = next((a.split("=", 1)[1] for a in args if a.startswith("--config-name=")), "ppo_trainer")
    overrides = [a for a in args if not a.startswith("--")]
    with initialize_config_dir(config_dir=path, version_base=None):
        config = compose(config_name=name, overrides=overrides)
    assert resolve_reward_manager_cls(config) is CMERewardManager  # veRL's own lookup
    settings = CMESettings.from_verl_config(config)  # every reward.cme value is valid
    parser = OverridesParser.create()
    for override in parser.parse_overrides(overrides):
        key = override.key_or_group
        if key.startswith("reward.cme."):  # the value reached the block as written
            got = OmegaConf.select(config, key)
            got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
            assert got == override.value(), key
    assert settings.scorer.max_length >= 2


def run_as_written(command: str, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``command`` run by bash from the repository root, this interpreter first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-c", " ".join([command, *extra])],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_the_shell_commands_run_as_written():
    """The data script on a local file, and the launch script up to Hydra's composed config."""
    commands = [c for _, c in doc_commands()]
    prepare = next(c for c in commands if c.startswith("python integrations/verl/prepare_"))
    done = run_as_written(prepare)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "/tmp/ultrafeedback_cme/test.parquet: 4 prompts" in done.stdout
    import pandas as pd

    rows = pd.read_parquet("/tmp/ultrafeedback_cme/test.parquet")
    assert rows["prompt"][0][0]["role"] == "user" and rows["data_source"][0] == "ultrafeedback"

    launch = next(c for c in commands if "run_cme_grpo.sh" in c)
    done = run_as_written(launch, "--cfg job")
    assert done.returncode == 0, done.stderr[-2000:]
    config = yaml.safe_load(done.stdout)
    assert config["reward"]["reward_manager"]["name"] == "cme"
    assert config["reward"]["cme"]["verifier"] == "smollm2-135m-instruct"
    assert config["trainer"]["n_gpus_per_node"] == 8


@pytest.mark.slow
def test_plugin_status_reports_the_real_import_error(tmp_path):
    ok, message = plugin_status()
    assert ok, message
    assert "registers reward manager 'cme' -> cme_rewards.verl.manager.CMERewardManager" in message
    # A dependency of the plugin that does not import: veRL alone would log it at DEBUG and later
    # say only "Unknown reward manager: cme".
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Broken:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'cme_rewards.batching':\n"
        "            raise ImportError('simulated: cme_rewards.batching is broken here')\n"
        "sys.meta_path.insert(0, Broken())\n"
    )
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = f"{tmp_path}:{old}" if old else str(tmp_path)
    try:
        ok, message = plugin_status()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    assert not ok
    assert "importing the cme plugin fails, so veRL skips it" in message
    assert "ImportError: simulated: cme_rewards.batching is broken here" in message
    assert IMPORTLIB_FALLBACK in message  # the documented way to see it at training time


def test_a_bad_metrics_logger_names_the_key():
    config = OmegaConf.create(
        {
            "reward": {
                "reward_manager": {"source": "register", "name": "cme"},
                "cme": {"verifier": V, "metrics_logger": ["console", "tensorbored"]},
            }
        }
    )

    async def build():
        return CMERewardManager(config, tokenizer=None)

    with pytest.raises(
        CMESettingsError, match=r"^reward\.cme\.metrics_logger: 'tensorbored' is not"
    ):
        asyncio.run(build())
