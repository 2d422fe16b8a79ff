#!/usr/bin/env bash
# A throw-away Slurm cluster on this host, for the tests and for trying the sbatch scripts without a cluster:
#   launch/local_slurm.sh start DIR     # prints the line to run: export SLURM_CONF=DIR/slurm.conf
#   launch/local_slurm.sh stop DIR      # cancels its jobs and stops its daemons
# Needs root and Debian's slurmctld, slurmd, slurm-client and munge (apt-get install ...). Everything it
# writes lives in DIR (config, munge key and socket, spool, state, logs, job-completion log for
# `sacct -c`), on ports of its own, so it never touches a system-wide Slurm or munge. No cgroups:
# proctrack/linuxproc, task/none. Two nodes, 127.0.0.1 and 127.0.0.2 (two slurmd on this host; one node if
# this slurmd refuses that), each declaring MLLMFL_SLURM_CPUS CPUs (default 4) whatever the host has.
# Every wait has a timeout; a failed start stops what it started and exits non-zero with one line.
set -euo pipefail

usage="usage: launch/local_slurm.sh start|stop DIR"
action="${1:?$usage}"
dir="${2:?$usage}"
cpus="${MLLMFL_SLURM_CPUS:-4}"
start_timeout="${MLLMFL_SLURM_TIMEOUT:-60}"

die() { echo "local_slurm: $*" >&2; exit 1; }

# The daemons this cluster started, from its pid files; a pid file whose process is gone, or whose pid now
# belongs to another program, is skipped, so a stale file never makes this kill a stranger.
pids_of() {
  local file pid
  for file in "$dir"/run/*.pid; do
    [ -f "$file" ] || continue
    pid="$(cat "$file")"
    case "$(cat "/proc/$pid/comm" 2>/dev/null)" in
      munged|slurmctld|slurmd) echo "$pid" ;;
    esac
  done
}

stop() {
  [ -d "$dir/run" ] || return 0
  # Jobs first, so that no slurmstepd outlives its slurmd.
  if [ -f "$dir/slurm.conf" ] && [ -n "$(pids_of)" ]; then
    SLURM_CONF="$dir/slurm.conf" timeout 10 scancel --user="$(id -un)" 2>/dev/null || true
    wait_for 15 no_jobs || true
  fi
  local pid
  for pid in $(pids_of); do kill "$pid" 2>/dev/null || true; done
  # Daemons get 10 s to go, then SIGKILL (a stuck slurmd must not hang a test session).
  wait_for 10 none_alive || true
  for pid in $(pids_of); do kill -9 "$pid" 2>/dev/null || true; done
  rm -f "$dir"/run/*.pid
}

none_alive() { [ -z "$(pids_of)" ]; }

no_jobs() { [ -z "$(SLURM_CONF="$dir/slurm.conf" timeout 5 squeue -h -o %i 2>/dev/null)" ]; }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Polls "$@" every 0.2 s until it succeeds, for at most $1 seconds.
wait_for() {
  local seconds="$1"; shift
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# Node names must resolve to their node, as on a real cluster, because jobs take rank 0's address from
# `scontrol show hostnames`. Two daemons on one host cannot be named after it (Slurm maps "localhost" and
# the host name onto one NodeHostName), so the nodes are named by loopback addresses: every 127.x.y.z
# reaches this host without any change to /etc/hosts.
NODES="127.0.0.1 127.0.0.2"

write_config() {
  local nodes="$1" host ctld_port
  host="$(hostname -s)"
  ctld_port="$(free_port)"
  cat > "$dir/slurm.conf" <<EOF
# Written by launch/local_slurm.sh: a single-host test cluster.
ClusterName=mllmfl-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
SchedulerType=sched/backfill
# Schedule every 2 s rather than every minute, so a requeued test job starts again promptly.
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
PlugStackConfig=$dir/plugstack.conf
EOF
  : > "$dir/plugstack.conf"
  local name
  for name in $nodes; do
    echo "NodeName=$name NodeHostname=$host NodeAddr=$name Port=$(free_port) CPUs=$cpus State=UNKNOWN" \
      >> "$dir/slurm.conf"
  done
  echo "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >> "$dir/slurm.conf"
}

start_munge() {
  mkdir -p "$dir/munge"
  chmod 0700 "$dir/munge"
  [ -f "$dir/munge/munge.key" ] || dd if=/dev/urandom of="$dir/munge/munge.key" bs=1 count=128 status=none
  chmod 0400 "$dir/munge/munge.key"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/seed" \
    || die "munged did not start; see $dir/log/munged.log"
  wait_for 10 test -S "$dir/munge/munge.socket" || die "munged did not open $dir/munge/munge.socket"
}

# slurmctld answers, or has died (a refused config): no point waiting longer either way.
ctld_settled() {
  scontrol ping >/dev/null 2>&1 && return 0
  local pid_file="$dir/run/slurmctld.pid"
  [ -f "$pid_file" ] && [ "$(cat "/proc/$(cat "$pid_file")/comm" 2>/dev/null)" != slurmctld ]
}

all_idle() {
  local states
  states="$(sinfo -h -N -o '%T' 2>/dev/null)" || return 1
  [ -n "$states" ] && ! grep -qv '^idle$' <<<"$states"
}

start() {
  [ "$(id -u)" = 0 ] || die "needs root (slurmd starts jobs as their user)"
  local tool
  for tool in munged slurmctld slurmd sinfo python3; do
    command -v "$tool" >/dev/null || die "$tool not found; apt-get install slurmctld slurmd slurm-client munge"
  done
  stop
  rm -rf "$dir/state" "$dir/spool" "$dir/log"
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/run"
  export SLURM_CONF="$dir/slurm.conf"
  start_munge
  local nodes name
  for nodes in "$NODES" "${NODES%% *}"; do
    write_config "$nodes"
    slurmctld -c -f "$SLURM_CONF" || { stop_slurm; continue; }
    wait_for 20 ctld_settled && scontrol ping >/dev/null 2>&1 || { stop_slurm; continue; }
    local ok=1
    for name in $nodes; do
      mkdir -p "$dir/spool/$name"
      slurmd -f "$SLURM_CONF" -N "$name" || { ok=0; break; }
    done
    if [ "$ok" = 1 ] && wait_for "$start_timeout" all_idle; then
      echo "export SLURM_CONF=$SLURM_CONF"
      echo "local_slurm: node(s) $nodes idle, $cpus CPUs each; logs in $dir/log" >&2
      return 0
    fi
    stop_slurm
    rm -rf "$dir/state" && mkdir -p "$dir/state"
  done
  stop
  die "the nodes did not become idle within ${start_timeout}s; see $dir/log/"
}

# Stops slurmctld and the slurmds of a failed attempt, keeping munged for the next one.
stop_slurm() {
  local pid
  for pid in $(pids_of); do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = munged ] && continue
    kill "$pid" 2>/dev/null || true
  done
  wait_for 10 only_munge || true
  for pid in $(pids_of); do
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = munged ] || kill -9 "$pid" 2>/dev/null || true
  done
}

only_munge() { ! pids_of | xargs -r -I{} cat /proc/{}/comm 2>/dev/null | grep -q '^slurm'; }

case "$action" in
  start) start ;;
  stop) stop ;;
  *) die "$usage" ;;
esac
