#!/usr/bin/env python3
"""Parity of our networks on a device (CUDA) against the committed PyTorch fixtures, through the
release binary: `storygpt-v component KIND --model FIXTURE --inputs IN --out OUT --device DEV`
on the same tiny diffusers / transformers models and inputs that the CPU parity tests use
(backend/models/tests/{unet,vae,clip,llm}_parity.rs, fixtures made by tools/fixtures/*.py),
compared with the fixtures' reference outputs by the tests' rule:

    max |ours - reference| <= tol * max(1, max |reference|)

with tol = 1e-4 in f32 (the tests' rule) and 5e-2 in f16 / bf16 (llm_half_precision_runs_close_
to_f32's). f16 / bf16 need `component --dtype`, which the binary may not have yet: then only
f32 runs and the report says so.

    python3 tools/gpu/parity.py --bin storygpt-v --device cuda --dtypes f32,f16 --json out.json

Needs numpy and safetensors (both on the GPU machine). Prints a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from safetensors.numpy import load_file, save_file

TOL = {"f32": 1e-4, "f16": 5e-2, "bf16": 5e-2}


def cases(fx):
    """(case, component kind, model dir, inputs {name: array}, [(output key, reference, rows)])."""
    out = []
    for name in ("unet_a", "unet_b", "unet_c"):
        io = load_file(f"{fx}/{name}/io.safetensors")
        ins = {k: io[k] for k in ("sample", "timestep", "encoder_hidden_states")}
        out.append((name, "unet", name, ins, [("sample", io["out_sample"], None)]))
    for name in ("vae_a", "vae_b"):
        io = load_file(f"{fx}/{name}/io.safetensors")
        out.append((f"{name} encode", "vae-encode", name, {"sample": io["sample"]},
                    [("mean", io["mean"], None), ("logvar", io["logvar"], None)]))
        out.append((f"{name} decode", "vae-decode", name, {"latent": io["latent"]},
                    [("sample", io["decoded"], None)]))
    for name, kind in (("clip_text_quick", "clip-text"), ("clip_text_gelu_legacy", "clip-text"),
                       ("clip_vision_quick", "clip-vision"), ("clip_vision_gelu_bin", "clip-vision")):
        ins = load_file(f"{fx}/{name}/inputs.safetensors")
        ref = load_file(f"{fx}/{name}/outputs.safetensors")
        keys = ["last_hidden_state", "pooler_output"] + (["image_embeds"] if "image_embeds" in ref else [])
        out.append((name, kind, name, ins, [(k, ref[k], None) for k in keys]))
    ins = load_file(f"{fx}/clip_full/inputs.safetensors")
    ref = load_file(f"{fx}/clip_full/outputs.safetensors")
    out.append(("clip_full text", "clip-text", "clip_full", {"input_ids": ins["input_ids"]},
                [(k, ref[f"text.{k}"], None) for k in ("last_hidden_state", "pooler_output")]))
    out.append(("clip_full vision", "clip-vision", "clip_full", {"pixel_values": ins["pixel_values"]},
                [(k, ref[f"vision.{k}"], None) for k in ("last_hidden_state", "pooler_output", "image_embeds")]))
    for name in ("llm_opt", "llm_llama", "llm_llama_tied", "llm_opt_proj"):
        r = load_file(f"{fx}/{name}/reference.safetensors")
        ids = r["input_ids"].astype(np.int64)
        out.append((f"{name} ids", "llm", name, {"input_ids": ids},
                    [("logits", r["logits"], None), ("last_hidden_state", r["last_hidden_state"], None)]))
        out.append((f"{name} embeds", "llm", name, {"inputs_embeds": r["inputs_embeds"]},
                    [("logits", r["embeds_logits"], None),
                     ("last_hidden_state", r["embeds_last_hidden_state"], None)]))
        if "attention_mask" in r:
            # Padded queries are undefined: row 0 whole, row 1 from position 3 (as llm_parity.rs).
            out.append((f"{name} padded", "llm", name,
                        {"input_ids": ids, "attention_mask": r["attention_mask"].astype(np.int64)},
                        [("logits", r["padded_logits"], "llm_rows")]))
    return out


def kept(a, rows):
    if rows == "llm_rows":
        return np.concatenate([a[0].reshape(-1), a[1, 3:].reshape(-1)])
    return a


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="f32,f16")
    ap.add_argument("--fixtures", default="backend/models/tests/fixtures")
    ap.add_argument("--json")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per component run")
    args = ap.parse_args()

    help_text = subprocess.run([args.bin, "component", "--help"], capture_output=True, text=True).stdout
    has_dtype = "--dtype" in help_text
    dtypes = [d for d in args.dtypes.split(",") if d]
    skipped = []
    if not has_dtype:
        skipped = [d for d in dtypes if d != "f32"]
        dtypes = [d for d in dtypes if d == "f32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dt in dtypes:
            for case, kind, model, ins, checks in cases(args.fixtures):
                inp = os.path.join(tmp, "in.safetensors")
                outp = os.path.join(tmp, "out.safetensors")
                save_file({k: np.ascontiguousarray(v) for k, v in ins.items()}, inp)
                cmd = [args.bin, "component", kind, "--model", f"{args.fixtures}/{model}",
                       "--inputs", inp, "--out", outp, "--device", args.device]
                if has_dtype:
                    cmd += ["--dtype", dt]
                t = time.time()
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    rc, err = p.returncode, p.stderr.strip().splitlines()[-1:] or [""]
                except subprocess.TimeoutExpired:
                    rc, err = "timeout", [f"over {args.timeout} s"]
                secs = round(time.time() - t, 2)
                if rc != 0:
                    rows.append({"case": case, "dtype": dt, "output": "-", "pass": False,
                                 "error": err[0][:300], "seconds": secs})
                    continue
                got = load_file(outp)
                for key, ref, sel in checks:
                    g = got.get(key)
                    if g is None or g.shape != ref.shape:
                        rows.append({"case": case, "dtype": dt, "output": key, "pass": False, "seconds": secs,
                                     "error": f"shape {None if g is None else g.shape} vs {ref.shape}"})
                        continue
                    g, r = kept(g.astype(np.float64), sel), kept(ref.astype(np.float64), sel)
                    err_abs = float(np.max(np.abs(g - r)))
                    scale = max(1.0, float(np.max(np.abs(r))))
                    rows.append({"case": case, "dtype": dt, "output": key, "max_abs_err": err_abs,
                                 "rel_err": err_abs / scale, "tol": TOL[dt],
                                 "pass": bool(np.isfinite(err_abs) and err_abs <= TOL[dt] * scale),
                                 "seconds": secs})
    summary = {
        "device": args.device,
        "dtypes_run": dtypes,
        "dtypes_skipped": skipped,
        "skipped_reason": ("`storygpt-v component` has no --dtype flag in this binary: it runs every "
                           "network in f32") if skipped else None,
        "checks": len(rows),
        "passed": sum(r["pass"] for r in rows),
        "rows": rows,
    }
    print("| case | dtype | output | max abs err | rel err | tol | pass |")
    print("|---|---|---|---:|---:|---:|---|")
    for r in rows:
        if "max_abs_err" in r:
            print(f"| {r['case']} | {r['dtype']} | {r['output']} | {r['max_abs_err']:.2e} | "
                  f"{r['rel_err']:.2e} | {r['tol']:.0e} | {'yes' if r['pass'] else '**NO**'} |")
        else:
            print(f"| {r['case']} | {r['dtype']} | {r['output']} | - | - | - | **NO**: {r['error']} |")
    print(f"\n{summary['passed']}/{summary['checks']} checks passed on {args.device} "
          f"({', '.join(dtypes) or 'nothing'}); skipped: {', '.join(skipped) or 'none'}"
          + (f" ({summary['skipped_reason']})" if skipped else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    sys.exit(0 if rows and summary["passed"] == summary["checks"] else 1)


if __name__ == "__main__":
    main()
