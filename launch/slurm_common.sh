# Sourced by launch/slurm.sbatch and launch/slurm_torchrun.sbatch inside the job, from the repository
# they were submitted from: checks the venv, sets rank 0's address and port, and provides
# run_step_with_requeue, which runs the job step, forwards Slurm's warning signal to it and requeues the
# job when the ranks stopped on it. Nothing here installs packages: compute nodes often have no internet.
set -euo pipefail
# Remember a USR1 that arrives before the step runs (bash's default action would end the job unrequeued).
stop_asked=0
trap 'stop_asked=1' USR1

venv="${MLLMFL_VENV:-$PWD/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  echo "slurm: no virtual environment at $venv; create it once where pip can reach PyPI (bash launch/venv.sh" \
       "in the repository, or set MLLMFL_VENV): jobs do not install packages" >&2
  exit 2
fi
if [ "$(cat "$venv/.mllmfl_installed" 2>/dev/null)" != "$(sha256sum pyproject.toml | cut -d' ' -f1)" ]; then
  echo "slurm: warning: $venv was installed for another pyproject.toml; run bash launch/venv.sh to update it" >&2
fi
export PATH="$venv/bin:$PATH"

# Rank 0 runs on the job's first node: its name as Slurm expands the node list, and a port per job id
# (15000 + id % 15000, as mllmfl_dist/core/launch.py derives it), so that two jobs sharing a node do not collide.
# Both are set here whatever the submitting shell exported (sbatch passes its environment on).
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)" || true
[ -n "$MASTER_ADDR" ] || { echo "slurm: scontrol show hostnames $SLURM_JOB_NODELIST gave no host" >&2; exit 2; }
export MASTER_ADDR MASTER_PORT=$((15000 + SLURM_JOB_ID % 15000))
command="${MLLMFL_COMMAND:-run}"
echo "slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $command," \
     "rank 0 at $MASTER_ADDR:$MASTER_PORT" >&2

# check_before_launch NODES RANKS_PER_NODE GPUS_PER_NODE CONFIG [--set ...]: `python -m mllmfl_dist check` for the
# world this job starts, before any rank does, so a missing model, data file or shard, or a world that cannot
# run (more nccl ranks than GPUs, weights over a GPU's memory), fails the job at once with one line each
# instead of after the job queued and loaded its weights. Commands check does not know are not checked.
check_before_launch() {
  local nodes="$1" per_node="$2" gpus="$3"
  shift 3
  case "$command" in
    run|annotate|pretrain|federate|compare) ;;
    *) return 0 ;;
  esac
  python -m mllmfl_dist check "$@" --for "$command" --nnodes "$nodes" --nproc-per-node "$per_node" \
    --gpus-per-node "$gpus"
}

# run_step_with_requeue CMD...: runs the job step in the background so that this shell can take Slurm's
# warning signal (#SBATCH --signal=B:USR1@...; bash runs a trap only between commands, so it waits with
# `wait`). On USR1 the step's processes get USR1 too; the ranks finish their round, write a checkpoint and
# exit 75 (under torchrun the agents then exit 1). Then the job is requeued (#SBATCH --requeue) and the
# rerun resumes from that checkpoint. A USR1 before the step starts requeues at once.
requeue() {
  echo "slurm: $1; requeueing job $SLURM_JOB_ID to resume from the last checkpoint" >&2
  if scontrol requeue "$SLURM_JOB_ID"; then
    exit 0  # Slurm ends this instance of the job
  fi
  echo "slurm: could not requeue job $SLURM_JOB_ID (submitted without --requeue?); submit the same" \
       "command again to resume" >&2
  exit 75
}

run_step_with_requeue() {
  local rc=0 step_pid
  [ "$stop_asked" = 0 ] || requeue "USR1 before the ranks started"
  # srun passes USR1 on to every process of its step (the ranks; torchrun agents ignore it).
  trap 'stop_asked=1
        echo "slurm: USR1 (time limit or preemption ahead): the ranks stop after their current round" >&2
        kill -USR1 "$step_pid" 2>/dev/null || true' USR1
  "$@" &
  step_pid=$!
  wait "$step_pid" || rc=$?
  while kill -0 "$step_pid" 2>/dev/null; do  # wait returned early for the trap: keep waiting
    rc=0
    wait "$step_pid" || rc=$?
  done
  trap 'stop_asked=1' USR1
  if [ "$stop_asked" = 1 ] && [ "$rc" != 0 ]; then
    requeue "the ranks stopped on USR1 (exit $rc)"
  fi
  return "$rc"
}
