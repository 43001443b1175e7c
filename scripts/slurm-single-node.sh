#!/usr/bin/env bash
# A real single-node Slurm on this machine, bound to loopback, for the Slurm tests.
#
#   scripts/slurm-single-node.sh start   install (apt) if needed, write the config, start munged,
#                                        slurmctld and slurmd, wait until the node is idle
#   scripts/slurm-single-node.sh env     print `export SLURM_CONF=...` (eval it)
#   scripts/slurm-single-node.sh status  sinfo / squeue
#   scripts/slurm-single-node.sh stop    stop the daemons this script started (by pid)
#   scripts/slurm-single-node.sh overhead [N]  per-job overhead: N trivial jobs timed from
#                                        `sbatch` to the exit-status file they write; median
#
# Everything lives in ${PIPE_SLURM_DIR:-/tmp/pipe-slurm}: slurm.conf, a private munge key and
# socket, state, spool, logs and pid files. Nothing under /etc is changed. The daemons listen on
# 127.0.0.1 only (NoCtldInAddrAny, NoInAddrAny, NodeAddr=127.0.0.1), on ports
# ${PIPE_SLURM_CTLD_PORT:-16817} and ${PIPE_SLURM_D_PORT:-16818}. No cgroup is created or
# changed: proctrack/linuxproc, task/none, memory caps by jobacct_gather/linux + OverMemoryKill.
#
# The config is written before any Slurm command runs: a Slurm client without a config falls
# back to DNS (SRV) lookups.
set -euo pipefail

DIR="${PIPE_SLURM_DIR:-/tmp/pipe-slurm}"
CONF="$DIR/slurm.conf"
CTLD_PORT="${PIPE_SLURM_CTLD_PORT:-16817}"
D_PORT="${PIPE_SLURM_D_PORT:-16818}"
NODE="$(hostname -s)"

say() { echo "slurm-single-node: $*" >&2; }
die() { say "error: $*"; exit 1; }

pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
    && command -v sbatch >/dev/null && command -v munged >/dev/null; then
    return
  fi
  command -v apt-get >/dev/null || die "slurmctld/slurmd/slurm-client/munge are not installed and there is no apt-get"
  say "installing slurmctld slurmd slurm-client munge"
  DEBIAN_FRONTEND=noninteractive apt-get install -y slurmctld slurmd slurm-client munge >&2 \
    || die "apt-get install failed"
}

write_config() {
  mkdir -p "$DIR"/{ctld,spool,log,run,munge}
  chmod 711 "$DIR" "$DIR/munge"
  local cpus mem_mb
  cpus="$(nproc --all)"
  # RealMemory a little below MemTotal (slurmd drains a node that reports less than configured).
  mem_mb="$(awk '/^MemTotal:/ { printf "%d", $2 / 1024 * 0.9 }' /proc/meminfo)"
  if [[ ! -f "$DIR/munge/munge.key" ]]; then
    # A private key: this cluster trusts only itself.
    mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null 2>&1 \
      || dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
    chmod 600 "$DIR/munge/munge.key"
  fi
  cat >"$CONF" <<EOF
# Written by scripts/slurm-single-node.sh: a single-node cluster on loopback.
ClusterName=pipe
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$D_PORT
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
EnforcePartLimits=ALL
DependencyParameters=kill_invalid_depend
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MinJobAge=5
ReturnToService=2
InactiveLimit=0
KillWait=5
Waittime=0
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install_packages
  write_config
  export SLURM_CONF="$CONF"
  if pid_alive "$DIR/run/munged.pid" && pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid"; then
    say "already running (state in $DIR)"
  else
    stop_daemons quiet
    say "starting munged, slurmctld, slurmd (state in $DIR)"
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
      --seed-file="$DIR/munge/munged.seed" \
      || die "munged did not start (see $DIR/log/munged.log)"
    # -D: stay in the foreground of a background job, so $! is the daemon's pid.
    setsid slurmctld -D -f "$CONF" >>"$DIR/log/slurmctld.out" 2>&1 </dev/null &
    echo $! >"$DIR/run/slurmctld.own.pid"
    setsid slurmd -D -f "$CONF" -N "$NODE" >>"$DIR/log/slurmd.out" 2>&1 </dev/null &
    echo $! >"$DIR/run/slurmd.own.pid"
  fi
  local deadline=$((SECONDS + 60)) state=""
  while ((SECONDS < deadline)); do
    state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)"
    case "$state" in
      idle|mixed|allocated) say "node $NODE is $state"; return 0 ;;
      *drain*|down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    for d in slurmctld slurmd; do
      pid_alive "$DIR/run/$d.own.pid" || die "$d exited (see $DIR/log/$d.log and $d.out)"
    done
    sleep 0.5
  done
  die "node $NODE not idle after 60 s (last state: '${state:-none}'); see $DIR/log/"
}

stop_daemons() {
  local f pid
  for f in slurmd.own slurmctld.own munged; do
    [[ -f "$DIR/run/$f.pid" ]] || continue
    pid="$(cat "$DIR/run/$f.pid")"
    if kill -0 "$pid" 2>/dev/null; then
      [[ "${1:-}" == quiet ]] || say "stopping ${f%.own} (pid $pid)"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$DIR/run/$f.pid"
  done
}

overhead() {
  export SLURM_CONF="$CONF"
  local n="${1:-10}" work="$DIR/overhead" i t0 t1 times=()
  mkdir -p "$work"
  printf '%s\n' '#!/bin/sh' '/bin/true' 'rc=$?' 'echo "$rc" >"$1.tmp" && mv "$1.tmp" "$1"' \
    >"$work/job.sh"
  chmod +x "$work/job.sh"
  for i in $(seq "$n"); do
    rm -f "$work/status"
    t0=$(date +%s%N)
    sbatch --parsable --export=NONE -o /dev/null -e /dev/null -J pipe-overhead \
      "$work/job.sh" "$work/status" >/dev/null
    while [[ ! -f "$work/status" ]]; do sleep 0.005; done
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000000 )))
    echo "job $i: ${times[-1]} ms"
  done
  printf '%s\n' "${times[@]}" | sort -n | awk '{ a[NR] = $1 } END {
    m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
    printf "median submit -> exit-status file: %d ms (min %d, max %d, n=%d)\n", m, a[1], a[NR], NR }'
}

case "${1:-}" in
  overhead) overhead "${2:-10}" ;;
  start) start ;;
  stop) stop_daemons ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status)
    export SLURM_CONF="$CONF"
    sinfo && squeue ;;
  *) echo "usage: $0 start|stop|env|status|overhead [N]" >&2; exit 2 ;;
esac
