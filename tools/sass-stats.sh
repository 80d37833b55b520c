#!/usr/bin/env bash
# Static SASS of the tensor-core GEMM kernels, without a GPU: NVRTC compiles kernels/*.cu to CUBIN for an
# architecture (default sm_90) as the CUDA backend does, cuobjdump + nvdisasm (PyPI wheels, cached in
# ~/.cache/asge-cuda-tools) disassemble it, and tools/sass_loop.py counts each main loop's instructions by class.
# A proxy for the issue cost of a K step, not a speed measurement: only a GPU times kernels (tools/gpu-check.sh).
# With --check (as tools/test.sh runs it in CI), fails when a kernel in tools/sass-baseline.txt issues more
# instructions per MMA in its main loop than the count committed there.
# usage: tools/sass-stats.sh [--check] [ARCH] [LISTINGS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
CHECK=()
if [ "${1:-}" = --check ]; then CHECK=(--check tools/sass-baseline.txt); shift; fi
ARCH=${1:-sm_90}
LISTINGS=${2:-target/sass-$ARCH}
TOOLS=${ASGE_CUDA_TOOLS:-$HOME/.cache/asge-cuda-tools}
NVRTC=${ASGE_NVRTC:-$HOME/.cache/asge-nvrtc}
pipi() { python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$TOOLS" "$@"; }
# One install for both (pip --target does not merge into an existing nvidia/ folder).
if [ ! -x "$TOOLS/nvidia/cu13/bin/cuobjdump" ] || [ ! -x "$TOOLS/nvidia/cu13/bin/nvdisasm" ]; then
  rm -rf "$TOOLS"
  pipi nvidia-cuda-cuobjdump==13.2.86 nvidia-cuda-nvdisasm==13.2.86
fi
[ -e "$NVRTC/nvidia/cu13/lib/libnvrtc.so.13" ] || \
  python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$NVRTC" \
    nvidia-cuda-nvrtc==13.0.88
export PATH=$TOOLS/nvidia/cu13/bin:$PATH
export LD_LIBRARY_PATH=$NVRTC/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cargo run --release --quiet --example dump_cubin -- "$LISTINGS" "$ARCH"
for m in conv_goodness_fwd conv_goodness_wgrad; do
  cuobjdump -sass "$LISTINGS/$m.cubin" > "$LISTINGS/$m.sass"
done
echo "$ARCH, per warp and main-loop step (listings in $LISTINGS):"
python3 tools/sass_loop.py "${CHECK[@]}" "$LISTINGS/conv_goodness_fwd.sass" "$LISTINGS/conv_goodness_wgrad.sass"
