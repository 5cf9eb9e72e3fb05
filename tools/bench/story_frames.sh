#!/usr/bin/env bash
# StoryPipeline per-frame time and peak memory for 4, 10, 20 and 50 frames on the random toy
# bundle (issue #4, item 10). Each length runs in a fresh process, so VmHWM is that run's peak.
#   tools/bench/story_frames.sh [STEPS=30] [OUT=/tmp/storygpt-v-bench]
# Prints a markdown table and writes docs/img/story-frames.svg.
set -euo pipefail
cd "$(dirname "$0")/../.."
steps="${1:-30}"
out="${2:-/tmp/storygpt-v-bench}"
bin="${STORYGPT_BIN:-target/release/storygpt-v}"
[ -n "${STORYGPT_BIN:-}" ] || cargo build --release -p storygpt-v >&2
rm -rf "$out" && mkdir -p "$out"
"$bin" bundle random --config toy --out "$out/bundle" --seed 0 >&2
cp -r examples/story/portraits "$out/portraits"
for n in 4 10 20 50; do
  python3 - "$n" > "$out/story-$n.json" <<'PY'
import json, sys
n = int(sys.argv[1])
pattern = ["Tom walks into the living room.", "He waves at Mia.",
           "Mia smiles at Tom in the kitchen.", "They laugh together.",
           "Mia picks up a ball in the garden.", "She throws it to Tom."]
print(json.dumps({
    "characters": [{"name": "Tom", "pronoun": "he", "portrait": "portraits/tom.png"},
                   {"name": "Mia", "pronoun": "she", "portrait": "portraits/mia.png"}],
    "captions": [pattern[i % len(pattern)] for i in range(n)]}))
PY
  echo "== $n frames" >&2
  RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}" "$bin" generate --bundle "$out/bundle" \
    --story "$out/story-$n.json" --out "$out/run-$n" --steps "$steps" --seed 1 >&2
done
python3 tools/bench/story_frames_report.py "$out" docs/img/story-frames.svg
