#!/usr/bin/env bash
# Runs ON the GPU machine (issue #12 item 6): `train all` of the toy plan on CUDA, cut to
# GPU_TRAIN_STEPS steps a stage (the whole plan does not fit a 15-minute lease), with each
# stage's speed, the step's phases and the full plan's projected time (train_speed.py); then an
# A/B of char-ldm and stage 2 against a second, older binary on the same inputs, when one is
# carried as storygpt-v-base.xz. Writes under $OUT (the device tool brings back 8 files):
# train-check.log, train.md and train-check.tar.gz (every log, table and training.json).
#
#   bash tools/gpu/train_check.sh [CARRY_DIR]   # after tools/gpu/prepare.sh here
#
# Environment: GPU_TRAIN_STEPS (100), GPU_BASE_STEPS (75), GPU_BUDGET_S (500: the A/B is
# skipped when too little is left), STORYGPT_BIN / GPU_DEVICE / PYTHON / OUT / GPU_WORK as in
# on-device.sh. A dry run on a CPU machine:
#   GPU_DEVICE=cpu STORYGPT_BIN=target/release/storygpt-v GPU_PLAN=configs/tiny/toy.toml \
#     GPU_TRAIN_STEPS=10 GPU_BASE_STEPS=10 OUT=/tmp/gpu-dry bash tools/gpu/train_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
DEV=${GPU_DEVICE:-cuda}
PLAN=${GPU_PLAN:-configs/toy.toml}
STEPS=${GPU_TRAIN_STEPS:-100}
BASE_STEPS=${GPU_BASE_STEPS:-75}
BUDGET=${GPU_BUDGET_S:-500}
START=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - START))); }
# CUDA libraries found, the carried binary unpacked (CARRY, OUT, W and PY set).
. tools/gpu/device_env.sh
R=$W.train-check                       # every result; $OUT gets the log, the table and a tarball
rm -rf "$R" && mkdir -p "$R"
exec > >(tee -a "$R/train-check.log") 2>&1
BIN=${STORYGPT_BIN:-$W/bin/storygpt-v}
tdev=$DEV; [ "$DEV" = cuda ] && tdev=cuda:0
echo "== $("$BIN" --version 2>&1) on $tdev; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null)"
cat "$W/res/carry-manifest.txt" 2>/dev/null

stage_file() { # the stage file a plan names for a stage key
  "$PY" - "$PLAN" "$1" <<'EOF'
import os, sys, tomllib
plan = tomllib.load(open(sys.argv[1], "rb"))
print(os.path.join(os.path.dirname(sys.argv[1]), plan["stages"][sys.argv[2]]))
EOF
}

echo "== train all, $STEPS steps a stage ($(left) s left)"
t0=$(date +%s)
timeout -k 5 $(( $(left) - 30 )) "$BIN" train all --config "$PLAN" --out "$W/new" --max-steps "$STEPS" \
  --device "$tdev" >"$R/train-all.log" 2>&1
echo "train all: rc $? in $(( $(date +%s) - t0 )) s"
grep -E 'gate|finished|stopped|error|Error' "$R/train-all.log" | tail -n 20
"$PY" tools/gpu/train_speed.py --run "$W/new" --plan "$PLAN" --json "$R/train.json" | tee "$R/train.md"
cp "$W/new/training.json" "$R/training.json" 2>/dev/null

# A/B: the older binary's char-ldm and stage 2 on the same data and base models.
if [ -f "$CARRY/storygpt-v-base.xz" ] && [ -f "$W/new/bundle.toml" ]; then
  xz -dc "$CARRY/storygpt-v-base.xz" >"$W/bin/storygpt-v-base" && chmod +x "$W/bin/storygpt-v-base"
  echo "== base binary: $("$W/bin/storygpt-v-base" --version 2>&1)"
  for stage in char_ldm stage2; do
    name=${stage/_/-}
    [ "$(left)" -lt 100 ] && { echo "== base $name: skipped ($(left) s left)"; continue; }
    rm -rf "$W/base" && mkdir -p "$W/base"
    for f in "$W/new"/*; do [ "$(basename "$f")" = data ] || cp -r "$f" "$W/base/"; done
    rm -rf "$W/base/runs/$name"
    t0=$(date +%s)
    timeout -k 5 $(( $(left) - 15 )) "$W/bin/storygpt-v-base" train "$name" --config "$(stage_file $stage)" \
      --data "$W/new/data" --out "$W/base" --max-steps "$BASE_STEPS" --device "$tdev" \
      >"$R/base-$name.log" 2>&1
    echo "base $name: rc $? in $(( $(date +%s) - t0 )) s"
    tail -n 3 "$R/base-$name.log"
    "$PY" tools/gpu/train_speed.py --run "$W/base" --plan "$PLAN" --json "$R/base-$name.json" \
      | grep -E "^\| (stage|---|$name) " | tee "$R/base-$name.md"
    # The same windows of the new binary's run, and each window's gradient norm, side by side.
    "$PY" - "$W/new/runs/$name/metrics.jsonl" "$W/base/runs/$name/metrics.jsonl" <<'EOF'
import json, sys
rows = [[json.loads(l) for l in open(p) if '"train"' in l] for p in sys.argv[1:]]
print("step | new it/s | base it/s | new loss | base loss | new grad norm | base grad norm")
for a, b in zip(*rows):
    print(a["step"], round(a["it_s"], 3), round(b["it_s"], 3), a["loss"], b["loss"],
          a.get("grad_norm"), b.get("grad_norm"), sep=" | ")
EOF
  done
fi
echo "== done in $(( $(date +%s) - START )) s"
cp "$W.env.log" "$R/env.log" 2>/dev/null
cp "$R/train-check.log" "$R/train.md" "$OUT/" 2>/dev/null
tar czf "$OUT/train-check.tar.gz" -C "$R" .
