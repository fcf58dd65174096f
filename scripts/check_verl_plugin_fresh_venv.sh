#!/usr/bin/env bash
# Checks, in a fresh virtual environment (no --system-site-packages, nothing from the project's
# .venv), that `pip install torch==2.13.0 && pip install .[verl]` alone installs what veRL's trainer
# needs: the `cme` reward manager registers (veRL's own lookup and `plugin_status()`), the modules
# main_ppo's default path imports (trainer.use_v1: transfer_queue, the reward loop and its router)
# import, and `python -m verl.trainer.main_ppo ... --cfg job` composes the integration config.
# Prints the time each step took and the resolved versions. Not part of the test run (minutes).
# Usage: scripts/check_verl_plugin_fresh_venv.sh [VENV_DIR]   (default: a temporary folder, removed after)
# Extra pip options (e.g. --find-links DIR) can be passed in PIP_OPTS.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$(mktemp -d /tmp/cme-verl-venv.XXXXXX)}"
[ $# -ge 1 ] || trap 'rm -rf "$venv"' EXIT
PY=${PYTHON:-python3}
start=$(date +%s)
step() { echo "[$(( $(date +%s) - start )) s] $*"; }

step "creating a fresh venv in $venv"
"$PY" -m venv "$venv"
"$venv/bin/python" -c "import sys; assert sys.prefix != sys.base_prefix"
grep -q "include-system-site-packages = false" "$venv/pyvenv.cfg"
"$venv/bin/pip" install -q ${PIP_OPTS:-} --upgrade pip
step "pip install torch==2.13.0"
"$venv/bin/pip" install -q ${PIP_OPTS:-} torch==2.13.0
step "pip install $repo[verl]"
"$venv/bin/pip" install -q ${PIP_OPTS:-} "$repo[verl]"
step "checking the plugin (run from / so the checkout is not importable)"
cd /
"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import os
import sys

import cme_rewards

assert "site-packages" in cme_rewards.__file__, f"cme_rewards imported from {cme_rewards.__file__}"
eps = [ep for ep in md.entry_points(group="verl.plugins") if ep.name == "cme"]
assert eps and eps[0].value == "cme_rewards.verl", eps
import verl  # loads the verl.plugins entry points
from omegaconf import OmegaConf
from verl.trainer.ppo.reward import resolve_reward_manager_cls

assert "cme_rewards.verl" in sys.modules, "verl did not load the cme plugin"
config = OmegaConf.create({"reward": {"reward_manager": {"source": "register", "name": "cme"}}})
cls = resolve_reward_manager_cls(config)
assert cls.__name__ == "CMERewardManager", cls
print(f"OK: verl {verl.__version__} resolves reward_manager.name=cme to {cls.__module__}.{cls.__name__}")
print(f"python {sys.version.split()[0]}, venv {sys.prefix}, cwd {os.getcwd()}")

from cme_rewards.verl.status import plugin_status

ok, message = plugin_status()
assert ok, message
print(f"plugin_status: {message}")
import transfer_queue  # noqa: F401  main_ppo's default (v1) trainer
import verl.experimental.agent_loop  # noqa: F401
import verl.experimental.reward_loop.router.naive_router  # noqa: F401
import verl.trainer.main_ppo  # noqa: F401
import verl.trainer.ppo.v1  # noqa: F401

names = ["verl", "TransferQueue", "torch", "transformers", "ray", "tensordict", "virtualenv"]
print("versions: " + ", ".join(f"{n} {md.version(n)}" for n in names))
PY
step "python -m verl.trainer.main_ppo --help"
"$venv/bin/python" -m verl.trainer.main_ppo --help | sed -n '1,3p'  # sed reads it all: no SIGPIPE
step "python -m verl.trainer.main_ppo --config-name=cme_grpo ... --cfg job"
"$venv/bin/python" -m verl.trainer.main_ppo --config-path="$repo/integrations/verl/config" \
    --config-name=cme_grpo ++reward.cme.verifier=smollm2-135m-instruct --cfg job \
    | grep -A3 "reward_manager:"
step "done"
