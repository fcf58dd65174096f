"""OpenRLHF file-mode reward: pass this file's path to ``--reward.remote_url``.

``cme-rewards openrlhf-reward-file`` prints the path. OpenRLHF loads this file by path (not as
``cme_rewards.openrlhf.reward_func``), so the per-process state lives in ``runtime``. Configuration
comes from ``CME_REWARDS_*`` environment variables (see ``cme_rewards.openrlhf.runtime``); they are
checked when OpenRLHF loads this file, and the verifier loads on the first call.
"""

from __future__ import annotations

from typing import Any

from cme_rewards.openrlhf.runtime import FileModeConfig, get_runtime, reward_dict

_CONFIG = FileModeConfig.load()  # a bad variable fails when OpenRLHF loads this file, naming it


def reward_func(queries: list[str], prompts: list[str], labels: list[Any]) -> dict[str, Any]:
    """CME rewards for OpenRLHF: ``{"rewards": tensor [n], "scores": tensor [n], "extra_logs": {...}}``.

    ``queries[i]`` is the templated prompt + response as the trainer decoded it (special tokens
    kept), ``prompts[i]`` the templated prompt, ``labels[i]`` the ``--data.label_key`` column (the
    raw prompt, in the recipe). Thread-safe; concurrent calls share verifier batches. Rewards are
    nats (mean log-likelihood under the verifier). A sample that cannot be scored gets its group's
    floor with ``CME_REWARDS_GROUP_SIZE`` (:mod:`cme_rewards.openrlhf.grouping`), else the fixed one.
    """
    return reward_dict(get_runtime(_CONFIG).score(queries, prompts, labels))
