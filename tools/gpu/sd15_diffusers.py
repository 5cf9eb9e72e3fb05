#!/usr/bin/env python3
"""PyTorch diffusers reference for the GPU benchmark: one 512x512 Stable Diffusion 1.5-shaped
frame with random weights, 30 PNDM steps and classifier-free guidance, in fp16.

Builds UNet2DConditionModel / AutoencoderKL / CLIPTextModel from the inline SD 1.5 configs of
tools/gpu/sd15_configs.py (nothing is downloaded; random weights, seeded), then times what
StableDiffusionPipeline does for one image: the text encoder on the prompt and the empty prompt
(random token ids stand in for a tokenizer), 30 PNDM steps of the UNet at batch 2 with guidance,
the VAE decode and the copy of the image to the host. Warm-up runs are excluded.

    python3 tools/gpu/sd15_diffusers.py --json out.json                # cuda, fp16, 512x512
    python3 tools/gpu/sd15_diffusers.py --tiny --device cpu --dtype fp32 --steps 2 --runs 1

Prints one JSON object per attention variant on stdout (also written to --json as a list):
`sdpa` is diffusers' default (AttnProcessor2_0, torch's scaled_dot_product_attention: flash /
memory-efficient kernels); `classic` (--variants sdpa,classic) is AttnProcessor, which forms the
attention matrix explicitly, as our candle UNet does. If diffusers cannot be imported it prints
one JSON object with an `error` and exits with status 3.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sd15_configs as C  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--runs", type=int, default=3, help="timed runs (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="sdpa", help="comma list of sdpa, classic")
    ap.add_argument("--tiny", action="store_true", help="toy widths and 64x64 (CPU check)")
    ap.add_argument("--json", help="also write the results (a list) here")
    ap.add_argument("--png", help="write the last image here")
    args = ap.parse_args()

    try:
        import torch
        import diffusers
        from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor
        from transformers import CLIPTextConfig, CLIPTextModel
    except Exception as e:  # noqa: BLE001 - report any import failure as data
        out = {"impl": "diffusers", "error": f"cannot import the PyTorch side: {e!r}"}
        print(json.dumps(out))
        if args.json:
            with open(args.json, "w") as f:
                json.dump([out], f, indent=1)
        sys.exit(3)

    diffusers.utils.logging.set_verbosity_error()  # the notes on casting with .to()
    dev = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    cuda = dev.type == "cuda"
    unet_cfg, vae_cfg, text_cfg, _, _, size = C.configs(args.tiny)

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)

    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    # Built directly on the device (torch's default-device context), then cast.
    with dev:
        unet = UNet2DConditionModel(**C.public(unet_cfg))
        vae = AutoencoderKL(**C.public(vae_cfg))
        text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    for m in (unet, vae, text):
        m.to(device=dev, dtype=dtype).eval().requires_grad_(False)
    sync()
    build_s = time.perf_counter() - t0
    weights_mib = torch.cuda.memory_allocated(dev) / 2**20 if cuda else None
    scheduler = PNDMScheduler.from_config(C.SD15_SCHEDULER)
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in
              (("unet", unet), ("vae", vae), ("text_encoder", text))}

    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    vocab, bos, eos = text_cfg["vocab_size"], text_cfg["bos_token_id"], text_cfg["eos_token_id"]
    # A 12-token "prompt" and the empty prompt, padded with eos as CLIPTokenizer does for SD.
    ids = torch.full((2, 77), eos, dtype=torch.long)
    ids[:, 0] = bos
    ids[1, 1:13] = torch.randint(0, vocab - 2, (12,), generator=g)
    ids = ids.to(dev)
    lat_shape = (1, unet_cfg["in_channels"], size // 8, size // 8)
    noise = torch.randn(lat_shape, generator=g).to(dev, dtype)

    def one_image():
        """What StableDiffusionPipeline.__call__ does for one image, guidance included."""
        with torch.inference_mode():
            emb = text(ids)[0]  # (uncond, cond)
            scheduler.set_timesteps(args.steps, device=dev)
            latents = noise * scheduler.init_noise_sigma
            evals = 0
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
                eps = unet(x, t, encoder_hidden_states=emb).sample
                evals += 1
                if args.guidance > 1.0:
                    u, c = eps.chunk(2)
                    eps = u + args.guidance * (c - u)
                else:
                    eps = eps[1:]
                latents = scheduler.step(eps, t, latents).prev_sample
            finite = bool(torch.isfinite(latents).all())
            img = vae.decode(latents / vae_cfg["scaling_factor"]).sample
            img = ((img / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        return img, evals, finite

    results = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant == "classic":
            unet.set_attn_processor(AttnProcessor())
        elif variant != "sdpa":
            raise SystemExit(f"unknown variant {variant}")
        processors = sorted({type(p).__name__ for p in unet.attn_processors.values()})
        for _ in range(args.warmup):
            one_image()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(args.runs):
            sync()
            t = time.perf_counter()
            img, evals, finite = one_image()
            sync()
            times.append(time.perf_counter() - t)
        r = {
            "impl": "diffusers",
            "variant": variant,
            "attn_processors": processors,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "device": torch.cuda.get_device_name(dev) if cuda else args.device,
            "dtype": args.dtype,
            "size": size,
            "steps": args.steps,
            "unet_evals": evals,
            "unet_batch": 2,
            "guidance": args.guidance,
            "scheduler": "pndm",
            "params": params,
            "build_s": round(build_s, 3),
            "runs": len(times),
            "times_s": [round(x, 4) for x in times],
            "mean_s": round(sum(times) / len(times), 4),
            "min_s": round(min(times), 4),
            "ms_per_unet_eval": round(1000 * min(times) / evals, 2),
            "weights_mib": round(weights_mib, 1) if weights_mib is not None else None,
            "peak_allocated_mib": round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if cuda else None,
            "peak_reserved_mib": round(torch.cuda.max_memory_reserved(dev) / 2**20, 1) if cuda else None,
            "latents_finite": finite,
        }
        results.append(r)
        print(json.dumps(r), flush=True)
    if args.png:
        from PIL import Image

        Image.fromarray(img[0].permute(1, 2, 0).numpy()).save(args.png)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
