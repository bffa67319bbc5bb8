#!/usr/bin/env bash
# Create the virtual environment and install kvbench. Usage: scripts/setup.sh [VENV_DIR]
# torch first, chosen for the machine: with an NVIDIA GPU, the default (CUDA) build; without one, the CPU
# build of torch 2.13.0 (from pip's find-links where it lies on disk, else from PyTorch's CPU index), so a
# CPU machine never downloads gigabytes of CUDA libraries. An existing torch is kept.
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip >/dev/null
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  bash "$(dirname "$0")/install_torch.sh" "$venv/bin/python"
fi
"${pip[@]}" install -q -e ".[dev]"
touch "$venv/.installed"
"$venv/bin/python" -c "import torch, transformers; print('kvbench ready: torch', torch.__version__, '| transformers', transformers.__version__)"
