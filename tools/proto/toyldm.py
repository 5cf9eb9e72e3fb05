"""PyTorch prototype of the toy bundle's training recipes (research tool, never a CI or
runtime dependency): find VAE / Char-LDM settings that work within the time budget before
running them in Rust. Same architectures as the Rust stages (diffusers classes), same data.

  .venv/bin/python tools/proto/toyldm.py classifier --data /tmp/toy --out /tmp/proto/clf.pt
  .venv/bin/python tools/proto/toyldm.py vae --data /tmp/toy --out /tmp/proto/vae-a --minutes 10
  .venv/bin/python tools/proto/toyldm.py ldm --data /tmp/toy --bundle models/toy --out /tmp/proto/ldm-a
  .venv/bin/python tools/proto/toyldm.py recon --data /tmp/toy --vae models/toy/sd/vae --classifier /tmp/proto/clf.pt
"""

import argparse
import json
import math
import os
import pickle
import sys
import time

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("THREADS", "2")))


def load_split(data, split, story_len=5, limit=None):
    """Distinct frames of the split's stories, in story order: (frames uint8 N,H,W,3, captions,
    character label multi-hot N,C, character names)."""
    chars = json.load(open(os.path.join(data, "characters.json")))
    names = [c["name"] for c in chars]
    ann = json.load(open(os.path.join(data, "cleaned_annotations.json")))
    follow = pickle.load(open(os.path.join(data, "following_cache4.pkl"), "rb"))
    ids = json.load(open(os.path.join(data, "split.json")))[split]
    idset = set(ids)
    seen, out = set(), []
    for first in ids:
        if first not in follow:
            continue
        story = [first] + [str(x) for x in follow[first]][: story_len - 1]
        for f in story:
            if f in seen:
                continue
            seen.add(f)
            out.append(f)
        if limit and len(out) >= limit:
            break
    if limit:
        out = out[:limit]
    frames = np.stack(
        [np.load(os.path.join(data, "video_frames_sampled_4x", f + ".npy"))[0] for f in out]
    )
    caps = [ann[f]["caption"] for f in out]
    labels = np.zeros((len(out), len(names)), np.float32)
    for i, f in enumerate(out):
        for c in ann[f]["characters"]:
            if c in names:
                labels[i, names.index(c)] = 1
    return frames, caps, labels, names


def train_frame_ids(data, story_len=5, limit=8000):
    follow = pickle.load(open(os.path.join(data, "following_cache4.pkl"), "rb"))
    ids = json.load(open(os.path.join(data, "split.json")))["train"]
    seen, out = set(), []
    for first in ids:
        if first not in follow:
            continue
        for f in [first] + [str(x) for x in follow[first]][: story_len - 1]:
            if f not in seen:
                seen.add(f)
                out.append(f)
    return out[:limit]


def to_tensor(frames):
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ---------------------------------------------------------------- classifier (evaluation)
class Classifier(tnn.Module):
    def __init__(self, n):
        super().__init__()
        c = [3, 32, 64, 128, 128]
        layers = []
        for a, b in zip(c, c[1:]):
            layers += [tnn.Conv2d(a, b, 3, padding=1), tnn.BatchNorm2d(b), tnn.ReLU(), tnn.MaxPool2d(2)]
        self.f = tnn.Sequential(*layers)
        self.head = tnn.Linear(128 * 4 * 4, n)

    def forward(self, x):
        return self.head(self.f(x).flatten(1))


def char_metrics(logits, labels):
    pred = (logits > 0).float()
    acc = (pred == labels).all(1).float().mean().item()
    tp = (pred * labels).sum().item()
    fp = (pred * (1 - labels)).sum().item()
    fn = ((1 - pred) * labels).sum().item()
    f1 = 2 * tp / max(2 * tp + fp + fn, 1)
    return acc, f1


def cmd_classifier(a):
    tr, _, ytr, names = load_split(a.data, "train", limit=8000)
    va, _, yva, _ = load_split(a.data, "val", limit=800)
    xtr, xva = to_tensor(tr), to_tensor(va)
    ytr, yva = torch.from_numpy(ytr), torch.from_numpy(yva)
    torch.manual_seed(0)
    m = Classifier(len(names))
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    t0 = time.time()
    for ep in range(a.epochs):
        m.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i : i + 64]
            x = xtr[idx]
            # small shifts, as generated frames are not pixel-aligned with the data
            dx, dy = np.random.randint(-2, 3, 2)
            x = torch.roll(x, (int(dy), int(dx)), (2, 3))
            loss = F.binary_cross_entropy_with_logits(m(x), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        with torch.no_grad():
            acc, f1 = char_metrics(m(xva), yva)
        print(f"epoch {ep} loss {loss.item():.4f} val char-acc {acc:.4f} f1 {f1:.4f} {time.time()-t0:.0f}s", flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    torch.save({"state": m.state_dict(), "names": names}, a.out)


def load_classifier(path):
    d = torch.load(path)
    m = Classifier(len(d["names"]))
    m.load_state_dict(d["state"])
    m.eval()
    return m


# ---------------------------------------------------------------- VAE
def psnr(x, y):
    x = ((x.clamp(-1, 1) + 1) / 2)
    y = ((y.clamp(-1, 1) + 1) / 2)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()


def cmd_recon(a):
    """PSNR and classifier char-acc of a trained VAE's reconstructions (posterior mode) of the
    first 256 validation frames, next to the classifier on the real frames."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(a.vae).float().eval()
    clf = load_classifier(a.classifier)
    va, _, yva, _ = load_split(a.data, "val", limit=256)
    x, y = to_tensor(va), torch.from_numpy(yva)
    with torch.no_grad():
        rec = torch.cat(
            [vae.decode(vae.encode(x[i : i + 64]).latent_dist.mode()).sample for i in range(0, len(x), 64)]
        )
        print("psnr", psnr(rec, x), "recon char-acc/f1", char_metrics(clf(rec), y), "real", char_metrics(clf(x), y))


def cmd_vae(a):
    from diffusers import AutoencoderKL

    tr, _, _, _ = load_split(a.data, "train", limit=8000)
    va, _, _, _ = load_split(a.data, "val", limit=256)
    xtr, xva = to_tensor(tr), to_tensor(va)
    if a.char_weight != 1.0:
        ids = train_frame_ids(a.data)
        mtr = torch.from_numpy(np.stack([
            np.load(os.path.join(a.data, "seg_mask_4x_comb", f + "-frame0.npy")) > 0 for f in ids
        ])).float().unsqueeze(1)
        assert len(mtr) == len(xtr)
    cfg = dict(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(a.channels),
        up_block_types=["UpDecoderBlock2D"] * len(a.channels),
        block_out_channels=a.channels, layers_per_block=a.layers, latent_channels=a.latent,
        norm_num_groups=a.groups, sample_size=64, mid_block_add_attention=not a.no_attn,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(**cfg)
    print("params", sum(p.numel() for p in vae.parameters()) / 1e6, "M", flush=True)
    opt = torch.optim.AdamW(vae.parameters(), a.lr, weight_decay=0.0)
    t0 = time.time()
    step = 0
    g = torch.Generator().manual_seed(0)
    while step < a.steps:
        lr = a.lr * min(1, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(0, len(xtr), (a.batch,), generator=g)
        x = xtr[idx]
        if a.crop:
            # random crops aligned to the latent grid (8 px)
            oy, ox = (torch.randint(0, (64 - a.crop) // 8 + 1, (2,), generator=g) * 8).tolist()
            x = x[:, :, oy:oy + a.crop, ox:ox + a.crop]
        post = vae.encode(x).latent_dist
        z = post.mode() if a.det else post.sample()
        rec = vae.decode(z).sample
        if a.loss == "l1":
            r = (rec - x).abs().mean()
        elif a.loss == "mse":
            if a.char_weight != 1.0:
                w = 1 + (a.char_weight - 1) * mtr[idx]
                r = (((rec - x) ** 2) * w).mean() / w.mean()
            else:
                r = ((rec - x) ** 2).mean()
        else:  # l1 + mse
            r = (rec - x).abs().mean() + ((rec - x) ** 2).mean()
        kl = post.kl().sum() / x.numel() * 3  # per pixel (sum over latent / (H*W))
        loss = r + a.kl * kl
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"  step {step} posterior std {post.std.mean().item():.4f} mean abs {post.mean.abs().mean().item():.4f}", flush=True)
        if step % a.val_every == 0:
            with torch.no_grad():
                rec = torch.cat([vae.decode(vae.encode(xva[i:i+64]).latent_dist.mode()).sample for i in range(0, len(xva), 64)])
            print(f"step {step} {time.time()-t0:.0f}s loss {loss.item():.4f} val psnr {psnr(rec, xva):.2f}", flush=True)
    with torch.no_grad():
        rec = torch.cat([vae.decode(vae.encode(xva[i:i+64]).latent_dist.mode()).sample for i in range(0, len(xva), 64)])
        z = torch.cat([vae.encode(xtr[i:i+64]).latent_dist.mode() for i in range(0, 512, 64)])
    scale = 1.0 / z.std().item()
    print(f"final step {step} {time.time()-t0:.0f}s val psnr {psnr(rec, xva):.2f} scale {scale:.4f}", flush=True)
    vae.register_to_config(scaling_factor=scale)
    vae.save_pretrained(a.out)
    save_grid(torch.cat([xva[:8], rec[:8]]), 8, os.path.join(a.out, "recon.png"))
    if a.classifier:
        clf = load_classifier(a.classifier)
        _, _, yva, _ = load_split(a.data, "val", limit=256)
        with torch.no_grad():
            acc, f1 = char_metrics(clf(rec), torch.from_numpy(yva))
        print(f"reconstructions char-acc {acc:.4f} f1 {f1:.4f}", flush=True)


def save_grid(x, cols, path):
    from PIL import Image

    x = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    n, h, w, _ = x.shape
    rows = (n + cols - 1) // cols
    g = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i in range(n):
        g[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = x[i]
    Image.fromarray(g).save(path)


# ---------------------------------------------------------------- Char-LDM (text only)
def cmd_ldm(a):
    from diffusers import AutoencoderKL, DDPMScheduler, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(a.vae or os.path.join(a.bundle, "sd/vae")).float().eval()
    tok = CLIPTokenizer.from_pretrained(os.path.join(a.bundle, "sd/tokenizer"))
    te = CLIPTextModel.from_pretrained(os.path.join(a.bundle, "sd/text_encoder")).float().eval()
    clf = load_classifier(a.classifier)
    tr, ctr, _, _ = load_split(a.data, "train", limit=8000)
    va, cva, yva, _ = load_split(a.data, "val", limit=a.eval_n)
    scale = vae.config.scaling_factor

    @torch.no_grad()
    def encode_text(caps):
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return torch.cat([te(ids[i:i+256]).last_hidden_state for i in range(0, len(ids), 256)])

    with torch.no_grad():
        xtr = to_tensor(tr)
        lat = torch.cat([vae.encode(xtr[i:i+64]).latent_dist.mode() for i in range(0, len(xtr), 64)]) * scale
        ctx = encode_text(ctr)
        ctx_val = encode_text(cva)
        empty = encode_text([""])
    print("latents", tuple(lat.shape), "std", lat.std().item(), flush=True)
    ch = a.channels
    cfg = dict(
        sample_size=lat.shape[-1], in_channels=lat.shape[1], out_channels=lat.shape[1],
        down_block_types=["CrossAttnDownBlock2D"] * len(ch), up_block_types=["CrossAttnUpBlock2D"] * len(ch),
        block_out_channels=ch, layers_per_block=a.layers, attention_head_dim=a.heads,
        cross_attention_dim=ctx.shape[-1], norm_num_groups=32,
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg)
    print("unet params", sum(p.numel() for p in unet.parameters()) / 1e6, "M", flush=True)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type=a.pred, rescale_betas_zero_snr=a.ztsnr, clip_sample=False)
    ac = sched.alphas_cumprod
    ema = [p.detach().clone() for p in unet.parameters()]
    opt = torch.optim.AdamW(unet.parameters(), a.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    step = 0
    losses = []
    while True:
        frac = min(1, step / a.steps)
        lr = a.lr * min(1, (step + 1) / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for pg in opt.param_groups:
            pg["lr"] = lr
        idx = torch.randint(0, len(lat), (a.batch,), generator=g)
        x0 = lat[idx]
        c = ctx[idx].clone()
        drop = torch.rand(a.batch, generator=g) < 0.1
        c[drop] = empty
        noise = torch.randn(x0.shape, generator=g)
        if a.tsample == "logitnormal":
            t = (torch.sigmoid(torch.randn(a.batch, generator=g)) * 1000).long().clamp(0, 999)
        else:
            t = torch.randint(0, 1000, (a.batch,), generator=g)
        at = ac[t].view(-1, 1, 1, 1)
        xt = at.sqrt() * x0 + (1 - at).sqrt() * noise
        target = noise if a.pred == "epsilon" else at.sqrt() * noise - (1 - at).sqrt() * x0
        pred = unet(xt, t, c).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        d = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        losses.append(loss.item())
        step += 1
        elapsed = time.time() - t0
        done = step >= a.steps
        if step % a.eval_every == 0 or done:
            acc, f1, img = evaluate(unet, ema, sched, vae, scale, ctx_val, empty, clf, torch.from_numpy(yva), a, lat.shape[1:])
            print(f"step {step} {elapsed:.0f}s loss {np.mean(losses[-100:]):.4f} gen char-acc {acc:.4f} f1 {f1:.4f}", flush=True)
            os.makedirs(a.out, exist_ok=True)
            save_grid(torch.cat([to_tensor(va[:8]), img[:8]]), 8, os.path.join(a.out, f"samples-{step:06d}.png"))
        if done:
            break
    # the classifier on real val frames, for reference
    with torch.no_grad():
        acc, f1 = char_metrics(clf(to_tensor(va)), torch.from_numpy(yva))
    print(f"real frames char-acc {acc:.4f} f1 {f1:.4f}")


@torch.no_grad()
def evaluate(unet, ema, sched, vae, scale, ctx_val, empty, clf, yva, a, shape):
    from diffusers import DDIMScheduler

    backup = [p.detach().clone() for p in unet.parameters()]
    for p, e in zip(unet.parameters(), ema):
        p.data.copy_(e)
    s = DDIMScheduler.from_config(sched.config, timestep_spacing="trailing")
    s.set_timesteps(a.sample_steps)
    n = len(ctx_val)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((n,) + tuple(shape), generator=g)
    for t in s.timesteps:
        inp = torch.cat([x, x])
        c = torch.cat([ctx_val, empty.expand(n, -1, -1)])
        out = torch.cat([unet(inp[i:i+128], t, c[i:i+128]).sample for i in range(0, 2 * n, 128)])
        cond, unc = out[:n], out[n:]
        x = s.step(unc + a.guidance * (cond - unc), t, x).prev_sample
    img = torch.cat([vae.decode(x[i:i+64] / scale).sample for i in range(0, n, 64)]).clamp(-1, 1)
    acc, f1 = char_metrics(clf(img), yva)
    for p, b in zip(unet.parameters(), backup):
        p.data.copy_(b)
    return acc, f1, img


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("classifier")
    c.add_argument("--data", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--epochs", type=int, default=6)
    v = sub.add_parser("vae")
    v.add_argument("--data", required=True)
    v.add_argument("--out", required=True)
    v.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 64])
    v.add_argument("--layers", type=int, default=1)
    v.add_argument("--latent", type=int, default=4)
    v.add_argument("--groups", type=int, default=16)
    v.add_argument("--no-attn", action="store_true")
    v.add_argument("--loss", default="mse")
    v.add_argument("--classifier")
    v.add_argument("--crop", type=int, default=0)
    v.add_argument("--det", action="store_true")
    v.add_argument("--char-weight", type=float, default=1.0)
    v.add_argument("--kl", type=float, default=1e-6)
    v.add_argument("--lr", type=float, default=2e-3)
    v.add_argument("--batch", type=int, default=16)
    v.add_argument("--steps", type=int, default=1500)
    v.add_argument("--val-every", type=int, default=250)
    r = sub.add_parser("recon")
    r.add_argument("--data", required=True)
    r.add_argument("--vae", required=True)
    r.add_argument("--classifier", required=True)
    l = sub.add_parser("ldm")
    l.add_argument("--data", required=True)
    l.add_argument("--bundle", required=True)
    l.add_argument("--vae")
    l.add_argument("--classifier", required=True)
    l.add_argument("--out", required=True)
    l.add_argument("--channels", type=int, nargs="+", default=[64, 128])
    l.add_argument("--layers", type=int, default=1)
    l.add_argument("--heads", type=int, default=8)
    l.add_argument("--pred", default="v_prediction")
    l.add_argument("--ztsnr", type=int, default=1)
    l.add_argument("--tsample", default="uniform")
    l.add_argument("--lr", type=float, default=3e-4)
    l.add_argument("--warmup", type=int, default=200)
    l.add_argument("--ema", type=float, default=0.999)
    l.add_argument("--batch", type=int, default=32)
    l.add_argument("--steps", type=int, default=3000)
    l.add_argument("--eval-every", type=int, default=500)
    l.add_argument("--eval-n", type=int, default=128)
    l.add_argument("--sample-steps", type=int, default=20)
    l.add_argument("--guidance", type=float, default=5.0)
    a = p.parse_args()
    {"classifier": cmd_classifier, "vae": cmd_vae, "recon": cmd_recon, "ldm": cmd_ldm}[a.cmd](a)


if __name__ == "__main__":
    main()
