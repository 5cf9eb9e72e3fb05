#!/usr/bin/env python3
"""UNet benchmarks, the PyTorch side of tools/bench/run.sh (see docs/BENCHMARKS.md).

    python tools/bench/bench_unet.py [sd15|train|all] [iters]

Same cases as backend/models/examples/bench_unet.rs; prints one JSON line per case.
"""
import json
import os
import sys
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel


def timed(warmup, iters, fn):
    """Wall and process CPU seconds per iteration (CPU time is what a loaded machine disturbs
    least: time spent waiting for a core is not counted)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def report(case, params, times):
    wall, cpu = [t[0] for t in times], [t[1] for t in times]
    print(json.dumps({"impl": "pytorch", "case": case, "params": params,
                      "mean_s": round(sum(wall) / len(wall), 4), "min_s": round(min(wall), 4),
                      "cpu_mean_s": round(sum(cpu) / len(cpu), 4),
                      "cpu_min_s": round(min(cpu), 4), "iters": len(times)}), flush=True)


def bench_sd15(iters):
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    x = torch.randn(1, 4, 32, 32)
    t = torch.tensor([999])
    c = torch.randn(1, 77, 768)
    with torch.no_grad():
        times = timed(1, iters, lambda: unet(x, t, encoder_hidden_states=c))
    report("sd15_fwd_32x32_b1", sum(p.numel() for p in unet.parameters()), times)


def bench_train(iters):
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256, attention_head_dim=8).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    b = 32
    x = torch.randn(b, 4, 8, 8)
    t = torch.arange(b) * 30 + 1
    c = torch.randn(b, 77, 256)
    target = torch.randn(b, 4, 8, 8)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=c).sample, target)
        loss.backward()
        opt.step()

    times = timed(2, iters, step)
    n = sum(p.numel() for p in unet.parameters())
    report("train_step_64_128_b32_8x8", n, times)
    times = timed(1, iters, lambda: unet(x, t, encoder_hidden_states=c))
    report("train_fwd_only_64_128_b32_8x8", n, times)


def bench_toy(iters):
    """The toy bundle's UNet (cross-attention 128) and VAE training steps, batch 32."""
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=1e-2)
    b = 32
    x, t = torch.randn(b, 4, 8, 8), torch.arange(b) * 30 + 1
    c, target = torch.randn(b, 77, 128), torch.randn(b, 4, 8, 8)

    def unet_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=c).sample, target).backward()
        opt.step()

    report("train_step_toy_unet_b32_8x8", sum(p.numel() for p in unet.parameters()),
           timed(2, iters, unet_step))

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64).train()
    vopt = torch.optim.AdamW(vae.parameters(), lr=1e-4, weight_decay=1e-2)
    img = torch.rand(b, 3, 64, 64) * 2 - 1

    def vae_step():
        vopt.zero_grad(set_to_none=True)
        post = vae.encode(img).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = 0.5 * (post.mean ** 2 + post.var - 1 - post.logvar).sum() / b
        (torch.nn.functional.mse_loss(rec, img) + 1e-6 * kl).backward()
        vopt.step()

    report("toy_vae_train_step_b32_64x64", sum(p.numel() for p in vae.parameters()),
           timed(2, iters, vae_step))


def bench_ops(iters):
    """Per-op split matching bench_ops in bench_unet.rs."""
    x = torch.randn(32, 128, 8, 8, requires_grad=True)
    w = (torch.randn(128, 128, 3, 3) * 0.05).requires_grad_()
    r = torch.rand(32, 128, 8, 8) * 2 - 1
    conv = lambda: torch.nn.functional.conv2d(x, w, padding=1)
    gn = lambda: torch.nn.functional.group_norm(x, 32, eps=1e-5)
    with torch.no_grad():
        report("op_conv3x3_128_b32_8x8_fwd", 0, timed(1, iters, conv))
    report("op_conv3x3_128_b32_8x8_fwd_bwd", 0, timed(1, iters, lambda: conv().sum().backward()))
    with torch.no_grad():
        report("op_groupnorm32_b32_8x8_fwd", 0, timed(1, iters, gn))
    report("op_groupnorm32_b32_8x8_fwd_bwd", 0, timed(1, iters, lambda: (gn() * r).sum().backward()))
    q, k = torch.randn(32, 8, 64, 8), torch.randn(32, 8, 77, 8)
    with torch.no_grad():
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k)
        report("op_sdpa_b32_h8_64x77_fwd", 0, timed(1, iters, sdpa))


def main():
    which = sys.argv[1] if len(sys.argv) > 1 else "all"
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    if which in ("train", "all"):
        bench_train(iters)
    if which in ("toy", "all"):
        bench_toy(iters)
    if which == "ops":
        bench_ops(iters)
    if which in ("sd15", "all"):
        bench_sd15(iters)


if __name__ == "__main__":
    main()
