#!/usr/bin/env bash
# A Ray cluster on this one machine, for trying `hydra/launcher=ray` (docs/cluster.md, "Ray"):
#
#   tools/ray_local.sh [--workers N] [--cpus C] [-- COMMAND ...]
#   tools/ray_local.sh --workers 1 -- python -m softmaxlab sweep=grid12 hydra/launcher=ray
#   tools/ray_local.sh --no-cluster -- python -m softmaxlab sweep=grid12 launcher=ray
#
# starts a head node and N worker nodes (default 1), C CPUs each (default 1), the workers
# joined with `ray start --address`, then runs COMMAND (default: an interactive shell) with
# RAY_ADDRESS and Ray's token set. With --no-cluster it starts no Ray and sets neither: COMMAND
# runs alone in the namespaces (a sweep then starts a Ray of its own, in them). Everything
# runs inside a private network namespace where only loopback is up: `ray start` replaces a
# loopback node address with the machine's primary address and listens there, which a
# shared machine must not do; inside the namespace there is nothing else to bind to. It is
# also a private PID namespace: when COMMAND ends, this script (the namespace's first
# process) exits and the kernel stops every process started in it, so no Ray process
# outlives it (never `ray stop`: it kills every Ray process on the machine, by name). Whatever the jobs must reach (the tracking store) must be
# inside the namespace too: a file store (sqlite) is. Needs root, for unshare.
#
# The cluster's state (Ray's temp dir, its auth token) is in a new folder under /tmp (or
# $RAY_LOCAL_DIR), removed at the end; nothing is written to ~/.ray.
set -euo pipefail

if [ "${1:-}" != --inside ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "ray_local: needs root (unshare -n): run it as root" >&2
    exit 2
  fi
  # --kill-child: if this script is killed, the namespace (and every Ray process) goes too.
  exec unshare --net --pid --fork --mount-proc --kill-child "$0" --inside "$@"
fi
shift

workers=1
cpus=1
cluster=1
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) workers="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --no-cluster) cluster=0; shift ;;
    --) shift; break ;;
    *) echo "ray_local: unknown option $1 (usage: ray_local.sh [--workers N] [--cpus C] [--no-cluster] [-- COMMAND ...])" >&2
       exit 2 ;;
  esac
done
[ $# -gt 0 ] || set -- "${SHELL:-bash}"

ip link set lo up
if [ "$cluster" = 0 ]; then
  "$@"  # not exec'd: this script stays the namespace's first process, as below
  exit
fi
state=$(mktemp -d "${RAY_LOCAL_DIR:-/tmp}/ray-local.XXXXXX")
trap 'rm -rf "$state" 2>/dev/null || true' EXIT
# Token authentication (Ray's default for `ray start --head`), with the token in our folder:
# the head, the workers and the driver read it from RAY_AUTH_TOKEN_PATH.
python -c 'import secrets; print(secrets.token_hex(32))' >"$state/auth_token"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/auth_token" RAY_USAGE_STATS_ENABLED=0
# The namespace is ours alone: Ray's default port is free.
export RAY_ADDRESS=127.0.0.1:6379
# A small object store per node: jobs pass only their config and result through it.
# Each node its own temp dir: nodes sharing one would each forward every job's output.
common=(--num-cpus="$cpus" --node-ip-address=127.0.0.1 --object-store-memory=100000000 --disable-usage-stats)
ray start --head --port=6379 --include-dashboard=false --temp-dir="$state/head" "${common[@]}" \
  >"$state/head.log" 2>&1 || { cat "$state/head.log" >&2; exit 1; }
for i in $(seq 1 "$workers"); do
  ray start --address="$RAY_ADDRESS" --temp-dir="$state/worker$i" "${common[@]}" \
    >"$state/worker$i.log" 2>&1 || { cat "$state/worker$i.log" >&2; exit 1; }
done
echo "ray_local: head + $workers worker node(s), $cpus CPU(s) each, RAY_ADDRESS=$RAY_ADDRESS" >&2
"$@"
