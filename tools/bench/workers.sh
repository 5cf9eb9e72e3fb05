#!/usr/bin/env bash
# Issue #17: jobs per minute with 1, 2 and 3 `storygpt-v worker` processes sharing one
# PostgreSQL queue behind an API-only server (`serve --workers 0`), on the random toy bundle.
# Starts its own PostgreSQL cluster (tools/test-postgres.sh) and removes it afterwards.
#   tools/bench/workers.sh [JOBS_PER_RUN] [STEPS]      (defaults: 24 jobs of one frame, 20 steps)
set -euo pipefail
cd "$(dirname "$0")/../.."
jobs=${1:-24}
steps=${2:-20}
bin=target/release/storygpt-v
[ -x "$bin" ] || cargo build --release --locked -p storygpt-v
work=$(mktemp -d /tmp/storygpt-v-bench-workers.XXXXXX)
chmod 755 "$work"   # the postgres user enters it for its cluster
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  tools/test-postgres.sh stop "$work/pg" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
admin=$(tools/test-postgres.sh start "$work/pg")
psql "$admin" -qc "CREATE DATABASE bench"
url="${admin%/postgres}/bench"
"$bin" bundle random --config toy --out "$work/bundle" >/dev/null
"$bin" serve --workers 0 --database "$url" --bundle "$work/bundle" --data-dir "$work/data" \
  --bind 127.0.0.1:0 --queue-capacity 1000 >"$work/api.out" 2>"$work/api.log" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/api.out" && break; sleep 0.1; done
api=$(sed -n 's/^storygpt-v listening on //p' "$work/api.out")
python3 -c 'import struct,zlib
def chunk(t,d): return struct.pack(">I",len(d))+t+d+struct.pack(">I",zlib.crc32(t+d))
raw=b"".join(b"\x00"+bytes([200,120,80])*24 for _ in range(24))
open("'"$work"'/fred.png","wb").write(b"\x89PNG\r\n\x1a\n"+chunk(b"IHDR",struct.pack(">IIBBBBB",24,24,8,2,0,0,0))+chunk(b"IDAT",zlib.compress(raw))+chunk(b"IEND",b""))'
fred=$(curl -sf -F name=Fred -F pronoun=he -F "portrait=@$work/fred.png;type=image/png" "$api/api/characters" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
stories=()
for i in $(seq "$jobs"); do
  stories+=($(curl -sf -H 'content-type: application/json' \
    -d "{\"title\":\"Bench $i\",\"captions\":[\"Fred walks past house $i.\"],\"character_ids\":[$fred]}" \
    "$api/api/stories" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])'))
done
idle() {
  curl -sf "$api/readyz" | python3 -c 'import json,sys; q=json.load(sys.stdin)["queue"]; print(q["queued"]+q["running"])'
}
echo "| workers | jobs | steps | wall time | jobs per minute |"
echo "|---|---|---|---|---|"
for n in 1 2 3; do
  wpids=()
  for w in $(seq "$n"); do
    "$bin" worker --database "$url" --bundle "$work/bundle" --preview-every 0 \
      --capture-attention false >"$work/worker-$n-$w.out" 2>"$work/worker-$n-$w.log" &
    wpids+=($!)
    pids+=($!)
  done
  for w in $(seq "$n"); do
    for _ in $(seq 600); do grep -q ready "$work/worker-$n-$w.out" && break; sleep 0.1; done
  done
  start=$(date +%s.%N)
  for s in "${stories[@]}"; do
    curl -sf -o /dev/null -H 'content-type: application/json' -d "{\"steps\":$steps,\"seed\":$n}" \
      "$api/api/stories/$s/generate"
  done
  while [ "$(idle)" != 0 ]; do sleep 0.2; done
  end=$(date +%s.%N)
  python3 -c "t=$end-$start; print(f'| $n | $jobs | $steps | {t:.1f} s | {$jobs/t*60:.1f} |')"
  kill "${wpids[@]}"
  wait "${wpids[@]}" 2>/dev/null || true
done
