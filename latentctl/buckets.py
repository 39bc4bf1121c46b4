"""Aspect-ratio buckets and crops, as trainers use them (pure functions: sizes in, sizes and boxes out).

A bucket is a training resolution (width, height) of about a target area with sides multiples of `step`. Each
image goes to the bucket nearest its aspect ratio (in log space, so 2:1 and 1:2 are equally far from 1:1), is
resized to *cover* the bucket (the smaller scale that makes both sides at least the bucket's) and cropped to it.

Bucket lists are made as kohya's sd-scripts makes them: for every width from `min_side` to `max_side` in steps of
`step`, the largest multiple of `step` as height whose area stays within the target (capped at `max_side`), the
same pairs transposed, and the square; here also limited to `max_aspect`. The presets:

    sd15   area 512x512,   step 64, sides 256..1024, aspect <= 4   (kohya's defaults at --resolution 512)
    sdxl   area 1024x1024, step 64, sides 512..2048, aspect <= 4   (SDXL's own 1024 list: 512x2048 ... 2048x512)
    flux   the same list as sdxl (Flux trains at about one megapixel too)

Sizes are (width, height); boxes are (left, top, right, bottom), in pixels of the resized image.
SDXL's conditioning values are (height, width)-style pairs, as SDXL's `add_time_ids` orders them.
"""

import hashlib
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .errors import Skip, UsageError

CROPS = ("center", "random")
TOO_SMALL = ("upscale", "skip")
PRESETS = {"sd15": "area=512x512,step=64,min=256,max=1024,aspect=4",
           "sdxl": "area=1024x1024,step=64,min=512,max=2048,aspect=4",
           "flux": "area=1024x1024,step=64,min=512,max=2048,aspect=4"}


@dataclass(frozen=True)
class Buckets:
    sizes: tuple[tuple[int, int], ...]  # (width, height), sorted by aspect ratio, wide last
    spec: str                           # the text they were made from (recorded in each file)


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its bucket, the size it is resized to, and the crop box in the resized image."""

    original: tuple[int, int]           # (width, height) of the image
    bucket: tuple[int, int]             # (width, height)
    resized: tuple[int, int]            # (width, height) after the cover resize
    box: tuple[int, int, int, int]      # crop in the resized image: (left, top, right, bottom)

    @property
    def upscaled(self) -> bool:
        return self.resized[0] > self.original[0] or self.resized[1] > self.original[1]

    @property
    def flipped_box(self) -> tuple[int, int, int, int]:
        """The same pixels' box in the mirrored resized image (what the flipped latent was cropped from)."""
        left, top, right, bottom = self.box
        return self.resized[0] - right, top, self.resized[0] - left, bottom


class TooSmall(Skip):
    """The image would have to be enlarged to fill its bucket (raised by place() with too_small='skip')."""


# --- making bucket lists -------------------------------------------------------------------------------------

def generate(area: int, step: int = 64, min_side: int | None = None, max_side: int | None = None,
             max_aspect: float = 4.0) -> tuple[tuple[int, int], ...]:
    """Buckets of at most `area` pixels, sides multiples of `step` in [min_side, max_side] (default: half and twice
    the side of the square of that area), aspect ratio at most `max_aspect`, plus the largest square."""
    side = math.sqrt(area)
    min_side = min_side if min_side is not None else max(step, int(side / 2) // step * step)
    max_side = max_side if max_side is not None else int(side * 2) // step * step
    sizes = set()
    square = int(side) // step * step
    if square >= step:
        sizes.add((square, square))
    for width in range(math.ceil(min_side / step) * step, max_side + 1, step):
        height = min(max_side, area // width // step * step)  # the largest step multiple within the area
        if height >= max(min_side, step) and max(width, height) <= max_aspect * min(width, height):
            sizes.update({(width, height), (height, width)})
    if not sizes:
        raise UsageError(f"no bucket fits area {area}, step {step}, sides {min_side}..{max_side}, "
                         f"aspect <= {max_aspect:g}")
    return _sorted(sizes)


def _sorted(sizes) -> tuple[tuple[int, int], ...]:
    return tuple(sorted(set(sizes), key=lambda s: (s[0] / s[1], s[0])))


def parse(text: str) -> Buckets:
    """'sd15' | 'sdxl' | 'flux' | 'area=1024x1024,step=64,min=512,max=2048,aspect=4' | '1024x1024,1152x896,...'.
    In the custom form only `area` is needed (a side: 768, WxH: 1024x768, or pixels: 786432)."""
    t = text.strip().lower()
    spec = PRESETS.get(t, t)
    if not spec:
        raise UsageError("--buckets: empty")
    if "=" not in spec:
        sizes = [_size(part, text) for part in spec.split(",") if part.strip()]
        return Buckets(_sorted(sizes), ",".join(f"{w}x{h}" for w, h in _sorted(sizes)))
    fields = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in ("area", "step", "min", "max", "aspect"):
            raise UsageError(f"--buckets {text!r}: {part.strip()!r} is not one of area=, step=, min=, max=, aspect=")
        fields[key] = value.strip()
    if "area" not in fields:
        raise UsageError(f"--buckets {text!r}: the custom form needs area= (e.g. area=1024x1024)")
    try:
        a = fields["area"]
        area = math.prod(_size(a, text)) if "x" in a else int(a) ** 2 if int(a) < 65536 else int(a)
        step = int(fields.get("step", 64))
        lo = int(fields["min"]) if "min" in fields else None
        hi = int(fields["max"]) if "max" in fields else None
        aspect = float(fields.get("aspect", 4))
    except ValueError:
        raise UsageError(f"--buckets {text!r}: area, step, min, max must be integers, aspect a number") from None
    if step < 1 or area < step * step or aspect < 1 or (lo is not None and hi is not None and lo > hi):
        raise UsageError(f"--buckets {text!r}: need step >= 1, area >= step², aspect >= 1, min <= max")
    canonical = f"area={area},step={step},min={lo if lo is not None else ''},max={hi if hi is not None else ''}," \
                f"aspect={aspect:g}"
    return Buckets(generate(area, step, lo, hi, aspect), t if t in PRESETS else canonical)


def _size(part: str, text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in part.strip().split("x"))
    except ValueError:
        raise UsageError(f"--buckets {text!r}: {part.strip()!r} is not WIDTHxHEIGHT") from None
    if w < 1 or h < 1:
        raise UsageError(f"--buckets {text!r}: {part.strip()!r} has a side below 1")
    return w, h


def check_factor(buckets: Buckets, factor: int) -> None:
    """Bucket sides must be multiples of the model's factor (nothing is padded in a bucket)."""
    bad = [f"{w}x{h}" for w, h in buckets.sizes if w % factor or h % factor]
    if bad:
        raise UsageError(f"--buckets: {', '.join(bad[:4])} not multiples of the model's factor {factor}")


# --- placing one image ------------------------------------------------------------------------------------------

def nearest(buckets: Buckets, width: int, height: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's in log space (ties: the larger, then the wider)."""
    ratio = math.log(width / height)
    return min(buckets.sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - ratio), 12), -s[0] * s[1], -s[0]))


def cover(width: int, height: int, bw: int, bh: int) -> tuple[int, int]:
    """The size (w, h) of the image scaled, aspect kept, to the smallest size that covers bw x bh."""
    if width * bh >= height * bw:  # wider than the bucket (or equal): the heights match
        return max(bw, round(width * bh / height)), bh
    return bw, max(bh, round(height * bw / width))


def crop_box(resized: tuple[int, int], bucket: tuple[int, int], crop: str = "center", *, seed: int = 0,
             key: str = "") -> tuple[int, int, int, int]:
    """The bucket-sized box in the resized image: central, or at an offset drawn from (seed, key), the same
    on every run, machine and order."""
    (rw, rh), (bw, bh) = resized, bucket
    if crop == "center":
        left, top = (rw - bw) // 2, (rh - bh) // 2
    elif crop == "random":
        digest = hashlib.sha256(f"{seed}:crop:{key}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "little"))
        left, top = rng.randint(0, rw - bw), rng.randint(0, rh - bh)
    else:
        raise UsageError(f"--crop {crop!r}: choose {', '.join(CROPS)}")
    return left, top, left + bw, top + bh


def place(buckets: Buckets, width: int, height: int, *, crop: str = "center", too_small: str = "upscale",
          seed: int = 0, key: str = "") -> Placement:
    """Bucket, resize and crop for a width x height image. With too_small='skip', an image that would have to be
    enlarged to cover its bucket raises TooSmall (with the reason); with 'upscale' it is enlarged."""
    if too_small not in TOO_SMALL:
        raise UsageError(f"--too-small {too_small!r}: choose {', '.join(TOO_SMALL)}")
    bucket = nearest(buckets, width, height)
    resized = cover(width, height, *bucket)
    p = Placement((width, height), bucket, resized, crop_box(resized, bucket, crop, seed=seed, key=key))
    if p.upscaled and too_small == "skip":
        scale = max(resized[0] / width, resized[1] / height)
        raise TooSmall(f"{width}x{height} is smaller than its bucket {bucket[0]}x{bucket[1]} (it would be enlarged "
                       f"{scale:.2f}x); --too-small upscale encodes it anyway")
    return p


def prepare(rgb, buckets: Buckets, *, crop: str = "center", too_small: str = "upscale", seed: int = 0,
            key: str = "") -> tuple[torch.Tensor, Placement]:
    """RGB (H, W, 3) in [0, 1] (numpy) -> model input (3, bh, bw) in [-1, 1] and its Placement."""
    h, w = rgb.shape[:2]
    p = place(buckets, w, h, crop=crop, too_small=too_small, seed=seed, key=key)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return apply(x, p).mul(2.0).sub(1.0).contiguous(), p


def apply(x: torch.Tensor, p: Placement) -> torch.Tensor:
    """Image (3, H, W) in [0, 1] -> its bucket-sized crop (3, bh, bw): antialiased bicubic resize, then crop."""
    if (x.shape[2], x.shape[1]) != p.resized:
        x = F.interpolate(x[None], size=(p.resized[1], p.resized[0]), mode="bicubic", antialias=True,
                          align_corners=False)[0].clamp(0.0, 1.0)  # bicubic overshoots at edges
    left, top, right, bottom = p.box
    return x[:, top:bottom, left:right]


# --- what is recorded ----------------------------------------------------------------------------------------------

def _pair(a: int, b: int) -> str:
    return f"{a},{b}"


def metadata(p: Placement, flipped: bool = False) -> dict[str, str]:
    """Strings for the latent file: the bucket, and SDXL's conditioning as (height, width)-style pairs:
    original_size (H, W of the image), crop_top_left (top, left of the crop in the resized image), target_size
    (H, W of the bucket); with a flipped latent the same for its crop in the mirrored image."""
    left, top = p.box[:2]
    meta = {"bucket": f"{p.bucket[0]}x{p.bucket[1]}", "original_size": _pair(p.original[1], p.original[0]),
            "crop_top_left": _pair(top, left), "target_size": _pair(p.bucket[1], p.bucket[0]),
            "upscaled": str(p.upscaled).lower()}
    if flipped:
        fl, ft = p.flipped_box[:2]
        meta |= {"crop_box_flipped": ",".join(map(str, p.flipped_box)), "crop_top_left_flipped": _pair(ft, fl)}
    return meta
