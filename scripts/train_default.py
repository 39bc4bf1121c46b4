"""Train latentctl's small default autoencoder (factor 8, 4 latent channels, mid attention).

    python scripts/train_default.py train --out runs/default --minutes 30      # CPU or CUDA, resumes from --out
    python scripts/train_default.py distil-mid --out runs/default --steps 1500 --lr 2e-4   # mid block: photos as crops
    python scripts/train_default.py train --out runs/dec --init runs/default/distilled.pt --freeze-encoder --size 256
    python scripts/train_default.py check --out runs/dec                       # whole training photos vs bicubic
    python scripts/train_default.py export --out runs/dec                      # -> latentctl/weights/default.safetensors

The shipped model's exact commands and what each stage fixed: README, "The shipped default model".

Deterministic given --seed on one device (data order, crops, augmentation and init all come from seeded
generators; on CUDA cuDNN runs in deterministic mode). Data: scikit-image's bundled photos with colour
augmentation, plus synthetic "dead leaves" images (random overlapping coloured shapes), which cover colours
and edge statistics that a handful of photos do not. scikit-learn's and matplotlib's sample photos are
held out for evaluation and never read here.
Loss: L1 + MSE on pixels, MSE between 8x average-pooled input and reconstruction (the low frequencies a
bicubic thumbnail keeps, which the latent must keep too), and a small KL term; the latent is the posterior
mean for the first --warmup-det steps, then a sample.
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentctl.metrics import FLAT_COLOURS, edge_errors
from latentctl.modules import AEConfig, AutoencoderKL, FixedGroupNorm
from latentctl.modules.blocks import fix_norms

# Widths 32,32,64,128 and one res block per level: the widest layers run at low resolution, so
# encode + decode of 512x512 stays near 1 s on a 2-core CPU; 2.8 M parameters, 5.6 MB in fp16.
ARCH = dict(ch=32, ch_mult=(1, 1, 2, 4), num_res_blocks=1, z_channels=4, embed_dim=4, mid_attn="vanilla")
# scikit-image's bundled images (no download needed). Mostly colour; a few grey ones for texture.
PHOTOS = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket",
          "motorcycle_left", "motorcycle_right", "brick", "camera", "grass", "gravel", "moon"]


def load_photos() -> list[torch.Tensor]:
    """Training photos as float tensors (3, H, W) in [0, 1]."""
    from skimage import data

    out = []
    for name in PHOTOS:
        if name.startswith("motorcycle"):
            left, right, _ = data.stereo_motorcycle()
            img = left if name.endswith("left") else right
        else:
            img = getattr(data, name)()
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = img[..., :3]
        t = torch.from_numpy(img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else img.max()))
        out.append(t.permute(2, 0, 1).contiguous())
    return out


def dead_leaves(n: int, size: int, g: torch.Generator, device) -> torch.Tensor:
    """n synthetic images (n, 3, size, size): 64 random discs/squares with random colours and gradients."""
    k = 64
    yy, xx = torch.meshgrid(torch.arange(size, device=device), torch.arange(size, device=device), indexing="ij")
    r = lambda *s: torch.rand(*s, generator=g, device=g.device).to(device)  # noqa: E731
    cx, cy = r(n, k, 1, 1) * size, r(n, k, 1, 1) * size
    rad = (size * (0.02 + 0.3 * r(n, k, 1, 1) ** 3))
    square = r(n, k, 1, 1) < 0.3
    dx, dy = (xx - cx), (yy - cy)
    inside = torch.where(square, torch.maximum(dx.abs(), dy.abs()) < rad, dx**2 + dy**2 < rad**2)
    order = torch.arange(1, k + 1, device=device).view(1, k, 1, 1)
    top = (inside * order).argmax(dim=1)  # (n, H, W): index of the shape painted last at each pixel
    colour = r(n, k, 3)
    grad = (r(n, k, 6) - 0.5) * 0.6 / size  # per-shape colour gradient along x and y
    pick = lambda t: torch.gather(t, 1, top.view(n, -1, 1).expand(-1, -1, t.shape[2]))  # noqa: E731
    c, gr = pick(colour), pick(grad)  # (n, H*W, 3), (n, H*W, 6)
    px, py = (xx - size / 2).reshape(1, -1, 1), (yy - size / 2).reshape(1, -1, 1)
    img = (c + gr[..., :3] * px + gr[..., 3:] * py).permute(0, 2, 1).reshape(n, 3, size, size)
    img = img + 0.03 * torch.randn(n, 3, size, size, generator=g, device=g.device).to(device) * r(n, 1, 1, 1)
    return img.clamp(0, 1)


def colour_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Hue rotation about the grey axis, saturation and brightness jitter, random channel order."""
    n = x.shape[0]
    dev = x.device
    r = lambda *s: torch.rand(*s, generator=g, device=g.device).to(dev)  # noqa: E731
    theta = r(n) * 2 * math.pi
    a = torch.ones(3, device=dev) / math.sqrt(3)
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    K = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], device=dev)
    R = cos * torch.eye(3, device=dev) + sin * K + (1 - cos) * torch.outer(a, a)  # Rodrigues
    y = torch.einsum("nij,njhw->nihw", R, x)
    grey = y.mean(dim=1, keepdim=True)
    y = grey + (y - grey) * (0.6 + 0.9 * r(n, 1, 1, 1))
    y = y * (0.75 + 0.5 * r(n, 1, 1, 1))
    # random gamma (0.5..2): many dark and many bright scenes, which a few photos lack (dark areas came out lifted)
    y = y.clamp(0, 1) ** torch.exp((r(n, 1, 1, 1) * 2 - 1) * math.log(2))
    perm = torch.stack([torch.randperm(3, generator=g, device=g.device) for _ in range(n)]).to(dev)
    y = torch.gather(y, 1, perm[:, :, None, None].expand_as(y))
    return y.clamp(0, 1)


def photo_crops(photos, n: int, size: int, g: torch.Generator, device, wide: bool = False) -> torch.Tensor:
    """Random crops resized to size x size. wide: each crop covers 40-100% of the photo's short side, so the
    crop has the whole-image mix of content that GroupNorm sees at inference (its statistics span the image)."""
    out = []
    for _ in range(n):
        p = photos[int(torch.randint(len(photos), (1,), generator=g, device=g.device))]
        scale = 0.5 + float(torch.rand(1, generator=g, device=g.device))  # random zoom 0.5x-1.5x
        h, w = p.shape[1:]
        s = min(int(size / scale), h, w) if not wide else int(min(h, w) * (0.4 + 0.6 * scale / 1.5))
        y0 = int(torch.randint(h - s + 1, (1,), generator=g, device=g.device))
        x0 = int(torch.randint(w - s + 1, (1,), generator=g, device=g.device))
        crop = p[:, y0:y0 + s, x0:x0 + s][None].to(device)
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        if torch.rand(1, generator=g, device=g.device) < 0.5:
            crop = crop.flip(-1)
        out.append(crop)
    return colour_augment(torch.cat(out).clamp(0, 1), g)


def flat_fields(n: int, size: int, g: torch.Generator, device) -> torch.Tensor:
    """n nearly featureless images: a uniform colour or a gentle linear gradient, faint noise on some. Colours
    often sit at the ends of the range (near-black, near-white, saturated primaries). Such images give GroupNorm
    almost no variance, so whatever the zero padding adds at the borders is amplified: without them in training,
    v1 learned a blob in the top-right corner and drifted flat colours by up to 30 levels."""
    r = lambda *s: torch.rand(*s, generator=g, device=g.device).to(device)  # noqa: E731
    colour = r(n, 3, 1, 1)
    extreme = r(n, 3, 1, 1) < 0.3
    colour = torch.where(extreme, (colour > 0.5).float() * 0.96 + 0.02 * r(n, 3, 1, 1), colour)
    ramp = torch.linspace(-0.5, 0.5, size, device=device)
    slope = (r(n, 3, 2) - 0.5) * 0.4 * (r(n, 1, 1) < 0.5)          # half of them exactly uniform
    img = colour + slope[..., 0, None, None] * ramp.view(1, 1, 1, -1) + slope[..., 1, None, None] * ramp.view(1, 1, -1, 1)
    noise = 0.02 * torch.randn(n, 3, size, size, generator=g, device=g.device).to(device) * (r(n, 1, 1, 1) < 0.3)
    return (img + noise).clamp(0, 1)


def letterbox(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    """With probability p per image: the image shrunk to 40-90% of each side and placed at a random spot on a
    flat canvas (black half the time, else a random colour), as letterboxed frames and scans with dark surrounds
    come. Their corners are flat while the image's statistics come from its content: the case in which v1's
    decoder still drew its corner blob after flat fields were in training (it grows where nothing hides it)."""
    out = x.clone()
    n, _, size, _ = x.shape
    r = lambda: float(torch.rand(1, generator=g))  # noqa: E731
    for i in range(n):
        if r() >= p:
            continue
        h, w = (max(8, int(size * (0.4 + 0.5 * r()))) for _ in range(2))
        y0, x0 = int(r() * (size - h)), int(r() * (size - w))
        canvas = torch.zeros(3, 1, 1) if r() < 0.5 else torch.rand(3, 1, 1, generator=g)
        out[i] = canvas.to(x.device).expand(3, size, size)
        out[i, :, y0:y0 + h, x0:x0 + w] = F.interpolate(x[i:i + 1], size=(h, w), mode="bilinear", antialias=True)[0]
    return out


def batch(photos, n, size, g, device, wide=False, flat=0.0, boxed=0.0):
    """n images in [-1, 1]: half photo crops (a `boxed` fraction of them letterboxed), the rest dead leaves, and a
    `flat` fraction of flat fields."""
    k, f = n // 2, int(round(n * flat))
    crops = photo_crops(photos, k, size, g, device, wide)
    parts = [letterbox(crops, boxed, g) if boxed else crops, dead_leaves(n - k - f, size, g, device)]
    if f:
        parts.append(flat_fields(f, size, g, device))
    return torch.cat(parts) * 2 - 1


def border_weights(size: int, width: int, extra: float, device) -> torch.Tensor:
    """(1, 1, size, size) loss weights: 1 inside, 1 + extra within `width` pixels of an edge (where zero padding
    lets a decoder learn position-dependent artefacts, and where they are most visible)."""
    i = torch.arange(size, device=device)
    edge = torch.minimum(i, size - 1 - i) < width
    return (1 + extra * (edge[:, None] | edge[None, :]).float())[None, None]


def step_size(args, g: torch.Generator) -> tuple[int, int]:
    """This step's crop side and batch: one of --sizes, the batch scaled so each step has --batch x --size^2 pixels."""
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [args.size]
    size = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
    return size, max(2, round(args.batch * args.size**2 / size**2))


def psnr(a, b):
    return (10 * torch.log10(4.0 / F.mse_loss(a.float(), b.float()))).item()


@torch.no_grad()
def calibrate(model: AutoencoderKL, fixed: list[FixedGroupNorm], x: torch.Tensor) -> None:
    """Each FixedGroupNorm's statistics := the mean over the images of x of the per-image group mean and variance
    its input has in the model as it is, one norm after another in the order the forward pass meets them."""
    z = model.encode(x).mean   # the encoder is not touched: its latents serve every pass
    order = []
    hooks = [n.register_forward_pre_hook(lambda m, inp: order.append(m)) for n in fixed]
    model.decode(z[:1])
    for h in hooks:
        h.remove()
    for norm in order:
        seen = []
        hook = norm.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
        model.decode(z)
        hook.remove()
        h = seen[0].float()
        b, c = h.shape[:2]
        g = h.reshape(b, norm.num_groups, -1)
        mean = g.mean(-1).mean(0).repeat_interleave(c // norm.num_groups)
        var = g.var(-1, unbiased=False).mean(0).repeat_interleave(c // norm.num_groups)
        norm.fixed_mean.copy_(mean)
        norm.fixed_var.copy_(var)


def train(args):
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoencoderKL(AEConfig(**ARCH, attn_window=args.attn_window)).to(device)
    ema = AutoencoderKL(AEConfig(**ARCH, attn_window=args.attn_window)).to(device).requires_grad_(False)
    if args.init_weights and not (out / "ckpt.pt").exists():  # fine-tune exported (fp16) weights, e.g. v1's
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(args.init_weights).items()})
        print(f"initialised from {args.init_weights}")
    if args.fixed_norm_decoder:
        fixed = fix_norms(model.decoder)
        fix_norms(ema.decoder)
        if not (out / "ckpt.pt").exists():   # calibrated once, on photo crops; then trained as weights are
            calib_g = torch.Generator().manual_seed(args.seed + 1)
            calibrate(model, fixed, batch([p.to(device) for p in load_photos()], 16, 256, calib_g, device))
            print("decoder norms fixed to calibrated statistics")
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    step, log = 0, []
    ckpt = out / "ckpt.pt"
    if args.init and not ckpt.exists():  # start a new run (new schedule, fresh optimizer) from other weights
        init = torch.load(args.init, map_location=device, weights_only=True)
        model.load_state_dict(init["ema"])
        ema.load_state_dict(init["ema"])
        step, log = init["step"], json.loads(init["log"])
        print(f"initialised from {args.init} (step {step})")
    start = step
    if args.freeze_encoder:  # the latents (and their scale) stay as they are; only the decoder learns
        model.encoder.requires_grad_(False)
        model.quant_conv.requires_grad_(False)
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["gen"].cpu())  # map_location moved it to the training device
        step, log = state["step"], json.loads(state["log"])
        print(f"resumed at step {step}")
    photos = [p.to(device) for p in load_photos()]
    t_end = time.time() + args.minutes * 60
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)
    t0, last_save = time.time(), time.time()
    total = args.steps and start + args.steps
    if ckpt.exists():
        total, start = state.get("total", total), state.get("start", 0)
        if args.restart:  # a new cosine cycle from here (warm restart), e.g. to continue after a finished run
            total, start = args.steps and step + args.steps, step
    while (total == 0 or step < total) and time.time() < t_end:
        if total == 0 and step == start + 100:  # --steps 0: fit the cosine schedule to --minutes from the measured rate
            rate = (step - start) / (time.time() - t0)
            total = int(step + rate * (t_end - time.time()))
            print(f"schedule fixed at {total} steps ({rate:.2f} steps/s); rerun with --steps {total} to reproduce")
        progress = min((step - start) / max(total - start, 1), 1.0) if total else 0.0
        lr = args.lr * min(1.0, (step - start + 1) / 200) * (0.5 * (1 + math.cos(math.pi * progress)) * 0.95 + 0.05)
        for group in opt.param_groups:
            group["lr"] = lr
        size, n = step_size(args, g)
        x = batch(photos, n, size, g, device, args.wide_crops, args.flat, args.letterbox)
        with torch.autocast(**amp):
            with torch.set_grad_enabled(not args.freeze_encoder):
                post = model.encode(x)
            noise = torch.randn(post.mean.shape, generator=g).to(device)
            z = post.mean if step < args.warmup_det else post.mean + post.std * noise
            rec = model.decode(z).float()
        w = border_weights(size, 16, args.border_weight, device)
        l1 = ((rec - x).abs() * w).mean() / w.mean()
        mse = (((rec - x) ** 2) * w).mean() / w.mean()
        low = F.mse_loss(F.avg_pool2d(rec, 8), F.avg_pool2d(x, 8))
        kl = post.kl().float().mean() / x[0].numel()
        loss = l1 + mse + args.low_weight * low + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        step += 1
        if device.type == "cuda" and step == 20:
            print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        if step % 50 == 0:
            rec_psnr = psnr(rec.detach().clamp(-1, 1), x)
            log.append({"step": step, "loss": round(loss.item(), 5), "psnr": round(rec_psnr, 2),
                        "kl": round(kl.item(), 4), "lr": lr, "sec": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
        if time.time() - last_save > args.save_every:
            save(ckpt, model, ema, opt, g, step, log, total, start)
            last_save = time.time()
    save(ckpt, model, ema, opt, g, step, log, total, start)
    print(f"stopped at step {step} after {time.time() - t0:.0f}s")


def save(path, model, ema, opt, g, step, log, total, start=0):
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "gen": g.get_state(), "step": step, "total": total, "start": start, "log": json.dumps(log)}, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint


def windowed(attn: torch.nn.Module, window: int):
    """attn's forward run separately on window x window tiles: the token count it was trained with."""
    def forward(x):
        out = torch.empty_like(x)
        for i in range(0, x.shape[2], window):
            for j in range(0, x.shape[3], window):
                out[:, :, i:i + window, j:j + window] = type(attn).forward(attn, x[:, :, i:i + window, j:j + window])
        return out
    return forward


def load_model(path: Path, which: str, attn_window: int = 0) -> tuple[AutoencoderKL, dict]:
    """An inference model with the `which` weights ("ema" or "model") of a checkpoint written here, and the checkpoint."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    norm = "fixed" if any(k.endswith("fixed_mean") for k in state[which]) else "group"   # --fixed-norm-decoder
    model = AutoencoderKL(AEConfig(**ARCH, attn_window=attn_window, decoder_norm=norm)).eval().requires_grad_(False)
    model.load_state_dict(state[which])
    return model, state


def distil_mid(args):
    """Teach the decoder's mid block to behave on whole photos as it does on training crops.

    Trained on crops of 96-128 px, the mid attention saw 144-256 latent tokens; on a whole photo it sees
    thousands, its softmax averages over far more keys and the decoder lifts colours (measured with
    `check --windowed`: the same attention on 16x16 windows gains 0.1-3.7 dB per whole training photo).
    Fixed here at latent resolution, which is cheap: the student is the mid block with global attention, the
    teacher the same block frozen with its attention on --window x --window tiles, both fed the decoder's
    conv_in features of whole-photo latents (training photos and synthetic images at 128-512 px). Only
    decoder.mid changes; the encoder, hence the latents and their scale, stay as they are."""
    import copy

    torch.manual_seed(args.seed)
    out = Path(args.out)
    model, state = load_model(out / "ckpt.pt", args.export_from)
    mid = model.decoder.mid
    teacher = copy.deepcopy(mid)
    teacher.attn_1.forward = windowed(teacher.attn_1, args.window)
    g = torch.Generator().manual_seed(args.seed)
    photos = load_photos()
    with torch.no_grad():  # a fixed bank of conv_in features of whole-image latents, wide crops every third
        bank = [model.decoder.conv_in(model.encode(batch(photos, 2, (128, 256, 384, 512)[i % 4], g, "cpu",
                                                         wide=i % 3 == 0)).mean) for i in range(48)]
    mid.requires_grad_(True)
    opt = torch.optim.Adam(mid.parameters(), lr=args.lr)
    log, t0 = [], time.time()
    for step in range(args.steps):
        h = bank[int(torch.randint(len(bank), (1,), generator=g))]
        with torch.no_grad():
            target = teacher.block_2(teacher.attn_1(teacher.block_1(h)))
        loss = F.mse_loss(mid.block_2(mid.attn_1(mid.block_1(h))), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log.append({"step": step + 1, "loss": round(loss.item(), 5), "sec": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    weights = model.state_dict()
    save_state = {"model": weights, "ema": weights, "step": state["step"],
                  "log": json.dumps(json.loads(state["log"]) + [{"distil_mid": log}])}
    tmp = out / "distilled.tmp"
    torch.save(save_state, tmp)
    os.replace(tmp, out / "distilled.pt")
    print(f"wrote {out / 'distilled.pt'}; export it with --ckpt distilled.pt")


CHECK_PHOTOS = ["astronaut", "chelsea", "coffee", "retina", "rocket", "motorcycle_left"]


@torch.no_grad()
def check(args):
    """Whole training photos through a checkpoint, PSNR against the bicubic 8x reference: how the model does on
    whole images rather than crops, without looking at the held-out photos. Photos are cropped to multiples of
    128 (halved first when larger than 600x800). --windowed: the decoder's mid attention on --window tiles."""
    model, state = load_model(Path(args.out) / args.ckpt, args.export_from, args.attn_window)
    if args.windowed:
        model.decoder.mid.attn_1.forward = windowed(model.decoder.mid.attn_1, args.window)
    margins = []
    for name, p in zip(PHOTOS, load_photos()):
        if name not in CHECK_PHOTOS:
            continue
        x = p[None] * 2 - 1
        if x.shape[2] * x.shape[3] > 600 * 800:
            x = F.interpolate(x, scale_factor=0.5, mode="area")
        x = x[:, :, :x.shape[2] // 128 * 128, :x.shape[3] // 128 * 128]
        rec = model.decode(model.encode(x).mean).clamp(-1, 1)
        small = F.interpolate(x, scale_factor=1 / 8, mode="bicubic", antialias=True)
        bicubic = F.interpolate(small, scale_factor=8, mode="bicubic").clamp(-1, 1)
        ours, ref = psnr(rec, x), psnr(bicubic, x)
        bias = ((rec - x).mean((2, 3))[0] * 127.5).tolist()  # mean colour error in 8-bit levels, per channel
        margins.append(ours - ref)
        edges = edge_errors(rec[0] * 127.5, x[0] * 127.5)   # 8-bit levels
        print(json.dumps({"photo": name, "size": list(x.shape[2:]), "psnr": round(ours, 2), "bicubic8": round(ref, 2),
                          "mean_error_rgb": [round(b, 1) for b in bias],
                          "corners": [round(c, 1) for c in edges["corners"]], "median_block": round(edges["median"], 1)}))
    flat = torch.tensor(FLAT_COLOURS, dtype=torch.float32).view(-1, 3, 1, 1).expand(-1, 3, 256, 256) / 127.5 - 1
    rec = model.decode(model.encode(flat).mean).clamp(-1, 1)
    worst_channel = ((rec - flat).abs().mean((2, 3)) * 127.5).amax(1)        # per colour, levels
    frames = [edge_errors(r * 127.5, f * 127.5) for r, f in zip(rec, flat)]
    print(json.dumps({"flat_worst_channel_error": [round(float(v), 1) for v in worst_channel],
                      "flat_border_over_centre": [round(e["border"] / max(e["centre"], 1e-6), 1) for e in frames]}))
    print(json.dumps({"step": state["step"], "mean_margin": round(sum(margins) / len(margins), 2)}))


@torch.no_grad()
def export(args):
    """EMA (or raw) weights -> fp16 safetensors; scale/shift from the training photos so scaled latents have unit variance."""
    import hashlib

    from safetensors.torch import save_file

    model, state = load_model(Path(args.out) / args.ckpt, args.export_from, args.attn_window)
    zs = []
    for p in load_photos():
        h, w = (s // 8 * 8 for s in p.shape[1:])
        zs.append(model.encode(p[None, :, :h, :w] * 2 - 1).mean.flatten())
    z = torch.cat(zs)
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    dest = Path(args.dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # fp16 weights; a fixed norm's statistics (measured, not trained; a few kB) are kept as measured, in float32
    sd = {k: (v.float() if ".fixed_" in k else v.half()).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(dest), metadata={"step": str(state["step"]), "scaling_factor": f"{scale:.5f}",
                                       "shift_factor": f"{shift:.5f}"})
    sha = hashlib.sha256(dest.read_bytes()).hexdigest()
    print(json.dumps({"weights": str(dest), "sha256": sha, "scaling_factor": round(scale, 5),
                      "shift_factor": round(shift, 5), "step": state["step"], "bytes": dest.stat().st_size}))
    (Path(args.out) / "loss_log.json").write_text(state["log"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["train", "distil-mid", "check", "export"])
    ap.add_argument("--out", default="runs/default")
    ap.add_argument("--ckpt", default="ckpt.pt", help="checkpoint in --out that export reads (distil-mid writes distilled.pt)")
    ap.add_argument("--window", type=int, default=16,
                    help="distil-mid: the teacher's attention window in latent tokens; check --windowed: the same")
    ap.add_argument("--windowed", action="store_true", help="check: the decoder's mid attention on --window tiles")
    ap.add_argument("--attn-window", type=int, default=0,
                    help="train, check, export: every attention block on tiles of this many latent pixels a side, as "
                         "models.toml's attn_window runs them (0: whole)")
    ap.add_argument("--dest", default="latentctl/weights/default.safetensors")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20000, help="length of the cosine schedule; 0 fits it to --minutes")
    ap.add_argument("--minutes", type=float, default=1e9, help="stop (and save) after this long; resume later")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--sizes", default="", help="crop sides to draw from each step, e.g. 128,256,384 (batch scaled "
                                                "to --batch x --size^2 pixels); default: --size only")
    ap.add_argument("--flat", type=float, default=0.0, help="fraction of each batch that is flat fields (uniform "
                                                            "colours and gentle gradients)")
    ap.add_argument("--letterbox", type=float, default=0.0, help="fraction of photo crops letterboxed on a flat canvas")
    ap.add_argument("--border-weight", type=float, default=0.0,
                    help="extra loss weight on pixels within 16 px of an edge (0: none)")
    ap.add_argument("--init-weights", help="exported .safetensors weights that start a new run in an empty --out")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--kl-weight", type=float, default=1e-6)
    ap.add_argument("--low-weight", type=float, default=2.0)
    ap.add_argument("--warmup-det", type=int, default=500)
    ap.add_argument("--save-every", type=float, default=120, help="seconds between checkpoints")
    ap.add_argument("--wide-crops", action="store_true", help="photo crops span 40-100%% of the photo (whole-image statistics)")
    ap.add_argument("--export-from", choices=["ema", "model"], default="ema",
                    help="weights to export: the EMA, or the raw weights (after a short fine-tune the EMA lags)")
    ap.add_argument("--init", help="checkpoint whose EMA weights start a new run in an empty --out")
    ap.add_argument("--freeze-encoder", action="store_true", help="train the decoder only (latents stay as they are)")
    ap.add_argument("--fixed-norm-decoder", action="store_true",
                    help="experiment: the decoder's GroupNorms use calibrated fixed statistics (FixedGroupNorm)")
    ap.add_argument("--restart", action="store_true", help="on resume, start a new cosine cycle of --steps steps")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("TRAIN_THREADS", torch.get_num_threads())))
    {"train": train, "distil-mid": distil_mid, "check": check, "export": export}[args.cmd](args)


if __name__ == "__main__":
    main()
