#!/usr/bin/env bash
# A throwaway single-node SLURM cluster (Debian packages munge, slurmctld, slurmd,
# slurm-client) for tests/test_slurm.py:
#   tests/cluster/slurm.sh start|stop|status STATE_DIR
# Everything (slurm.conf, munge key and socket, spool, logs, PID files) lives under STATE_DIR;
# clients find the cluster through SLURM_CONF=STATE_DIR/slurm.conf, or the wrappers in
# STATE_DIR/bin (first on PATH: jobs' nested srun calls lose SLURM_CONF). Needs root (slurmd runs
# jobs as their submitter). No systemd: the daemons are started directly and stopped by their
# PID files. start and stop are idempotent. Ports: SLURMCTLD_PORT / SLURMD_PORT (default
# 6817 / 6818). No accounting daemon: clients must query job state with squeue, which keeps
# finished jobs for MinJobAge = 300 s.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status STATE_DIR" >&2; exit 2; }
[[ $# -eq 2 ]] || usage
action=$1
state=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$state/slurm.conf
export SLURM_CONF=$conf

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {  # PID file: TERM, wait up to 10 s, then KILL
  local pidfile=$1
  alive "$pidfile" || { rm -f "$pidfile"; return 0; }
  local pid
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$pidfile"
}

write_config() {
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  # RealMemory: the machine's memory less 10% for the OS and the daemons.
  mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
  mkdir -p "$state/munge" "$state/spool/ctld" "$state/spool/d" "$state/log" "$state/run"
  cat >"$conf" <<CONF
ClusterName=segflowtest
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$state/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$state/spool/ctld
SlurmdSpoolDir=$state/spool/d
SlurmctldPidFile=$state/run/slurmctld.pid
SlurmdPidFile=$state/run/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
# No cgroups (containers, no systemd): plain process tracking, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
# Memory limits enforced without cgroups: every second each step's RSS is read from /proc and
# a step above its job's --mem is killed (state OUT_OF_MEMORY), as a real cluster would.
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
# Schedule by cores and memory, so --mem and --cpus-per-task requests are checked.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
# Finished jobs stay visible to squeue this long (the snakemake plugin needs >= 300 s).
MinJobAge=300
InactiveLimit=0
KillWait=5
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=main Nodes=$host Default=YES MaxTime=INFINITE State=UP
PartitionName=segflow Nodes=$host MaxTime=INFINITE State=UP
CONF
}

write_wrappers() {
  # Client commands that find this cluster without SLURM_CONF: snakemake's slurm-jobstep
  # plugin drops every SLURM_* variable before it calls srun inside a job, and srun would
  # then look for /etc/slurm/slurm.conf. Put STATE_DIR/bin first on PATH.
  mkdir -p "$state/bin"
  local command
  for command in srun sbatch squeue scancel sinfo scontrol sacct; do
    printf '#!/bin/sh\nSLURM_CONF=%q exec %q "$@"\n' "$conf" "$(command -v "$command")" \
      >"$state/bin/$command"
    chmod 755 "$state/bin/$command"
  done
}

start() {
  command -v munged slurmctld slurmd sbatch >/dev/null ||
    { echo "munge/slurm not installed (apt-get install munge slurmctld slurmd slurm-client)" >&2; exit 3; }
  [[ -f $conf ]] || write_config
  [[ -x $state/bin/srun ]] || write_wrappers
  if ! alive "$state/munge/munged.pid"; then
    if [[ ! -s $state/munge/munge.key ]]; then
      dd if=/dev/urandom of="$state/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge:munge "$state/munge"
    chmod 700 "$state/munge"
    chmod 400 "$state/munge/munge.key"
    chmod 755 "$state"
    runuser -u munge -- test -w "$state/munge" ||
      { echo "user munge cannot reach $state/munge: make STATE_DIR's parents searchable (o+x)" >&2; exit 1; }
    # --force: the state folder may sit under a world-writable /tmp, which munged distrusts.
    runuser -u munge -- munged --force \
      --key-file "$state/munge/munge.key" --socket "$state/munge/munge.socket" \
      --pid-file "$state/munge/munged.pid" --log-file "$state/munge/munged.log" \
      --seed-file "$state/munge/munged.seed"
  fi
  alive "$state/run/slurmctld.pid" || slurmctld -f "$conf"
  alive "$state/run/slurmd.pid" || slurmd -f "$conf" -N "$(hostname -s)"
  # Up when the node accepts jobs (about 10 s).
  for _ in $(seq 60); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
      echo "slurm up: SLURM_CONF=$conf PATH=$state/bin:\$PATH"
      return 0
    fi
    sleep 1
  done
  echo "slurm did not come up; logs in $state/log" >&2
  tail -n 20 "$state/log/"*.log >&2 || true
  exit 1
}

stop() {
  stop_daemon "$state/run/slurmd.pid"
  stop_daemon "$state/run/slurmctld.pid"
  stop_daemon "$state/munge/munged.pid"
  echo "slurm stopped"
}

status() {
  local rc=0 name pidfile
  for name in munged slurmctld slurmd; do
    case $name in
      munged) pidfile=$state/munge/munged.pid ;;
      *) pidfile=$state/run/$name.pid ;;
    esac
    if alive "$pidfile"; then echo "$name: running (pid $(cat "$pidfile"))"; else echo "$name: stopped"; rc=1; fi
  done
  [[ $rc -ne 0 ]] || sinfo -N -l
  return $rc
}

case $action in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
