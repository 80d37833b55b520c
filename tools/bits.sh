#!/usr/bin/env bash
# The engine's own bits: SHA-256s of the weights of seeded runs (tools/tensor_digest.py: the tensors, not the
# metadata), to show that a change which must not change a number does not: the fixture replay's weights after
# its two steps, and two epochs of MNIST at width 0.125 on the CPU in fp32 and fp16 and under the CUDA stand-in in
# fp16. The CPU's GEMM library picks its kernels and blocking by the CPU it runs on, so the bits are a CPU's:
# compare on the machine that recorded them.
#
#   tools/bits.sh                 print them (with the CPU's name)
#   tools/bits.sh --check FILE    compare with FILE (an earlier output); exit 1 where one differs
set -euo pipefail
cd "$(dirname "$0")/.."
data=${ASGE_DATA:-$PWD/data}
target=${CARGO_TARGET_DIR:-target}
nvrtc=${ASGE_NVRTC:-$HOME/.cache/asge-nvrtc}
check=
if [ "${1:-}" = --check ]; then check=${2:?--check FILE}; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo build --release --locked --bin asge -q
ASGE_BITS_DIR=$work cargo test --release --locked --test fixture -q > "$work/fixture.log" 2>&1 ||
  { cat "$work/fixture.log"; exit 1; }
run() {
  local name=$1
  shift
  "$target/release/asge" train --dataset mnist --data "$data" --width 0.125 --epochs 2 --batch 64 --lr 2e-3 \
    --limit-train 640 --limit-test 128 --val 128 --seed 7 --threads 2 --tb-every 0 --quiet --out "$work/$name" "$@" \
    > "$work/$name.log" 2>&1 || { cat "$work/$name.log"; exit 1; }
}
run cpu-fp32
run cpu-fp16 --precision fp16
ASGE_CUDA_STANDIN=1 LD_LIBRARY_PATH=$nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
  run standin-fp16 --device cuda --precision fp16
{
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')"
  for f in fixture.safetensors cpu-fp32/last.safetensors cpu-fp16/last.safetensors standin-fp16/last.safetensors; do
    python3 tools/tensor_digest.py "$work/$f" | sed "s|$work/||"
  done
} > "$work/bits.txt"
cat "$work/bits.txt"
if [ -n "$check" ]; then
  if [ "$(head -1 "$check")" != "$(head -1 "$work/bits.txt")" ]; then
    echo "tools/bits.sh: $check was recorded on another CPU ($(head -1 "$check")): not compared"
    exit 1
  fi
  if diff <(tail -n +2 "$check") <(tail -n +2 "$work/bits.txt"); then
    echo "tools/bits.sh: every digest as recorded in $check"
  else
    echo "tools/bits.sh: DIFFERENT from $check"
    exit 1
  fi
fi
