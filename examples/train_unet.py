"""Train latentctl's timestep-conditioned U-Net (`latentctl.modules.Model`) as a DDPM denoiser on a bucketed latent
folder: noise-prediction loss, batches of one bucket from BucketBatchSampler, items from LatentDataset.

    latentctl encode imgs/ -o latents/ --buckets sd15 --flip --store posterior
    python examples/train_unet.py latents/ --steps 200

Prints the loss of every step and, at the end, the mean of the first and the last 10 steps. Small by default
(ch 32, two levels) so that a few dozen steps run in seconds on a CPU; a proof of use, not a recipe.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from latentctl.data import BucketBatchSampler, LatentDataset
from latentctl.modules.unet import Model


def ddpm_schedule(steps: int = 1000) -> torch.Tensor:
    """alpha-bar_t for DDPM's linear betas 1e-4 .. 0.02."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


def main(argv=None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("latents", help="folder written by `latentctl encode` (ideally with --buckets)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ch", type=int, default=32, help="U-Net base width")
    ap.add_argument("--flip", default="random", help="never | random | always (random/always need encode --flip)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    ap.add_argument("--json", action="store_true", help="print the losses as one JSON list at the end")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = LatentDataset(args.latents, flip=args.flip, seed=args.seed)
    sampler = BucketBatchSampler(data, batch_size=args.batch_size, seed=args.seed)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=args.workers)
    channels = data.shapes[0][0]
    model = Model(ch=args.ch, out_ch=channels, ch_mult=(1, 2), num_res_blocks=1, in_channels=channels,
                  resolution=64).to(args.device)  # latent sides must be even (one downsample)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    alpha_bar = ddpm_schedule().to(args.device)
    g = torch.Generator().manual_seed(args.seed)  # timesteps and noise: the same run on every machine

    losses, step, epoch, started = [], 0, 0, time.perf_counter()
    while step < args.steps:
        sampler.set_epoch(epoch)
        data.set_epoch(epoch)
        for batch in loader:
            x0 = batch["latent"].to(args.device)                              # (B, C, h, w), one bucket
            t = torch.randint(0, len(alpha_bar), (x0.shape[0],), generator=g).to(args.device)
            noise = torch.randn(x0.shape, generator=g).to(args.device)
            a = alpha_bar[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise                          # q(x_t | x_0)
            loss = F.mse_loss(model(xt, t), noise)                                # predict the noise
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            print(f"step {step:4d}  epoch {epoch}  bucket {batch['bucket'][0]:>9}  loss {loss.item():.4f}", flush=True)
            step += 1
            if step == args.steps:
                break
        epoch += 1
    k = min(10, len(losses))
    print(f"{step} steps in {time.perf_counter() - started:.1f} s; mean loss of the first {k}: "
          f"{sum(losses[:k]) / k:.4f}, of the last {k}: {sum(losses[-k:]) / k:.4f}")
    if args.json:
        print(json.dumps(losses))
    return losses


if __name__ == "__main__":
    main()
