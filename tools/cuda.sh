#!/usr/bin/env bash
# Runs a command (a cargo build or check with `--features cuda`) in an environment where
# candle's CUDA backend compiles on a machine without a GPU or a system CUDA install:
#
#   tools/cuda.sh cargo check --locked -p storygpt-v --features cuda
#   tools/cuda.sh cargo build --release --locked -p storygpt-v --features cuda
#
# What it sets up, once, under $STORYGPT_CUDA_CACHE (default ~/.cache/storygpt-v/cuda13):
# - the CUDA 13.0 toolkit pieces from PyPI wheels in a virtualenv. 13.0, not 13.1+: PTX made by
#   a newer nvcc than the driver's CUDA version does not load, and the GPU machines we target
#   run a 13.0 driver. The cu12 nvcc wheels have no `nvcc`, so CUDA 12 cannot be used this way.
# - a CUDA root of symlinks in the layout cudarc and candle-kernels' build scripts look for,
#   with the unversioned library names the linker needs (-lcublas, ...).
# - a link-time stub `libcuda.so` (soname libcuda.so.1) with every driver API name cudarc
#   binds: no wheel ships the driver library, which comes from the NVIDIA driver at run time.
#
# Binaries built this way need the real libcuda.so.1 (an NVIDIA driver) to start, even for
# CPU work: cudarc links the CUDA libraries as ordinary ELF dependencies. The CPU build stays
# the default. Target dir: target/cuda (the feature changes every candle artifact).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -eq 0 ]; then
  echo "usage: tools/cuda.sh COMMAND... (e.g. cargo check --locked -p storygpt-v --features cuda)" >&2
  exit 2
fi

cache="${STORYGPT_CUDA_CACHE:-$HOME/.cache/storygpt-v/cuda13}"
venv="$cache/venv"
root="$cache/root"
# Pinned from the cuda-toolkit==13.0.2 metapackage.
wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cublas==13.1.0.3 nvidia-curand==10.4.0.35
  nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85
)

if [ ! -x "$venv/bin/python" ] || [ ! -f "$cache/wheels.txt" ] \
  || [ "$(cat "$cache/wheels.txt")" != "${wheels[*]}" ]; then
  echo "== tools/cuda.sh: installing the CUDA 13.0 toolkit wheels into $venv" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "${wheels[@]}"
  printf '%s' "${wheels[*]}" >"$cache/wheels.txt"
fi
nvidia="$("$venv/bin/python" -c 'import nvidia; print(list(nvidia.__path__)[0])')"
cu13="$nvidia/cu13"
[ -x "$cu13/bin/nvcc" ] || { echo "tools/cuda.sh: no nvcc in $cu13/bin" >&2; exit 1; }

mkdir -p "$root/lib64/stubs"
for d in bin include nvvm; do ln -sfn "$cu13/$d" "$root/$d"; done
for lib in libcudart.so.13 libnvrtc.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10; do
  [ -e "$cu13/lib/$lib" ] || { echo "tools/cuda.sh: $cu13/lib/$lib is missing" >&2; exit 1; }
  ln -sf "$cu13/lib/$lib" "$root/lib64/$lib"
  ln -sf "$cu13/lib/$lib" "$root/lib64/${lib%%.so*}.so"
done

# The stub's names come from the cudarc version in Cargo.lock.
cudarc_version="$(awk '/^name = "cudarc"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)"
stub="$root/lib64/stubs/libcuda.so"
if [ ! -f "$stub" ] || [ "$(cat "$root/stub-cudarc.txt" 2>/dev/null)" != "$cudarc_version" ]; then
  cargo fetch --locked >/dev/null
  bindings="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_version" | head -n1)/src/driver/sys/mod.rs"
  [ -f "$bindings" ] || { echo "tools/cuda.sh: cudarc $cudarc_version sources not found" >&2; exit 1; }
  grep -oP '^\s*pub unsafe fn \Kcu\w+(?=\()' "$bindings" | sort -u \
    | sed 's/.*/int &(void) { return 999; }/' >"$root/libcuda_stub.c"
  [ -s "$root/libcuda_stub.c" ] || { echo "tools/cuda.sh: no driver API names in $bindings" >&2; exit 1; }
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$root/libcuda_stub.c"
  printf '%s' "$cudarc_version" >"$root/stub-cudarc.txt"
fi

export CUDA_ROOT="$root" CUDA_HOME="$root" CUDA_PATH="$root"
export PATH="$root/bin:$PATH" NVCC="$root/bin/nvcc" NVCC_CCBIN="${NVCC_CCBIN:-/usr/bin/g++}"
# No nvidia-smi here to ask: 90 is the H100/H200 (candle-kernels builds sm_90a from it).
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH="$root/lib64:$root/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
exec "$@"
