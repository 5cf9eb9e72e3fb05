#!/usr/bin/env bash
# Runs ON the GPU machine (issue #14 item 2): load time and peak host memory of a full-size
# bundle (SD 1.5 + CLIP ViT-L/14 vision + OPT-6.7B shapes, random f16 weights) loaded onto the
# GPU by `storygpt-v bundle info --device cuda` (the whole StoryPipeline::load), with a cold
# and then a warm page cache. Uses on-device.sh's environment part (libraries, the carried
# binary) and tools/gpu/make_sd15_bundle.py; writes load.tsv under $OUT.
#
#   bash tools/gpu/load_check.sh [CARRY_DIR]      # after tools/gpu/prepare.sh here
set -uo pipefail
cd "$(dirname "$0")/../.."
. tools/gpu/device_env.sh
BIN=$W/bin/storygpt-v
t0=$(date +%s)
"$BIN" bundle random --config toy --out "$W/toy" --seed 0 >/dev/null \
  && "$PY" tools/gpu/make_sd15_bundle.py --template "$W/toy" --out "$W/b1" --llm toy --device cuda \
       --dtype f16 >/dev/null \
  && "$PY" tools/gpu/make_sd15_bundle.py --template "$W/toy" --out "$W/b2" --llm opt-6.7b \
       --share-sd "$W/b1" --device cuda --dtype f16 >/dev/null \
  || { echo "could not write the bundle"; exit 1; }
echo "bundle written in $(( $(date +%s) - t0 )) s; $(du -sh --apparent-size -L "$W/b2" | cut -f1)"
printf 'cache\trc\tseconds\tpeak_host_rss_mib\tpeak_gpu_mib\n' | tee "$OUT/load.tsv"
for cache in cold warm; do
  if [ "$cache" = cold ]; then sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || cache=unknown; fi
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$W/mem-$cache.csv" &
  smi=$!
  # Wall time and the child's peak RSS (getrusage), for the whole process.
  line=$("$PY" -c 'import resource, subprocess, sys, time
t = time.time(); r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
print(r.returncode, round(time.time() - t, 2), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024, sep="\t")' \
    "$BIN" bundle info "$W/b2" --device cuda)
  kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
  gpu=$(sort -n "$W/mem-$cache.csv" | tail -1)
  printf '%s\t%s\t%s\n' "$cache" "$line" "$gpu" | tee -a "$OUT/load.tsv"
done
