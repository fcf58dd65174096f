"""veRL integration: the reward-loop reward manager ``cme``.

``pip install cme-rewards[verl]`` registers it through veRL's ``verl.plugins`` entry point (loaded on
``import verl``), so ``reward.reward_manager.name=cme`` selects it with no change to veRL. Importing
this package only registers the manager; no model is loaded until veRL builds the manager.
Settings: the ``reward.cme`` block (:class:`CMESettings`, keys listed in
``integrations/verl/README.md``).
"""

from cme_rewards.verl.manager import EXTRA_INFO_KEYS, CMERewardManager, route_to_cme
from cme_rewards.verl.settings import CMESettings, CMESettingsError

__all__ = ["EXTRA_INFO_KEYS", "CMERewardManager", "CMESettings", "CMESettingsError", "route_to_cme"]
