#!/usr/bin/env bash
# A separate venv with NVIDIA kvpress 0.5.5, for side-by-side runs (benchmarks/vs_kvpress.py) and for
# regenerating the conformance fixtures (tools/conformance/dump_kvpress.py). kvpress pins transformers<5.3 and
# pandas<3, so it cannot share kvbench's environment.
# Usage: bash tools/peers/kvpress-env.sh [VENV_DIR]   (default: .peers/kvpress-venv, git-ignored)
# Without an NVIDIA GPU the CPU build of torch 2.13.0 is installed (never a CUDA build on a CPU machine).
set -euo pipefail
venv=${1:-.peers/kvpress-venv}
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import kvpress" 2>/dev/null; then
  echo "kvpress environment ready: $venv"
  exit 0
fi
python=${PYTHON:-python3}
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
bash "$(dirname "$0")/../../scripts/install_torch.sh" "$venv/bin/python"
"${pip[@]}" install -q "kvpress==0.5.5"
"$venv/bin/python" -c "import kvpress, torch, transformers; print('kvpress environment ready:', '$venv', '| torch', torch.__version__, '| transformers', transformers.__version__)"
