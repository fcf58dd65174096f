"""veRL integration: the reward-loop reward manager ``cme``.

``pip install cme-rewards[verl]`` registers it through veRL's ``verl.plugins`` entry point (loaded on
``import verl``), so ``reward.reward_manager.name=cme`` selects it with no change to veRL. Importing
this package only registers the manager; no model is loaded until veRL builds the manager.
Settings: the ``reward.cme`` block (:class:`CMESettings`, keys listed in
``integrations/verl/README.md``).

veRL logs a plugin that fails to import at DEBUG level only, so the trainer later says just
"Unknown reward manager: cme". This package therefore logs the real import error itself, as a
warning with its traceback, and :func:`cme_rewards.verl.status.plugin_status` (used by
``cme-rewards doctor``) reports it; the names below then raise ``ImportError`` from it.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

__all__ = ["EXTRA_INFO_KEYS", "CMERewardManager", "CMESettings", "CMESettingsError", "route_to_cme"]

IMPORT_ERROR: BaseException | None = None
"""Why the manager could not be imported (and so registered), or ``None``."""
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
