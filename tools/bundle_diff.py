#!/usr/bin/env python3
"""Compare two model bundles (or two .safetensors files) tensor by tensor.

    python3 tools/bundle_diff.py models/toy /tmp/run-shipped [--quiet]

For every .safetensors file present in both (same relative path), says how many tensors hold
identical values and, for the others, the largest absolute difference. An f32 tensor compared
with an f16 one is first rounded to f16 as `bundle ship --f16` rounds it, so an f32 `train all`
output can be checked exactly against the shipped f16 bundle. Exit status 0 when every tensor
matches. Standard library only; docs/TRAINING.md uses it to check that `train all` reproduces
models/toy.
"""
import json
import struct
import sys
from pathlib import Path

FORMATS = {"F16": "e", "F32": "f", "F64": "d"}
FLOATS = set(FORMATS) | {"BF16"}


def read_tensors(path):
    try:
        raw = path.read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + header_len])
        header.pop("__metadata__", None)
        base = 8 + header_len
        out = {}
        for name, info in header.items():
            start, end = info["data_offsets"]
            if base + end > len(raw):
                raise ValueError("tensor %s runs past the end of the file" % name)
            out[name] = (info["dtype"], tuple(info["shape"]), raw[base + start : base + end])
        return out
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        sys.exit("%s: not a readable safetensors file (%s)" % (path, err))


def values(dtype, data):
    if dtype == "BF16":
        # bf16 is the top half of an f32.
        halves = struct.unpack("<%dH" % (len(data) // 2), data)
        return [struct.unpack("<f", struct.pack("<I", h << 16))[0] for h in halves]
    fmt = FORMATS[dtype]
    width = struct.calcsize(fmt)
    return struct.unpack("<%d%s" % (len(data) // width, fmt), data)


def as_f16(vals):
    return struct.unpack("<%de" % len(vals), struct.pack("<%de" % len(vals), *vals))


def compare_files(a_path, b_path, quiet):
    a, b = read_tensors(a_path), read_tensors(b_path)
    only = sorted(set(a) ^ set(b))
    if only:
        print("  tensors in one file only: %s%s" % (", ".join(only[:5]), " ..." if len(only) > 5 else ""))
    identical, worst, worst_name = 0, 0.0, None
    shared = sorted(set(a) & set(b))
    for name in shared:
        (da, sa, xa), (db, sb, xb) = a[name], b[name]
        if sa != sb:
            print("  %s: shape %s against %s" % (name, sa, sb))
            continue
        if da == db and xa == xb:
            identical += 1
            continue
        if not {da, db} <= FLOATS:
            # Integer tensors (ids, positions) are compared as bytes.
            print("  %s: differs (%s against %s)" % (name, da, db))
            continue
        va, vb = values(da, xa), values(db, xb)
        if {da, db} == {"F16", "F32"}:
            # Round the f32 side to f16 as `bundle ship --f16` does (nearest, ties to even).
            if da == "F32":
                va = as_f16(va)
            else:
                vb = as_f16(vb)
        diff = max((abs(p - q) for p, q in zip(va, vb)), default=0.0)
        if diff == 0.0:
            identical += 1
            continue
        scale = max((abs(p) for p in va), default=0.0)
        if not quiet:
            print("  %s: max |diff| %.3g (max |value| %.3g)" % (name, diff, scale))
        if diff > worst:
            worst, worst_name = diff, name
    print(
        "  %d of %d tensors identical in value%s"
        % (identical, len(shared), "" if worst_name is None else "; largest difference %.3g in %s" % (worst, worst_name))
    )
    return identical == len(shared) and not only


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    quiet = "--quiet" in sys.argv[1:]
    if len(args) != 2:
        sys.exit(__doc__)
    a, b = Path(args[0]), Path(args[1])
    for p in (a, b):
        if not p.exists():
            sys.exit("%s: no such file or directory" % p)
    if a.is_file() != b.is_file():
        sys.exit("compare two bundle directories or two .safetensors files, not one of each")
    if a.is_file() and b.is_file():
        pairs = [(a, b)]
    else:
        def weights(root):
            # `runs/` (checkpoints) and `data/` are `train all`'s working files, not the bundle.
            found = (p.relative_to(root) for p in root.rglob("*.safetensors"))
            return {f for f in found if f.parts[0] not in ("runs", "data")}

        in_a, in_b = weights(a), weights(b)
        for f in sorted(in_a ^ in_b):
            print("%s: only in %s" % (f, a if f in in_a else b))
        pairs = [(a / f, b / f) for f in sorted(in_a & in_b)]
        if not pairs:
            sys.exit("no .safetensors file is in both")
    all_same = not (a.is_dir() and in_a != in_b)
    for pa, pb in pairs:
        print(pa.relative_to(a) if pa != a else pa)
        all_same &= compare_files(pa, pb, quiet)
    sys.exit(0 if all_same else 1)


if __name__ == "__main__":
    main()
