"""veRL integration: the reward-loop reward manager ``cme`` (settings: ``reward.cme``).

Registered through veRL's ``verl.plugins`` entry point (``reward.reward_manager.name=cme``). veRL
logs a plugin's import error at DEBUG level only, so it is logged here as a warning, and the
names below then raise ``ImportError`` from it.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

__all__ = ["EXTRA_INFO_KEYS", "CMERewardManager", "CMESettings", "CMESettingsError", "route_to_cme"]

IMPORT_ERROR: BaseException | None = None  # why the manager could not be imported, or None
IMPORT_TRACEBACK: str | None = None

try:
    from cme_rewards.verl.manager import EXTRA_INFO_KEYS, CMERewardManager, route_to_cme
    from cme_rewards.verl.settings import CMESettings, CMESettingsError
except Exception as _exc:  # noqa: BLE001 - reported, then re-raised on use (see __getattr__)
    IMPORT_ERROR = _exc
    IMPORT_TRACEBACK = traceback.format_exc()
    logging.getLogger("cme_rewards").warning(
        "cme_rewards.verl: the reward manager 'cme' could not be registered with veRL (%s: %s); "
        "reward.reward_manager.name=cme will fail with 'Unknown reward manager: cme'. "
        "Run `cme-rewards doctor` for details.\n%s",
        type(_exc).__name__,
        _exc,
        IMPORT_TRACEBACK,
    )


def __getattr__(name: str) -> Any:
    if IMPORT_ERROR is not None and name in __all__:
        raise ImportError(
            f"cme_rewards.verl.{name} is unavailable: importing the veRL manager failed with "
            f"{type(IMPORT_ERROR).__name__}: {IMPORT_ERROR}"
        ) from IMPORT_ERROR
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
