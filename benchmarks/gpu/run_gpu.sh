#!/usr/bin/env bash
# GPU check of the Triton kernels: compiled correctness tests, then bench_kernels.py.
#
# Runs on a GPU machine that has torch + triton but no network, from the repository root:
#     bash benchmarks/gpu/run_gpu.sh            # results in $OUT (default benchmarks/results)
#     QUICK=1 bash benchmarks/gpu/run_gpu.sh    # small shapes: a smoke run
# Peers and pytest come from the wheels in benchmarks/gpu/wheels/ (git-ignored; fill it with
#     pip download --no-deps liger-kernel cut-cross-entropy trl pytest pluggy iniconfig -d benchmarks/gpu/wheels
# and carry the folder to the GPU machine). They are installed into a private folder, never
# into the machine's Python. Every step writes its log to $OUT; a failing step does not stop
# the later ones, and the script exits non-zero if any failed.
set -uo pipefail

cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
TEST_TIMEOUT="${TEST_TIMEOUT:-240}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-420}"
status=0

unset TRITON_INTERPRET
export TRITON_PRINT_AUTOTUNING=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

PEERS=/tmp/cme_gpu_peers
if compgen -G "benchmarks/gpu/wheels/*.whl" > /dev/null; then
    "$PY" -m pip install --quiet --no-deps --no-index --target "$PEERS" benchmarks/gpu/wheels/*.whl \
        > "$OUT/pip_peers.log" 2>&1 || echo "peer wheel install failed (see pip_peers.log)"
    # Pure-Python wheels, installed without their dependencies; the peers import with the
    # machine's torch / triton / transformers.
    export PYTHONPATH="$PYTHONPATH:$PEERS"
else
    echo "no wheels in benchmarks/gpu/wheels: peers and pytest only if already installed"
fi

if ! "$PY" -c "import cme_rewards.ops.triton_logits, cme_rewards.ops.triton_linear" > "$OUT/import.log" 2>&1; then
    echo "cannot import the kernels (see $OUT/import.log)"; cat "$OUT/import.log"; exit 1
fi

echo "== GPU correctness tests (compiled kernels, no interpreter)"
timeout "$TEST_TIMEOUT" "$PY" -m pytest tests/test_triton_kernels.py -q -p no:cacheprovider \
    -m "not slow" --durations=5 --junitxml="$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
rc=$?
tail -n 25 "$OUT/gpu_tests.log"
[ "$rc" -eq 0 ] || { echo "GPU tests failed (rc=$rc)"; status=1; }

echo "== bench_kernels.py"
bench_args=(--out "$OUT")
[ "${QUICK:-0}" = "1" ] && bench_args+=(--quick)
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/bench_kernels.py "${bench_args[@]}" > "$OUT/bench.log" 2>&1
rc=$?
grep -v "^Triton autotuning\|^with key\|^finished after\|^best config" "$OUT/bench.log" | tail -n 60
[ "$rc" -eq 0 ] || { echo "bench failed (rc=$rc)"; status=1; }

for json in "$OUT"/kernels_*.json; do
    [ -e "$json" ] && "$PY" benchmarks/render_kernels.py "$json" > /dev/null && echo "rendered ${json%.json}.md"
done
exit "$status"
