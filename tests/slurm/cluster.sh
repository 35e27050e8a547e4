#!/usr/bin/env bash
# A private single-node Slurm cluster for the Slurm executor's tests: munge,
# slurmctld and slurmd on this machine, on free ports, with every file under
# one folder, so it neither needs nor touches a system-wide Slurm.
#
#   tests/slurm/cluster.sh start DIR   # prints SLURM_CONF=DIR/slurm.conf once it is up
#   tests/slurm/cluster.sh stop DIR
#
# Needs Debian's slurm-wlm and munge (`.ci/run` installs them). The node
# has one "GPU" backed by /dev/null: enough for Slurm to grant `--gres=gpu:1`
# and set CUDA_VISIBLE_DEVICES, which is what the tests check.
set -euo pipefail

command=${1:?usage: cluster.sh start|stop DIR}
dir=$(realpath -m "${2:?usage: cluster.sh start|stop DIR}")
conf="$dir/slurm.conf"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "$command" in
start)
  mkdir -p "$dir"/{state,spool,log,run}
  chmod 700 "$dir/run"
  user=$(id -un)
  host=$(hostname -s)
  cpus=$(nproc)
  memory=$(( $(awk '/^MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  head -c 1024 /dev/urandom > "$dir/munge.key"
  chmod 600 "$dir/munge.key"
  cat > "$conf" <<CONF
ClusterName=xlpipe-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
AuthInfo=socket=$dir/run/munge.sock
CredType=cred/munge
SlurmUser=$user
SlurmdUser=$user
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
CONF
  echo "Name=gpu File=/dev/null" > "$dir/gres.conf"
  munged --socket="$dir/run/munge.sock" --key-file="$dir/munge.key" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/run/munge.seed" --force
  SLURM_CONF="$conf" slurmctld
  SLURM_CONF="$conf" slurmd
  for _ in $(seq 60); do
    state=$(SLURM_CONF="$conf" sinfo --noheader --format=%T 2>/dev/null || true)
    case "$state" in
    idle*) echo "SLURM_CONF=$conf"; exit 0 ;;
    drain* | inval* | down*) SLURM_CONF="$conf" scontrol update nodename="$host" state=resume 2>/dev/null || true ;;
    esac
    sleep 0.5
  done
  echo "the test cluster in $dir did not come up; its logs:" >&2
  tail -n 20 "$dir"/log/*.log >&2 || true
  exit 1
  ;;
stop)
  SLURM_CONF="$conf" scontrol shutdown >/dev/null 2>&1 || true
  for daemon in slurmd slurmctld munged; do
    pid_file="$dir/run/$daemon.pid"
    if [ -f "$pid_file" ]; then
      pid=$(cat "$pid_file")
      # `scontrol shutdown` stops the Slurm daemons; munged needs a signal.
      if [ "$daemon" = munged ]; then kill "$pid" 2>/dev/null || true; fi
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  ;;
*)
  echo "usage: cluster.sh start|stop DIR" >&2
  exit 2
  ;;
esac
