"""Option definitions shared by the commands, so a flag reads the same everywhere."""

from pathlib import Path
from typing import Optional

import typer

Model = typer.Option(None, "--model", "-m", help="Model name from models.toml (default: the shipped 'default').")
Weights = typer.Option(None, "--weights", "-w", help="Weights file or diffusers folder (overrides the model's).")
ModelsFile = typer.Option(None, "--models", help="Extra models.toml that adds or overrides entries.")
Device = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
Dtype = typer.Option("auto", "--dtype", help="Compute precision: auto | fp32 | bf16 | fp16. auto picks the fastest "
                                               "safe one: bf16 on GPUs and on CPUs with bf16 kernels (AVX-512 BF16/AMX), else fp32.")
Attn = typer.Option("sdpa", "--attn", help="Attention backend: sdpa (torch, default) | xformers (CUDA, optional "
                                           "extra) | linear (O(N); on ordinary checkpoints an approximation).")
ScalingFactor = typer.Option(None, "--scaling-factor", help="Latent scale: model-ready = (z - shift) * scale. "
                             "Default: the model's entry, the weights' config.json, or the published file's.")
ShiftFactor = typer.Option(None, "--shift-factor", help="Latent shift (default: from the same place as the scale, "
                                                        "else 0).")
Download = typer.Option(False, "--download", help="Download the model's weights if they are not on this machine.")
Json = typer.Option(False, "--json", help="One JSON object per line on stdout.")
Quiet = typer.Option(False, "--quiet", "-q", help="No progress or summary on stderr (errors still shown).")

# encode / decode / roundtrip
BatchSize = typer.Option(4, "--batch-size", "-b", help="Images per model call (images of equal size are batched).")
Workers = typer.Option(None, "--workers", help="Threads that read/prepare inputs, and as many that write outputs "
                                               "(default: the number of CPUs, at most 8).")
Store = typer.Option("mean", "--store", help="What `latent` holds: mean (the posterior mean, default) | sample (a "
                                             "draw, reproducible with --seed) | posterior (also raw `mean` and "
                                             "`logvar`, to draw a fresh sample every epoch).")
Seed = typer.Option(None, "--seed", help="Seed for --store sample (per image: from the seed and the image's path). "
                                         "Without it one is drawn and recorded in each file.")
LatentDtype = typer.Option("fp16", "--latent-dtype", help="Storage precision of latent files: fp16 (default) | bf16 | "
                           "fp32. fp16 halves the size of fp32 and keeps 3 more mantissa bits than bf16; model-ready "
                           "latents are near unit scale, far below fp16's limit (65504), and a latent that would "
                           "overflow is refused, never written as inf.")
Resize = typer.Option(None, "--resize", help="Scale the short side to this many pixels first (antialiased bicubic).")
CenterCrop = typer.Option(None, "--center-crop", help="Keep the central WxH pixels (after --resize), e.g. 512x512.")
AlphaBackground = typer.Option("white", "--alpha-background", help="Colour transparent pixels are composited on: "
                                                                   "white | black | gray | #rrggbb.")
MaxPixels = typer.Option(100_000_000, "--max-pixels", help="Refuse images with more pixels than this (read from the "
                                                           "header, before decoding).")
Overwrite = typer.Option(False, "--overwrite", help="Redo outputs that already exist (default: skip complete ones).")
VerifySources = typer.Option(False, "--verify-sources", help="On a rerun, hash every source to decide whether its "
                             "output is still current (default: only when its size or mtime changed).")
KeepExt = typer.Option(False, "--keep-ext", help="Keep the input's extension in output names (a.jpg -> "
                       "a.jpg.safetensors), so a.jpg and a.png in one folder both get an output.")
Root = typer.Option(None, "--root", help="Input root the output paths mirror (default: the deepest folder holding "
                    "all inputs; files named directly or on stdin count by their folder).")
Null = typer.Option(False, "--null", "-0", help="Paths on stdin are separated by NUL bytes (find -print0), not lines.")
FailFast = typer.Option(False, "--fail-fast", help="Stop at the first input that fails (default: report it, go on).")
Tile = typer.Option("auto", "--tile", help="Tiled encode/decode for large images: auto | on | off.")
TileSize = typer.Option(None, "--tile-size", help="Tile side in pixels for --tile (default: chosen from memory).")
MaxMemory = typer.Option(None, "--max-memory", help="Memory budget for --tile auto, e.g. 8G or 512M.")
SpillDir = typer.Option(None, "--spill-dir", help="Folder where tiling may keep whole activations that do not fit "
                                                  "--max-memory instead of recomputing them (default: the system "
                                                  "temp folder; 'none': never).")
Buckets = typer.Option(None, "--buckets", help="Aspect-ratio buckets: sd15 (~512² area) | sdxl | flux (~1024²) | "
                       "area=1024x1024,step=64,min=512,max=2048,aspect=4 | an explicit list 1024x1024,1152x896,... "
                       "Each image is resized to cover the bucket nearest its aspect ratio (antialiased) and cropped.")
Crop = typer.Option("center", "--crop", help="With --buckets: center | random (reproducible with --seed).")
TooSmall = typer.Option("upscale", "--too-small", help="With --buckets, an image smaller than its bucket (it would be "
                                                     "enlarged): upscale (default) | skip (reported as skipped).")
Flip = typer.Option(False, "--flip", help="With --buckets: also store `latent_flipped`, the latent of the mirrored "
                                          "crop, computed in the same batch.")
ImageFormat = typer.Option(None, "--format", help="Files written: for images png (default) | jpg | webp; for clips "
                                                  "mp4 (default) | gif | webp, or png | jpg: a folder of frames.")

# clips (videos, animated GIF/WebP/PNG)
FrameStep = typer.Option(1, "--frame-step", help="Clips: encode every Nth frame.")
Fps = typer.Option(None, "--fps", help="Clips: resample to this rate by timestamp (the first frame in each 1/F "
                                       "seconds; never above the clip's own rate).")
MaxFrames = typer.Option(None, "--max-frames", help="Clips: stop after this many selected frames.")
Start = typer.Option(0.0, "--start", help="Clips: first second to encode.")
End = typer.Option(None, "--end", help="Clips: encode frames before this second.")
Quality = typer.Option(95, "--quality", help="JPEG/WebP quality (1-100).")

# scale-out (latentctl/dist)
Shard = typer.Option(None, "--shard", help="Do part K of N (K from 0), e.g. 0/4: N runs with K = 0..N-1 together do "
                                           "every input once. Default: from torchrun (RANK, WORLD_SIZE) or SLURM "
                                           "(SLURM_PROCID, SLURM_NTASKS), else everything.")
ShardBy = typer.Option("bytes", "--shard-by", help="Balance the N parts by input bytes (default) or by count.")
Engine = typer.Option("threads", "--engine", help="threads: this process (default) | ray: a Ray Data pipeline "
                                                  "(pip install 'latentctl[ray]'), on a local cluster or --ray-address.")
RayAddress = typer.Option(None, "--ray-address", help="Ray cluster to join with --engine ray (e.g. auto, "
                                                      "ray://head:10001); default: start a local one.")

__all__ = ["AlphaBackground", "Attn", "BatchSize", "Buckets", "CenterCrop", "Crop", "Device", "Download", "Dtype", "End",
           "Engine", "FailFast", "Flip", "Fps", "FrameStep", "ImageFormat", "Json", "KeepExt", "LatentDtype",
           "MaxFrames", "MaxMemory", "MaxPixels", "Model", "ModelsFile", "Null", "Optional", "Overwrite", "Path",
           "Quality", "Quiet", "RayAddress", "Resize", "Root", "ScalingFactor", "Seed", "Shard", "ShardBy",
           "ShiftFactor", "SpillDir", "Start", "Store", "Tile", "TileSize", "TooSmall", "VerifySources", "Weights",
           "Workers"]
