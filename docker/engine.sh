#!/usr/bin/env bash
# A docker engine for the container tests: Debian's docker.io, mmdebstrap, docker-compose (v1) and
# docker-registry (a local registry for the push test) installed when missing; dockerd started in
# the background when no engine answers. ENGINE_CPUS (a cpuset list such as "1", which `make test`
# sets) keeps that engine's containers on those CPUs: they then size their torch threads to them
# instead of contending with the test workers, whose OpenMP threads would spin waiting on theirs.
set -euo pipefail
missing=()
for pair in dockerd:docker.io mmdebstrap:mmdebstrap docker-compose:docker-compose \
  docker-registry:docker-registry; do
  command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "The container tests need ${missing[*]}; install them (as root) and rerun." >&2
    exit 1
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if docker info >/dev/null 2>&1; then
  exit 0
fi
log=${DOCKERD_LOG:-/tmp/dockerd.log}
options=()
if [ -n "${ENGINE_CPUS:-}" ]; then
  parent=byoc-tests
  if [ -d /sys/fs/cgroup/cpuset ]; then # cgroup v1
    group=/sys/fs/cgroup/cpuset/$parent
    mkdir -p "$group"
    cat /sys/fs/cgroup/cpuset/cpuset.mems >"$group/cpuset.mems"
  else # cgroup v2
    group=/sys/fs/cgroup/$parent
    echo +cpuset >/sys/fs/cgroup/cgroup.subtree_control
    mkdir -p "$group"
  fi
  echo "$ENGINE_CPUS" >"$group/cpuset.cpus"
  options+=(--exec-opt native.cgroupdriver=cgroupfs --cgroup-parent "/$parent")
fi
nohup dockerd "${options[@]}" >"$log" 2>&1 &
for _ in $(seq 60); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "dockerd did not answer within 60 s; its log is $log" >&2
exit 1
