#!/usr/bin/env bash
# The main job on the embedded offline default: the whole method (annotate -> pretrain -> federate with
# alignment, and FedAvg from scratch beside it -> report) on the shipped shards, with a CLIP and a LLaVA
# trained here on the shipped web-like corpus (built once into runs/standins/, a few minutes; reused after),
# under torchrun with 3 processes (rank 0 the server, ranks 1-2 hosting clients). Outputs land in
# runs/default/; the report with its plots and report.md in runs/default/report/. Extra arguments are passed
# on, e.g.
#   launch/run.sh --set federated.rounds=20
set -euo pipefail
source "$(dirname "$0")/venv.sh"
python -m mllmfl_dist tiny-models runs/standins --train shards/fmnist_web
# Set explicitly, or torchrun prints its OMP_NUM_THREADS banner; each rank's intra-op threads are dist.threads.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec torchrun --standalone --nproc_per_node 3 -m mllmfl_dist run configs/default.toml "$@"
