"""An OpenRLHF file-mode reward that adds a brevity term to CME (a template for your own terms).

    --reward.remote_url integrations/openrlhf/composed_reward.py

The reward is ``1.0 * cme + 0.1 * brevity``; OpenRLHF logs ``reward/cme`` and ``reward/brevity``
(each unweighted) beside CME's own ``cme/...`` metrics. CME is configured by the ``CME_REWARDS_*``
variables, as for the file ``cme-rewards openrlhf-reward-file`` prints.
"""

from cme_rewards.openrlhf.compose import cme_reward, compose


def brevity(queries, prompts, labels):
    """-(response characters) / 4000, in [-1, 0]: the query is the prompt followed by the response."""
    return [-min(len(q) - len(p), 4000) / 4000 for q, p in zip(queries, prompts, strict=True)]


reward_func = compose((cme_reward, 1.0), (brevity, 0.1))
