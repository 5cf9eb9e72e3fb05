#!/usr/bin/env bash
# Builds the images from the repository root with the legacy builder and host networking
# (what works on an engine without a bridge network or BuildKit), logging to a file:
#
#   tools/docker/build.sh cpu     # storygpt-v:cpu   from docker/Dockerfile       (~20 min on 2 cores)
#   tools/docker/build.sh cuda    # storygpt-v:cuda  from docker/Dockerfile.cuda  (~35 min on 2 cores)
#   CUDA_COMPUTE_CAP=89 tools/docker/build.sh cuda   # e.g. an L4 / RTX 4090 (default 90: H100/H200)
#
# Makes the base image first if it is missing (tools/docker/base-image.sh), and starts a
# private dockerd if no engine answers (tools/docker/dockerd.sh). Log: $LOG_DIR/build-KIND.log
# (default /var/tmp/storygpt-v-docker/logs). Extra arguments go to `docker build`.
set -euo pipefail
cd "$(dirname "$0")/../.."

kind="${1:?usage: tools/docker/build.sh cpu|cuda [docker build args...]}"
shift
case "$kind" in
  cpu) file=docker/Dockerfile; tag="${TAG:-storygpt-v:cpu}"; args=() ;;
  cuda) file=docker/Dockerfile.cuda; tag="${TAG:-storygpt-v:cuda}"
        args=(--build-arg "CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}") ;;
  *) echo "unknown image kind $kind (cpu or cuda)" >&2; exit 2 ;;
esac
eval "$(tools/docker/base-image.sh)"
export DOCKER_HOST

# Extra CA certificates the host trusts (a TLS-intercepting proxy in front of the registries):
# the build stages trust them too. Set EXTRA_CA_CERTS_DIR= (empty) to pass none.
ca_dir="${EXTRA_CA_CERTS_DIR-/usr/local/share/ca-certificates}"
if [ -n "$ca_dir" ] && compgen -G "$ca_dir/*.crt" >/dev/null; then
  echo "== build stages trust the extra CA certificates in $ca_dir" >&2
  args+=(--build-arg "EXTRA_CA_CERTS=$(cat "$ca_dir"/*.crt)")
fi

log_dir="${LOG_DIR:-${STORYGPT_DOCKER_ROOT:-/var/tmp/storygpt-v-docker}/logs}"
mkdir -p "$log_dir"
log="$log_dir/build-$kind.log"
echo "== building $tag from $file (log: $log)" >&2
start=$(date +%s)
if ! DOCKER_BUILDKIT=0 docker build --network host -f "$file" -t "$tag" "${args[@]}" "$@" . >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "== build of $tag failed after $(( $(date +%s) - start )) s; log: $log" >&2
  exit 1
fi
echo "== built $tag in $(( $(date +%s) - start )) s" | tee -a "$log" >&2
docker image ls "$tag" | tee -a "$log" >&2
