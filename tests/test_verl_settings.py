"""The ``reward.cme`` settings: from veRL's command line and from a YAML file, checked at start-up."""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import pytest
import verl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls

from cme_rewards.verl import CMERewardManager, CMESettings, CMESettingsError, route_to_cme

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
INTEGRATION_DIR = Path(__file__).resolve().parents[1] / "integrations" / "verl"


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
