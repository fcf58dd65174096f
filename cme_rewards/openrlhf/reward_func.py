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
    """CME rewards (nats) for OpenRLHF: ``{"rewards": tensor [n], "scores": tensor [n],
    "extra_logs": {...}}`` of templated prompt + response ``queries``, templated ``prompts`` and
    ``--data.label_key`` ``labels``; thread-safe, concurrent calls share verifier batches."""
    return reward_dict(get_runtime(_CONFIG).score(queries, prompts, labels))
