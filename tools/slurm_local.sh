#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying `launcher=slurm` (docs/cluster.md,
# "SLURM"):
#
#   tools/slurm_local.sh [--cpus C] [-- COMMAND ...]
#   tools/slurm_local.sh -- python -m softmaxlab sweep=grid12 launcher=slurm
#
# starts slurmctld and one slurmd (C CPUs, default: all) with their configuration, state and
# logs in a new folder under /tmp, then runs COMMAND (default: an interactive shell) with
# SLURM_CONF pointing at it, so sbatch, squeue and sinfo talk to this cluster. Every daemon
# and job listens on 127.0.0.1 only (CommunicationParameters=NoCtldInAddrAny,NoInAddrAny;
# free ports). Everything runs in a private PID namespace: when COMMAND ends, this script
# (the namespace's first process) exits and the kernel stops every daemon and job. Needs root
# and Debian's slurm-wlm (22.05). Authentication is off (auth/none, no munge): the cluster is
# for this machine's root only; never use this configuration on a real cluster.
set -euo pipefail

if [ "${1:-}" != --inside ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_local: needs root (slurmd, unshare): run it as root" >&2
    exit 2
  fi
  for p in slurmctld slurmd sbatch; do
    command -v "$p" >/dev/null || { echo "slurm_local: $p is missing (apt-get install slurm-wlm)" >&2; exit 2; }
  done
  # --kill-child: if this script is killed, the namespace (and every daemon and job) goes too.
  exec unshare --pid --fork --mount-proc --kill-child "$0" --inside "$@"
fi
shift

cpus=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --cpus) cpus="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "slurm_local: unknown option $1 (usage: slurm_local.sh [--cpus C] [-- COMMAND ...])" >&2
       exit 2 ;;
  esac
done
[ $# -gt 0 ] || set -- "${SHELL:-bash}"

state=$(mktemp -d /tmp/slurm-local.XXXXXX)
trap 'rm -rf "$state" 2>/dev/null || true' EXIT
mkdir -p "$state/spool" "$state/ctld"
read -r ctld_port slurmd_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
cat >"$state/slurm.conf" <<CONF
ClusterName=softmaxlab
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
NodeName=local NodeAddr=127.0.0.1 NodeHostname=$(hostname -s) CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$state/slurm.conf"
slurmctld -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF" -N local
for _ in $(seq 1 60); do
  sinfo -h -o %t 2>/dev/null | grep -qx idle && break
  sleep 0.5
done
sinfo -h -o %t | grep -qx idle || { echo "slurm_local: the node did not come up:" >&2; tail -n 20 "$state"/*.log >&2; exit 1; }
echo "slurm_local: slurmctld on 127.0.0.1:$ctld_port, one node with $cpus CPU(s), SLURM_CONF=$SLURM_CONF" >&2
"$@"
