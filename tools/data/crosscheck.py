#!/usr/bin/env python3
"""Cross-check the Rust `data` crate's file formats against CPython pickle and numpy.

    python3 tools/data/crosscheck.py read DIR    # validate a dataset the Rust writer made
                                                 # (e.g. `storygpt-v toyworld generate --out DIR`)
    python3 tools/data/crosscheck.py write DIR   # write a FlintstonesSV-style dataset with
                                                 # Python (pickle protocols 2/4/5, numpy str arrays,
                                                 # Fortran-order masks) plus DIR/expected.json,
                                                 # which backend/data/tests/python_crosscheck.rs reads

Needs numpy only (`pip install numpy`).
"""
import json
import os
import pickle
import sys

import numpy as np


def read(root):
    j = lambda name: json.load(open(os.path.join(root, name)))
    split = j("split.json")
    chars = j("characters.json")
    bgs = j("backgrounds.json")
    ann = j("cleaned_annotations.json")
    labels = pickle.load(open(os.path.join(root, "labels.pkl"), "rb"))
    labels_bg = pickle.load(open(os.path.join(root, "labels_bg.pkl"), "rb"))
    n_checked = 0
    for n in (3, 4):
        path = os.path.join(root, f"following_cache{n}.pkl")
        if not os.path.exists(path):
            continue
        follow = pickle.load(open(path, "rb"))
        for first, rest in follow.items():
            assert isinstance(rest, np.ndarray) and rest.dtype.kind == "U" and rest.shape == (n,), rest
            assert first in ann and all(str(r) in ann for r in rest)
    names = [c["label"] for c in chars]
    for fid, a in ann.items():
        lab = labels[fid]
        assert isinstance(lab, np.ndarray) and lab.dtype == np.float64 and lab.shape == (len(chars),)
        assert [names[i] for i in np.flatnonzero(lab)] == sorted(c.lower() for c in a["characters"]) or \
            sorted(names[i] for i in np.flatnonzero(lab)) == sorted(c.lower() for c in a["characters"])
        bg = labels_bg[fid]
        assert bg.shape == (len(bgs),) and bgs[int(np.argmax(bg))] == a["setting"] and bg.sum() == 1
        clip = np.load(os.path.join(root, "video_frames_sampled_4x", fid + ".npy"))
        assert clip.dtype == np.uint8 and clip.ndim == 4 and clip.shape[-1] == 3, clip.shape
        h, w = clip.shape[1:3]
        seg = np.load(os.path.join(root, "seg_mask_4x_comb", fid + "-frame0.npy"))
        assert seg.shape == (h, w) and seg.dtype == np.uint8
        ids = sorted(int(v) for v in np.unique(seg) if v != 0)
        assert ids == sorted(s["id"] for s in a["segments"]), (fid, ids, a["segments"])
        for s in a["segments"]:
            ys, xs = np.nonzero(seg == s["id"])
            box = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            sx, sy = 128 / w, 128 / h
            assert s["bbox"] == [round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy)], (fid, s)
        n_checked += 1
    for c in chars:
        assert os.path.exists(os.path.join(root, c["portrait"])), c
    frames = sum(len(v) for v in split.values())
    print(f"ok: {n_checked} frames, {frames} in splits, {len(chars)} characters, {len(bgs)} backgrounds")


def write(root):
    os.makedirs(os.path.join(root, "video_frames_sampled_4x"), exist_ok=True)
    os.makedirs(os.path.join(root, "seg_mask_4x_comb"), exist_ok=True)
    ids = [f"s_02_e_05_shot_{k:06d}_{k + 100:06d}" for k in range(5)]
    captions = [
        "Wilma and Betty are shopping.",
        "Betty and Wilma carry Mr. Slate's bags.",
        "Pebbles plays with Dino.",
        "Pebbles laughs at Dino's tail.",
        "The stone house is quiet.",
    ]
    chars = [["Wilma", "Betty"], ["betty", "wilma"], ["Pebbles", "Dino"], ["pebbles", "dino"], []]
    expected_ref = [captions[0], "They carry Mr. Slate's bags.", captions[2], captions[3], captions[4]]
    json.dump({"train": [], "val": ids[:1], "test": []}, open(os.path.join(root, "split.json"), "w"))
    follow = {ids[0]: np.array(ids[1:4]), ids[1]: np.array(ids[2:5])}
    with open(os.path.join(root, "following_cache3.pkl"), "wb") as f:
        pickle.dump(follow, f, protocol=5)
    records = [
        {"globalID": i, "description": c, "setting": "shop" if k < 2 else "home",
         "characters": [{"entityLabel": n, "labelNPC": n.lower()} for n in ch]}
        for k, (i, c, ch) in enumerate(zip(ids, captions, chars))
    ]
    json.dump(records, open(os.path.join(root, "cleaned_annotations.json"), "w"))
    order = ["fred", "wilma", "barney", "betty", "pebbles", "dino", "slate"]
    labels = {i: np.array([float(o in [n.lower() for n in ch]) for o in order]) for i, ch in zip(ids, chars)}
    with open(os.path.join(root, "labels.pkl"), "wb") as f:
        pickle.dump(labels, f, protocol=2)
    with open(os.path.join(root, "labels_bg.pkl"), "wb") as f:
        pickle.dump({i: np.eye(2)[0 if k < 2 else 1] for k, i in enumerate(ids)}, f, protocol=4)
    boxes = {}
    for k, i in enumerate(ids):
        clip = (np.arange(3 * 8 * 10 * 3).reshape(3, 8, 10, 3) + k).astype(np.uint8)
        np.save(os.path.join(root, "video_frames_sampled_4x", i + ".npy"), clip)
        seg = np.zeros((8, 10), dtype=np.uint8)
        if chars[k]:
            seg[1:4, 2:5] = 1
            seg[5:7, 6:10] = 2
            boxes[i] = [[2, 1, 5, 4], [6, 5, 10, 7]]
        np.save(os.path.join(root, "seg_mask_4x_comb", f"{i}-frame1.npy"), np.asfortranarray(seg))
    expected = {
        "story": ids[0], "frames": ids[:4], "captions": captions[:4], "referential": expected_ref[:4],
        "characters": [[n.capitalize() for n in ch] for ch in chars[:4]],
        "pixel0": [(240 + k) % 256 for k in range(4)], "boxes": [boxes.get(i, []) for i in ids[:4]],
        "settings": ["shop", "shop", "home", "home"],
    }
    json.dump(expected, open(os.path.join(root, "expected.json"), "w"), indent=1)
    print(f"wrote {root}")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("read", "write"):
        sys.exit(__doc__)
    (read if sys.argv[1] == "read" else write)(sys.argv[2])
