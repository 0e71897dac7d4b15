#!/usr/bin/env bash
# The test suite: sets up .venv (CPU torch where there is no GPU) if needed, then runs pytest on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# an empty selection fails too (pytest exits 5): a suite that ran nothing proves nothing
python -m pytest tests "$@"
