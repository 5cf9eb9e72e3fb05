#!/usr/bin/env python3
"""Training speed of a cut `train all` run (issue #12 item 6): for each stage that ran, the steps
it took, its wall time, its steady speed (the median `it_s` of the logged windows after the
first, which holds the kernels' JIT compilation and the first allocations), the time the
stage's full plan (`run.max_steps` of its config) would take at that speed and, where the log
has them, the step's phases (`ms_forward`, `ms_backward`, ...: median milliseconds per step of
the same windows).

    python3 tools/gpu/train_speed.py --run RUN_DIR --plan configs/toy.toml --json out.json

RUN_DIR is the `--out` of `storygpt-v train all` (runs/STAGE/metrics.jsonl, training.json).
Prints a markdown table; stdlib only.
"""

import argparse
import json
import os
import statistics
import sys
import tomllib


PHASES = ("ms_batch", "ms_forward", "ms_backward", "ms_clip", "ms_optimizer", "ms_after")


def stage_rows(run_dir, plan_path):
    with open(plan_path, "rb") as f:
        plan = tomllib.load(f)
    base = os.path.dirname(os.path.abspath(plan_path))
    try:
        with open(os.path.join(run_dir, "training.json")) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    stages = record.get("stages", record) if isinstance(record, dict) else {}
    rows = []
    for key, config in plan.get("stages", {}).items():
        name = key.replace("_", "-")
        with open(os.path.join(base, config), "rb") as f:
            full_steps = tomllib.load(f).get("run", {}).get("max_steps")
        lines = []
        for candidate in (name, key):
            path = os.path.join(run_dir, "runs", candidate, "metrics.jsonl")
            if os.path.exists(path):
                with open(path) as f:
                    for line in f:
                        try:
                            lines.append(json.loads(line))
                        except ValueError:
                            pass
                break
        train = [m for m in lines if m.get("split") == "train" and m.get("it_s")]
        if not train:
            rows.append({"stage": name, "ran": False, "full_steps": full_steps})
            continue
        steady = [m["it_s"] for m in train[1:]] or [train[0]["it_s"]]
        it_s = statistics.median(steady)
        info = stages.get(name) or stages.get(key) or {}
        steady_lines = train[1:] or train[:1]
        phases = {k[3:]: round(statistics.median(m[k] for m in steady_lines), 2)
                  for k in PHASES if all(k in m for m in steady_lines)}
        rows.append({
            "stage": name,
            "ran": True,
            "steps": train[-1]["step"],
            "elapsed_s": round(train[-1]["elapsed_s"], 2),
            "wall_time_s": info.get("wall_time_s"),
            "first_window_it_s": round(train[0]["it_s"], 3),
            "steady_it_s": round(it_s, 3),
            "full_steps": full_steps,
            "projected_full_min": round(full_steps / it_s / 60, 2) if full_steps else None,
            "phases_ms": phases,
        })
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = stage_rows(args.run, args.plan)
    ran = [r for r in rows if r["ran"]]
    total = sum(r["projected_full_min"] for r in ran if r.get("projected_full_min"))
    summary = {"run": args.run, "plan": args.plan, "stages": rows,
               "all_stages_ran": len(ran) == len(rows),
               "projected_full_min": round(total, 1) if ran else None}
    print("| stage | steps run | elapsed s | first window it/s | steady it/s | full plan steps | projected full min |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["ran"]:
            print(f"| {r['stage']} | {r['steps']} | {r['elapsed_s']} | {r['first_window_it_s']} | "
                  f"{r['steady_it_s']} | {r['full_steps']} | {r['projected_full_min']} |")
        else:
            print(f"| {r['stage']} | not run | - | - | - | {r['full_steps']} | - |")
    timed = [r for r in ran if r.get("phases_ms")]
    if timed:
        names = [k[3:] for k in PHASES]
        print("\n| stage | " + " | ".join(f"{n} ms" for n in names) + " | step ms (1000 / it/s) |")
        print("|---|" + "---:|" * (len(names) + 1))
        for r in timed:
            cells = " | ".join(str(r["phases_ms"].get(n, "-")) for n in names)
            print(f"| {r['stage']} | {cells} | {round(1000 / r['steady_it_s'], 1)} |")
    if ran:
        print(f"\nProjected full plan, stages' steps only (no validation, data or bundle writing): "
              f"{summary['projected_full_min']} min"
              + ("" if summary["all_stages_ran"] else " (NOT every stage ran: a lower bound)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    sys.exit(0 if ran else 1)


if __name__ == "__main__":
    main()
