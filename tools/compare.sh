#!/usr/bin/env bash
# Side-by-side training-step throughput: asge (CPU backend) against the authors' recipe in PyTorch
# (tools/torch_step.py), same shapes, same thread count, alternating, several rounds; prints images/s and the
# ratio asge / PyTorch per configuration with min / median / max over the rounds.
#
#   tools/compare.sh [--rounds R] [--widths "0.25 1.0"] [--batch 128] [--threads N] [--channels 3] [--device cuda]
#
# With --device cuda both sides run on the GPU, and PyTorch runs twice per round: the released recipe (fp32,
# eager) and a channels-last + fp16 autocast variant; the ratio is against each.
#
# PyTorch: anything importable by python3, or $ASGE_TORCH (default ~/.cache/asge-torch, which
# tools/install-torch.sh fills from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=5; WIDTHS="0.25 1.0"; BATCH=128; THREADS=$(nproc); CH=3; DEVICE=cpu
while [ $# -gt 0 ]; do
  case $1 in
    --rounds) ROUNDS=$2; shift 2 ;;
    --widths) WIDTHS=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --channels) CH=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    *) echo "compare.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
export PYTHONPATH=${ASGE_TORCH:-$HOME/.cache/asge-torch}${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch" 2>/dev/null || { echo "compare.sh: PyTorch is not importable (run tools/install-torch.sh)" >&2; exit 1; }
cargo build --release --quiet
ASGE=${CARGO_TARGET_DIR:-target}/release/asge
# images_per_s from a JSON document on stdin (asge prints one pretty JSON object, torch_step.py one line).
field() { python3 -c "import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index('{'):])['images_per_s'])"; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); device $DEVICE; threads $THREADS; batch $BATCH; vgg8, $CH input channels"
echo "torch: $(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)"
VARIANTS=("")
[ "$DEVICE" = cpu ] || VARIANTS=("" "--channels-last-fp16")
for variant in "${VARIANTS[@]}"; do
  echo "== PyTorch ${variant:-fp32 eager} =="
  printf '%-6s %-6s %12s %12s %8s\n' width round asge_img/s torch_img/s ratio
  for w in $WIDTHS; do
    ratios=()
    for r in $(seq 1 "$ROUNDS"); do
      a=$("$ASGE" --threads "$THREADS" bench --device "$DEVICE" --step-only --json --width "$w" --batch "$BATCH" --channels "$CH" --reps 3 | field)
      # shellcheck disable=SC2086
      t=$(python3 tools/torch_step.py --json --width "$w" --batch "$BATCH" --channels "$CH" --threads "$THREADS" \
          --device "$DEVICE" $variant --steps 3 --rounds 1 2>/dev/null | field)
      ratio=$(python3 -c "print(f'{$a / $t:.3f}')")
      ratios+=("$ratio")
      printf '%-6s %-6s %12.1f %12.1f %8s\n' "$w" "$r" "$a" "$t" "$ratio"
    done
    python3 -c "
import statistics, sys
r = sorted(float(x) for x in sys.argv[2:])
print(f'width {sys.argv[1]}: asge/torch ratio min {r[0]:.2f}  median {statistics.median(r):.2f}  max {r[-1]:.2f}')
" "$w" "${ratios[@]}"
  done
done
