#!/usr/bin/env bash
# GRPO with the CME reward in OpenRLHF 0.11.2 (openrlhf.cli.train_ppo_ray; flags as its parser has them).
#
#   MODE=file   (default) reward_func runs inside every vLLM rollout actor, one verifier per actor.
#   MODE=server the reward comes from `cme-rewards serve` on this node (start it: serve_cme.sh).
#
# The prompt column is both the input (templated with the policy's chat template) and the label, so
# the verifier sees the raw instruction (--data.label_key = --data.input_key).
# Every setting below can be overridden from the environment, e.g. MODE=server NGPUS=4 ./train_grpo_cme.sh
set -euo pipefail

MODE=${MODE:-file}
POLICY=${POLICY:-Qwen/Qwen2.5-0.5B-Instruct}
VERIFIER=${VERIFIER:-smollm2-135m-instruct}
DATASET=${DATASET:-openbmb/UltraFeedback}   # any dataset with a raw prompt column
PROMPT_KEY=${PROMPT_KEY:-instruction}
NGPUS=${NGPUS:-8}
PORT=${PORT:-5000}
SAVE=${SAVE:-./ckpt/grpo_cme}
N_SAMPLES=${N_SAMPLES:-8}   # GRPO group size: --rollout.n_samples_per_prompt and CME_REWARDS_GROUP_SIZE

case "$MODE" in
  file)
    # Read by reward_func in each rollout actor (a local Ray cluster inherits this environment;
    # with `ray job submit`, pass them in --runtime-env-json instead).
    export CME_REWARDS_VERIFIER=$VERIFIER
    export CME_REWARDS_POLICY_TOKENIZER=$POLICY
    export CME_REWARDS_DEVICE=${CME_REWARDS_DEVICE:-auto}
    export CME_REWARDS_GPU_MEMORY_FRACTION=${CME_REWARDS_GPU_MEMORY_FRACTION:-0.1}
    # A sample that cannot be scored waits for its group and gets just under its worst member.
    export CME_REWARDS_GROUP_SIZE=$N_SAMPLES
    VLLM_MEM=${VLLM_MEM:-0.5}    # vLLM's share + the verifier's share + training must fit on the GPU
    # --check: every CME_REWARDS_* variable, then load the verifier and score a probe; prints the file.
    CME_FILE=$(cme-rewards openrlhf-reward-file --check)
    # REWARD_FILE=integrations/openrlhf/composed_reward.py (or your own) adds terms to CME.
    REWARD_URL=${REWARD_FILE:-$CME_FILE}
    ;;
  server)
    REWARD_URL="http://127.0.0.1:${PORT}/get_reward${CME_REWARDS_TOKEN:+?token=$CME_REWARDS_TOKEN}"
    curl -sf "http://127.0.0.1:${PORT}/health" >/dev/null || { echo "start the server first: serve_cme.sh" >&2; exit 1; }
    VLLM_MEM=${VLLM_MEM:-0.6}
    ;;
  *) echo "MODE must be file or server, got $MODE" >&2; exit 2 ;;
esac

python3 -m openrlhf.cli.train_ppo_ray \
  --actor.model_name_or_path "$POLICY" \
  --actor.num_nodes 1 --actor.num_gpus_per_node "$NGPUS" \
  --ref.num_nodes 1 --ref.num_gpus_per_node "$NGPUS" \
  --vllm.num_engines "$NGPUS" --vllm.tensor_parallel_size 1 \
  --vllm.gpu_memory_utilization "$VLLM_MEM" --vllm.enable_sleep --ds.enable_sleep \
  --train.colocate_all \
  --reward.remote_url "$REWARD_URL" \
  --data.prompt_dataset "$DATASET" --data.input_key "$PROMPT_KEY" --data.label_key "$PROMPT_KEY" \
  --data.apply_chat_template --data.max_samples 5000 --data.max_len 3072 \
  --rollout.max_new_tokens 2048 --rollout.temperature 1.0 \
  --rollout.n_samples_per_prompt "$N_SAMPLES" --rollout.batch_size 64 --rollout.micro_batch_size 4 \
  --train.batch_size 256 --train.micro_batch_size 2 --train.max_epochs 1 --train.num_episodes 1 \
  --algo.advantage.estimator group_norm \
  --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef 0.01 \
  --actor.adam.lr 3e-6 --actor.gradient_checkpointing_enable \
  --ds.zero_stage 2 --ds.param_dtype bf16 \
  --logger.logging_steps 1 --ckpt.save_steps 50 --ckpt.output_dir "$SAVE" --ckpt.save_hf \
  "$@"
