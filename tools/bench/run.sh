#!/usr/bin/env bash
# Runs the training-speed, stage-2 and LLM benchmarks of candle (ours) and PyTorch side by side,
# one case per process on each side (so that each process's peak memory is that case's), and
# prints the tables of docs/BENCHMARKS.md.
# Usage: tools/bench/run.sh [all|train|toy_unet|vae|stage2|sd15|llm|ops|toy] [iters]
# Needs the project venv (.venv with torch + diffusers + transformers) for the PyTorch column.
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
# BENCH_UNET_BIN / BENCH_LLM_BIN: use already built binaries instead of building them here.
if [ -z "${BENCH_UNET_BIN:-}" ] || [ -z "${BENCH_LLM_BIN:-}" ]; then
  cargo build -q -p models --profile numeric --example bench_unet --example bench_llm
fi
BENCH_UNET_BIN=${BENCH_UNET_BIN:-"${CARGO_TARGET_DIR:-target}/numeric/examples/bench_unet"}
BENCH_LLM_BIN=${BENCH_LLM_BIN:-"${CARGO_TARGET_DIR:-target}/numeric/examples/bench_llm"}
case "$WHICH" in
  all) CASES="train toy_unet vae stage2 sd15 llm" ;;
  *) CASES=$WHICH ;;
esac
for case in $CASES; do
  if [ "$case" = llm ]; then
    for kind in llama opt; do
      "$PY" tools/bench/bench_llm.py "$kind" | tee -a "$OUT" >&2
      "$BENCH_LLM_BIN" "$kind" | tee -a "$OUT" >&2
    done
  else
    "$PY" tools/bench/bench_unet.py "$case" "$ITERS" | tee -a "$OUT" >&2
    "$BENCH_UNET_BIN" "$case" "$ITERS" | tee -a "$OUT" >&2
  fi
done
echo "load after: $(uptime)" >&2
"$PY" - "$OUT" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
def mem(r):
    # Peak resident memory, and the peak above what the process held before the case (the
    # interpreter and torch's libraries on PyTorch's side).
    return f"{r['peak_rss_mib']} ({r['peak_rss_mib'] - r['base_rss_mib']})" if r and "peak_rss_mib" in r else "-"
steps = [r for r in rows if "mean_s" in r]
if steps:
    print("| case | params | PyTorch mean / min (s) | ours mean / min (s) | wall ratio (mean) | CPU s/iter PyTorch / ours (min) | CPU ratio | peak MiB PyTorch (above start) | peak MiB ours (above start) |")
    print("|---|---|---|---|---:|---|---:|---:|---:|")
    for c in dict.fromkeys(r["case"] for r in steps):
        by = {r["impl"]: r for r in steps if r["case"] == c}
        p, k = by.get("pytorch"), by.get("candle")
        ratio = f"**{k['mean_s'] / p['mean_s']:.2f}x**" if p and k else "-"
        fmt = lambda r: f"{r['mean_s']:.3f} / {r['min_s']:.3f}" if r else "-"
        cpu = lambda r: r.get("cpu_min_s") if r else None
        cpus = f"{cpu(p) or 0:.3f} / {cpu(k) or 0:.3f}"
        cratio = f"{cpu(k) / cpu(p):.2f}x" if cpu(p) and cpu(k) else "-"
        print(f"| {c} | {(k or p)['params']} | {fmt(p)} | {fmt(k)} | {ratio} | {cpus} | {cratio} | {mem(p)} | {mem(k)} |")
llms = [r for r in rows if "prefill_tok_s" in r]
if llms:
    print()
    print("| model | PyTorch prefill tok/s | ours prefill tok/s (last-position logits) | prefill ours / PyTorch | PyTorch decode tok/s | ours decode tok/s | decode ours / PyTorch | peak MiB PyTorch (above start) | peak MiB ours (above start) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in dict.fromkeys(r["case"] for r in llms):
        by = {r["impl"]: r for r in llms if r["case"] == c}
        p, k = by.get("pytorch"), by.get("candle")
        if not (p and k):
            continue
        print(f"| {c[4:]} | {p['prefill_tok_s']:.0f} | {k['prefill_tok_s']:.0f} ({k['prefill_last_tok_s']:.0f}) | "
              f"**{k['prefill_tok_s'] / p['prefill_tok_s']:.2f}x** | {p['decode_tok_s']:.1f} | {k['decode_tok_s']:.1f} | "
              f"**{k['decode_tok_s'] / p['decode_tok_s']:.2f}x** | {mem(p)} | {mem(k)} |")
PYEOF
rm -f "$OUT"
