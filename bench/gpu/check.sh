#!/usr/bin/env bash
# One GPU check, for a machine with one H100/H200, a CUDA torch, triton and
# nvcc but no network: build and install kevlarflow with its CUDA kernels, run
# the GPU tests, benchmark the kernels (bench/gpu/bench_gpu.py), run the
# failover benchmark on the GPU (the medium preset 2 x 2), time the engine's
# decode steps with and without CUDA graphs (bench/gpu/bench_engine.py) and
# offline tokens/s (bench throughput), then, if time is left, the failover
# benchmark at the paper's topology (a llama-8b-shaped checkpoint, written in
# the background while the tests run; 2 instances x 4 stages, all eight
# workers on the one GPU), and print the tables last. Steps run in that order
# of importance; what the budget leaves no time for is skipped and said.
# Usage, from anywhere: bash bench/gpu/check.sh   (log: $OUT/check.log if OUT is set)
# Env: PYTHON (default python3), BUDGET_S (default 540: all steps together),
# SKIP_8B=1 to leave the paper-scale run out, SKIP_TESTS=1 for the benchmarks
# alone (a second run after the tests have passed).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee "$OUT/check.log") 2>&1
  TEE_PID=$!
  # Let tee write the last lines before the machine collects $OUT.
  trap 'exec >&- 2>&-; wait "$TEE_PID" || true' EXIT
fi

DEADLINE=$((SECONDS + ${BUDGET_S:-540}))
FAILED=()
step() { printf '\n========== [%s, %ss in] %s ==========\n' "$(date +%T)" "$SECONDS" "$*"; }
# Run a step under `timeout`: at most $1 seconds, and never past the deadline.
run_for() {
  local cap=$1 left=$((DEADLINE - SECONDS)); shift
  ((left < cap)) && cap=$left
  if ((cap <= 0)); then echo "!!! out of time: skipped: $*"; return 124; fi
  timeout --kill-after=10 "$cap" "$@"
}
# Tests failing must not hide the benchmarks: note the failure, go on.
record() { local name=$1; shift; "$@" || { echo "!!! FAILED ($?): $name"; FAILED+=("$name"); }; }

step "environment"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv
"$PY" -c 'import sys, torch, triton; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)'
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH
nvcc --version | tail -n 1
"$PY" -c 'import torch; assert torch.cuda.is_available(), "torch sees no GPU"'
ARCH=$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')
echo "CUDA architecture: $ARCH; $(nproc) cores"

# A system Python refuses pip installs (PEP 668): use a venv that still sees
# its torch. Any other environment (venv, conda) gets the package directly.
# (A venv's python is never externally managed, even when its base is.)
if "$PY" -c 'import os, sys, sysconfig; sys.exit(sys.prefix != sys.base_prefix or not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
  # --without-pip: Debian's python3 has no ensurepip without python3-venv;
  # the system pip, seen through the system site packages, installs into it.
  "$PY" -m venv --system-site-packages --without-pip /tmp/kevlarflow-gpu-venv
  PY=/tmp/kevlarflow-gpu-venv/bin/python
fi
# No registry here: whatever is missing can only come from wheels in .whl/
# (with their dependencies: --no-deps), e.g. scikit_build_core, pathspec,
# pytest, pluggy, iniconfig, hypothesis, attrs, sortedcontainers.
install_from_wheelhouse() {
  if compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps "$REPO"/.whl/*.whl
  else
    return 1
  fi
}

# The runtime's own needs the image may lack (deployments talk over zmq).
"$PY" -c 'import zmq, msgpack, fastapi, uvicorn' 2>/dev/null || install_from_wheelhouse ||
  echo "!!! pyzmq, fastapi or uvicorn is missing and there is no .whl/: deployments cannot start"

step "build and install with CUDA (sm_$ARCH)"
export MAX_JOBS=16 CMAKE_BUILD_PARALLEL_LEVEL=16
"$PY" -c 'import scikit_build_core' 2>/dev/null || install_from_wheelhouse ||
  { echo "!!! scikit-build-core is missing and there is no .whl/ to install it from"; exit 1; }
command -v cmake >/dev/null || "$PY" -c 'import cmake' 2>/dev/null ||
  { echo "!!! no cmake (>= 3.25) on PATH or in Python"; exit 1; }
BUILD_LOG=${OUT:-/tmp}/build.log
echo "full build log: $BUILD_LOG"
if ! run_for 240 "$PY" -m pip install -v --no-index --no-build-isolation --no-deps \
    --config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" "$REPO" >"$BUILD_LOG" 2>&1; then
  tail -n 60 "$BUILD_LOG"
  echo "!!! build failed"
  exit 1
fi
grep -E -- '-- kevlarflow|Successfully installed' "$BUILD_LOG" || true
# From outside the tree, so that the installed package is what gets imported.
(cd /tmp && "$PY" -c 'from kevlarflow import _C; assert _C.built_with_cuda, "no CUDA kernels"; print("installed:", _C.__file__)')

# The llama-8b-shaped checkpoint (16 GB) is written on the CPUs while the
# GPU tests run; the engine benchmark and the paper-scale failover run read it.
CKPT=/tmp/kevlarflow-llama-8b
MAKE_8B_PID=
if [[ -z "${SKIP_8B:-}" && ! -f $CKPT/.complete ]]; then
  rm -rf "$CKPT"
  (cd /tmp && timeout 400 "$PY" -m kevlarflow make-model "$CKPT" --preset llama-8b &&
    touch "$CKPT/.complete") >"${OUT:-/tmp}/make-model-llama-8b.log" 2>&1 &
  MAKE_8B_PID=$!
  echo "writing $CKPT in the background (pid $MAKE_8B_PID)"
fi
# Whether the checkpoint is there, waiting at most $1 s for its writing.
have_8b() {
  local end=$((SECONDS + $1))
  while [[ -n $MAKE_8B_PID ]] && kill -0 "$MAKE_8B_PID" 2>/dev/null && ((SECONDS < end)); do
    sleep 2
  done
  [[ -f $CKPT/.complete ]]
}

step "tests"
if ! "$PY" -c 'import pytest, hypothesis' 2>/dev/null; then
  install_from_wheelhouse || true
fi
if [[ -n "${SKIP_TESTS:-}" ]]; then
  echo "!!! SKIP_TESTS is set: no tests"
elif "$PY" -c 'import pytest, hypothesis' 2>/dev/null; then
  cd "$REPO/tests"  # tests import the installed package, not the source tree
  # A group at a time, each with a cap of its own, so that one slow group
  # cannot starve the others; every GPU test is in one of them.
  gpu_tests() {  # name, seconds, test files
    local name=$1 cap=$2; shift 2
    record "$name" run_for "$cap" "$PY" -m pytest -q -p no:cacheprovider --durations=3 -m gpu "$@"
  }
  gpu_tests "kernel gpu tests" 120 test_gpu_ops.py
  gpu_tests "engine gpu tests" 90 test_gpu_engine.py
  gpu_tests "deployment gpu tests" 210 test_gpu_deployment.py
  gpu_tests "replication and nccl gpu tests" 90 test_gpu_replication.py e2e/test_comm_nccl.py
  others=$(grep -rl --include='test_*.py' "mark.gpu" . | sed 's|^\./||' | sort |
           grep -v -x -e test_gpu_ops.py -e test_gpu_engine.py -e test_gpu_deployment.py \
             -e test_gpu_replication.py -e e2e/test_comm_nccl.py || true)
  [[ -n $others ]] && gpu_tests "other gpu tests" 60 $others
  record "kernel tests" run_for 90 "$PY" -m pytest -q -p no:cacheprovider \
    test_paged_attention.py test_cache_ops.py
  cd "$REPO"
else
  echo "!!!!!!!!!! SKIPPED THE TESTS: pytest or hypothesis is missing and no .whl/ has them !!!!!!!!!!"
  FAILED+=("tests skipped")
fi

step "benchmarks"
TABLE=${OUT:-/tmp}/bench_gpu_table.txt
rm -f "$TABLE"
record "benchmarks" run_for 90 "$PY" "$REPO/bench/gpu/bench_gpu.py" --table "$TABLE"

# The failover benchmark with its workers on the GPU: KevlarFlow against a
# restart, one SIGKILL mid-trace, and fault-free rounds (replication's cost).
FAILOVER=${OUT:-/tmp}/failover
mkdir -p "$FAILOVER"
failover() {  # name, seconds, then the benchmark's own options; its report in $FAILOVER/name.log
  local name=$1 cap=$2; shift 2
  step "failover on the GPU: $name"
  record "failover $name" run_for "$cap" "$PY" -m kevlarflow bench failover --device cuda \
    --modes kevlarflow,restart --rounds 2 --out "$FAILOVER/$name" "$@" >"$FAILOVER/$name.log" 2>&1
  tail -n 30 "$FAILOVER/$name.log"
}
pushd /tmp >/dev/null  # the installed package, not the source tree
failover medium-2x2 240 --preset medium --instances 2 --stages 2 \
  --capacity-requests 48 --kv-memory $((2 << 30))
popd >/dev/null

# Decode steps of the model runner, eager against CUDA graphs, with the
# weight-read floor: on the llama-8b shape, else on the medium preset (which
# the first run writes to /tmp).
step "engine decode steps"
ENGINE_TABLE=${OUT:-/tmp}/bench_engine_table.txt
rm -f "$ENGINE_TABLE"
ENGINE_MODEL=()
if have_8b 60; then ENGINE_MODEL=(--model "$CKPT"); else echo "!!! no llama-8b checkpoint: the medium preset"; fi
record "engine benchmark" run_for 120 "$PY" "$REPO/bench/gpu/bench_engine.py" "${ENGINE_MODEL[@]}" \
  --table "$ENGINE_TABLE"

pushd /tmp >/dev/null
# Offline tokens/s on a long-tailed trace: KevlarFlow with CUDA graphs, eager,
# and transformers' generate, alternating, each in a fresh process.
step "offline throughput"
THROUGHPUT_LOG=${OUT:-/tmp}/throughput.log
record "offline throughput" run_for 150 "$PY" -m kevlarflow bench throughput --device cuda \
  --preset medium --lengths varied --num-requests 128 --prompt-len 256 --output-len 128 \
  --repeats 2 >"$THROUGHPUT_LOG" 2>&1
tail -n 8 "$THROUGHPUT_LOG"
if [[ -z "${SKIP_8B:-}" ]] && ((DEADLINE - SECONDS >= 150)) && have_8b 30; then
  failover llama-8b-2x4 $((DEADLINE - SECONDS)) --model "$CKPT" --instances 2 --stages 4 \
    --rate 2 --duration 8 --output-len 64 --kv-memory $((4 << 30))
else
  echo "!!! skipped the llama-8b 2 x 4 run (SKIP_8B, under 150 s left, or no checkpoint:" \
    "${OUT:-/tmp}/make-model-llama-8b.log)"
fi
popd >/dev/null
[[ -n $MAKE_8B_PID ]] && kill "$MAKE_8B_PID" 2>/dev/null || true

step "summary (${SECONDS}s)"
if ((${#FAILED[@]})); then printf '!!! FAILED: %s\n' "${FAILED[@]}"; else echo "all steps passed"; fi
echo
if [[ -f "$TABLE" ]]; then cat "$TABLE"; else echo "!!! no benchmark table"; fi
[[ -f "$ENGINE_TABLE" ]] && { echo; cat "$ENGINE_TABLE"; }
[[ -f "$THROUGHPUT_LOG" ]] && { echo; grep -A8 "requests x" "$THROUGHPUT_LOG" || true; }
for f in "$FAILOVER"/*.log; do
  [[ -f $f ]] && { echo; echo "== $(basename "$f" .log)"; grep -B1 -A24 -m1 '^mode ' "$f" || tail -n 20 "$f"; }
done
((${#FAILED[@]} == 0))
