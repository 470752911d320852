#!/usr/bin/env bash
# Start (or stop) a single-node SLURM cluster on localhost, no systemd; run as root. Recipe verified in
# ../shared/reference/ENVIRONMENT.md §5.2 (Debian slurmctld/slurmd/munge 22.05). Usage:
#   scripts/slurm_local.sh start     # installs the Debian packages if missing, writes slurm.conf, starts daemons
#   scripts/slurm_local.sh stop
set -euo pipefail
MODE="${SLURM_PROCTRACK:-linuxproc}"   # linuxproc (portable) | cgroup (needs cgroup v1 hierarchy mounted)

stop() {
  for f in /run/slurmd.pid /run/slurmctld.pid; do [ -s "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  [ -s /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  sleep 1; rm -f /run/slurmd.pid /run/slurmctld.pid
}

start() {
  export DEBIAN_FRONTEND=noninteractive
  if ! command -v slurmctld >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  fi
  HOST="$(hostname -s)"; CPUS="$(nproc)"
  MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 * 85 / 100 ))
  mkdir -p /run/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  chown munge:munge /run/munge /etc/munge; chmod 0755 /run/munge; chmod 0700 /etc/munge
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
  chown slurm:slurm /var/spool/slurmctld /var/log/slurm
  if [ "$MODE" = cgroup ]; then
    PT=proctrack/cgroup; TP=task/cgroup,task/affinity
    printf 'CgroupPlugin=cgroup/v1\nConstrainCores=yes\nConstrainRAMSpace=yes\n' > /etc/slurm/cgroup.conf
  else
    PT=proctrack/linuxproc; TP=task/none; rm -f /etc/slurm/cgroup.conf
  fi
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=${HOST}
SlurmUser=slurm
AuthType=auth/munge
MpiDefault=none
ProctrackType=${PT}
TaskPlugin=${TP}
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 1 30); do sinfo -h -o %T 2>/dev/null | grep -qE 'idle|mix|alloc' && break; sleep 1; done
  sinfo
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
