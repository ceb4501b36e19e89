#!/usr/bin/env bash
# Create benchmarks/.venv-sb3, a venv separate from dqnc's, holding SB3 + CPU torch (+ MinAtar,
# ale-py) for train_vs_sb3.py, import_sb3*.py and atari_preset_vs_sb3.py. Kept apart so SB3/torch
# never leak into dqnc's dependency set.
# Usage: bash benchmarks/setup_venv.sh            (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-sb3"
python="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r "$here/requirements.txt"

# Fail here, not mid-benchmark, if the stack does not import; report what got installed.
"$venv/bin/python" - <<'PY'
import sys

import gymnasium, stable_baselines3, torch

if torch.version.cuda is not None:
    sys.exit(f"torch {torch.__version__} is a CUDA build; install the CPU wheel (torch==X+cpu) into "
             "benchmarks/.venv-sb3 and rerun")
print(f"ok: stable-baselines3 {stable_baselines3.__version__}, torch {torch.__version__}, "
      f"gymnasium {gymnasium.__version__}, cuda={torch.cuda.is_available()}")
PY
