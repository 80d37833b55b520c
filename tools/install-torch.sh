#!/usr/bin/env bash
# Installs PyTorch from PyPI into a private folder ($ASGE_TORCH, default ~/.cache/asge-torch) for
# tools/compare.sh and tools/torch_step.py. PyPI only has the CUDA build of torch for Linux: with its NVIDIA
# libraries it is about 5 GB; it runs on the CPU as well.
set -euo pipefail
T=${ASGE_TORCH:-$HOME/.cache/asge-torch}
if PYTHONPATH=$T python3 -c "import torch" 2>/dev/null; then echo "torch: ok ($T)"; exit 0; fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$T" torch
PYTHONPATH=$T python3 -c "import torch; print('torch', torch.__version__, 'in', '$T')"
