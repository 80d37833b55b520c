#!/usr/bin/env bash
# Installs PyTorch (and numpy) from PyPI into a private folder ($ASGE_TORCH, default ~/.cache/asge-torch) for
# tools/compare.sh, tools/torch_step.py and the test of python/asge_torch.py. PyPI only has the CUDA build of torch
# for Linux: with its NVIDIA libraries it is about 5 GB; it runs on the CPU as well.
set -euo pipefail
T=${ASGE_TORCH:-$HOME/.cache/asge-torch}
if PYTHONPATH=$T python3 -c "import torch, numpy" 2>/dev/null; then echo "torch: ok ($T)"; exit 0; fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$T" \
  torch==2.15.0 numpy==2.4.6
PYTHONPATH=$T python3 -c "import torch; print('torch', torch.__version__, 'in', '$T')"
