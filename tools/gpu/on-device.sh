#!/usr/bin/env bash
# Runs ON the GPU machine (issue #14 item 4), from the repository root, in one go:
#   1. env     finds libcuda.so.1 and the CUDA 13 runtime / cuBLAS / cuRAND / NVRTC inside the
#              machine's PyTorch environment, unpacks our CUDA binary, prints nvidia-smi;
#   2. parity  tools/gpu/parity.py: our UNet / VAE / CLIP / LLM on CUDA against the committed
#              PyTorch fixtures, f32 and (if `component --dtype` exists) f16; plus the CUDA
#              test executables of `prepare.sh`, if it carried any;
#   3. bundles a random toy bundle (our binary), then tools/gpu/make_sd15_bundle.py: SD 1.5-
#              shaped + toy LLM, and SD 1.5-shaped + OPT-6.7B-shaped (in the background, while
#              parity runs);
#   4. sd15    one 512x512 frame, 30 PNDM steps, guidance 7.5: PyTorch diffusers fp16
#              (tools/gpu/sd15_diffusers.py, SDPA and classic attention) and ours (f16, a
#              3-frame story run twice: cold process, then warm JIT cache);
#   4b. train  `train all --max-steps N` of the toy plan on CUDA, each stage's speed and the full
#              plan's projected time (tools/gpu/train_speed.py; issue #12 item 6);
#   5. story   a 50-frame story on the OPT-6.7B bundle (else the SD 1.5 + toy LLM bundle, else
#              the random toy bundle, labelled), time per frame and peak GPU memory
#              (nvidia-smi sampled every 200 ms, above the idle baseline);
#   6. report  $OUT/summary.md and $OUT/summary.json (tools/gpu/report.py).
#
#   bash tools/gpu/on-device.sh [CARRY_DIR]        # CARRY_DIR default target/gpu-carry
#
# Environment: GPU_BUDGET_S (total seconds, default 460; every part has its own timeout and is
# skipped when too little is left), GPU_PARTS (default parity,sd15,train,story; env always runs), OUT (results,
# default /tmp/gpu-out), GPU_WORK (scratch, default /tmp/storygpt-gpu), STORYGPT_BIN (a binary
# to use instead of the carried one), PYTHON (default python3), GPU_LLM (opt-6.7b, opt-1.3b or
# toy), GPU_STORY_FRAMES (50). A dry run on a CPU machine:
#   GPU_DEVICE=cpu GPU_TINY=1 STORYGPT_BIN=target/release/storygpt-v PYTHON=.venv/bin/python \
#     OUT=/tmp/gpu-dry bash tools/gpu/on-device.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CARRY=${1:-target/gpu-carry}
OUT=${OUT:-/tmp/gpu-out}
WORK=${GPU_WORK:-/tmp/storygpt-gpu}
BUDGET=${GPU_BUDGET_S:-460}
PARTS=${GPU_PARTS:-parity,sd15,train,story}
DEV=${GPU_DEVICE:-cuda}
TINY=${GPU_TINY:-}
PY=${PYTHON:-python3}
FRAMES=${GPU_STORY_FRAMES:-50}
STEPS=30
[ -n "$TINY" ] && STEPS=2 && FRAMES=${GPU_STORY_FRAMES:-6}
START=$(date +%s)
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK/res" "$WORK/bin"
exec > >(tee -a "$OUT/on-device.log") 2>&1
R=$WORK/res            # one JSON / text file per result; report.py reads them

left() { echo $((BUDGET - ($(date +%s) - START))); }
has() { [[ ",$PARTS," == *",$1,"* ]]; }
note() { echo "$*" | tee -a "$R/notes.txt"; }
# part NAME LIMIT_S CMD...: runs CMD under a timeout of min(LIMIT, what is left - 20 s), and
# records its exit status and seconds in parts.tsv (124 = timed out).
part() {
  local name=$1 limit=$2; shift 2
  local l; l=$(( $(left) - 20 ))
  [ "$l" -lt "$limit" ] && limit=$l
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped\t0\tbudget\n' "$name" >>"$R/parts.tsv"; note "== $name: skipped (budget)"; return 99
  fi
  echo "== $name (limit ${limit} s, $(left) s left)"
  local t0=$(date +%s)
  timeout -k 5 "$limit" "$@"
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >>"$R/parts.tsv"
  echo "== $name: rc $rc in $(( $(date +%s) - t0 )) s"
  return $rc
}
# GPU memory sampling (nvidia-smi, MiB of the whole GPU, every 200 ms).
mem_start() {
  command -v nvidia-smi >/dev/null || return 0
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$R/mem-$1.csv" 2>/dev/null &
  echo $! >"$WORK/mem-$1.pid"; sleep 0.5
}
mem_stop() {
  [ -f "$WORK/mem-$1.pid" ] || return 0
  kill "$(cat "$WORK/mem-$1.pid")" 2>/dev/null; wait "$(cat "$WORK/mem-$1.pid")" 2>/dev/null
  rm -f "$WORK/mem-$1.pid"
}
printf 'budget_s\t%s\nparts\t%s\ndevice\t%s\ntiny\t%s\nstart\t%s\n' "$BUDGET" "$PARTS" "$DEV" "${TINY:-0}" \
  "$(date -u +%FT%TZ)" >"$R/run.tsv"

# ------------------------------------------------------------------ 1. env
echo "== env"
uname -a; nproc; free -g | head -2; df -h /tmp "$ROOT" | tail -n +1
command -v nvidia-smi >/dev/null && { nvidia-smi | tee "$R/nvidia-smi.txt";
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
    | tee "$R/gpu.csv"; }
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], sys.executable); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())' \
  2>&1 | tee "$R/python.txt"

# CUDA libraries: the NVIDIA wheels next to torch (nvidia/cu13/lib, nvidia/*/lib), torch/lib,
# then a system toolkit. libcuda.so.1 is the driver's.
libdirs=()
add_dir() { local d; for d in "$@"; do [[ " ${libdirs[*]-} " == *" $d "* ]] || libdirs+=("$d"); done; }
sites=$("$PY" - <<'EOF' 2>/dev/null
import os, site, sys
dirs = set(site.getsitepackages() + [site.getusersitepackages()])
try:
    import torch
    dirs.add(os.path.dirname(os.path.dirname(torch.__file__)))
except Exception:
    pass
print("\n".join(d for d in dirs if os.path.isdir(d)))
EOF
)
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  f=""
  for s in $sites; do
    f=$(find "$s/nvidia" "$s/torch/lib" -maxdepth 4 -name "$lib*" 2>/dev/null | head -n1)
    [ -n "$f" ] && break
  done
  [ -z "$f" ] && f=$(find /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib /usr/lib/x86_64-linux-gnu \
    -maxdepth 1 -name "$lib*" 2>/dev/null | head -n1)
  if [ -n "$f" ]; then add_dir "$(dirname "$f")"; echo "found $lib: $f"; else note "MISSING $lib"; fi
done
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda.so.1 '; then
  f=$(find /usr/local/nvidia /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib /usr/local/cuda*/compat \
    -maxdepth 3 -name 'libcuda.so.1' 2>/dev/null | head -n1)
  if [ -n "$f" ]; then add_dir "$(dirname "$f")"; echo "found libcuda.so.1: $f";
  elif [ "$DEV" != cpu ]; then note "MISSING libcuda.so.1 (the NVIDIA driver)"; fi
fi
IFS=: ; export LD_LIBRARY_PATH="${libdirs[*]-}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; unset IFS
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" | tee "$R/ld_library_path.txt"
# candle loads its kernels as PTX, which the driver compiles once and caches on disk.
export CUDA_CACHE_MAXSIZE=${CUDA_CACHE_MAXSIZE:-2147483648}

# Our binary: STORYGPT_BIN, else the carried storygpt-v(.xz).
BIN=${STORYGPT_BIN:-}
if [ -z "$BIN" ]; then
  BIN=$WORK/bin/storygpt-v
  if [ -f "$CARRY/storygpt-v.xz" ]; then
    xz -dc "$CARRY/storygpt-v.xz" >"$BIN" 2>/dev/null \
      || "$PY" -c 'import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],"wb"))' \
           "$CARRY/storygpt-v.xz" "$BIN"
  elif [ -f "$CARRY/storygpt-v" ]; then cp "$CARRY/storygpt-v" "$BIN"
  else note "no binary: neither \$STORYGPT_BIN nor $CARRY/storygpt-v(.xz)"; fi
  chmod +x "$BIN" 2>/dev/null
fi
BIN=$(realpath "$BIN" 2>/dev/null || echo "$BIN")
ldd "$BIN" 2>&1 | tee "$R/ldd.txt" | grep -E 'cuda|cublas|curand|nvrtc|not found'
"$BIN" --version 2>&1 | tee "$R/version.txt" || note "our binary does not start (see ldd.txt)"
[ -f "$CARRY/manifest.txt" ] && cp "$CARRY/manifest.txt" "$R/carry-manifest.txt"

# diffusers: the carried wheel, installed apart (no dependencies: the machine has them).
if ! "$PY" -c 'import diffusers' 2>/dev/null; then
  if ls "$CARRY"/diffusers-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" \
      "$CARRY"/diffusers-*.whl && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
"$PY" -c 'import diffusers; print("diffusers", diffusers.__version__)' 2>&1 | tail -1 | tee "$R/diffusers.txt"

# Portraits and stories for the generation parts.
cp -r examples/story/portraits "$WORK/portraits"
for n in 3 "$FRAMES"; do
  "$PY" - "$n" >"$WORK/story-$n.json" <<'EOF'
import json, sys
n = int(sys.argv[1])
pattern = ["Tom walks into the living room.", "He waves at Mia.",
           "Mia smiles at Tom in the kitchen.", "They laugh together.",
           "Mia picks up a ball in the garden.", "She throws it to Tom."]
print(json.dumps({
    "characters": [{"name": "Tom", "pronoun": "he", "portrait": "portraits/tom.png"},
                   {"name": "Mia", "pronoun": "she", "portrait": "portraits/mia.png"}],
    "captions": [pattern[i % len(pattern)] for i in range(n)]}))
EOF
done

# ------------------------------------------------------------------ 3. bundles (background)
bundle_pid=""
if has sd15 || has story; then
  part toy-bundle 60 "$BIN" bundle random --config toy --out "$WORK/toy" --seed 0
  tiny=(); dt=f16; [ -n "$TINY" ] && tiny=(--tiny) && dt=f32
  llm=${GPU_LLM:-opt-6.7b}; [ -n "$TINY" ] && llm=${GPU_LLM:-opt-tiny}
  free_gb=$(df -BG --output=avail "$WORK" | tail -1 | tr -dc 0-9)
  if [ "$llm" = opt-6.7b ] && [ "${free_gb:-0}" -lt 24 ]; then
    note "only ${free_gb} GB free under $WORK: OPT-1.3B-shaped LLM instead of OPT-6.7B"; llm=opt-1.3b
  fi
  echo "$llm" >"$R/story-llm.txt"
  (
    "$PY" tools/gpu/make_sd15_bundle.py --template "$WORK/toy" --out "$WORK/sd15-toyllm" --llm toy \
      --device "$DEV" --dtype $dt "${tiny[@]}" --report "$R/bundle-sd15-toyllm.json" \
      && if [ "$llm" != toy ]; then
        "$PY" tools/gpu/make_sd15_bundle.py --template "$WORK/toy" --out "$WORK/sd15-llm" --llm "$llm" \
          --share-sd "$WORK/sd15-toyllm" --device "$DEV" --dtype $dt "${tiny[@]}" \
          --report "$R/bundle-sd15-llm.json"
      fi
  ) >"$WORK/bundles.log" 2>&1 &
  bundle_pid=$!
  echo "== bundles: building in the background (pid $bundle_pid, log $WORK/bundles.log)"
fi

# ------------------------------------------------------------------ 2. parity
if has parity; then
  dts=f32,f16
  part parity 150 "$PY" tools/gpu/parity.py --bin "$BIN" --device "$DEV" --dtypes $dts --timeout 60 \
    --json "$R/parity.json" | tee "$R/parity.md"
  # CUDA test executables (only when prepare.sh found tests that take STORYGPT_TEST_DEVICE).
  if ls "$CARRY"/tests/*.xz >/dev/null 2>&1; then
    # The fixtures are found through the path compiled into the tests (CARGO_MANIFEST_DIR).
    src=$(cat "$CARRY/tests/source-root.txt" 2>/dev/null)
    if [ -n "$src" ] && [ ! -e "$src" ]; then mkdir -p "$(dirname "$src")" && ln -s "$ROOT" "$src"; fi
    for z in "$CARRY"/tests/*.xz; do
      t=$WORK/bin/$(basename "$z" .xz); xz -dc "$z" >"$t" && chmod +x "$t"
      for dt in f32 f16; do
        part "test-$(basename "$t")-$dt" 90 env STORYGPT_TEST_DEVICE="$DEV" STORYGPT_TEST_DTYPE=$dt \
          "$t" --test-threads=1 2>&1 | tee "$R/test-$(basename "$t")-$dt.txt" | grep -E '^test result|FAILED|panicked'
      done
    done
  fi
fi

if [ -n "$bundle_pid" ]; then
  echo "== waiting for the bundles ($(left) s left)"
  w=$(( $(left) - 200 )); [ "$w" -lt 30 ] && w=30
  for _ in $(seq "$w"); do kill -0 "$bundle_pid" 2>/dev/null || break; sleep 1; done
  if kill -0 "$bundle_pid" 2>/dev/null; then
    note "bundle writing still running after ${w} s: stopped"
    pkill -P "$bundle_pid" 2>/dev/null; kill "$bundle_pid" 2>/dev/null
  fi
  wait "$bundle_pid"; echo "bundles rc $?"
  cat "$WORK/bundles.log" | tee "$R/bundles.log"
fi

# ------------------------------------------------------------------ 4. sd15: diffusers vs ours
if has sd15; then
  tiny=(); pdt=fp16; [ -n "$TINY" ] && tiny=(--tiny) && pdt=fp32
  mem_start diffusers
  part diffusers 150 "$PY" tools/gpu/sd15_diffusers.py --device "$DEV" --dtype $pdt --steps $STEPS \
    --guidance 7.5 --runs 3 --warmup 1 --variants sdpa,classic "${tiny[@]}" \
    --json "$R/diffusers.json" --png "$OUT/diffusers-frame.png"
  mem_stop diffusers
  if [ -f "$WORK/sd15-toyllm/bundle.toml" ]; then
    for run in cold warm; do
      mem_start "sd15-$run"
      part "ours-sd15-$run" 120 "$BIN" generate --bundle "$WORK/sd15-toyllm" --story "$WORK/story-3.json" \
        --out "$WORK/ours-sd15-$run" --steps $STEPS --guidance 7.5 --scheduler pndm --seed 1 --device "$DEV"
      mem_stop "sd15-$run"
      cp "$WORK/ours-sd15-$run/story.json" "$R/ours-sd15-$run.json" 2>/dev/null
    done
    cp "$WORK/ours-sd15-warm/frame-01.png" "$OUT/ours-frame.png" 2>/dev/null
  else
    note "no SD 1.5-shaped bundle (see bundles.log): our 512x512 frame was not run"
  fi
fi

# ------------------------------------------------------------------ 4b. train: `train all` on CUDA
# Issue #12 item 6. The whole plan (22,200 steps) does not fit a 15-minute lease, so every stage
# runs GPU_TRAIN_STEPS steps (`--max-steps`, which also ends each stage normally so the next one
# starts from its output) and tools/gpu/train_speed.py projects the full plan from the steady
# speed of each stage.
if has train; then
  plan=configs/toy.toml; tsteps=${GPU_TRAIN_STEPS:-100}
  [ -n "$TINY" ] && plan=configs/tiny/toy.toml && tsteps=${GPU_TRAIN_STEPS:-10}
  tdev=$DEV; [ "$DEV" = cuda ] && tdev=cuda:0
  printf 'plan\t%s\nsteps_per_stage\t%s\ndevice\t%s\n' "$plan" "$tsteps" "$tdev" >"$R/train.tsv"
  mem_start train
  part train 170 "$BIN" train all --config "$plan" --out "$WORK/train" --max-steps "$tsteps" \
    --device "$tdev" 2>&1 | tee "$R/train.log" | grep -vE '^\s*$' | tail -n 40
  mem_stop train
  "$PY" tools/gpu/train_speed.py --run "$WORK/train" --plan "$plan" --json "$R/train.json" \
    | tee "$R/train.md"
  cp "$WORK/train/training.json" "$R/train-training.json" 2>/dev/null
fi

# ------------------------------------------------------------------ 5. the 50-frame story
if has story; then
  # Which bundle, and how many steps fit: 30 unless the measured time per step says otherwise.
  label="" bundle="" load_s=10
  if [ -f "$WORK/sd15-llm/bundle.toml" ] && [ -f "$R/ours-sd15-warm.json" ]; then
    bundle=$WORK/sd15-llm; label="SD 1.5-shaped + $(cat "$R/story-llm.txt")-shaped LLM"; load_s=60
  elif [ -f "$R/ours-sd15-warm.json" ]; then
    bundle=$WORK/sd15-toyllm; label="SD 1.5-shaped + toy LLM (the OPT bundle was not made)"; load_s=20
  elif [ -f "$WORK/toy/bundle.toml" ]; then
    bundle=$WORK/toy; label="random TOY bundle, 64x64 (no SD 1.5-shaped run succeeded)"
  fi
  [ -n "$TINY" ] && label="TINY dry run: ${label/SD 1.5-shaped/tiny SD 1.5 layout}"
  if [ -n "$bundle" ]; then
    steps=$STEPS
    if [ -f "$R/ours-sd15-warm.json" ] && [ "$bundle" != "$WORK/toy" ]; then
      avail=$(( $(left) - 30 - load_s ))
      steps=$("$PY" - "$R/ours-sd15-warm.json" "$avail" "$FRAMES" "$STEPS" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1])); avail, n, steps = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ms = [f["duration_ms"] for f in d["frames"][1:] if f.get("duration_ms")] or [d["frames"][0]["duration_ms"]]
per_step = max(ms) / 1000 / d["steps"]              # seconds per denoising step (slowest frame)
print(max(min(3, steps), min(steps, int(avail / (n * per_step * 1.2)))))
EOF
) || steps=10
    fi
    printf 'bundle\t%s\nlabel\t%s\nsteps\t%s\nframes\t%s\n' "$bundle" "$label" "$steps" "$FRAMES" >"$R/story.tsv"
    note "story: $FRAMES frames, $steps steps, bundle: $label"
    mem_start story
    part story $(( $(left) - 25 )) "$BIN" generate --bundle "$bundle" --story "$WORK/story-$FRAMES.json" \
      --out "$WORK/story" --steps "$steps" --guidance 7.5 --scheduler pndm --seed 1 --device "$DEV"
    mem_stop story
    cp "$WORK/story/story.json" "$R/story.json" 2>/dev/null
  else
    note "story: no bundle to run"
  fi
fi

# ------------------------------------------------------------------ 6. report
printf 'end\t%s\nseconds\t%s\n' "$(date -u +%FT%TZ)" "$(( $(date +%s) - START ))" >>"$R/run.tsv"
"$PY" tools/gpu/report.py "$R" "$OUT" || { echo "report.py failed; raw results:"; ls -la "$R"; }
echo "== done in $(( $(date +%s) - START )) s; results in $OUT"
ls -la "$OUT"
