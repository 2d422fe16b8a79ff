#!/usr/bin/env bash
# Benchmark (not a test; CI does not run it): the trainer under torchrun with 3 processes against a
# framework-free single-process loop on configs/fmnist_lt.toml, then 100 against 100,000 synthetic
# clients. Prints ratios measured in this one invocation. Arguments go to benchmarks/bench.py.
set -euo pipefail
source "$(dirname "$0")/venv.sh"
exec python "$(dirname "$0")/../benchmarks/bench.py" "$@"
