#!/usr/bin/env bash
# The test suite on the CPU (lint, then unit, real gloo process groups, end to end). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/venv.sh"
ruff check .
exec python -m pytest -q --durations=20 "$@"  # the slowest tests in every log: the suite should stay under 20 min
