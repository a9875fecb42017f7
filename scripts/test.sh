#!/usr/bin/env bash
# The README's test command: installs the test dependencies, then runs the linters, the layer
# contract and the whole test suite.  `.ci/run` calls exactly this.  Extra arguments go to pytest
# (e.g. `scripts/test.sh -m "not slow"` for the fast set).
set -euo pipefail
. "$(dirname "$0")/bootstrap.sh" test
cd "$UMBRA_ROOT"
echo "== ruff" && ruff check src tests bench
echo "== ruff format --check" && ruff format --check src tests bench
echo "== mypy" && mypy
echo "== import-linter" && lint-imports
echo "== pytest" && pytest "$@"
