#!/usr/bin/env bash
# Makes the base image the Dockerfiles build FROM, `storygpt-v-base:bookworm`, without
# Docker Hub: a Debian 12 (bookworm) `minbase` root file system made with debootstrap from
# deb.debian.org, imported with `docker import`. About 90 s and a 120 MB image.
#
#   tools/docker/base-image.sh            # starts a private dockerd if no engine answers
#   FORCE=1 tools/docker/base-image.sh    # remakes the image even if it exists
#
# Where Docker Hub is reachable this step is optional: build with
# `--build-arg BASE_IMAGE=debian:bookworm-slim` instead. Needs root (debootstrap).
set -euo pipefail
cd "$(dirname "$0")/../.."

tag="${STORYGPT_BASE_IMAGE:-storygpt-v-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
eval "$(tools/docker/dockerd.sh)"
export DOCKER_HOST

if [ -z "${FORCE:-}" ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "== $tag already exists (FORCE=1 to remake it)" >&2
  echo "export DOCKER_HOST=$DOCKER_HOST"
  exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "== installing debootstrap" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2 \
    || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >&2; }
fi

work="$(mktemp -d "${TMPDIR:-/var/tmp}/storygpt-v-rootfs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "== debootstrap --variant=minbase bookworm ($mirror)" >&2
debootstrap --variant=minbase bookworm "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
# What a slim image leaves out: downloaded packages, package lists, docs and man pages.
rm -rf "$work/rootfs"/var/cache/apt/archives/*.deb "$work/rootfs"/var/lib/apt/lists/* \
  "$work/rootfs"/usr/share/doc/* "$work/rootfs"/usr/share/man/* "$work/rootfs"/usr/share/info/*
# Keep apt from installing docs and recommends in the images built on top.
cat >"$work/rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
CFG
cat >"$work/rootfs/etc/apt/apt.conf.d/docker-slim" <<'CFG'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
CFG
echo "== docker import -> $tag" >&2
tar -C "$work/rootfs" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' - "$tag" >&2
docker image ls "$tag" >&2
echo "export DOCKER_HOST=$DOCKER_HOST"
