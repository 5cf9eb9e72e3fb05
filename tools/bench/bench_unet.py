#!/usr/bin/env python3
"""UNet benchmarks, the PyTorch side of tools/bench/run.sh (see docs/BENCHMARKS.md).

    python tools/bench/bench_unet.py [sd15|train|toy|toy_unet|vae|stage2|ops|all] [iters]

Same cases as backend/models/examples/bench_unet.rs; prints one JSON line per case.
"""
import json
import os
import sys
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from memory import status_mib  # tools/bench/memory.py, next to this script


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


# Resident memory after the imports, before any case ran (the interpreter, torch, diffusers).
BASE_RSS_MIB = status_mib("VmRSS:")


def report(case, params, times):
    wall, cpu = [t[0] for t in times], [t[1] for t in times]
    print(json.dumps({"impl": "pytorch", "case": case, "params": params,
                      "mean_s": round(sum(wall) / len(wall), 4), "min_s": round(min(wall), 4),
                      "cpu_mean_s": round(sum(cpu) / len(cpu), 4),
                      "cpu_min_s": round(min(cpu), 4), "iters": len(times),
                      "peak_rss_mib": round(status_mib("VmHWM:")),
                      "base_rss_mib": round(BASE_RSS_MIB)}), flush=True)


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


def bench_toy_unet(iters):
    """The toy bundle's UNet (cross-attention 128) training step, batch 32."""
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


def bench_vae(iters):
    """The toy VAE's training step on 64x64 frames, batch 32."""
    b = 32
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


class TextFcLayer(torch.nn.Module):
    """Mapper_LDM: GILL's TextFcLayer in mode 'gill_mapper', as models::mappers::MapperLdm."""

    def __init__(self, in_dim, out_dim, num_output_tokens, d_model, nhead, layers, ff):
        super().__init__()
        self.fc = torch.nn.Linear(in_dim, d_model)
        self.tfm = torch.nn.Transformer(
            batch_first=True, norm_first=True, d_model=d_model, num_encoder_layers=layers,
            num_decoder_layers=layers, dim_feedforward=ff, dropout=0.0, nhead=nhead)
        self.model = torch.nn.Linear(d_model, out_dim)
        self.query_embs = torch.nn.Parameter(torch.randn(1, num_output_tokens, d_model))

    def forward(self, x, input_embs):
        x = self.fc(x + input_embs)
        return self.model(self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1)))


def bench_stage2(iters):
    """The toy bundle's stage-2 step, as bench_stage2 in bench_unet.rs: frozen toy OPT over 32
    prompts of 151 positions (7 history frames with 4 visual tokens each, 8 [IMG] tokens),
    L_gen over the [IMG] targets + MSE of Mapper_LDM's (32, 77, 128) output, backward into the
    [IMG] rows and both mappers, AdamW, the rows renormalised."""
    from transformers import OPTConfig, OPTForCausalLM
    vocab, d, b, r, history, m = 634, 128, 32, 8, 7, 4
    lm = OPTForCausalLM(OPTConfig(
        vocab_size=vocab, hidden_size=d, ffn_dim=512, num_hidden_layers=4, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=d, do_layer_norm_before=True,
        dropout=0.0, attention_dropout=0.0)).train()
    for p in lm.parameters():
        p.requires_grad_(False)
    table = lm.get_input_embeddings().weight
    frozen_norm = table.norm(dim=1).mean()
    img_rows = torch.nn.Parameter(torch.empty(r, d).uniform_(-1, 1) * frozen_norm * 3 ** 0.5 / d ** 0.5)
    mapper_llm = torch.nn.Linear(128, m * d)
    mapper_ldm = TextFcLayer(d, 128, 77, 128, 4, 2, 512)
    params = [img_rows, *mapper_llm.parameters(), *mapper_ldm.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    # The prompt layout of bench_stage2: BOS; per history frame 2 ids, 4 visual, 12 ids; 16 ids;
    # 8 [IMG].
    frame = 2 + m + 12
    img_start = 1 + history * frame + 16
    length = img_start + r
    visual_pos = torch.tensor([1 + k * frame + 2 + j for k in range(history) for j in range(m)])
    ids = torch.randint(3, vocab, (b, length))
    ids[:, 0] = 2
    ids[:, visual_pos] = 0
    ids[:, img_start:] = torch.arange(vocab, vocab + r)
    text_ids = ids.clamp(max=vocab - 1)
    is_img = (ids >= vocab).unsqueeze(-1)
    labels = torch.where(ids >= vocab, ids, torch.full_like(ids, -100))
    pooled = torch.randn(b * history, 128)
    target = torch.randn(b, 77, 128)

    def step():
        opt.zero_grad(set_to_none=True)
        embeds = torch.where(is_img, img_rows[(ids - vocab).clamp(0, r - 1)], table[text_ids])
        embeds = embeds.index_put((torch.arange(b)[:, None], visual_pos[None, :]),
                                  mapper_llm(pooled).reshape(b, history * m, d))
        hidden = lm.model.decoder(inputs_embeds=embeds).last_hidden_state
        logits = torch.cat([lm.lm_head(hidden), hidden @ img_rows.T], dim=-1)
        # L_gen as transformers computes it: every position shifted, only the [IMG] labels kept.
        lgen = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab + r), labels[:, 1:].reshape(-1), ignore_index=-100)
        conds = mapper_ldm(hidden[:, img_start:], img_rows.unsqueeze(0).expand(b, r, d))
        (torch.nn.functional.mse_loss(conds, target) + lgen).backward()
        opt.step()
        with torch.no_grad():
            img_rows.mul_(frozen_norm / img_rows.norm(dim=1).mean())

    report("stage2_step_toy_b32_151", sum(p.numel() for p in params), timed(2, iters, step))


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
    if which in ("toy", "toy_unet", "all"):
        bench_toy_unet(iters)
    if which in ("toy", "vae", "all"):
        bench_vae(iters)
    if which in ("stage2", "all"):
        bench_stage2(iters)
    if which == "ops":
        bench_ops(iters)
    if which in ("sd15", "all"):
        bench_sd15(iters)


if __name__ == "__main__":
    main()
