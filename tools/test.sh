#!/usr/bin/env bash
# The test suite: fetch the real datasets the tests read (into $ASGE_DATA, default ./data; a second run only
# re-checks the checksums), then run every test in release mode (the tests train real models).
#
# The CUDA tests (tests/cuda.rs, tests/cuda_train.rs) run in a pass of their own: on a machine with a GPU on it,
# elsewhere under the CUDA driver stand-in (ASGE_CUDA_STANDIN=1, built from tests/emu/standin.cpp by build.rs),
# which runs the real CUDA backend and the real kernels on the CPU with memory checking; every test there runs and
# prints where it ran. Set ASGE_CUDA_TESTS=gpu to run that pass on the GPU instead of the stand-in.
set -euo pipefail
cd "$(dirname "$0")/.."
export ASGE_DATA=${ASGE_DATA:-$PWD/data}
tools/fetch-datasets.sh "$ASGE_DATA" mnist fashion-mnist cifar10 images
# The real NVRTC (the PyPI wheel of the CUDA 13.0 toolkit's, as on the GPU machines): every kernel must compile.
NVRTC=${ASGE_NVRTC:-$HOME/.cache/asge-nvrtc}
if [ ! -e "$NVRTC/nvidia/cu13/lib/libnvrtc.so.13" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$NVRTC" \
    nvidia-cuda-nvrtc==13.0.88
fi
export LD_LIBRARY_PATH=$NVRTC/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# The Python packages the interop tests check the engine's files with: tensorboard's event reader, onnxruntime
# and onnx's checker (tests/workflow.rs, tests/interop.rs); PyTorch for python/asge_torch.py (about 5 GB, once).
export ASGE_PYTOOLS=${ASGE_PYTOOLS:-$HOME/.cache/asge-pytools}
if ! PYTHONPATH=$ASGE_PYTOOLS python3 -c "import tensorboard, onnxruntime, onnx" 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$ASGE_PYTOOLS" \
    tensorboard==2.21.0 onnxruntime==1.32.0 onnx==1.23.2
fi
export ASGE_TORCH=${ASGE_TORCH:-$HOME/.cache/asge-torch}
tools/install-torch.sh
# The stand-in is part of what the tests check: its build must not be skipped silently.
export ASGE_REQUIRE_STANDIN=1
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Benchmarks once each in test mode (they must keep compiling and running; the CUDA ones skip without a GPU),
# then every test; the last line sums every test binary's result.
# (--bench for each: --benches would also run the library's unit tests, which run below, and count them twice.)
benches=()
for f in benches/*.rs; do benches+=(--bench "$(basename "$f" .rs)"); done
cargo test --release --locked "${benches[@]}" 2>&1 | tee "$log"
tests=()
for f in tests/*.rs; do
  n=$(basename "$f" .rs)
  case "$n" in cuda | cuda_train | dist) ;; *) tests+=(--test "$n") ;; esac
done
cargo test --release --locked --lib --bins "${tests[@]}" 2>&1 | tee -a "$log"
if [ "${ASGE_CUDA_TESTS:-standin}" = gpu ]; then
  cargo test --release --locked --test cuda --test cuda_train -- --include-ignored --nocapture 2>&1 | tee -a "$log"
else
  ASGE_CUDA_STANDIN=1 cargo test --release --locked --test cuda --test cuda_train -- --include-ignored --nocapture 2>&1 |
    tee -a "$log"
fi
# Many processes (tests/dist.rs, tests/dist/train.rs, tests/dist/layers.rs): ranks started by --nproc, torchrun and
# the launchers' variables, NCCL between them, the faults, and data- and layer-parallel training against one process
# (about 6.5 minutes on 2 cores). Under the stand-in, whose NCCL works across processes, one test at a time (each starts several ranks); on
# a GPU machine they are reported as ignored (they need the stand-in).
if [ "${ASGE_CUDA_TESTS:-standin}" = gpu ]; then
  cargo test --release --locked --test dist 2>&1 | tee -a "$log"
else
  ASGE_CUDA_STANDIN=1 cargo test --release --locked --test dist -- --include-ignored --test-threads=1 2>&1 | tee -a "$log"
fi
if [ "${ASGE_CUDA_TESTS:-standin}" != gpu ]; then
  # The conv parity again with the stand-in's tensor cores accumulating by truncation (every addition rounded
  # toward zero), as Hopper's do: the tolerances must cover it (tests/cuda.rs says why they do).
  ASGE_CUDA_STANDIN=1 ASGE_STANDIN_MMA_ROUNDING=truncate cargo test --release --locked --test cuda -- --include-ignored \
    --nocapture --exact conv_fwd_and_wgrad_match_cpu 2>&1 | tee -a "$log"
  # The GPU check's own logic (its steps, limits, parsing and missing tools) under the stand-in: the summary must
  # end, and name each fp16 GEMM kernel as passed.
  dry=$(mktemp -d)
  tools/gpu-check.sh build > "$dry/build.txt" 2>&1 || { cat "$dry/build.txt"; exit 1; }
  tools/gpu-check.sh dry-run --out "$dry/out" 2>&1 | tee -a "$log"
  for k in conv_fwd_nhwc_f16 conv_fwd_nhwc_f16_l conv_fwd_nhwc_f16_sk conv_wgrad_nhwc_f16 conv_wgrad_nhwc_f16_l; do
    grep -q "^  kernel $k: passed$" "$dry/out/summary.txt" || { echo "gpu-check dry run: kernel $k did not pass"; exit 1; }
  done
  grep -qE '^self-test: self-test cuda:0 .*: passed' "$dry/out/summary.txt" ||
    { echo "gpu-check dry run: the tensor-core self-test did not pass"; exit 1; }
  grep -q '^== done in' "$dry/out/summary.txt" || { echo "gpu-check dry run: the summary did not end"; exit 1; }
  grep -qE '^nccl, a world of one: ok; NCCL: ' "$dry/out/summary.txt" ||
    { echo "gpu-check dry run: the NCCL step did not pass (see $dry/out/comm-check.txt)"; exit 1; }
  # The kernel table agrees with tools/perf_model.py row by row, and the comparison fails when one row's bytes
  # differ (a model or a launch that drifted).
  grep -qE '^  perf model: [0-9]+ kernel rows agree' "$dry/out/summary.txt" ||
    { echo "gpu-check dry run: the kernel table and tools/perf_model.py disagree (see $dry/out/perf-model-*.txt)"; exit 1; }
  python3 - "$dry/out/bench-cuda-fp16-w0.125.json" "$dry/drifted.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
r["kernels"][2]["bytes"] += 64
json.dump(r, open(sys.argv[2], "w"))
PY
  if python3 tools/perf_model.py --compare "$dry/drifted.json" > "$dry/drifted.txt"; then
    echo "gpu-check dry run: tools/perf_model.py --compare missed a row whose bytes differ"; exit 1
  fi
  grep -q 'DISAGREES: layer 1 .*: bytes' "$dry/drifted.txt" || { cat "$dry/drifted.txt"; exit 1; }
  rm -rf "$dry"
fi
# The fp16 GEMM kernels' instructions per MMA, from their SASS (NVRTC + the cuobjdump and nvdisasm wheels, no
# GPU): fails when a kernel issues more than tools/sass-baseline.txt commits.
tools/sass-stats.sh --check 2>&1 | tee -a "$log"
grep -E '^test result:' "$log" | awk '
  { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1); if ($i ~ /^ignored/) s += $(i-1) } }
  END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }'
# The CUDA tests: how many distinct tests of the two binaries ran (the truncation rerun repeats one), and on
# what (each prints the device it ran on).
awk '/Running tests\/cuda(_train)?\.rs/ { cuda = 1; next }
  cuda && /^test result:/ { cuda = 0 }
  cuda && /^test [A-Za-z0-9_:]+ \.\.\. / { seen[$2] = 1 }
  END { n = 0; for (t in seen) n++; printf "CUDA tests: %d ran on: ", n }' "$log"
grep -o 'ran on: .*' "$log" | sed 's/^ran on: //' | sort -u | paste -sd, - || true
