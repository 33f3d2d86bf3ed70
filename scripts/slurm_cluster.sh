#!/usr/bin/env bash
# A single-node Slurm cluster on localhost for tests (Debian's slurmctld, slurmd and munge;
# nothing in /etc, everything under one scratch directory). Needs root, as in CI.
#   scripts/slurm_cluster.sh up      start munged, slurmctld and slurmd (idempotent), wait idle
#   scripts/slurm_cluster.sh down    cancel every job, stop the daemons this directory started
#   scripts/slurm_cluster.sh env     print `export SLURM_CONF=...` for client commands
# SLURM_TEST_DIR (default /tmp/switchyard-slurm) and SLURM_TEST_PORT_BASE (default 6817: the
# controller, the slurmd one above) select the cluster; one cluster per port pair at a time.
set -euo pipefail

D="${SLURM_TEST_DIR:-/tmp/switchyard-slurm}"
PORT="${SLURM_TEST_PORT_BASE:-6817}"
export SLURM_CONF="$D/etc/slurm.conf"

# A PID from a daemon's own pid file, only if that process is alive and is that daemon
# (`cd X && daemon &` would give a subshell's PID; a stale file may name a reused PID).
daemon_pid() {
  local file="$1" name="$2" pid
  [[ -s "$file" ]] || return 1
  pid="$(tr -dc '0-9' <"$file")"
  [[ -n "$pid" && -r "/proc/$pid/comm" ]] || return 1
  [[ "$(cat "/proc/$pid/comm")" == "$name" ]] || return 1
  echo "$pid"
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n 1; }

write_conf() {
  local host cpus mem_mb
  host="$(hostname -s)"
  cpus="$(nproc)"
  mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 2048))
  # Localhost-only listening needs the host name to resolve to 127.0.0.1 (it does on Debian
  # CI images and here); otherwise the daemons would bind 0.0.0.0.
  local listen=""
  if getent hosts "$host" | grep -q '^127\.'; then
    listen="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
  fi
  # cred_expire=5 and 1 s scheduler passes: a requeued job restarts ~6 s later, not ~30 s.
  cat >"$SLURM_CONF" <<EOF
ClusterName=switchyardtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/slurmd-%n
TmpFS=$D/tmp/%n
SlurmdParameters=config_overrides
$listen
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
Waittime=0
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  for tool in munged mungekey slurmctld slurmd sinfo; do
    command -v "$tool" >/dev/null || {
      echo "slurm_cluster: $tool not found; install: apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge" >&2
      exit 1
    }
  done
  if daemon_pid "$D/run/slurmctld.pid" slurmctld >/dev/null &&
    daemon_pid "$D/run/slurmd-$(hostname -s).pid" slurmd >/dev/null &&
    [[ "$(node_state)" == idle* || "$(node_state)" == mixed* || "$(node_state)" == allocated* ]]; then
    echo "slurm_cluster: already up ($D)"
    return
  fi
  down quiet
  # A fresh cluster starts empty: no jobs recovered from an earlier, interrupted test.
  rm -rf "$D/state" "$D/spool"
  # TmpFS ($D/tmp/%n) must exist: PMIx creates its per-step directories there.
  install -d -m 0755 "$D" "$D/etc" "$D/state" "$D/spool" "$D/tmp/$(hostname -s)" "$D/run" "$D/log"
  # munged refuses a socket directory that others cannot traverse: 0755, key 0600.
  install -d -m 0755 "$D/munge"
  [[ -s "$D/munge/munge.key" ]] || mungekey --create --keyfile="$D/munge/munge.key" --force
  chmod 0600 "$D/munge/munge.key"
  # Daemonizes and returns once its socket is up.
  munged --key-file="$D/munge/munge.key" --socket="$D/munge/munge.socket.2" \
    --pid-file="$D/munge/munged.pid" --log-file="$D/munge/munged.log" \
    --seed-file="$D/munge/munged.seed"
  write_conf
  slurmctld -f "$SLURM_CONF"
  slurmd -f "$SLURM_CONF" -N "$(hostname -s)"
  local state=""
  for _ in $(seq 1 60); do
    state="$(node_state)"
    [[ "$state" == idle* ]] && break
    sleep 0.5
  done
  if [[ "$state" != idle* ]]; then
    echo "slurm_cluster: the node did not become idle (state: '${state:-none}'); logs in $D/log" >&2
    tail -n 20 "$D/log/slurmctld.log" "$D/log/slurmd-"*.log >&2 || true
    exit 1
  fi
  echo "slurm_cluster: up ($D, ports $PORT-$((PORT + 1)))"
}

# Stops only the daemons recorded under $D, after checking their /proc/PID/comm.
down() {
  local quiet="${1:-}" pid
  if daemon_pid "$D/run/slurmctld.pid" slurmctld >/dev/null; then
    # Jobs first: slurmstepd processes of running jobs would outlive slurmd.
    scancel --quiet --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 1 40); do
      [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
      sleep 0.25
    done
    scontrol shutdown >/dev/null 2>&1 || true
  fi
  for f in "$D/run/slurmctld.pid:slurmctld" "$D"/run/slurmd-*.pid:slurmd "$D/munge/munged.pid:munged"; do
    [[ "$f" == *'*'* ]] && continue
    local file="${f%:*}" name="${f##*:}"
    for _ in $(seq 1 40); do
      pid="$(daemon_pid "$file" "$name")" || break
      [[ "$name" == munged || $_ -gt 8 ]] && kill "$pid" 2>/dev/null || true
      sleep 0.25
    done
    if pid="$(daemon_pid "$file" "$name")"; then
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  [[ -n "$quiet" ]] || echo "slurm_cluster: down ($D)"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *)
    echo "usage: $0 up|down|env" >&2
    exit 2
    ;;
esac
