#!/usr/bin/env bash
# DP-FedAvg's accuracy against epsilon (configs/fmnist_dp.toml): FedAvg without DP and with noise multipliers
# 1, 2 and 4, seeds 0-4, each a torchrun of 3 processes (about 2 min each on a 2-core CPU). Seeds are the outer
# loop, so a sweep cut short holds every multiplier for its first seeds; a finished run is skipped, a killed one
# resumes from its last checkpoint. Then: python examples/dp_epsilon/figure.py
#   examples/dp_epsilon/sweep.sh [SEEDS] [MULTIPLIERS]    e.g. examples/dp_epsilon/sweep.sh "0 1 2" "none 1.0"
set -euo pipefail
source "$(dirname "$0")/../../launch/venv.sh"
seeds="${1:-0 1 2 3 4}"
multipliers="${2:-none 1.0 2.0 4.0}"
for seed in $seeds; do
  for z in $multipliers; do
    name="fmnist_dp-z$z-s$seed"
    if [ -f "runs/$name/federated/summary.json" ]; then continue; fi
    if [ "$z" = none ]; then dp=(--set dp.enabled=false); else dp=(--set "dp.noise_multiplier=$z"); fi
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 3 -m mllmfl_dist federate \
      configs/fmnist_dp.toml --set "run.seed=$seed" --set "run.name=$name" --set log.progress=false "${dp[@]}"
  done
done
