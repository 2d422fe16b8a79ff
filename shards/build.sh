#!/usr/bin/env bash
# Rebuilds every shipped shard folder from the raw Fashion-MNIST files; deterministic (same bytes on rerun).
# Needs the four idx files: `apt-get install dataset-fashion-mnist` puts them under
# /usr/share/datasets/fashion-mnist, or pass another folder as FMNIST_ROOT=DIR.
# Run from anywhere: shards/build.sh   (PYTHON=... picks the interpreter; default .venv/bin/python or python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
ROOT=${FMNIST_ROOT:-}
shards() { "$PYTHON" -m mllmfl_dist.commands.shards --from-source fashion_mnist --root "$ROOT" --overwrite "$@"; }

# Unlabeled pool for the MLLM stages: the last 512 training images (indices 59488..59999).
shards --split train --indices 59488:60000 --no-labels --out shards/pool --prefix pool --max-count 128
# Fashion-MNIST-LT train set: the first 300 images of each class among indices 0..59487, long-tailed at IF 0.01.
shards --split train --indices 0:59488 --per-class 300 --imb-factor 0.01 --out shards/fmnist_lt --prefix train --max-count 500
# Balanced test set: the first 100 images of each class of the test split.
shards --split test --per-class 100 --out shards/fmnist_lt --prefix test --max-count 500
# Balanced labeled alignment pool: the first 20 images of each class among indices 50000..59487.
shards --split train --indices 50000:59488 --per-class 20 --out shards/fmnist_align --prefix align --max-count 500
# Web-like image-text corpus for training the MLLM stand-ins (no labels): Fashion-MNIST train images among
# indices 50000..59487 that are not in fmnist_align, a reversed long-tail class mix, alt-text-like captions
# (10% name a wrong class, 10% no class), seed 0. See shards/README.md.
"$PYTHON" -m mllmfl_dist.commands.web_corpus --root "$ROOT" --overwrite --indices 50000:59488 \
  --exclude 'shards/fmnist_align/align-*.tar.gz' --n-max 950 --mix-factor 0.4 --wrong-fraction 0.1 \
  --no-class-fraction 0.1 --seed 0 --out shards/fmnist_web --prefix web --max-count 1000
