#!/usr/bin/env bash
# GRPO with the CME reward on several nodes joined in one Ray cluster.
#   on the head node:    NNODES=2 NGPUS=8 integrations/verl/run_cme_grpo_multinode.sh head [overrides...]
#   on each other node:  HEAD_IP=10.0.0.1 integrations/verl/run_cme_grpo_multinode.sh worker
# The head starts Ray, waits until NNODES nodes have joined, then runs veRL's trainer, which
# connects to this cluster. With reward.cme.backend=local each node hosts one verifier actor that
# the node's reward-loop workers share. (Under Slurm, start `ray start` the same way from srun.)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
role=${1:?usage: $0 head|worker [overrides...]}; shift
PORT=${RAY_PORT:-6379}
NGPUS=${NGPUS:-8}
case "$role" in
  worker)
    exec ray start --address="${HEAD_IP:?set HEAD_IP to the head node address}:$PORT" \
        --num-gpus="$NGPUS" --block ;;
  head)
    NNODES=${NNODES:?set NNODES to the number of nodes}
    ray start --head --port="$PORT" --num-gpus="$NGPUS" --include-dashboard=false
    python - "$NNODES" <<'PY'
import sys, time
import ray
ray.init(address="auto")
want = int(sys.argv[1])
while (n := sum(1 for node in ray.nodes() if node["Alive"])) < want:
    print(f"waiting for nodes: {n}/{want}", flush=True)
    time.sleep(10)
print(f"{n} nodes in the Ray cluster")
PY
    export RAY_ADDRESS=auto
    exec python -m verl.trainer.main_ppo \
        --config-path="$here/config" --config-name=cme_grpo \
        trainer.n_gpus_per_node="$NGPUS" trainer.nnodes="$NNODES" \
        "$@" ;;
  *) echo "usage: $0 head|worker [overrides...]" >&2; exit 2 ;;
esac
