#!/usr/bin/env bash
# The CME reward server for OpenRLHF's server mode (MODE=server train_grpo_cme.sh).
# Binds 127.0.0.1; set CME_REWARDS_TOKEN to require a token (the trainer passes it in the URL).
set -euo pipefail
exec cme-rewards serve \
  --verifier "${VERIFIER:-smollm2-135m-instruct}" \
  --policy-tokenizer "${POLICY:-Qwen/Qwen2.5-0.5B-Instruct}" \
  --host 127.0.0.1 --port "${PORT:-5000}" \
  --device "${CME_REWARDS_DEVICE:-auto}" \
  --max-batch-tokens "${MAX_BATCH_TOKENS:-32768}" --max-batch-size "${MAX_BATCH_SIZE:-128}" --max-wait-ms "${MAX_WAIT_MS:-10}" \
  "$@"
