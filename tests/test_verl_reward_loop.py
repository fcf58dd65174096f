"""The ``cme`` manager inside veRL's own reward loop (``RewardLoopManager`` / ``RewardLoopWorker``).

One local Ray instance for the module (2 CPUs, no dashboard). veRL's ``RewardLoopManager`` starts
two ``RewardLoopWorker`` actors which build our manager by its registered name ``cme`` (through the
``verl.plugins`` entry point, loaded by ``import verl`` in each worker); they share one verifier
actor holding the real SmolLM2-135M-Instruct verifier. The batch is a real ``DataProto`` built with
the SmolLM2 tokenizer as the policy tokenizer.
"""

from __future__ import annotations

import os

import pytest
import ray
import verl
from hydra import compose, initialize_config_dir
from verl.experimental.reward_loop import RewardLoopManager
from verl_data import make_batch, valid_response_lengths

from cme_rewards import FLOOR_REWARD, cached_model_dir
from cme_rewards.verl import EXTRA_INFO_KEYS
from cme_rewards.verl.verifier_actor import ACTOR_PREFIX

pytestmark = pytest.mark.slow

VERIFIER = "smollm2-135m-instruct"
VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def verl_config(*overrides: str):
    """veRL's ``ppo_trainer`` config composed by Hydra, as ``main_ppo`` composes it."""
    policy = str(cached_model_dir(VERIFIER))
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(
            config_name="ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={policy}",
                "reward.reward_manager.name=cme",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


def test_reward_loop_scores_with_cme(ray_session, smollm_scorer):
    config = verl_config(
        "reward.num_workers=2",
        f"+reward.cme.verifier={VERIFIER}",
        "+reward.cme.device=cpu",
        "+reward.cme.dtype=float32",
        "+reward.cme.max_wait_ms=1000",  # lets both workers' calls meet in one batch
    )
    manager = RewardLoopManager(config)
    data, messages, texts = make_batch(smollm_scorer.tokenizer)
    out = manager.compute_rm_score(data)

    want = smollm_scorer.score(messages, texts)
    rm = out.batch["rm_scores"]
    assert rm.shape == data.batch["responses"].shape
    last = valid_response_lengths(data) - 1
    for i, w in enumerate(want):
        assert rm[i, last[i]].item() == pytest.approx(
            w.cme, abs=1e-4
        )  # scalar at the last valid token
        assert rm[i].count_nonzero().item() == 1
    assert out.meta_info["reward_extra_keys"] == list(EXTRA_INFO_KEYS)
    assert out.non_tensor_batch["cme"].tolist() == pytest.approx([w.cme for w in want], abs=1e-4)
    assert out.non_tensor_batch["n_tokens"].tolist() == [w.n_tokens for w in want]
    assert out.non_tensor_batch["error"].tolist() == [w.error or "" for w in want]
    # The policy emitted only EOS for sample 5: floor reward, same keys as every other sample.
    assert want[5].error == "empty response" and rm[5, 0].item() == FLOOR_REWARD
    assert min(w.cme for i, w in enumerate(want) if i != 5) > FLOOR_REWARD  # real scores elsewhere

    # One verifier actor for the node, shared by both workers, which batched their calls together.
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(ACTOR_PREFIX)
    ]
    assert len(names) == 1
    info = ray.get(ray.get_actor(names[0]).info.remote())
    assert info["device"] == "cpu" and info["calls"] == len(data)
    assert sum(info["batch_sizes"]) == len(data) and max(info["batch_sizes"]) > 1


def test_bad_setting_names_the_key(ray_session, smollm_scorer):
    """A misspelt key stops the reward loop with a message naming it (before any training step)."""
    config = verl_config(
        "reward.num_workers=1", f"+reward.cme.verifier={VERIFIER}", "+reward.cme.max_lenght=512"
    )
    manager = RewardLoopManager(config)
    data, _, _ = make_batch(smollm_scorer.tokenizer)
    with pytest.raises(
        ray.exceptions.RayActorError, match=r"reward\.cme\.max_lenght: unknown option"
    ):
        manager.compute_rm_score(data[:1])
