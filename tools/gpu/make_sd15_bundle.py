#!/usr/bin/env python3
"""Writes a randomly initialised, full-size-shaped storygpt-v bundle (UNTRAINED) for the GPU
benchmark: Stable Diffusion 1.5's UNet / VAE / CLIP text encoder, CLIP ViT-L/14's vision tower,
FuseModule, GILL's Mapper_LDM, Mapper_LLM and [IMG] rows, with a toy, OPT-1.3B- or OPT-6.7B-
shaped LLM; 512x512 frames, compute dtype f16.

Nothing is downloaded. The tokenizers (and, for `--llm toy`, the whole LLM) come from a toy
bundle written by our binary (`storygpt-v bundle random --config toy --out TOY`), because the
real CLIP and OPT tokenizer files are not on the GPU machine; the networks only need ids
inside their vocabularies. Tensor names and shapes come from the diffusers / transformers
modules built on the `meta` device (no memory, no time), the values are drawn on --device
(PyTorch-like scales: uniform +-1/sqrt(fan_in), norms 1 / 0, embeddings N(0, 0.02)) and saved
as safetensors, the LLM in ~2 GiB shards with a model.safetensors.index.json.

    python3 tools/gpu/make_sd15_bundle.py --template TOY --out B1 --llm toy           # SD 1.5 + toy LLM
    python3 tools/gpu/make_sd15_bundle.py --template TOY --out B2 --llm opt-6.7b --share-sd B1
    python3 tools/gpu/make_sd15_bundle.py --template TOY --out T --tiny --dtype f32 --device cpu
    python3 tools/gpu/make_sd15_bundle.py --template TOY --check-template   # names/shapes self-check

`--share-sd B1` links B1's sd/, clip-vision/ and stage-1 file instead of writing them again.
`--check-template` rebuilds every part at the template's own sizes from this script's name and
shape rules and compares them with the template's safetensors (run it on a CPU).
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
import tomllib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sd15_configs as C  # noqa: E402

R = 8  # [IMG] tokens
M = 4  # visual tokens per past frame
SHARD_BYTES = int(os.environ.get("GPU_BUNDLE_SHARD_BYTES", 2 << 30))  # override: tests

TINY_OPT = {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def read_json(path):
    with open(path) as f:
        return json.load(f)


# ------------------------------------------------------------------ names and shapes


def meta_shapes(build):
    """{name: shape} of the module `build()` makes, built on the meta device."""
    import torch

    with torch.device("meta"):
        m = build()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def text_shapes(cfg):
    from transformers import CLIPTextConfig, CLIPTextModel

    shapes = meta_shapes(lambda: CLIPTextModel(CLIPTextConfig(**cfg)))
    # transformers 5 builds CLIPTextModel without its `text_model.` level (its loader maps the
    # names); SD 1.5's files and our loader have it.
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in shapes.items()}


def vision_shapes(cfg):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return meta_shapes(lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)))


def unet_shapes(cfg):
    from diffusers import UNet2DConditionModel

    return meta_shapes(lambda: UNet2DConditionModel(**C.public(cfg)))


def vae_shapes(cfg):
    from diffusers import AutoencoderKL

    return meta_shapes(lambda: AutoencoderKL(**C.public(cfg)))


def opt_shapes(cfg):
    from transformers import OPTConfig, OPTForCausalLM

    shapes = meta_shapes(lambda: OPTForCausalLM(OPTConfig(**cfg)))
    if cfg.get("tie_word_embeddings", True):
        shapes.pop("lm_head.weight", None)  # tied to the input embeddings, as transformers saves it
    return shapes


def fuse_shapes(d, prefix="postfuse_module"):
    """The authors' FuseModule (backend/models/src/fuse.rs) for text width d."""
    s = {}
    for mlp, i in (("mlp1", 2 * d), ("mlp2", d)):
        s[f"{prefix}.{mlp}.layernorm.weight"] = (i,)
        s[f"{prefix}.{mlp}.layernorm.bias"] = (i,)
        s[f"{prefix}.{mlp}.fc1.weight"] = (d, i)
        s[f"{prefix}.{mlp}.fc1.bias"] = (d,)
        s[f"{prefix}.{mlp}.fc2.weight"] = (d, d)
        s[f"{prefix}.{mlp}.fc2.bias"] = (d,)
    s[f"{prefix}.layer_norm.weight"] = (d,)
    s[f"{prefix}.layer_norm.bias"] = (d,)
    return s


def stage2_shapes(llm_d, vision_d, text_d, mp):
    """[IMG] rows, Mapper_LLM and GILL's Mapper_LDM (backend/models/src/mappers.rs), with the
    authors' names."""
    s = {"model.input_embeddings.weight": (R, llm_d),
         "model.visual_embeddings.weight": (M * llm_d, vision_d),
         "model.visual_embeddings.bias": (M * llm_d,)}
    p = "model.gen_text_hidden_fcs.0"
    d, ff = mp["d_model"], mp["ff_dim"]
    s[f"{p}.fc.weight"] = (d, llm_d)
    s[f"{p}.fc.bias"] = (d,)
    s[f"{p}.model.weight"] = (text_d, d)
    s[f"{p}.model.bias"] = (text_d,)
    s[f"{p}.query_embs"] = (1, 77, d)

    def attn(q):
        s[f"{q}.in_proj_weight"] = (3 * d, d)
        s[f"{q}.in_proj_bias"] = (3 * d,)
        s[f"{q}.out_proj.weight"] = (d, d)
        s[f"{q}.out_proj.bias"] = (d,)

    def layer(q, norms):
        s[f"{q}.linear1.weight"] = (ff, d)
        s[f"{q}.linear1.bias"] = (ff,)
        s[f"{q}.linear2.weight"] = (d, ff)
        s[f"{q}.linear2.bias"] = (d,)
        for n in range(1, norms + 1):
            s[f"{q}.norm{n}.weight"] = (d,)
            s[f"{q}.norm{n}.bias"] = (d,)

    for i in range(mp["encoder_layers"]):
        q = f"{p}.tfm.encoder.layers.{i}"
        attn(f"{q}.self_attn")
        layer(q, 2)
    for i in range(mp["decoder_layers"]):
        q = f"{p}.tfm.decoder.layers.{i}"
        attn(f"{q}.self_attn")
        attn(f"{q}.multihead_attn")
        layer(q, 3)
    for side in ("encoder", "decoder"):
        s[f"{p}.tfm.{side}.norm.weight"] = (d,)
        s[f"{p}.tfm.{side}.norm.bias"] = (d,)
    return s


# ------------------------------------------------------------------ values


EMBEDDINGS = ("embed_tokens.weight", "embed_positions.weight", "token_embedding.weight",
              "position_embedding.weight", "class_embedding", "model.input_embeddings.weight")


def random_tensor(name, shape, g, dev, dtype):
    import torch

    if name.endswith(EMBEDDINGS):
        t = torch.randn(shape, generator=g, device=dev) * 0.02
    elif name.endswith("query_embs"):
        t = torch.randn(shape, generator=g, device=dev)
    elif len(shape) == 1:
        is_norm = "norm" in name.rsplit(".", 2)[-2].lower() if "." in name else False
        t = (torch.ones if is_norm and name.endswith("weight") else torch.zeros)(shape, device=dev)
    else:
        b = 1.0 / math.sqrt(math.prod(shape[1:]))
        t = (torch.rand(shape, generator=g, device=dev) * 2 - 1) * b
    return t.to(dtype)


def save_tensors(shapes, path, dev, dtype, seed, shard=False):
    """Draws every tensor of `shapes` and writes `path` (a .safetensors file), or for
    `shard` ~2 GiB shards `stem-0000i-of-0000n.safetensors` plus `stem.safetensors.index.json`."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator(device=dev).manual_seed(seed)
    names = sorted(shapes)
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups, cur, size = [], [], 0
    for n in names:
        b = math.prod(shapes[n]) * itemsize
        if shard and cur and size + b > SHARD_BYTES:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    groups.append(cur)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stem = path[: -len(".safetensors")]
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        tensors = {n: random_tensor(n, shapes[n], g, dev, dtype).cpu() for n in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        file = path if len(groups) == 1 else f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, file)
        weight_map.update({n: os.path.basename(file) for n in group})
        del tensors
    if len(groups) > 1:
        write_json(f"{stem}.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": weight_map})
    return sum(math.prod(s) for s in shapes.values()), total


# ------------------------------------------------------------------ the bundle


def opt_config(kind, template_llm_cfg):
    dims = TINY_OPT if kind == "opt-tiny" else C.OPT[kind]
    return {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "vocab_size": 50272 if kind != "opt-tiny" else max(1024, template_llm_cfg["vocab_size"]),
        "word_embed_proj_dim": dims["hidden_size"],
        "max_position_embeddings": 2048,
        "do_layer_norm_before": True,
        "activation_function": "relu",
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": True,
        # The toy tokenizer's special ids (the same as OPT's: pad 1, bos = eos = 2).
        "pad_token_id": template_llm_cfg["pad_token_id"],
        "bos_token_id": template_llm_cfg["bos_token_id"],
        "eos_token_id": template_llm_cfg["eos_token_id"],
        "torch_dtype": "float16",
        **dims,
    }


def manifest(name, description, dtype, mapper, size, template):
    s = template["sampling"]
    llm = template["llm"]
    return f"""# storygpt-v model bundle (see docs/MODELS.md, "Model bundles").
# Written by tools/gpu/make_sd15_bundle.py: random weights, UNTRAINED.
format = 1
name = "{name}"
description = "{description}"
trained = false

[char_ldm]
base = "sd"
image_encoder = "clip-vision"
stage1 = "storygpt-v/stage1.safetensors"
dtype = "{dtype}"

[char_ldm.stage1_prefixes]
fuse = "postfuse_module"
unet = "unet"
image_encoder = "image_encoder"

[llm]
model = "llm"
stage2 = "storygpt-v/stage2.safetensors"
dtype = "{dtype}"
num_img_tokens = {R}
visual_tokens = {M}
max_prompt_len = {llm.get("max_prompt_len", 160)}
caption_only = false

[llm.stage2_names]
img_rows = "model.input_embeddings.weight"
mapper_llm = "model.visual_embeddings"
mapper_ldm = "model.gen_text_hidden_fcs.0"

[llm.mapper_ldm]
d_model = {mapper["d_model"]}
heads = {mapper["heads"]}
encoder_layers = {mapper["encoder_layers"]}
decoder_layers = {mapper["decoder_layers"]}
ff_dim = {mapper["ff_dim"]}

[sampling]
height = {size}
width = {size}
steps = 30
guidance_scale = 7.5
start_merge_step = {s.get("start_merge_step", 15)}
scheduler = "pndm"
"""


def link(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(os.path.abspath(src), dst)


def build(args):
    import torch

    t_start = time.time()
    dev = torch.device(args.device)
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    tpl = args.template
    template = tomllib.load(open(os.path.join(tpl, "bundle.toml"), "rb"))
    unet_cfg, vae_cfg, text_cfg, vision_cfg, mapper, size = C.configs(args.tiny)
    tpl_text = read_json(os.path.join(tpl, "sd/text_encoder/config.json"))
    tpl_llm = read_json(os.path.join(tpl, "llm/config.json"))
    # The tokenizer is the template's: its special ids, a vocabulary that holds its ids.
    text_cfg.update({k: tpl_text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    text_cfg["vocab_size"] = max(text_cfg["vocab_size"], tpl_text["vocab_size"]) if not args.tiny \
        else tpl_text["vocab_size"]
    out = args.out
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"{out} exists and is not empty")
    os.makedirs(out, exist_ok=True)
    report = {"bundle": out, "llm": args.llm, "tiny": args.tiny, "dtype": args.dtype, "params": {}}

    def part(name, shapes, path, seed, shard=False):
        t = time.time()
        n, b = save_tensors(shapes, path, dev, dtype, args.seed * 100 + seed, shard)
        report["params"][name] = n
        print(f"  {name:<28} {n:>14,} parameters  {b / 2**30:6.2f} GiB  {time.time() - t:6.1f} s",
              file=sys.stderr, flush=True)

    if args.share_sd:
        for p in ("sd", "clip-vision", "storygpt-v/stage1.safetensors"):
            link(os.path.join(args.share_sd, p), os.path.join(out, p))
        report["shared_sd"] = args.share_sd
    else:
        shutil.copytree(os.path.join(tpl, "sd/tokenizer"), os.path.join(out, "sd/tokenizer"))
        write_json(os.path.join(out, "sd/scheduler/scheduler_config.json"), C.SD15_SCHEDULER)
        write_json(os.path.join(out, "sd/text_encoder/config.json"), text_cfg)
        part("clip text encoder", text_shapes(text_cfg),
             os.path.join(out, "sd/text_encoder/model.safetensors"), 1)
        write_json(os.path.join(out, "sd/unet/config.json"), unet_cfg)
        part("unet", unet_shapes(unet_cfg),
             os.path.join(out, "sd/unet/diffusion_pytorch_model.safetensors"), 2)
        write_json(os.path.join(out, "sd/vae/config.json"), vae_cfg)
        part("vae", vae_shapes(vae_cfg),
             os.path.join(out, "sd/vae/diffusion_pytorch_model.safetensors"), 3)
        write_json(os.path.join(out, "clip-vision/config.json"), vision_cfg)
        img = vision_cfg["image_size"]
        write_json(os.path.join(out, "clip-vision/preprocessor_config.json"), {
            "crop_size": img, "do_center_crop": True, "do_normalize": True, "do_resize": True,
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
            "size": {"shortest_edge": img}})
        part("clip vision tower", vision_shapes(vision_cfg),
             os.path.join(out, "clip-vision/model.safetensors"), 4)
        part("fuse module", fuse_shapes(text_cfg["hidden_size"]),
             os.path.join(out, "storygpt-v/stage1.safetensors"), 5)

    if args.llm == "toy":
        shutil.copytree(os.path.join(tpl, "llm"), os.path.join(out, "llm"))
        llm_d = tpl_llm["hidden_size"]
        report["params"]["llm"] = "toy (copied from the template)"
    else:
        cfg = opt_config(args.llm, tpl_llm)
        os.makedirs(os.path.join(out, "llm"))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tpl, "llm", f), os.path.join(out, "llm", f))
        write_json(os.path.join(out, "llm/config.json"), cfg)
        part("llm " + args.llm, opt_shapes(cfg), os.path.join(out, "llm/model.safetensors"), 6,
             shard=True)
        llm_d = cfg["hidden_size"]
    part("stage-2 mappers, [IMG] rows",
         stage2_shapes(llm_d, vision_cfg["hidden_size"], text_cfg["hidden_size"], mapper),
         os.path.join(out, "storygpt-v/stage2.safetensors"), 7)

    shape = "tiny SD-1.5-layout" if args.tiny else "SD-1.5-shaped"
    desc = (f"Randomly initialised {shape} bundle ({size}x{size}, CLIP ViT-L/14-shaped vision, "
            f"LLM {args.llm}), UNTRAINED: for speed and memory measurements only. Written by "
            f"tools/gpu/make_sd15_bundle.py.")
    with open(os.path.join(out, "bundle.toml"), "w") as f:
        f.write(manifest(f"sd15-random-{args.llm}", desc, args.dtype, mapper, size, template))
    report["seconds"] = round(time.time() - t_start, 1)
    report["size"] = size
    report["mapper_ldm"] = mapper
    print(json.dumps(report))
    if args.report:
        write_json(args.report, report)


def check_template(args):
    """Rebuilds the names and shapes of every part at the template's sizes and compares them
    with the template's files (the rules above against what our Rust writer produces)."""
    from safetensors import safe_open

    tpl = args.template
    template = tomllib.load(open(os.path.join(tpl, "bundle.toml"), "rb"))

    def on_disk(path):
        with safe_open(os.path.join(tpl, path), "np") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    text = read_json(os.path.join(tpl, "sd/text_encoder/config.json"))
    vision = read_json(os.path.join(tpl, "clip-vision/config.json"))
    llm = read_json(os.path.join(tpl, "llm/config.json"))
    mp = template["llm"]["mapper_ldm"]
    expect = {
        "sd/text_encoder/model.safetensors": text_shapes(text),
        "clip-vision/model.safetensors": vision_shapes(vision),
        "sd/unet/diffusion_pytorch_model.safetensors":
            unet_shapes(read_json(os.path.join(tpl, "sd/unet/config.json"))),
        "sd/vae/diffusion_pytorch_model.safetensors":
            vae_shapes(read_json(os.path.join(tpl, "sd/vae/config.json"))),
        "llm/model.safetensors": opt_shapes(llm),
        "storygpt-v/stage1.safetensors": fuse_shapes(text["hidden_size"]),
        "storygpt-v/stage2.safetensors":
            stage2_shapes(llm["hidden_size"], vision["hidden_size"], text["hidden_size"], mp),
    }
    bad = 0
    for path, want in expect.items():
        got = on_disk(path)
        missing = sorted(set(got) - set(want))
        extra = sorted(set(want) - set(got))
        shape = sorted(k for k in set(got) & set(want) if got[k] != want[k])
        ok = not (missing or extra or shape)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {path}: {len(got)} tensors"
              + (f"; not made here: {missing[:5]}" if missing else "")
              + (f"; made here only: {extra[:5]}" if extra else "")
              + (f"; shapes differ: {[(k, got[k], want[k]) for k in shape[:5]]}" if shape else ""))
    sys.exit(1 if bad else 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--template", required=True, help="a toy bundle (storygpt-v bundle random)")
    ap.add_argument("--out")
    ap.add_argument("--llm", default="toy", choices=["toy", "opt-tiny", *C.OPT])
    ap.add_argument("--share-sd", help="link sd/, clip-vision/ and stage 1 of this bundle")
    ap.add_argument("--tiny", action="store_true", help="toy widths, 64x64 (CPU check)")
    ap.add_argument("--dtype", default="f16", choices=["f16", "bf16", "f32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", help="write the JSON report here too")
    ap.add_argument("--check-template", action="store_true")
    args = ap.parse_args()
    if args.check_template:
        check_template(args)
    elif not args.out:
        ap.error("--out is required")
    else:
        build(args)


if __name__ == "__main__":
    main()
