#!/usr/bin/env bash
# The main job on the embedded offline default: configs/smoke.toml under torchrun with 3 processes
# (rank 0 the server, ranks 1-2 hosting clients). Extra arguments are passed on, e.g.
#   launch/run.sh --set federated.rounds=5
set -euo pipefail
source "$(dirname "$0")/venv.sh"
exec torchrun --standalone --nproc_per_node 3 -m mllmfl_dist federate configs/smoke.toml "$@"
