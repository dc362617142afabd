#!/usr/bin/env bash
# Creates (once) the virtual environment .venv with vdit-sparse installed in
# editable mode. Sourced by scripts/demo.sh and scripts/test.sh.
# torch is installed first and pinned: a bare `torch` requirement in a fresh
# venv can pull a multi-GB CUDA build; 2.13.0 is the CPU build these machines
# carry. Set VDIT_VENV to use another environment (e.g. one with CUDA torch).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VDIT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
stamp="$VENV/.vdit-sparse-installed"
want="$(sha1sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
    "$PY" -m pip install -q -e ".[test]"
    echo "$want" > "$stamp"
fi
export PATH="$(pwd)/$VENV/bin:$PATH"
