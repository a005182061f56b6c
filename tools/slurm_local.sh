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
# (the namespace's first process) exits and the kernel stops every daemon and job. Needs root,
# Debian's slurm-wlm (22.05) and munge. Daemons and clients authenticate with munge
# (AuthType=auth/munge): a munged of this cluster's own, with a new key (0400) and its socket
# in that folder, started here and stopped by its PID when COMMAND ends; the machine's own
# munged and /etc/munge/munge.key are not used.
set -euo pipefail

if [ "${1:-}" != --inside ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_local: needs root (slurmd, unshare): run it as root" >&2
    exit 2
  fi
  for p in slurmctld slurmd sbatch munged mungekey; do
    command -v "$p" >/dev/null || { echo "slurm_local: $p is missing (apt-get install slurm-wlm munge)" >&2; exit 2; }
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
munge_pid=
stop() {
  # munged first, by its PID (never by name: the machine may run its own); the namespace's
  # end stops the SLURM daemons and jobs.
  if [ -n "$munge_pid" ]; then kill "$munge_pid" 2>/dev/null || true; fi
  rm -rf "$state" 2>/dev/null || true
}
trap stop EXIT
mkdir -p "$state/spool" "$state/ctld" "$state/munge"
# munged wants its socket's folders searchable by everyone (any local user may ask it for a
# credential, as themselves): the folders 0711, nothing in them readable but by root.
chmod 0711 "$state" "$state/munge"
# The cluster's munge key: new, readable by its owner only (munged refuses a looser one).
mungekey --create --keyfile="$state/munge/munge.key"
chmod 0400 "$state/munge/munge.key"
munged --key-file="$state/munge/munge.key" --socket="$state/munge/munge.socket" \
  --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" \
  --seed-file="$state/munge/munged.seed" \
  || { echo "slurm_local: munged did not start:" >&2; tail -n 20 "$state/munge/munged.log" >&2; exit 1; }
munge_pid=$(cat "$state/munge/munged.pid")
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
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$state/munge/munge.socket
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
