#!/usr/bin/env python3
"""Turns the raw results of tools/gpu/on-device.sh (RESULTS: one file per result) into
OUT/summary.md and OUT/summary.json, and packs RESULTS as OUT/results.tar.gz.

    python3 tools/gpu/report.py RESULTS OUT

Every input is optional: a part that failed or was skipped shows as such.
"""

import csv
import io
import json
import os
import sys
import tarfile


def read(path, default=None):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def load_json(path):
    text = read(path)
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return None


def tsv(path):
    text = read(path, "")
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def mem(res, name):
    """(baseline, peak, peak above baseline) in MiB from nvidia-smi samples, or None."""
    text = read(os.path.join(res, f"mem-{name}.csv"))
    if not text:
        return None
    vals = [int(v) for v in text.split() if v.strip().isdigit()]
    if not vals:
        return None
    return {"baseline_mib": vals[0], "peak_mib": max(vals), "above_baseline_mib": max(vals) - vals[0],
            "samples": len(vals)}


def fmt(x, spec=".2f", dash="-"):
    return dash if x is None else format(x, spec)


def story_stats(d):
    if not d:
        return None
    fr = [f for f in d.get("frames", []) if f.get("drawn") and f.get("duration_ms") is not None]
    ms = [f["duration_ms"] for f in fr]
    return {
        "bundle": d.get("bundle"),
        "device": d.get("device"),
        "size": f"{d.get('width')}x{d.get('height')}",
        "steps": d.get("steps"),
        "guidance": d.get("guidance_scale"),
        "frames": len(fr),
        "load_s": d["load_ms"] / 1000 if d.get("load_ms") is not None else None,
        "total_s": d["total_ms"] / 1000 if d.get("total_ms") is not None else None,
        "frame_ms": ms,
        "first_frame_ms": ms[0] if ms else None,
        "later_mean_ms": sum(ms[1:]) / len(ms[1:]) if len(ms) > 1 else None,
        "last_frame_ms": ms[-1] if ms else None,
        "mean_frame_ms": d.get("mean_frame_ms"),
        "peak_rss_mib": d["peak_rss_bytes"] / 2**20 if d.get("peak_rss_bytes") else None,
        "max_prompt_tokens": max((f.get("prompt_tokens") or 0 for f in fr), default=None),
        "llm_positions_last": fr[-1].get("llm_positions_computed") if fr else None,
    }


def main():
    res, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    run = dict(r[:2] for r in tsv(os.path.join(res, "run.tsv")) if len(r) >= 2)
    parts = [{"part": r[0], "rc": r[1], "seconds": r[2] if len(r) > 2 else None,
              "limit_s": r[3] if len(r) > 3 else None} for r in tsv(os.path.join(res, "parts.tsv"))]
    gpu = (read(os.path.join(res, "gpu.csv"), "") or "").strip()
    py = (read(os.path.join(res, "python.txt"), "") or "").strip()
    notes = (read(os.path.join(res, "notes.txt"), "") or "").strip()
    parity = load_json(os.path.join(res, "parity.json"))
    diff = load_json(os.path.join(res, "diffusers.json")) or []
    cold = story_stats(load_json(os.path.join(res, "ours-sd15-cold.json")))
    warm = story_stats(load_json(os.path.join(res, "ours-sd15-warm.json")))
    story = story_stats(load_json(os.path.join(res, "story.json")))
    story_meta = dict(r[:2] for r in tsv(os.path.join(res, "story.tsv")) if len(r) >= 2)
    bundles = {k: load_json(os.path.join(res, f"bundle-{k}.json")) for k in ("sd15-toyllm", "sd15-llm")}
    mems = {k: mem(res, k) for k in ("diffusers", "sd15-cold", "sd15-warm", "train", "story")}
    train = load_json(os.path.join(res, "train.json"))
    train_meta = dict(r[:2] for r in tsv(os.path.join(res, "train.tsv")) if len(r) >= 2)
    tests = {}
    for f in sorted(os.listdir(res)):
        if f.startswith("test-") and f.endswith(".txt"):
            lines = [l for l in read(os.path.join(res, f), "").splitlines() if l.startswith("test result")]
            tests[f[5:-4]] = lines[-1] if lines else "no result line"

    summary = {"run": run, "gpu": gpu, "python": py, "parts": parts, "notes": notes.splitlines(),
               "parity": {k: v for k, v in (parity or {}).items() if k != "rows"} if parity else None,
               "parity_failures": [r for r in (parity or {}).get("rows", []) if not r["pass"]],
               "test_executables": tests, "diffusers": diff, "ours_sd15_cold": cold,
               "ours_sd15_warm": warm, "story": story, "story_meta": story_meta,
               "bundles": bundles, "gpu_memory": mems, "train": train, "train_meta": train_meta}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    md = io.StringIO()
    w = lambda s="": print(s, file=md)  # noqa: E731
    w(f"# GPU run of tools/gpu/on-device.sh ({run.get('start', '?')})")
    w()
    w(f"- GPU (name, driver, memory, compute capability): {gpu or 'not read (no nvidia-smi)'}")
    w(f"- {py.replace(chr(10), '; ')}" if py else "- python: not read")
    w(f"- device `{run.get('device')}`, budget {run.get('budget_s')} s, took {run.get('seconds', '?')} s"
      + (", TINY dry run (toy widths, not a measurement)" if run.get("tiny") not in (None, "", "0") else ""))
    w()
    w("| part | exit status | seconds | limit (s) |")
    w("|---|---|---:|---:|")
    for p in parts:
        w(f"| {p['part']} | {p['rc']} | {p['seconds']} | {p['limit_s']} |")
    w()
    w("## Parity on the device against the PyTorch fixtures")
    w()
    if parity:
        w(f"{parity['passed']}/{parity['checks']} checks passed on `{parity['device']}` in "
          f"{', '.join(parity['dtypes_run']) or 'nothing'}; not run: "
          f"{', '.join(parity['dtypes_skipped']) or 'none'}"
          + (f" ({parity['skipped_reason']})" if parity.get("skipped_reason") else "") + ".")
        rows = parity.get("rows", [])
        for dt in parity["dtypes_run"]:
            rel = [r["rel_err"] for r in rows if r["dtype"] == dt and "rel_err" in r]
            if rel:
                w(f"Largest relative error in {dt}: {max(rel):.2e}.")
        fails = [r for r in rows if not r["pass"]]
        if fails:
            w()
            w("Failures: " + "; ".join(f"{r['case']} {r['dtype']} {r['output']}: "
                                      + (f"{r['rel_err']:.2e}" if "rel_err" in r else r.get("error", "?"))
                                      for r in fails))
        w()
        w("Full table: results.tar.gz, parity.md.")
    else:
        w("Not run, or it failed before writing parity.json (see on-device.log).")
    if tests:
        w()
        w("CUDA test executables: " + "; ".join(f"{k}: {v}" for k, v in tests.items()))
    w()
    w("## One 512x512 SD 1.5-shaped frame: 30 PNDM steps, guidance 7.5, random weights")
    w()
    w("| implementation | dtype | attention | time per frame, mean / min (s) | UNet evals (batch 2) | "
      "peak GPU MiB (torch allocated / reserved) | peak GPU MiB above idle (nvidia-smi) |")
    w("|---|---|---|---:|---:|---:|---:|")
    m = mems.get("diffusers")
    for r in diff:
        if "error" in r:
            w(f"| diffusers | - | - | {r['error']} | | | |")
            continue
        w(f"| diffusers {r['diffusers']}, torch {r['torch']} | {r['dtype']} | {r['variant']} "
          f"({', '.join(r['attn_processors'])}) | {r['mean_s']:.3f} / {r['min_s']:.3f} | {r['unet_evals']} | "
          f"{fmt(r.get('peak_allocated_mib'), '.0f')} / {fmt(r.get('peak_reserved_mib'), '.0f')} | "
          f"{m['above_baseline_mib'] if m else '-'} (both variants) |")
    for name, s, mm in (("cold process", cold, mems.get("sd15-cold")), ("warm JIT cache", warm, mems.get("sd15-warm"))):
        if not s:
            w(f"| ours, {name} | - | - | not run | | | |")
            continue
        w(f"| ours, {name}: frame 1 (Char-LDM) | f16 | explicit | {s['first_frame_ms'] / 1000:.3f} | | | "
          f"{mm['above_baseline_mib'] if mm else '-'} |")
        if s.get("later_mean_ms") is not None:
            w(f"| ours, {name}: frames 2-{s['frames']} (LLM-conditioned, toy LLM), mean | f16 | explicit | "
              f"{s['later_mean_ms'] / 1000:.3f} | | | |")
    ok = [r for r in diff if "error" not in r]
    if warm and ok:
        w()
        best = warm["later_mean_ms"] or warm["first_frame_ms"]
        for r in ok:
            w(f"- ours (warm, {best / 1000:.3f} s) / diffusers {r['variant']} ({r['mean_s']:.3f} s): "
              f"**{best / 1000 / r['mean_s']:.2f}x**")
    if warm:
        w(f"- our bundle load: {fmt(warm['load_s'], '.1f')} s (warm), {fmt(cold['load_s'] if cold else None, '.1f')} s (cold)")
    w()
    w(f"## {story['frames'] if story else story_meta.get('frames', '?')}-frame story")
    w()
    if story:
        label = story_meta.get("label", "?")
        w(f"Bundle: **{label}** (`{story['bundle']}`), {story['size']}, {story['steps']} PNDM steps, "
          f"guidance {story['guidance']}, f16 (the bundle's dtype) on `{story['device']}`.")
        if story["steps"] and int(story["steps"]) < 30:
            w(f"Fewer than 30 steps to fit the time budget; at 30 steps a frame would take about "
              f"{story['later_mean_ms'] * 30 / int(story['steps']) / 1000:.2f} s (UNet time scales with steps; "
              f"the LLM's does not, so this is an upper bound)." if story.get("later_mean_ms") else "")
        w()
        sm = mems.get("story")
        w("| frames | load (s) | total (s) | mean per frame (ms) | frame 1 (ms) | last frame (ms) | "
          "peak GPU MiB above idle (nvidia-smi) | peak GPU MiB total | peak host RSS (MiB) | max prompt tokens |")
        w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        w(f"| {story['frames']} | {fmt(story['load_s'], '.1f')} | {fmt(story['total_s'], '.1f')} | "
          f"{fmt(story['mean_frame_ms'], '.0f')} | {story['first_frame_ms']} | {story['last_frame_ms']} | "
          f"{sm['above_baseline_mib'] if sm else '-'} | {sm['peak_mib'] if sm else '-'} | "
          f"{fmt(story['peak_rss_mib'], '.0f')} | {story['max_prompt_tokens']} |")
        fm = story["frame_ms"]
        if len(fm) >= 10:
            q = len(fm) // 5
            w()
            w("Mean ms per frame by fifth of the story: "
              + ", ".join(f"{sum(fm[i * q:(i + 1) * q]) / q:.0f}" for i in range(5)) + ".")
    else:
        w("Not run or failed (see parts above and on-device.log).")
    if train_meta:
        w()
        w("## `train all` on the GPU, every stage cut short")
        w()
        w(f"`storygpt-v train all --config {train_meta.get('plan')} --max-steps {train_meta.get('steps_per_stage')} "
          f"--device {train_meta.get('device')}`; part rc and seconds in the parts table above.")
        w()
        w((read(os.path.join(res, "train.md"), "") or "No speed table (see train.log).").strip())
        tm = mems.get("train")
        if tm:
            w()
            w(f"GPU memory during training (nvidia-smi, whole GPU): {tm}")
    if any(bundles.values()):
        w()
        w("Bundles written on the device: " + "; ".join(
            f"{k}: {v['seconds']} s ({', '.join(f'{n} {p:,}' if isinstance(p, int) else f'{n}: {p}' for n, p in v['params'].items())})"
            for k, v in bundles.items() if v))
    if notes:
        w()
        w("## Notes")
        w()
        for line in notes.splitlines():
            w(f"- {line}")
    text = md.getvalue()
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    with tarfile.open(os.path.join(out, "results.tar.gz"), "w:gz") as t:
        t.add(res, arcname="results")
    print(text)


if __name__ == "__main__":
    main()
