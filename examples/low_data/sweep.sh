#!/usr/bin/env bash
# The low-data claim (configs/fmnist_lt_lowdata.toml): FedAvg from scratch and from the DWP backbone, each with
# and without LLaVA alignment, while the clients hold 10%, 25% and 100% of the long-tailed training set; seeds
# 0-4, one compare of 3 processes per fraction (about 7-8 min per seed and fraction on a 2-core CPU). compare
# skips a finished row and resumes a killed one. The recorded tables ran stage 1 on the 512 pool images for 60
# steps; the config now uses the web corpus (docs/results.md says why). Build the stand-ins first (launch/run.sh does:
# python -m mllmfl_dist tiny-models runs/standins --train shards/fmnist_web). Then:
# python examples/low_data/figure.py
#   examples/low_data/sweep.sh [SEEDS] [FRACTIONS]    e.g. examples/low_data/sweep.sh 0,1,2 "0.1 0.25"
set -euo pipefail
source "$(dirname "$0")/../../launch/venv.sh"
seeds="${1:-0,1,2,3,4}"
fractions="${2:-0.1 0.25 1.0}"
for f in $fractions; do
  OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node 3 -m mllmfl_dist compare \
    configs/fmnist_lt_lowdata.toml --seeds "$seeds" \
    --methods 'fedavg,fedavg+dwp[llava],fedavg+align[llava],mllm-llava-fl' \
    --set "data.train_fraction=$f" --set "run.name=fmnist_lt_lowdata-f$f" --last 3 --target 0.5
done
