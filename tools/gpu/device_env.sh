# Sourced ON the GPU machine by the check scripts (load_check.sh, train_check.sh), from the
# repository root, with the carry folder as $1: sets CARRY, OUT, W (scratch) and PY, runs
# on-device.sh's environment part (it finds the CUDA libraries and unpacks the carried binary
# to $W/bin/storygpt-v; its output goes to $W/env, not $OUT, which brings back at most 8 files)
# and exports the LD_LIBRARY_PATH it found.
CARRY=${1:-target/gpu-carry}
OUT=${OUT:-/tmp/gpu-out}
W=${GPU_WORK:-/tmp/storygpt-gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
GPU_PARTS=none GPU_BUDGET_S=60 OUT="$W.env" bash tools/gpu/on-device.sh "$CARRY" >"$W.env.log" 2>&1
LD_LIBRARY_PATH=$(sed 's/^LD_LIBRARY_PATH=//' "$W/res/ld_library_path.txt")
export LD_LIBRARY_PATH
