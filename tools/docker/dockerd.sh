#!/usr/bin/env bash
# Makes sure a Docker engine answers, and prints the DOCKER_HOST to use on stdout:
#
#   eval "$(tools/docker/dockerd.sh)"      # export DOCKER_HOST=...
#   tools/docker/dockerd.sh stop           # stops the daemon this script started
#
# If `docker info` already answers (the system daemon, or $DOCKER_HOST), nothing is started.
# Otherwise, on a Debian/Ubuntu machine without a running engine (a CI runner, a container,
# this project's build machine), it installs Debian's `docker.io` if `dockerd` is missing and
# starts a private daemon in the background, with its own socket, pidfile, data root and log,
# all under $STORYGPT_DOCKER_ROOT (default /var/tmp/storygpt-v-docker):
#
#   socket   $STORYGPT_DOCKER_ROOT/docker.sock      log  $STORYGPT_DOCKER_ROOT/dockerd.log
#   pidfile  $STORYGPT_DOCKER_ROOT/dockerd.pid      data $STORYGPT_DOCKER_ROOT/data
#
# That daemon has no bridge network and leaves iptables alone (--bridge=none
# --iptables=false), so it changes nothing in the host's network set-up: builds use
# `--network host`, and containers either share the host network or have none. Needs root.
# STORYGPT_DOCKERD_NICE=19 starts it (and so every build and container it runs) at that
# niceness, for a machine shared with other builds.
set -euo pipefail

root="${STORYGPT_DOCKER_ROOT:-/var/tmp/storygpt-v-docker}"
sock="$root/docker.sock"
pidfile="$root/dockerd.pid"

if [ "${1:-}" = "stop" ]; then
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    pid="$(cat "$pidfile")"
    echo "stopping dockerd (pid $pid)" >&2
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    umount "$root/exec/netns/default" 2>/dev/null || true
  else
    echo "no dockerd started by this script is running (pidfile $pidfile)" >&2
  fi
  exit 0
fi

command -v docker >/dev/null 2>&1 || MISSING_CLIENT=1

# An engine that already answers wins (the system one, or the one $DOCKER_HOST names).
if [ -z "${MISSING_CLIENT:-}" ] && docker info >/dev/null 2>&1; then
  echo "export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}"
  exit 0
fi
# Ours, started earlier.
if [ -z "${MISSING_CLIENT:-}" ] && DOCKER_HOST="unix://$sock" docker info >/dev/null 2>&1; then
  echo "export DOCKER_HOST=unix://$sock"
  exit 0
fi

if ! command -v dockerd >/dev/null 2>&1 || [ -n "${MISSING_CLIENT:-}" ]; then
  echo "== installing docker.io (Debian's Docker engine)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends docker.io >&2
fi

mkdir -p "$root"
echo "== starting dockerd: socket $sock, log $root/dockerd.log" >&2
# setsid + nohup: the daemon outlives this script and the shell that ran it.
setsid nohup nice -n "${STORYGPT_DOCKERD_NICE:-0}" dockerd \
  --host "unix://$sock" \
  --pidfile "$pidfile" \
  --data-root "$root/data" \
  --exec-root "$root/exec" \
  --iptables=false --ip6tables=false --bridge=none \
  --storage-driver=overlay2 \
  >>"$root/dockerd.log" 2>&1 </dev/null &
for _ in $(seq 1 120); do
  if DOCKER_HOST="unix://$sock" docker info >/dev/null 2>&1; then
    echo "export DOCKER_HOST=unix://$sock"
    exit 0
  fi
  sleep 0.5
done
echo "dockerd did not answer within 60 s; see $root/dockerd.log" >&2
tail -n 20 "$root/dockerd.log" >&2 || true
exit 1
