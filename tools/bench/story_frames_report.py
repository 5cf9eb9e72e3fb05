"""Table and SVG plot of tools/bench/story_frames.sh runs (no third-party packages)."""
import json
import sys
from pathlib import Path

root, svg_path = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for n in (4, 10, 20, 50):
    rec = json.loads((root / f"run-{n}" / "story.json").read_text())
    frames = rec["frames"]
    ms = [f["duration_ms"] for f in frames]
    rows.append({
        "n": n,
        "mean": sum(ms) / len(ms),
        "last": ms[-1],
        "peak": rec["peak_rss_bytes"] / 2**20,
        "prompt": max(f["prompt_tokens"] for f in frames),
        "computed": frames[-1]["llm_positions_computed"],
        "total": rec["total_ms"] / 1e3,
        "per_frame": ms,
    })
print(f"steps {rec['steps']}, {rec['width']}x{rec['height']} px, scheduler {rec['scheduler']}, bundle {rec['bundle']}")
print()
print("| frames | total (s) | mean per frame (ms) | last frame (ms) | peak RSS (MiB) | max prompt tokens | LLM positions computed, last frame |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['n']} | {r['total']:.1f} | {r['mean']:.0f} | {r['last']} | {r['peak']:.1f} | {r['prompt']} | {r['computed']} |")

# Two panels: per-frame time along the 50-frame story, and peak memory per story length.
W, H, P = 760, 300, 50
def panel(x0, title, xs, ys, xlabel, ylabel, ymax):
    w, h = W / 2 - P - 20, H - 2 * P
    out = [f'<text x="{x0 + w / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{x0}" y1="{P + h}" x2="{x0 + w}" y2="{P + h}" stroke="black"/>',
           f'<line x1="{x0}" y1="{P}" x2="{x0}" y2="{P + h}" stroke="black"/>',
           f'<text x="{x0 + w / 2}" y="{H - 8}" text-anchor="middle" font-size="12">{xlabel}</text>',
           f'<text x="{x0 - 38}" y="{P + h / 2}" font-size="12" transform="rotate(-90 {x0 - 38} {P + h / 2})" text-anchor="middle">{ylabel}</text>']
    xmax = max(xs)
    for k in range(5):
        v = ymax * k / 4
        y = P + h - h * k / 4
        out.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end" font-size="10">{v:.0f}</text>')
        out.append(f'<line x1="{x0}" y1="{y}" x2="{x0 + w}" y2="{y}" stroke="#ddd"/>')
    for x in sorted(set([1, xmax] + [v for v in xs if v in (4, 10, 20, 50)])):
        out.append(f'<text x="{x0 + w * x / xmax}" y="{P + h + 14}" text-anchor="middle" font-size="10">{x}</text>')
    pts = " ".join(f"{x0 + w * x / xmax:.1f},{P + h - h * y / ymax:.1f}" for x, y in zip(xs, ys))
    out.append(f'<polyline points="{pts}" fill="none" stroke="#1f6fb2" stroke-width="2"/>')
    out += [f'<circle cx="{x0 + w * x / xmax:.1f}" cy="{P + h - h * y / ymax:.1f}" r="3" fill="#1f6fb2"/>' for x, y in zip(xs, ys)]
    return out

long = rows[-1]["per_frame"]
parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif">',
         f'<rect width="{W}" height="{H}" fill="white"/>']
parts += panel(P + 10, "Time per frame, 50-frame story", list(range(1, len(long) + 1)), long,
               "frame", "ms", max(long) * 1.2)
peaks = [r["peak"] for r in rows]
parts += panel(W / 2 + P + 10, "Peak memory per story length", [r["n"] for r in rows], peaks,
               "frames in the story", "peak RSS (MiB)", max(peaks) * 1.3)
parts.append("</svg>")
svg_path.write_text("\n".join(parts) + "\n")
print(f"\nplot: {svg_path}")
