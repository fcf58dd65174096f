"""Whether ``import verl`` registers the ``cme`` reward manager, and if not, why (for the doctor).

veRL logs a plugin that fails to import at DEBUG level only, and the trainer stops much later with
"Unknown reward manager: cme"; :func:`plugin_status` finds the real cause.
"""

from __future__ import annotations

import json
import subprocess
import sys

IMPORTLIB_FALLBACK = (
    "reward.reward_manager.source=importlib "
    "reward.reward_manager.module.path=pkg://cme_rewards.verl.manager "
    "reward.reward_manager.name=CMERewardManager"
)
"""veRL overrides that load the manager by module path, so an import error stops the trainer."""

_PROBE = r"""
import json, os, sys, traceback
from importlib.metadata import entry_points

eps = [ep for ep in entry_points(group="verl.plugins") if ep.name == "cme"]
out = {"ok": False, "entry_point": eps[0].value if eps else None, "stage": "import verl"}
out["policy"] = os.environ.get("VERL_USE_EXTERNAL_PLUGINS", "auto")
try:
    import verl
    out["verl"] = getattr(verl, "__version__", "?")
    out["stage"] = "veRL's reward-manager registry"
    from verl.experimental.reward_loop.reward_manager.registry import REWARD_MANAGER
except Exception:
    out["traceback"] = traceback.format_exc()
    print(json.dumps(out)); sys.exit(0)
cls = REWARD_MANAGER.get("cme")
out["stage"] = "cme plugin"
if cls is not None:
    out["ok"] = True
    out["cls"] = f"{cls.__module__}.{cls.__qualname__}"
else:
    tb = getattr(sys.modules.get("cme_rewards.verl"), "IMPORT_TRACEBACK", None)
    if tb is None:
        try:
            import cme_rewards.verl.manager  # noqa: F401
        except Exception:
            tb = traceback.format_exc()
    out["traceback"] = tb
print(json.dumps(out))
"""


def plugin_status(timeout: float = 300.0) -> tuple[bool, str]:
    """``(True, what registered)`` when ``import verl`` registers the reward manager ``cme``, else
    ``(False, why not)`` with the import error's traceback and what to do about it.

    Runs ``import verl`` in a fresh interpreter with this environment, as a trainer would (seconds).
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False, f"`import verl` did not finish within {timeout:g} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip()[-3000:]
        return False, f"the veRL probe process failed (exit {proc.returncode}):\n{tail}"
    return _describe(json.loads(lines[-1]))


def _describe(out: dict) -> tuple[bool, str]:
    if out.get("ok"):
        return True, (
            f"veRL {out['verl']} registers reward manager 'cme' -> {out['cls']} "
            f"(entry point verl.plugins: cme = {out['entry_point']})"
        )
    fallback = f"To see the error at training time instead, load it by path: {IMPORTLIB_FALLBACK}"
    stage = out.get("stage")
    tb = (out.get("traceback") or "").strip()
    if stage == "import verl":
        if "No module named 'verl'" in tb:
            return False, "veRL is not installed: pip install 'cme-rewards[verl]'"
        return False, f"`import verl` fails:\n{tb}"
    if stage != "cme plugin":
        return False, f"veRL {out.get('verl')} has no reward-loop registry ({stage}):\n{tb}"
    if out.get("entry_point") is None:
        return False, (
            "no 'cme' entry point in the group verl.plugins: cme-rewards is not installed in this "
            "environment (pip install 'cme-rewards[verl]', or pip install -e . in a checkout). "
            + fallback
        )
    policy = str(out.get("policy", "auto")).strip().lower()
    if policy == "none" or (
        policy != "auto" and "cme" not in {p.strip() for p in policy.split(",")}
    ):
        return False, (
            f"VERL_USE_EXTERNAL_PLUGINS={out.get('policy')!r} keeps veRL from loading the cme "
            "plugin: unset it or add cme to the list. " + fallback
        )
    if tb:
        return False, f"importing the cme plugin fails, so veRL skips it:\n{tb}\n{fallback}"
    return False, "veRL loaded the cme plugin but 'cme' is not in its registry. " + fallback
