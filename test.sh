#!/usr/bin/env bash
# Quick start: set up whatever is missing, then run the checks (ruff, mypy) and the whole test
# suite.
# Arguments go to pytest (for example: ./test.sh -m "not gemma" -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
echo "[test] ruff"
.venv/bin/ruff check .
echo "[test] mypy"
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
