#!/usr/bin/env bash
# The whole test suite, on CPU. Triton kernels run in the interpreter.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export TRITON_INTERPRET=1
python -m pytest -q "$@"
