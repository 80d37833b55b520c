#!/usr/bin/env bash
# One prepared command for a GPU machine that has no Rust toolchain and no network, sized to the device budget
# (15 minutes in all, the machine's start included, with room to fix and rerun): a total deadline of 5 minutes,
# enforced here, most important first, every result written to the summary as soon as it exists.
#
# Here (with Rust):   tools/gpu-check.sh build     -> gpu-bundle/ (asge, the CUDA test binary, MNIST, and every
#                                                     kernel precompiled to PTX for sm_90 by the real NVRTC, so a
#                                                     device without NVRTC runs too)
# There (the device): tools/gpu-check.sh run       -> 1. the CUDA parity tests with ASGE_CUDA_SYNC=1 (2 min)
#                                                     2. one MNIST epoch on the GPU, fp16 then fp32
#                                                     3. asge bench at width 1 and 0.25 beside the PyTorch recipe
#                                                     4. a traced 8-stream run
#                                                     summary in $OUT/summary.txt (or gpu-bundle/out), logs beside
#                     tools/gpu-check.sh sanitize  -> optional second run: the parity tests under
#                                                     compute-sanitizer memcheck and racecheck (which work depends on
#                                                     the device's runtime: the summary says)
# The device tool: run(command="tools/gpu-check.sh run", carry=["gpu-bundle"]).
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=gpu-bundle
DEADLINE=${ASGE_GPU_CHECK_DEADLINE:-300}

build() {
  set -e
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/bin" "$BUNDLE/data/mnist" "$BUNDLE/kernel-cache"
  cargo build --release --bin asge
  # The test binary of tests/cuda.rs (its path is printed by cargo as an executable artifact).
  local exe
  exe=$(cargo test --release --test cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c "import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get('reason') == 'compiler-artifact' and m.get('executable') and m['target']['name'] == 'cuda':
        print(m['executable'])")
  cp "$exe" "$BUNDLE/bin/cuda-tests"
  cp "${CARGO_TARGET_DIR:-target}/release/asge" "$BUNDLE/bin/asge"
  local data=${ASGE_DATA:-data}
  [ -f "$data/mnist/train-images-idx3-ubyte" ] || tools/fetch-datasets.sh "$data" mnist
  gzip -c "$data/mnist/train-images-idx3-ubyte" > "$BUNDLE/data/mnist/train-images-idx3-ubyte.gz"
  gzip -c "$data/mnist/t10k-images-idx3-ubyte" > "$BUNDLE/data/mnist/t10k-images-idx3-ubyte.gz"
  cp "$data/mnist/train-labels-idx1-ubyte" "$data/mnist/t10k-labels-idx1-ubyte" "$BUNDLE/data/mnist/"
  # Every kernel compiled for sm_90 (an H100/H200, CUDA 13.0 driver) by the real NVRTC, through the driver
  # stand-in, which reports exactly that device and driver: the cache keys match the device's.
  local nvrtc=${ASGE_NVRTC:-$HOME/.cache/asge-nvrtc}
  LD_LIBRARY_PATH=$nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ASGE_CUDA_STANDIN=1 \
    ASGE_KERNEL_CACHE=$PWD/$BUNDLE/kernel-cache "$BUNDLE/bin/asge" bench --device cuda --width 0.125 --batch 2 \
    --reps 1 --step-only > /dev/null
  echo "precompiled: $(ls "$BUNDLE/kernel-cache" | wc -l) kernel modules for sm_90"
  strip "$BUNDLE/bin/"* 2>/dev/null || true
  du -sh "$BUNDLE"
}

# Shared by run and sanitize: libraries, paths, the summary and the deadline.
setup() {
  out=${OUT:-$BUNDLE/out}
  mkdir -p "$out/kernel-cache"
  cp "$BUNDLE/kernel-cache/"* "$out/kernel-cache/" 2>/dev/null || true
  # NVRTC 13 and cuBLAS 13: from the CUDA toolkit if the machine has one, else from the Python wheels beside
  # PyTorch (nvidia-cuda-nvrtc, nvidia-cublas); the folders found are named in the summary.
  libdirs=""
  local pydirs
  pydirs=$(python3 -c "import nvidia; print(' '.join(nvidia.__path__))" 2>/dev/null || true)
  for lib in libnvrtc.so.13 libcublas.so.13; do
    local found
    found=$(find /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda*/lib64 $pydirs \
      -maxdepth 4 -name "$lib" 2>/dev/null | head -1)
    [ -n "$found" ] && libdirs="$libdirs $(dirname "$found")" && export LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  done
  export ASGE_DATA=$PWD/$BUNDLE/data ASGE_KERNEL_CACHE=$out/kernel-cache
  unset ASGE_CUDA_STANDIN
  B=$BUNDLE/bin
  start=$SECONDS
}

row() { printf '%s\n' "$*" | tee -a "$out/summary.txt"; }

# `lim SECONDS cmd...`: the command with a time limit of SECONDS, or what is left of the deadline (minus a margin
# for the summary) when that is less; nothing runs once the deadline has passed.
lim() {
  local want=$1
  shift
  local left=$((DEADLINE - (SECONDS - start) - 10))
  if [ "$left" -le 5 ]; then
    echo "(skipped: the ${DEADLINE}s deadline was reached)"
    return 124
  fi
  [ "$want" -gt "$left" ] && want=$left
  timeout --kill-after=5 "$want" "$@"
}

run() {
  setup
  : > "$out/summary.txt"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
  row "== gpu-check ($(head -1 "$out/gpu.txt"), $(date -u +%FT%TZ), deadline ${DEADLINE}s) =="
  row "libraries from:${libdirs:- nowhere (no libnvrtc.so.13: only the kernels precompiled in the bundle)}"
  lim 20 "$B/asge" info > "$out/info.txt" 2>&1
  # 1. Parity, every launch synchronised and checked so that a failing kernel is named with its layer.
  ASGE_CUDA_SYNC=1 lim 120 "$B/cuda-tests" --include-ignored --test-threads 1 --skip standin_ --nocapture \
    > "$out/parity.txt" 2>&1
  row "parity tests: $(grep -E '^test result' "$out/parity.txt" || echo "did not finish (rc $?)")"
  row "  $(grep -m1 'ran on:' "$out/parity.txt")"
  # The first lines of every failure, so the summary alone says what to fix.
  grep -E "^test .* FAILED$|panicked at|^  *(left|right):|differ" "$out/parity.txt" | head -20 | while IFS= read -r line; do row "  $line"; done
  # 2. One MNIST epoch. The CPU reference of this exact run (seed 42, width 0.25, one epoch of full MNIST at the
  # recipe's lr) is in docs/calibration.md: the GPU runs should land near it (the spread between seeds there is
  # +-1.6 points for last, +-0.4 for best).
  row "mnist 1 epoch cpu fp32 (docs/calibration.md, seed 42): last 88.66% best 91.96% fusion 58.54%"
  for prec in fp16 fp32; do
    lim 45 "$B/asge" train --dataset mnist --data "$ASGE_DATA" --width 0.25 --epochs 1 --precision $prec \
      --device cuda --out "$out/mnist-cuda-$prec" --overwrite --quiet > "$out/train-cuda-$prec.txt" 2>&1
    row "mnist 1 epoch cuda $prec: $(grep -E '^  (last|best|fusion)' "$out/train-cuda-$prec.txt" | awk '{print $1, $3}' | tr '\n' ' ')" \
        "$(python3 -c "import json; m=json.load(open('$out/mnist-cuda-$prec/summary.json')); print(f\"train {m['train_images_per_s']:.0f} images/s\")" 2>/dev/null || tail -1 "$out/train-cuda-$prec.txt")"
  done
  # 3. Throughput against cuBLAS HGEMM measured in the same run, and the PyTorch recipe on the same card.
  for w in 1 0.25; do
    lim 40 "$B/asge" bench --device cuda --precision fp16 --width $w --batch 128 --reps 3 > "$out/bench-cuda-fp16-w$w.txt" 2>&1
    row "bench cuda fp16 w$w: $(grep 'train step' "$out/bench-cuda-fp16-w$w.txt" || tail -1 "$out/bench-cuda-fp16-w$w.txt")"
    # The CIFAR-10 recipe (50,000 training images, 100 epochs) projected from the measured step rate: training
    # steps only (evaluation, data loading and the last partial batch are not in it).
    row "  CIFAR-10 100 epochs at this rate: $(grep -o '([0-9]* images/s)' "$out/bench-cuda-fp16-w$w.txt" | head -1 | tr -dc '0-9' | awk '$1 > 0 {printf "%.0f s of training steps", 5000000 / $1} $1 == "" || $1 == 0 {print "no rate"}')"
    row "  the model's expectation (tools/perf_model.py, not measured): $(python3 tools/perf_model.py $w | tail -1)"
    # The fp16 forward's and weight gradient's share of HGEMM by layer: the bench rows' sixth column (%), then
    # the kernel that ran.
    row "  fp16 conv fwd, % of cuBLAS HGEMM by layer: $(grep -E '^ *conv_goodness_fwd' "$out/bench-cuda-fp16-w$w.txt" | awk '{print $6}' | tr '\n' ' ')"
    row "  fp16 conv wgrad, % of cuBLAS HGEMM by layer: $(grep -E '^ *conv_goodness_wgrad' "$out/bench-cuda-fp16-w$w.txt" | awk '{print $6}' | tr '\n' ' ')"
    row "  fp16 kernels by layer: $(grep -E '^ *conv_goodness_(fwd|wgrad)' "$out/bench-cuda-fp16-w$w.txt" | awk '{print $2 ":" $7}' | tr '\n' ' ')"
    if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
      # The authors' recipe (fp32 eager, TF32 pinned to PyTorch's defaults: the line says which), then
      # channels-last fp16 autocast (cuDNN).
      for variant in "" --channels-last-fp16; do
        local f="$out/torch-w$w${variant:+-cl-fp16}.txt"
        lim 40 python3 tools/torch_step.py --device cuda --width $w --batch 128 --rounds 2 --tf32 default $variant > "$f" 2>&1
        row "pytorch w$w ${variant:-eager fp32}: $(tail -1 "$f")"
      done
    else
      row "pytorch w$w: no torch with CUDA on this machine"
    fi
  done
  # The same step without the step graph (every op launched): what the graph saves.
  ASGE_CUDA_GRAPHS=0 lim 30 "$B/asge" bench --device cuda --precision fp16 --width 0.25 --batch 128 --reps 3 --step-only \
    > "$out/bench-cuda-fp16-w0.25-eager.txt" 2>&1
  row "bench cuda fp16 w0.25 without the step graph: $(grep 'train step' "$out/bench-cuda-fp16-w0.25-eager.txt" || tail -1 "$out/bench-cuda-fp16-w0.25-eager.txt")"
  lim 30 "$B/asge" bench --device cuda --precision fp32 --width 1 --batch 128 --reps 3 --step-only > "$out/bench-cuda-fp32-w1.txt" 2>&1
  row "bench cuda fp32 w1: $(grep 'train step' "$out/bench-cuda-fp32-w1.txt" || tail -1 "$out/bench-cuda-fp32-w1.txt")"
  # 4. One stream per layer: the same step, then a traced run for the overlap.
  ASGE_CUDA_LANES=8 lim 30 "$B/asge" bench --device cuda --precision fp16 --width 0.25 --batch 128 --reps 3 --step-only \
    > "$out/bench-cuda-fp16-w0.25-lanes8.txt" 2>&1
  row "bench cuda fp16 w0.25, 8 streams: $(grep 'train step' "$out/bench-cuda-fp16-w0.25-lanes8.txt" || tail -1 "$out/bench-cuda-fp16-w0.25-lanes8.txt")"
  ASGE_CUDA_LANES=8 lim 30 "$B/asge" train --dataset mnist --data "$ASGE_DATA" --width 0.25 --epochs 1 \
    --limit-train 2560 --device cuda --precision fp16 --out "$out/trace-run" --overwrite --trace "$out/trace-lanes8.json" \
    --quiet > "$out/trace-run.txt" 2>&1
  row "trace (8 streams): $out/trace-lanes8.json; $(python3 -c "
import json, sys
ev = [e for e in json.load(open(sys.argv[1]))['traceEvents'] if e.get('pid') == 2 and e.get('ph') == 'X']
if not ev: print('no GPU spans'); sys.exit()
pts = sorted([(e['ts'], 1) for e in ev] + [(e['ts'] + e['dur'], -1) for e in ev])
busy = multi = 0.0; depth = 0; last = pts[0][0]
for t, d in pts:
    if depth >= 1: busy += t - last
    if depth >= 2: multi += t - last
    depth += d; last = t
print(f'{len(ev)} GPU spans on {len(set(e[\"tid\"] for e in ev))} streams; 2+ streams busy {100 * multi / max(busy, 1e-9):.0f}% of the busy time')
" "$out/trace-lanes8.json" 2>&1)"
  row "== done in $((SECONDS - start)) s =="
}

sanitize() {
  setup
  : > "$out/sanitize.txt"
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$cs" ]; then
    echo "no compute-sanitizer on this machine" | tee -a "$out/sanitize.txt"
    return 0
  fi
  for tool in memcheck racecheck; do
    lim 140 "$cs" --tool $tool --error-exitcode 3 "$B/cuda-tests" --include-ignored --test-threads 1 --skip standin_ \
      conv_fwd_and_wgrad_match_cpu loss_output_heads_adamw_match_cpu > "$out/sanitize-$tool.txt" 2>&1
    local rc=$?
    local verdict
    case $rc in
      0) verdict="clean" ;;
      3) verdict="ERRORS reported: $(grep -m3 -E '=========.*(Invalid|Race|Error)' "$out/sanitize-$tool.txt" | tr '\n' ' ')" ;;
      124) verdict="did not finish in its time" ;;
      *) verdict="did not run on this device's runtime (rc $rc): $(grep -m1 -iE 'error|not supported' "$out/sanitize-$tool.txt")" ;;
    esac
    printf 'compute-sanitizer %s: %s\n' "$tool" "$verdict" | tee -a "$out/sanitize.txt"
  done
}

case ${1:-} in
  build) build ;;
  run) run ;;
  sanitize) sanitize ;;
  *) echo "usage: tools/gpu-check.sh build|run|sanitize" >&2; exit 2 ;;
esac
