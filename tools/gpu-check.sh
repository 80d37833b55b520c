#!/usr/bin/env bash
# The GPU check: correctness and speed of the CUDA backend on one NVIDIA GPU (H100/H200-class, CUDA 13 driver) in
# one run under a five-minute deadline (not yet timed on a GPU), every result written to a summary as soon as it exists, most important first.
# The GPU machine needs no Rust toolchain and no network: the bundle carries what runs there.
#
#   tools/gpu-check.sh build             here, with Rust: gpu-bundle/ holds asge, the CUDA test binary, MNIST,
#                                        and every kernel precompiled by NVRTC for sm_90, as CUBIN (the machine
#                                        code whose SASS CI checks, used by the run) and as PTX (the fallback)
#   tools/gpu-check.sh run [--out DIR]   on the GPU machine, from the repository root with gpu-bundle/ in it
#                                        (default DIR: gpu-bundle/report): in order, each step with its own time
#                                        limit, the limits summing to 4.75 minutes:
#                                        1. nvidia-smi, the tensor-core self-test, asge info (libraries,
#                                           device, registers)                                            20 s
#                                        2. device parity: every op and every fp16 GEMM variant against
#                                           the CPU reference, graphs and lanes on; failures rerun with
#                                           every launch synchronised, to name the kernel                65 + 15 s
#                                        3. the lanes and step-graph tests again (exact equality twice
#                                           turns a race into a visible failure)                          15 s
#                                        4. asge bench fp16 at width 1 and 0.25: per-op rows, the step
#                                           by events over 20 steps, every kernel timed alone beside
#                                           tools/perf_model.py's row for it                              30 + 25 s
#                                        5. Nsight Compute (ncu, when present) on the large GEMMs and dz   20 s
#                                        6. one MNIST epoch in fp16                                        35 s
#                                        7. PyTorch channels-last fp16 autocast at width 1 (when present)  25 s
#                                        8. 8 streams, and the step without its graph                     10 + 10 s
#                                        9. NCCL, a world of one: it loads, exact sums (asge comm-check)   15 s
#                                       10. fp32 rows, while time is left
#   tools/gpu-check.sh dry-run [--out DIR] here, without a GPU: the same sequence under the CUDA driver stand-in at
#                                        small sizes (tools/test.sh runs it), so that the script itself (its
#                                        quoting, deadline, parsing, missing tools) is tested; its times are the
#                                        stand-in's emulator's, and it says so on every timed line
#   tools/gpu-check.sh sanitize          optional: the parity tests under compute-sanitizer memcheck/racecheck
#
# Record each run in docs/gpu-log.md: date, card, commit, the summary's parity lines, the per-layer rows, the
# kernel table (perf-model-w*.txt: every kernel measured beside the model), the step rate and PyTorch's beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=gpu-bundle
DEADLINE=${ASGE_GPU_CHECK_DEADLINE:-300}

build() {
  set -e
  rm -rf "$BUNDLE" && mkdir -p "$BUNDLE/bin" "$BUNDLE/data/mnist" "$BUNDLE/kernel-cache"
  cargo build --release --locked --bin asge --example dump_cubin
  # The test binary of tests/cuda.rs (its path is printed by cargo as an executable artifact).
  local exe
  exe=$(cargo test --release --locked --test cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c "import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get('reason') == 'compiler-artifact' and m.get('executable') and m['target']['name'] == 'cuda':
        print(m['executable'])")
  cp "$exe" "$BUNDLE/bin/cuda-tests"
  local target=${CARGO_TARGET_DIR:-target}
  cp "$target/release/asge" "$BUNDLE/bin/asge"
  local data=${ASGE_DATA:-data}
  [ -f "$data/mnist/train-images-idx3-ubyte" ] || tools/fetch-datasets.sh "$data" mnist
  gzip -c "$data/mnist/train-images-idx3-ubyte" > "$BUNDLE/data/mnist/train-images-idx3-ubyte.gz"
  gzip -c "$data/mnist/t10k-images-idx3-ubyte" > "$BUNDLE/data/mnist/t10k-images-idx3-ubyte.gz"
  cp "$data/mnist/train-labels-idx1-ubyte" "$data/mnist/t10k-labels-idx1-ubyte" "$BUNDLE/data/mnist/"
  # Every kernel as CUBIN and PTX for sm_90, written by NVRTC under the names the kernel cache looks up (no
  # driver is needed to write them, and none is in the names: any CUDA 13 driver takes them).
  local nvrtc=${ASGE_NVRTC:-$HOME/.cache/asge-nvrtc}
  LD_LIBRARY_PATH=$nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    "$target/release/examples/dump_cubin" --cache "$BUNDLE/kernel-cache" sm_90
  echo "precompiled: $(ls "$BUNDLE/kernel-cache" | grep -c '\.cubin$') CUBIN and $(ls "$BUNDLE/kernel-cache" | grep -c '\.ptx$') PTX modules for sm_90"
  strip "$BUNDLE/bin/"* 2>/dev/null || true
  du -sh "$BUNDLE"
}

# Shared by run, dry-run and sanitize: the output folder, libraries, paths, the summary and the deadline.
setup() {
  report=${REPORT_DIR:-$BUNDLE/report}
  mkdir -p "$report/kernel-cache"
  cp "$BUNDLE/kernel-cache/"* "$report/kernel-cache/" 2>/dev/null || true
  export ASGE_DATA=$PWD/$BUNDLE/data ASGE_KERNEL_CACHE=$report/kernel-cache
  B=$BUNDLE/bin
  start=$SECONDS
  libdirs=""
  if [ "$dry" = 1 ]; then
    # The stand-in and the local NVRTC; the stand-in loads PTX only.
    local nvrtc=${ASGE_NVRTC:-$HOME/.cache/asge-nvrtc}
    export ASGE_CUDA_STANDIN=1 LD_LIBRARY_PATH=$nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    unset ASGE_KERNEL_FORMAT
    return
  fi
  # What runs is what CI counted: the bundle's CUBIN (the PTX beside it is the fallback if this is changed).
  export ASGE_KERNEL_FORMAT=cubin
  unset ASGE_CUDA_STANDIN
  # NVRTC 13 and cuBLAS 13: from the CUDA toolkit if the machine has one, else from the Python wheels beside
  # PyTorch (nvidia-cuda-nvrtc, nvidia-cublas); the folders found are named in the summary.
  local pydirs
  pydirs=$(python3 -c "import nvidia; print(' '.join(nvidia.__path__))" 2>/dev/null || true)
  for lib in libnvrtc.so.13 libcublas.so.13; do
    local found
    found=$(find /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda*/lib64 $pydirs \
      -maxdepth 4 -name "$lib" 2>/dev/null | head -1)
    if [ -n "$found" ]; then
      libdirs="$libdirs $(dirname "$found")"
      export LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    fi
  done
}

row() { printf '%s\n' "$*" | tee -a "$report/summary.txt"; }

# `timed TEXT`: a summary line that carries a time or a rate; in a dry run it says whose.
timed() { row "$*${stand_in_tag:-}"; }

# `lim SECONDS cmd...`: the command with a time limit of SECONDS (scaled by $scale in a dry run), or what is left
# of the deadline (less a margin for the summary) when that is less; nothing runs once the deadline has passed.
lim() {
  local want=$(($1 * scale))
  shift
  local left=$((DEADLINE * scale - (SECONDS - start) - 10))
  if [ "$left" -le 5 ]; then
    echo "(skipped: the deadline was reached)"
    return 124
  fi
  [ "$want" -gt "$left" ] && want=$left
  timeout --kill-after=5 "$want" "$@"
}

# `first FILE PATTERN FALLBACK`: the first line of FILE matching PATTERN, else FALLBACK.
first() { grep -m1 -E "$2" "$1" 2>/dev/null || echo "$3"; }

# The verdict of a step that ran `cmd` with exit status $1 into a log: what a summary line says when it did not
# finish.
ended() {
  case $1 in
    0) echo "ok" ;;
    124 | 137) echo "did not finish in its time limit" ;;
    *) echo "failed (exit $1)" ;;
  esac
}

check() {
  setup
  : > "$report/summary.txt"
  local what="GPU"
  if [ "$dry" = 1 ]; then
    what="DRY RUN under the CUDA driver stand-in: every time below is its emulator's, not a GPU's"
    echo "dry run: no GPU" > "$report/gpu.txt"
  else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$report/gpu.txt" 2>&1
  fi
  row "== gpu-check ($(head -1 "$report/gpu.txt"), $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), deadline $((DEADLINE * scale)) s) =="
  row "$what"
  [ "$dry" = 1 ] || row "libraries from:${libdirs:- nowhere (no libnvrtc.so.13: only the kernels precompiled in the bundle)}; kernels: ${ASGE_KERNEL_FORMAT:-ptx}"

  # 1. The machine and the build, and the tensor-core self-test: cp.async, ldmatrix, ldmatrix.trans and mma.sync on
  # known inputs, every value compared (a fragment-order error is named here by lane and register).
  lim 20 "$B/asge" info --self-test > "$report/info.txt" 2>&1
  local irc=$?
  row "asge info: $(ended $irc); $(first "$report/info.txt" '^cuda:0' 'no cuda:0 line')"
  row "self-test: $(first "$report/info.txt" '^self-test cuda:0' "did not run: $(tail -1 "$report/info.txt")")"

  # 2. Device parity: every device test, graphs and lanes as in training (no ASGE_CUDA_SYNC: it turns graphs off
  # and serialises the streams). The CPU-only NVRTC tests are not ignored and so not run here. A dry run takes
  # the one-small-case-per-variant test only.
  # The kernel verdicts come from the full parity test's lines (a line is printed once its pass has succeeded), or
  # in a dry run from the one-small-case test's.
  local filter=() small="one small case"
  [ "$dry" = 1 ] && filter=(every_fp16_gemm_variant_on_one_small_case)
  lim 65 "$B/cuda-tests" --ignored --skip standin_ --test-threads 2 --nocapture ${filter[@]+"${filter[@]}"} \
    > "$report/parity.txt" 2>&1
  local rc=$?
  row "parity: $(first "$report/parity.txt" '^test result' "did not finish: $(ended $rc)")"
  row "  $(first "$report/parity.txt" 'ran on:' 'ran on: (no device line)')"
  grep -E '^parity ' "$report/parity.txt" | while IFS= read -r line; do row "  $line"; done
  for k in conv_fwd_nhwc_f16 conv_fwd_nhwc_f16_l conv_fwd_nhwc_f16_sk conv_wgrad_nhwc_f16 conv_wgrad_nhwc_f16_l; do
    local verdict="not run"
    local lines
    lines=$(grep -E "^parity fp16 .*\b$k\b" "$report/parity.txt")
    if [ "$dry" = 0 ]; then lines=$(printf '%s\n' "$lines" | grep -v "$small"); fi
    if [ -n "$lines" ]; then
      verdict="passed"
    elif [ $rc = 124 ] || [ $rc = 137 ]; then
      verdict="not reached: the parity step ran out of time"
    elif grep -qE "^test .* FAILED$" "$report/parity.txt"; then
      verdict="FAILED (see the failures below)"
    fi
    row "  kernel $k: $verdict"
  done
  # The failures, rerun one by one with every launch synchronised and checked, so that the first failing kernel is
  # named with its layer.
  local failed
  failed=$(grep -E '^test .* FAILED$' "$report/parity.txt" | awk '{print $2}')
  for t in $failed; do
    ASGE_CUDA_SYNC=1 lim 15 "$B/cuda-tests" --ignored --exact "$t" --nocapture > "$report/parity-sync-$t.txt" 2>&1
    row "  FAILED $t; synchronised rerun: $(grep -m3 -E 'panicked at|differ|error' "$report/parity-sync-$t.txt" | tr '\n' ' ')"
  done

  # 3. The lanes and step-graph tests a second time.
  if [ "$dry" = 0 ]; then
    lim 15 "$B/cuda-tests" --ignored --test-threads 2 layers_on_separate_streams a_replayed_step_graph \
      > "$report/parity-again.txt" 2>&1
    row "lanes and graphs, second run: $(first "$report/parity-again.txt" '^test result' "did not finish: $(ended $?)")"
  fi

  # 4. Throughput, every op and layer, against cuBLAS measured in the same run.
  # The step by the device's events over 20 steps on a GPU; 2 under the stand-in's emulator.
  # Then every kernel of 3 eager steps timed alone (1 under the stand-in): the kernel table, compared row by row
  # with tools/perf_model.py's (launches, FLOPs, bytes must agree; the times are the measurement).
  local widths=(1 0.25) batch=128 reps=5 steps=20 ksteps=3
  [ "$dry" = 1 ] && widths=(0.125) batch=4 reps=1 steps=2 ksteps=1
  local limit_s=30
  for w in "${widths[@]}"; do
    local f="$report/bench-cuda-fp16-w$w.txt" j="$report/bench-cuda-fp16-w$w.json"
    rm -f "$j"
    lim $limit_s "$B/asge" bench --device cuda --precision fp16 --width "$w" --batch $batch --reps $reps --step-reps $steps \
      --kernel-steps $ksteps --save "$j" > "$f" 2>&1
    local brc=$?
    timed "bench cuda fp16 w$w: $(first "$f" '^train step' "$(ended $brc)")"
    row "  $(first "$f" '^(ceilings|NOT GPU)' 'no ceiling line')"
    row "  fp16 conv fwd, % of the GEMM ceiling by layer: $(grep -E '^ *conv_goodness_fwd' "$f" | awk '{print $6}' | tr '\n' ' ')"
    row "  fp16 conv wgrad, % of the GEMM ceiling by layer: $(grep -E '^ *conv_goodness_wgrad' "$f" | awk '{print $6}' | tr '\n' ' ')"
    row "  kernels by layer: $(grep -E '^ *conv_goodness_(fwd|wgrad)' "$f" | awk '{print $2 ":" $7}' | tr '\n' ' ')"
    # The CIFAR-10 recipe (50,000 training images, 100 epochs) at the measured step rate: training steps only.
    timed "  CIFAR-10 100 epochs at this rate: $(grep -o '([0-9]* images/s' "$f" | head -1 | tr -dc '0-9' | awk '$1 > 0 {printf "%.0f s of training steps", 5000000 / $1} $1 == "" || $1 == 0 {print "no rate"}')"
    timed "  $(first "$f" '^kernels alone' 'no kernel table')"
    if [ -f "$j" ]; then
      python3 tools/perf_model.py --compare "$j" > "$report/perf-model-w$w.txt" 2>&1
      row "  $(grep -E '^perf model' "$report/perf-model-w$w.txt" | head -3 | tr '\n' ' ')"
      timed "  slowest kernels alone (layer:kernel us, % of ceiling): $(python3 -c 'import json,sys
r = json.load(open(sys.argv[1]))
ks = sorted(r["kernels"], key=lambda k: -k["us"])[:6]
pct = lambda k: "-" if k["pct_of_ceiling"] is None else "%.0f%%" % k["pct_of_ceiling"]
print(" ".join("%s:%s %.0f %s" % ("heads" if k["layer"] > r["layers"] else k["layer"], k["kernel"], k["us"], pct(k)) for k in ks))' "$j" 2>&1)"
    else
      row "  perf model: no kernel table to compare (the bench did not finish)"
    fi
    limit_s=25
    row "  the model's expectation on an H100 (tools/perf_model.py, not measured): $(python3 tools/perf_model.py "$w" | tail -1)"
  done

  # 5. Counters on the large GEMM kernels and dz, where Nsight Compute can read them.
  if command -v ncu > /dev/null; then
    local nf="$report/ncu.txt"
    lim 20 ncu --kernel-name regex:'conv_fwd_nhwc_f16_l|conv_wgrad_nhwc_f16_l|dz_f16' --launch-count 6 \
      --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
      "$B/asge" bench --device cuda --precision fp16 --width 1 --batch 128 --reps 1 --step-only > "$nf" 2>&1
    local nrc=$?
    if [ $nrc = 0 ]; then
      row "ncu: $(grep -c '^==PROF== Profiling "' "$nf") kernel launches profiled ($nf)"
    else
      row "ncu: $(ended $nrc): $(grep -m1 -iE 'ERR|error|permission' "$nf" || tail -1 "$nf")"
    fi
  else
    row "ncu: not on this machine (no counters)"
  fi

  # 6. One MNIST epoch. The CPU reference of this exact run (seed 42, width 0.25, one epoch of full MNIST at the
  # recipe's lr) is in docs/calibration.md: the GPU runs should land near it (the spread between seeds there is
  # +-1.6 points for last, +-0.4 for best).
  local limit=()
  [ "$dry" = 1 ] && limit=(--limit-train 64 --limit-test 32 --batch 16)
  row "mnist 1 epoch cpu fp32 (docs/calibration.md, seed 42): last 88.66% best 91.96% fusion 58.54%"
  mnist() {
    local prec=$1
    lim "$2" "$B/asge" train --dataset mnist --data "$ASGE_DATA" --width 0.25 --epochs 1 --precision "$prec" \
      --device cuda ${limit[@]+"${limit[@]}"} --out "$report/mnist-cuda-$prec" --overwrite --quiet > "$report/train-cuda-$prec.txt" 2>&1
    local mrc=$?
    timed "mnist 1 epoch cuda $prec: $(grep -E '^  (last|best|fusion)' "$report/train-cuda-$prec.txt" | awk '{print $1, $3}' | tr '\n' ' ')" \
      "$(python3 -c "import json, sys; m = json.load(open(sys.argv[1])); print(f\"train {m['train_images_per_s']:.0f} images/s\")" \
        "$report/mnist-cuda-$prec/summary.json" 2>/dev/null || echo "$(ended $mrc)")"
  }
  mnist fp16 35

  # 7. PyTorch on the same card: channels-last fp16 autocast (cuDNN), the fair comparison for the fp16 step.
  torch_row() {
    local w=$1 variant=$2 name=$3 f
    f="$report/torch-w$w${variant:+-cl-fp16}.txt"
    if python3 -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
      lim 25 python3 tools/torch_step.py --device cuda --width "$w" --batch 128 --rounds 2 --tf32 default $variant > "$f" 2>&1
      row "pytorch w$w $name: $(tail -1 "$f")"
    else
      row "pytorch w$w $name: no PyTorch with CUDA on this machine"
    fi
  }
  torch_row 1 --channels-last-fp16 "channels-last fp16 autocast"

  # 8. One stream per layer, and the step without its graph (every op launched): what each changes.
  local sw=0.25
  [ "$dry" = 1 ] && sw=0.125
  ASGE_CUDA_LANES=8 lim 10 "$B/asge" bench --device cuda --precision fp16 --width $sw --batch $batch --reps $reps --step-reps $steps \
    --step-only > "$report/bench-cuda-fp16-lanes8.txt" 2>&1
  timed "bench cuda fp16 w$sw, 8 streams: $(first "$report/bench-cuda-fp16-lanes8.txt" '^train step' "$(ended $?)")"
  ASGE_CUDA_GRAPHS=0 lim 10 "$B/asge" bench --device cuda --precision fp16 --width $sw --batch $batch --reps $reps --step-reps $steps \
    --step-only > "$report/bench-cuda-fp16-eager.txt" 2>&1
  timed "bench cuda fp16 w$sw without the step graph: $(first "$report/bench-cuda-fp16-eager.txt" '^train step' "$(ended $?)")"

  # 9. NCCL on this machine, a world of one (several GPUs need it; one never does): the library asge finds
  # (ASGE_NCCL, libnccl.so.2 on the loader path, or the nvidia-nccl wheel PyTorch installs) loads, and its
  # all-reduce gives exact sums on the GPU. Under the stand-in, its NCCL.
  local nccl=${ASGE_NCCL:-}
  if [ -z "$nccl" ] && [ "$dry" = 0 ]; then
    nccl=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2"))' 2>/dev/null)
    [ -f "$nccl" ] || nccl=""
  fi
  lim 15 env ${nccl:+ASGE_NCCL="$nccl"} "$B/asge" comm-check --sizes 1000,1000000 --iters 20 > "$report/comm-check.txt" 2>&1
  local crc=$?
  timed "nccl, a world of one: $(ended $crc); $(first "$report/comm-check.txt" '^NCCL:' "$(tail -1 "$report/comm-check.txt")"); $(first "$report/comm-check.txt" 'bus bandwidth' 'no timing')"

  # 10. fp32, while time is left: the step, an epoch, and the authors' recipe in PyTorch (fp32 eager, TF32 as
  # PyTorch's defaults: its line says which).
  lim 15 "$B/asge" bench --device cuda --precision fp32 --width "${widths[0]}" --batch $batch --reps $reps --step-reps $steps --step-only \
    > "$report/bench-cuda-fp32.txt" 2>&1
  timed "bench cuda fp32 w${widths[0]}: $(first "$report/bench-cuda-fp32.txt" '^train step' "$(ended $?)")"
  mnist fp32 30
  torch_row 1 "" "eager fp32"
  row "== done in $((SECONDS - start)) s =="
}

sanitize() {
  setup
  : > "$report/sanitize.txt"
  local cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$cs" ]; then
    echo "no compute-sanitizer on this machine" | tee -a "$report/sanitize.txt"
    return 0
  fi
  for tool in memcheck racecheck; do
    lim 140 "$cs" --tool $tool --error-exitcode 3 "$B/cuda-tests" --ignored --test-threads 1 --skip standin_ \
      every_fp16_gemm_variant_on_one_small_case parity:: > "$report/sanitize-$tool.txt" 2>&1
    local rc=$?
    local verdict
    case $rc in
      0) verdict="clean" ;;
      3) verdict="ERRORS reported: $(grep -m3 -E '=========.*(Invalid|Race|Error)' "$report/sanitize-$tool.txt" | tr '\n' ' ')" ;;
      124 | 137) verdict="did not finish in its time" ;;
      *) verdict="did not run on this device's runtime (rc $rc): $(grep -m1 -iE 'error|not supported' "$report/sanitize-$tool.txt")" ;;
    esac
    printf 'compute-sanitizer %s: %s\n' "$tool" "$verdict" | tee -a "$report/sanitize.txt"
  done
}

dry=0
scale=1
cmd=${1:-}
shift || true
while [ $# -gt 0 ]; do
  case $1 in
    --out) REPORT_DIR=$2; shift 2 ;;
    *) echo "tools/gpu-check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
case $cmd in
  build) build ;;
  run) check ;;
  # Under the stand-in every limit is doubled: the emulator is slow, and the sizes are small.
  dry-run) dry=1; scale=2; stand_in_tag="  [stand-in emulator time, not a GPU's]"; check ;;
  sanitize) sanitize ;;
  *) echo "usage: tools/gpu-check.sh build | run [--out DIR] | dry-run [--out DIR] | sanitize [--out DIR]" >&2; exit 2 ;;
esac
