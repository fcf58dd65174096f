#!/usr/bin/env bash
# The one GPU run of issue 13 (correctness on the GPU first, then the benchmarks), within 540 s.
#
# On the device machine, from the repository root, as ONE command with the wheels carried:
#     run(command="bash benchmarks/gpu/run_gpu.sh", carry=["benchmarks/gpu/wheels"], timeout_s=600)
# Results go to $OUT (the run tool's folder; default benchmarks/results/gpu_run), at most 5 files:
#     device_run.json  summary: environment, each step's status and time, pytest failures
#     log.txt          every step's output as it ran (tuning timings included)
#     e2e.json         CMEScorer on the Triton path vs a float64 forward, 3 families x 2 dtypes
#     kernels_<gpu>.json  bench_kernels.py rows and target checks (render it here afterwards with
#                      python3 benchmarks/render_kernels.py <file>)
#     scorer_*.json    what benchmarks/bench_scorer.py --device cuda --config qwen2.5-0.5b wrote
# Each file is rewritten after every case, so a kill keeps what was measured.
#
# CPU dry run of the same plumbing (tiny shapes, Triton interpreter, ~2 minutes on 2 cores):
#     DRY=1 OUT=/tmp/gpu_dry bash benchmarks/gpu/run_gpu.sh
#
# Peers come from benchmarks/gpu/wheels/ (git-ignored, so name it in `carry`). Fill it with
#     pip download --no-deps -d benchmarks/gpu/wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0
#     .venv/bin/python benchmarks/bench_scorer.py --save-tokenizer benchmarks/gpu/wheels/smollm2-tokenizer
# (pure-Python wheels; pytest is NOT carried: the device image has it). They are installed
# without dependencies into a private folder, never into the machine's Python; the device image
# (Python 3.12, torch 2.11 / CUDA 13, triton 3.6, transformers 5.17) provides the rest.
set -uo pipefail

cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/results/gpu_run}"
PY="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-540}"
mkdir -p "$OUT"

dry=()
[ "${DRY:-0}" = "1" ] && dry=(--dry)

PEERS="$(mktemp -d /tmp/cme_gpu_peers.XXXXXX)"
PIP_LOG="$(mktemp /tmp/cme_gpu_pip.XXXXXX)"
if compgen -G "benchmarks/gpu/wheels/*.whl" > /dev/null; then
    if "$PY" -m pip install --no-deps --no-index --target "$PEERS" benchmarks/gpu/wheels/*.whl \
        > "$PIP_LOG" 2>&1; then
        export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PEERS"
    else
        echo "peer wheel install failed (see log.txt)"
    fi
else
    echo "no wheels in benchmarks/gpu/wheels: peers only if the machine has them" | tee "$PIP_LOG"
fi

# The driver stops starting steps 15 s before TOTAL_S; `timeout` is the last resort.
timeout -k 5 "$TOTAL_S" "$PY" benchmarks/gpu/device_run.py --out "$OUT" \
    --budget "$((TOTAL_S - 15))" --peers-log "$PIP_LOG" ${dry[@]+"${dry[@]}"}
status=$?
rm -rf "$PEERS" "$PIP_LOG"
ls -l "$OUT"
exit "$status"
