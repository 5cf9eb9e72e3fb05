#!/usr/bin/env bash
# Runs the UNet benchmarks of candle (ours) and PyTorch/diffusers side by side, 2 threads each,
# and prints a table. Usage: tools/bench/run.sh [sd15|train|toy|ops|all] [iters]
# Needs the project venv (.venv with torch + diffusers) for the PyTorch column.
set -euo pipefail
cd "$(dirname "$0")/../.."
WHICH=${1:-all}
ITERS=${2:-3}
# BENCH_THREADS: threads per side (default 2). On a shared machine, 1 thread and the CPU-time
# columns disturb least (time spent waiting for a core is not counted).
T=${BENCH_THREADS:-2}
export BENCH_THREADS=$T RAYON_NUM_THREADS=$T OMP_NUM_THREADS=$T MKL_NUM_THREADS=$T
PY=${PYTHON:-.venv/bin/python}
OUT=$(mktemp)
echo "load before: $(uptime)" >&2
# BENCH_UNET_BIN: use an already built bench_unet binary instead of building it here.
if [ -z "${BENCH_UNET_BIN:-}" ]; then
  cargo build -q -p models --profile numeric --example bench_unet
  BENCH_UNET_BIN="${CARGO_TARGET_DIR:-target}/numeric/examples/bench_unet"
fi
for case in $( [ "$WHICH" = all ] && echo "train toy sd15" || echo "$WHICH" ); do
  "$PY" tools/bench/bench_unet.py "$case" "$ITERS" | tee -a "$OUT" >&2
  "$BENCH_UNET_BIN" "$case" "$ITERS" | tee -a "$OUT" >&2
done
echo "load after: $(uptime)" >&2
"$PY" - "$OUT" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
cases = sorted({r["case"] for r in rows})
print(f"| case | params | PyTorch mean / min (s) | candle mean / min (s) | candle / PyTorch | CPU s/iter PyTorch / candle (min) | CPU ratio |")
print("|---|---|---|---|---|---|---|")
for c in cases:
    by = {r["impl"]: r for r in rows if r["case"] == c}
    p, k = by.get("pytorch"), by.get("candle")
    ratio = f"{k['mean_s'] / p['mean_s']:.2f}x" if p and k else "-"
    fmt = lambda r: f"{r['mean_s']:.3f} / {r['min_s']:.3f}" if r else "-"
    cpu = lambda r: r.get("cpu_min_s") if r else None
    cpus = f"{cpu(p) or 0:.3f} / {cpu(k) or 0:.3f}"
    cratio = f"{cpu(k) / cpu(p):.2f}x" if cpu(p) and cpu(k) else "-"
    print(f"| {c} | {(k or p)['params']} | {fmt(p)} | {fmt(k)} | {ratio} | {cpus} | {cratio} |")
PYEOF
rm -f "$OUT"
