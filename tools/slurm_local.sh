#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the tests of the launch scripts (tests/integration/test_slurm*.py).
#
#   bash tools/slurm_local.sh start     # install slurm-wlm + munge if missing, write the config, start the
#                                       # daemons, wait until `sinfo` shows the node idle
#   bash tools/slurm_local.sh status    # the daemons and the node state (exit 0 when the node takes jobs)
#   bash tools/slurm_local.sh stop      # stop the daemons this script started
#
# What it sets up (Debian packages slurm-wlm and munge, installed with apt-get, non-interactive, when missing):
#   - munged with the package's key (created with mungekey when the package did not make one);
#   - /etc/slurm/slurm.conf (the path every Slurm client reads): one node named after this host, reached on
#     127.0.0.1 only, with this machine's CPUs and memory; no cgroups (ProctrackType=proctrack/linuxproc,
#     TaskPlugin=task/none), select/cons_tres with CR_CPU, no accounting database (finished jobs stay visible to
#     `scontrol show job` for MinJobAge=3600 s). An existing slurm.conf that this script did not write is never
#     overwritten: start refuses instead.
#   - slurmctld and slurmd as root; state, spool, logs and pid files under $SLURM_LOCAL_DIR.
#
# Settings (environment): SLURM_LOCAL_DIR (default /var/tmp/megatron_rl_slurm), SLURM_LOCAL_CPUS (default:
# nproc), SLURM_LOCAL_START_TIMEOUT (seconds to wait for the node, default 90).
# Needs root (it installs packages and starts daemons). Logs: $SLURM_LOCAL_DIR/{slurmctld,slurmd,munged}.log.
set -euo pipefail

STATE_DIR=${SLURM_LOCAL_DIR:-/var/tmp/megatron_rl_slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by megatron_rl tools/slurm_local.sh"
NODE=$(hostname -s)
START_TIMEOUT=${SLURM_LOCAL_START_TIMEOUT:-90}

log() { echo "[slurm_local] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; run as root to install slurm-wlm and munge"
  log "installing slurm-wlm and munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

# The pid in FILE when that process is alive and runs COMMAND; nothing otherwise.
live_pid() {
  local file=$1 command=$2 pid
  [[ -f $file ]] || return 0
  pid=$(cat "$file")
  if [[ -n $pid ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$command" ]]; then
    echo "$pid"
  fi
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged is already answering
  fi
  install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
  install -d -o munge -g munge -m 0755 /run/munge
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid --log-file=/var/log/munge/munged.log
  cp /run/munge/munged.pid "$STATE_DIR/munged.pid"
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged does not answer; see /var/log/munge/munged.log"
}

write_config() {
  if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; refusing to overwrite a real Slurm configuration"
  fi
  local cpus mem_mb
  cpus=${SLURM_LOCAL_CPUS:-$(nproc)}
  mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)
  mkdir -p /etc/slurm "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
  cat >"$CONF" <<EOF
$MARKER (single node, 127.0.0.1 only, no cgroups)
ClusterName=megatron-rl-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=3600
KillWait=30
InactiveLimit=0
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd.log
NodeName=$NODE NodeHostname=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1; }

wait_for_idle() {
  local deadline=$((SECONDS + START_TIMEOUT)) state
  while ((SECONDS < deadline)); do
    state=$(node_state || true)
    case "$state" in
      idle | mixed | allocated) log "node $NODE is $state"; return 0 ;;
      down* | drain*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 1
  done
  sinfo -N -l >&2 || true
  die "node $NODE not idle after ${START_TIMEOUT}s (state: ${state:-none}); see $STATE_DIR/slurmctld.log and slurmd.log"
}

start() {
  [[ $(id -u) -eq 0 ]] || die "start needs root (it installs packages and starts daemons)"
  install_packages
  mkdir -p "$STATE_DIR"
  write_config
  start_munge
  if [[ -z $(live_pid "$STATE_DIR/slurmctld.pid" slurmctld) ]]; then
    log "starting slurmctld"
    slurmctld -c
  fi
  if [[ -z $(live_pid "$STATE_DIR/slurmd.pid" slurmd) ]]; then
    log "starting slurmd (node $NODE)"
    slurmd -N "$NODE"
  fi
  wait_for_idle
}

stop() {
  local name pid
  for name in slurmd slurmctld munged; do
    pid=$(live_pid "$STATE_DIR/$name.pid" "$name")
    if [[ -n $pid ]]; then
      log "stopping $name ($pid)"
      kill "$pid"
    fi
  done
}

status() {
  local name pid state
  for name in munged slurmctld slurmd; do
    pid=$(live_pid "$STATE_DIR/$name.pid" "$name")
    if [[ -n $pid ]]; then echo "$name: running ($pid)"; else echo "$name: not running (or not started by this script)"; fi
  done
  state=$(node_state || true)
  echo "node $NODE: ${state:-unknown}"
  [[ $state == idle || $state == mixed || $state == allocated ]]
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
