#!/usr/bin/env bash
# GRPO with the CME reward on one node (config/cme_grpo.yaml: Qwen2.5-0.5B-Instruct policy,
# google/gemma-3-1b-it verifier, group size 8, UltraFeedback prompts). Needs GPUs and vLLM.
#   pip install "cme-rewards[verl]" vllm            # plus veRL's GPU stack (see veRL's install guide)
#   python integrations/verl/prepare_ultrafeedback.py --out ~/data/ultrafeedback_cme
#   NGPUS=8 integrations/verl/run_cme_grpo.sh [hydra overrides...]
# Examples of overrides: actor_rollout_ref.model.path=meta-llama/Llama-3.2-1B-Instruct
#   reward.cme.verifier=smollm2-135m-instruct   reward.cme.verifier=random:google/gemma-3-1b-it
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
NGPUS=${NGPUS:-8}
exec python -m verl.trainer.main_ppo \
    --config-path="$here/config" --config-name=cme_grpo \
    trainer.n_gpus_per_node="$NGPUS" trainer.nnodes=1 \
    "$@"
