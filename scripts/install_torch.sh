#!/usr/bin/env bash
# Install torch into the venv of PYTHON, chosen for the machine: with an NVIDIA GPU the default (CUDA) build;
# without one the CPU build of torch 2.13.0 (from pip's find-links where it lies on disk, else PyTorch's CPU
# index), so a CPU machine never downloads CUDA libraries. Usage: scripts/install_torch.sh VENV/bin/python
set -euo pipefail
pip=("$1" -m pip)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" install -q torch
elif compgen -G "${PIP_FIND_LINKS:-/nonexistent}/torch-2.13.0*cpu*.whl" >/dev/null; then
  "${pip[@]}" install -q "torch==2.13.0"
else
  "${pip[@]}" install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
