#!/usr/bin/env bash
# The test suite on the CPU (lint, then unit, real gloo process groups, end to end). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/venv.sh"
ruff check .
ruff format --check . >/dev/null || { ruff format --check .; echo "run: ruff format ." >&2; exit 1; }
# The slowest tests in every log (the suite should stay under 20 min). Tests marked slow (two of the paper configs'
# end-to-end runs) are left out unless the arguments select markers themselves: `launch/test.sh -m slow`.
if [[ " $* " == *" -m "* ]]; then exec python -m pytest -q --durations=20 "$@"; fi
exec python -m pytest -q --durations=20 -m "not slow" "$@"
