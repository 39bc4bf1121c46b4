"""One image in: decode, apply EXIF orientation, convert any pillow mode to RGB in [0, 1], resize/crop on request,
reflect-pad to the model's factor. One image out: encode to PNG/JPEG/WebP bytes.

Nothing is distorted silently: 16-bit images are scaled (not clipped), alpha is composited on a background the
user chooses, a size the model cannot take is padded (never stretched) and the valid box recorded.
"""

import io
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError, UsageError

# Our own limit (max_pixels, checked from the header before decoding) replaces pillow's global one,
# which would refuse a large image with an exception before the user's --max-pixels is consulted.
Image.MAX_IMAGE_PIXELS = None

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
NAMED_COLORS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5)}


@dataclass
class Loaded:
    """An image as float RGB (H, W, 3) in [0, 1], and how it was read."""

    rgb: np.ndarray
    mode: str                   # pillow mode of the file (e.g. "I;16", "CMYK", "RGBA")
    exif_transposed: bool       # an EXIF orientation other than "normal" was applied
    has_alpha: bool


@dataclass
class Geometry:
    """Where the encoded pixels came from. Sizes are (width, height); boxes are (left, top, right, bottom)."""

    width: int                          # original size, after EXIF orientation
    height: int
    resized: tuple[int, int] | None     # size after --resize, if any
    crop: tuple[int, int, int, int] | None   # --center-crop box in the resized image, if any
    valid: tuple[int, int, int, int]    # the image inside the padded one (padding is right/bottom only)
    padded: tuple[int, int]             # size fed to the model: a multiple of its factor


def parse_color(text: str) -> tuple[float, float, float]:
    """'white' | 'black' | 'gray' | '#rrggbb' -> RGB in [0, 1]."""
    t = text.strip().lower()
    if t in NAMED_COLORS:
        return NAMED_COLORS[t]
    h = t.lstrip("#")
    if len(h) == 6 and all(c in "0123456789abcdef" for c in h):
        return tuple(int(h[i:i + 2], 16) / 255 for i in (0, 2, 4))
    raise UsageError(f"--alpha-background {text!r}: use white, black, gray or #rrggbb")


def color_hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def parse_size(text: str, flag: str) -> tuple[int, int]:
    """'WxH' -> (W, H), both positive."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected WIDTHxHEIGHT, e.g. 512x512") from None
    if w <= 0 or h <= 0:
        raise UsageError(f"{flag} {text!r}: width and height must be positive")
    return w, h


def read_image(data: bytes, *, max_pixels: int, alpha_background=(1.0, 1.0, 1.0)) -> Loaded:
    """Decode image bytes (first frame of an animation) to float RGB. Raises InputError with the reason."""
    if not data:
        raise InputError("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError("not an image, or a format pillow cannot read") from None
    except (OSError, SyntaxError, ValueError) as e:  # pillow reports a broken header with any of these
        raise InputError(f"unreadable image header: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise InputError(f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} (raise it with --max-pixels)")
    if w == 0 or h == 0:
        raise InputError(f"image has no pixels ({w}x{h})")
    try:
        im.verify()  # checksums (PNG CRCs): a corrupted PNG would otherwise decode to garbage without a word
        im = Image.open(io.BytesIO(data))  # verify() leaves the image unusable: open it again
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"corrupt or truncated image ({_first_line(e)})") from None
    mode = im.mode
    transposed = _orientation(im) not in (None, 1)
    try:
        im.load()
        oriented = ImageOps.exif_transpose(im)
    except OSError as e:  # "image file is truncated", "broken data stream", decoder errors
        raise InputError(f"corrupt or truncated image ({e})") from None
    except (SyntaxError, ValueError, EOFError) as e:
        raise InputError(f"corrupt image ({type(e).__name__}: {e})") from None
    im = oriented if oriented is not None else im
    deep = _png_16bit_color(data)
    if deep is not None:  # pillow reads 16-bit RGB(A) PNGs as 8-bit: read the samples themselves
        rgb, has_alpha = _composite(_orient(deep, _orientation(im) or 1), alpha_background)
        return Loaded(rgb, mode + ";16", transposed, has_alpha)
    rgb, has_alpha = to_rgb(im, alpha_background)
    return Loaded(rgb, mode, transposed, has_alpha)


def _png_16bit_color(data: bytes) -> np.ndarray | None:
    """A 16-bit RGB or RGBA PNG as float32 (H, W, 3 or 4) in [0, 1] (via pypng), else None."""
    # PNG signature, then the IHDR chunk: length, b"IHDR", width, height, bit depth (byte 24), colour type (25)
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or data[24] != 16 or data[25] not in (2, 6):
        return None
    import png

    try:
        width, height, rows, info = png.Reader(bytes=data).asDirect()
        planes = info["planes"]
        a = np.vstack([np.asarray(row, dtype=np.uint16) for row in rows]).reshape(height, width, planes)
    except (png.Error, ValueError) as e:
        raise InputError(f"corrupt 16-bit PNG ({e})") from None
    return a.astype(np.float32) / 65535.0


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF orientation applied to an (H, W, C) array, as ImageOps.exif_transpose does to an image."""
    t = a.transpose(1, 0, 2)
    return {2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: t, 6: t[:, ::-1], 7: t[::-1, ::-1],
            8: t[::-1]}.get(orientation, a).copy()


def _composite(a: np.ndarray, background) -> tuple[np.ndarray, bool]:
    if a.shape[2] == 3:
        return a, False
    alpha = a[..., 3:4]
    return a[..., :3] * alpha + np.asarray(background, dtype=np.float32) * (1.0 - alpha), True


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _orientation(im: Image.Image):
    try:
        return im.getexif().get(0x0112)
    except Exception:  # a broken EXIF block must not fail an image that decodes
        return None


def to_rgb(im: Image.Image, background=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, bool]:
    """Any pillow mode -> (float32 (H, W, 3) in [0, 1], had alpha). 16-bit and float images keep their precision."""
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        gray = np.asarray(im, dtype=np.float32) / 65535.0
        return np.repeat(gray[..., None], 3, axis=2), False
    if mode == "I":  # 32-bit integers: what pillow gives for some 16-bit PNG/TIFF files
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise InputError(f"32-bit integer image with values {a.min()}..{a.max()}: only 0..65535 is supported")
        gray = a.astype(np.float32) / 65535.0
        return np.repeat(gray[..., None], 3, axis=2), False
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not np.isfinite(a).all() or (a.size and (a.min() < 0 or a.max() > 1)):
            raise InputError("floating-point image with values outside 0..1: range unknown, not converted")
        return np.repeat(a[..., None], 3, axis=2), False
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        a = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = a[..., 3:4]
        bg = np.asarray(background, dtype=np.float32)
        return a[..., :3] * alpha + bg * (1.0 - alpha), True
    # L, 1, P, RGB, CMYK, YCbCr, LAB, HSV, RGBX: pillow's own conversions are exact for these
    return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0, False


def prepare(rgb: np.ndarray, *, factor: int, resize: int | None = None,
            center_crop: tuple[int, int] | None = None) -> tuple[torch.Tensor, Geometry]:
    """RGB (H, W, 3) in [0, 1] -> model input (3, Hp, Wp) in [-1, 1] and its Geometry.

    --resize scales the short side to `resize` (antialiased bicubic); --center-crop takes the central WxH;
    then the image is reflect-padded on the right/bottom up to a multiple of `factor`.
    """
    h, w = rgb.shape[:2]
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    resized = crop = None
    if resize is not None:
        scale = resize / min(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
        x = x.clamp(0.0, 1.0)  # bicubic overshoots at edges
        resized = (nw, nh)
    if center_crop is not None:
        cw, ch = center_crop
        hh, ww = x.shape[1:]
        if cw > ww or ch > hh:
            raise InputError(f"{ww}x{hh} is smaller than --center-crop {cw}x{ch} (add --resize to scale it up first)")
        left, top = (ww - cw) // 2, (hh - ch) // 2
        x = x[:, top:top + ch, left:left + cw]
        crop = (left, top, left + cw, top + ch)
    vh, vw = x.shape[1:]
    ph, pw = math.ceil(vh / factor) * factor, math.ceil(vw / factor) * factor
    if (ph, pw) != (vh, vw):
        # reflect needs pad < size; a tiny image (a few pixels) repeats its edge instead
        how = "reflect" if ph - vh < vh and pw - vw < vw else "replicate"
        x = F.pad(x[None], (0, pw - vw, 0, ph - vh), mode=how)[0]
    geometry = Geometry(width=w, height=h, resized=resized, crop=crop, valid=(0, 0, vw, vh), padded=(pw, ph))
    return x.mul(2.0).sub(1.0).contiguous(), geometry


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model output (3, H, W) in [-1, 1] -> uint8 (H, W, 3), rounded."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


_RECORD_TAG = 0x010E  # EXIF ImageDescription: PNG, JPEG and WebP all carry EXIF


def encode_image(rgb: np.ndarray, fmt: str = "png", quality: int = 95, record: dict | None = None) -> bytes:
    """uint8 (H, W, 3) -> file bytes in `fmt` (png | jpg | webp); `record` (strings) is kept in the file's EXIF
    as JSON, for read_record."""
    buf = io.BytesIO()
    kwargs = {"compress_level": 1} if fmt == "png" else {"quality": quality}  # png level 1: fast, ~same size
    if record is not None:
        exif = Image.Exif()
        exif[_RECORD_TAG] = json.dumps(record, sort_keys=True)  # ASCII: non-ASCII characters are escaped
        kwargs["exif"] = exif.tobytes()
    Image.fromarray(rgb, "RGB").save(buf, FORMATS[fmt], **kwargs)
    return buf.getvalue()


HEAT_FULL_SCALE = 0.1  # error-map colour scale: a mean absolute error (in [0, 1] units) this large shows white


def side_by_side(original: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """original | reconstruction | error heat-map (per-pixel mean absolute error, black -> red -> yellow -> white),
    all uint8 (H, W, 3)."""
    err = np.abs(original.astype(np.float32) - reconstruction.astype(np.float32)).mean(axis=2) / 255.0
    v = np.clip(err / HEAT_FULL_SCALE, 0, 1)[..., None] * 3
    heat = (np.clip(np.concatenate([v, v - 1, v - 2], axis=2), 0, 1) * 255).round().astype(np.uint8)
    return np.concatenate([original, reconstruction, heat], axis=1)


def read_record(path) -> dict | None:
    """The record encode_image kept in the file ({} when there is none), or None when the file is not a complete
    image."""
    if not is_valid_image(path):
        return None
    try:
        with Image.open(path) as im:
            text = im.getexif().get(_RECORD_TAG)
        record = json.loads(text) if isinstance(text, str) else {}
    except Exception:  # a broken EXIF block or foreign text: no record
        return {}
    return record if isinstance(record, dict) else {}


def is_valid_image(path) -> bool:
    """True when `path` is a complete image pillow can decode (used to skip finished outputs)."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # any failure means "write it again"
        return False
