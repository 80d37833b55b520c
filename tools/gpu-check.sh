#!/usr/bin/env bash
# One prepared command for a GPU machine that has no Rust toolchain and no network.
#
# Here (with Rust):   tools/gpu-check.sh build     -> gpu-bundle/ (release test binaries, asge, MNIST; < 60 MB)
# There (the device): tools/gpu-check.sh run       -> GPU parity tests (fp32 and fp16), one-epoch MNIST
#                                                     trainings on the GPU in fp32 and fp16 (the CPU's numbers
#                                                     for the same run are quoted), asge bench in both precisions beside the
#                                                     PyTorch recipe (when the machine has torch), a traced
#                                                     8-stream run; a short table last; full logs under $OUT
#                                                     (or gpu-bundle/out)
# The device tool: run(command="tools/gpu-check.sh run", carry=["gpu-bundle"]).
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=gpu-bundle

build() {
  set -e
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/bin" "$BUNDLE/data/mnist"
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
  strip "$BUNDLE/bin/"* 2>/dev/null || true
  du -sh "$BUNDLE"
}

run() {
  local out=${OUT:-$BUNDLE/out}
  mkdir -p "$out"
  # NVRTC 13 and cuBLAS 13: from the CUDA toolkit if the machine has one, else from the Python wheels beside
  # PyTorch (nvidia-cuda-nvrtc, nvidia-cublas); the folders found are named in the summary.
  local libdirs=""
  local pydirs
  pydirs=$(python3 -c "import nvidia; print(' '.join(nvidia.__path__))" 2>/dev/null || true)
  for lib in libnvrtc.so.13 libcublas.so.13; do
    local found
    found=$(find /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda*/lib64 $pydirs \
      -maxdepth 4 -name "$lib" 2>/dev/null | head -1)
    [ -n "$found" ] && libdirs="$libdirs $(dirname "$found")" && export LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  done
  export ASGE_DATA=$PWD/$BUNDLE/data ASGE_KERNEL_CACHE=$out/kernel-cache
  local B=$BUNDLE/bin
  # Every result goes to the summary as soon as it exists (a run cut short by the device's time limit still
  # leaves what it got), most important first; every step has its own time limit, so one hang cannot eat the
  # whole budget.
  : > "$out/summary.txt"
  row() { printf '%s\n' "$*" | tee -a "$out/summary.txt"; }
  lim() { timeout --kill-after=5 "$@"; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/gpu.txt" 2>&1
  row "== gpu-check ($(head -1 "$out/gpu.txt"), $(date -u +%FT%TZ)) =="
  row "libraries from:${libdirs:- nowhere (no libnvrtc.so.13 found: every CUDA step will fail)}"
  lim 60 "$B/asge" info > "$out/info.txt" 2>&1
  lim 240 "$B/cuda-tests" --include-ignored --test-threads 1 > "$out/parity.txt" 2>&1
  row "parity tests: $(grep -E '^test result' "$out/parity.txt" || echo "did not finish (rc $?)")"
  # The first lines of every failure, so the summary alone says what to fix.
  grep -E "^test .* FAILED$|panicked at|^  *(left|right):|differ" "$out/parity.txt" | head -20 | while IFS= read -r line; do row "  $line"; done
  # The CPU reference of this exact run (seed 42, width 0.25, one epoch of full MNIST at the recipe's lr) is in
  # docs/calibration.md: the GPU runs should land near it (different summation orders drift apart over an epoch;
  # the spread between seeds there is +-1.6 points for last, +-0.4 for best).
  row "mnist 1 epoch cpu fp32 (docs/calibration.md, seed 42): last 88.66% best 91.96% fusion 58.54%"
  for run in cuda:fp32 cuda:fp16; do
    local dev=${run%%:*} prec=${run##*:}
    lim 150 "$B/asge" train --dataset mnist --data "$ASGE_DATA" --width 0.25 --epochs 1 --precision $prec \
      --device $dev --out "$out/mnist-$dev-$prec" --quiet > "$out/train-$dev-$prec.txt" 2>&1
    row "mnist 1 epoch $dev $prec: $(grep -E '^  (last|best|fusion)' "$out/train-$dev-$prec.txt" | awk '{print $1, $3}' | tr '\n' ' ')" \
        "$(python3 -c "import json; m=json.load(open('$out/mnist-$dev-$prec/summary.json')); print(f\"train {m['train_images_per_s']:.0f} images/s\")" 2>/dev/null || tail -1 "$out/train-$dev-$prec.txt")"
  done
  for w in 1 0.25; do
    for prec in fp16 fp32; do
      lim 90 "$B/asge" bench --device cuda --precision $prec --width $w --batch 128 > "$out/bench-cuda-$prec-w$w.txt" 2>&1
      row "bench cuda $prec w$w: $(grep 'train step' "$out/bench-cuda-$prec-w$w.txt" || tail -1 "$out/bench-cuda-$prec-w$w.txt")"
    done
    # The fp16 forward's share of the tensor-core ceiling, layer by layer (the CUDA issue's 50% target), and the
    # weight gradient's: the sixth column of the bench's rows (op, layer, ms, rate, unit, %), then the kernel.
    row "  fp16 conv fwd, % of cuBLAS HGEMM by layer: $(grep -E '^ *conv_goodness_fwd' "$out/bench-cuda-fp16-w$w.txt" | awk '{print $6}' | tr '\n' ' ')"
    row "  fp16 conv wgrad, % of cuBLAS HGEMM by layer: $(grep -E '^ *conv_goodness_wgrad' "$out/bench-cuda-fp16-w$w.txt" | awk '{print $6}' | tr '\n' ' ')"
    row "  fp16 kernels by layer: $(grep -E '^ *conv_goodness_(fwd|wgrad)' "$out/bench-cuda-fp16-w$w.txt" | awk '{print $2 ":" $7}' | tr '\n' ' ')"
    # The authors' recipe in PyTorch on the same card (eager fp32, and channels-last + fp16 autocast).
    if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
      for variant in "" --channels-last-fp16; do
        local f="$out/torch-w$w${variant:+-cl-fp16}.txt"
        lim 120 python3 tools/torch_step.py --device cuda --width $w --batch 128 $variant > "$f" 2>&1
        row "pytorch w$w ${variant:-eager fp32}: $(tail -1 "$f")"
      done
    else
      row "pytorch w$w: no torch with CUDA on this machine"
    fi
    # The same fp16 step with one stream per layer (sequential above): the overlap's gain.
    ASGE_CUDA_LANES=8 lim 90 "$B/asge" bench --device cuda --precision fp16 --width $w --batch 128 --step-only \
      > "$out/bench-cuda-fp16-w$w-lanes8.txt" 2>&1
    row "bench cuda fp16 w$w, 8 streams: $(grep 'train step' "$out/bench-cuda-fp16-w$w-lanes8.txt" || tail -1 "$out/bench-cuda-fp16-w$w-lanes8.txt")"
  done
  ASGE_CUDA_LANES=8 lim 90 "$B/asge" train --dataset mnist --data "$ASGE_DATA" --width 0.25 --epochs 1 \
    --limit-train 2560 --device cuda --precision fp16 --out "$out/trace-run" --trace "$out/trace-lanes8.json" --quiet \
    > "$out/trace-run.txt" 2>&1
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
  lim 60 "$B/asge" bench --width 1 --batch 128 --step-only > "$out/bench-cpu.txt" 2>&1
  row "bench cpu w1 (this host): $(grep 'train step' "$out/bench-cpu.txt")"
}

case ${1:-} in
  build) build ;;
  run) run ;;
  *) echo "usage: tools/gpu-check.sh build|run" >&2; exit 2 ;;
esac
