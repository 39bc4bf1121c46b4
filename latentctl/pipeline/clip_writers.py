"""Writing a clip's frames: mp4 (H.264 through imageio's pyav plugin), animated gif or webp (pillow), or one
png/jpg per frame in a folder named after the clip. Every output appears complete or not at all: files go
to a temporary name in the same folder and are renamed once finished; a frame folder is filled under a
temporary name and renamed.

mp4 and frame folders stream (one frame in memory); gif and webp hold the clip's uint8 frames until the end
(pillow writes an animation in one call). mp4 uses yuv420p (plays everywhere) when width and height are
even, yuv444p otherwise (H.264 4:2:0 needs even sizes; the size is kept, never padded or cropped).
Pillow's GIF writer merges identical consecutive frames into one longer frame.
"""

import io
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from . import images
from .outputs import temp_path
from .latents import atomic_write

CLIP_FORMATS = ("mp4", "gif", "webp", "png", "jpg")   # png / jpg: a folder of frames
FOLDER_FORMATS = ("png", "jpg")


def clip_output(output: Path, fmt: str) -> Path:
    """Where a clip goes: OUT/name.mp4 (gif, webp), or the folder OUT/name/ for png/jpg frames."""
    return output.with_suffix("") if fmt in FOLDER_FORMATS else output.with_suffix("." + fmt)


def compare_output(output: Path, fmt: str) -> Path:
    """roundtrip's side-by-side clip beside `output` (a clip_output path)."""
    if fmt in FOLDER_FORMATS:
        return output.with_name(output.name + ".compare")
    return output.with_name(output.stem + ".compare" + output.suffix)


def frame_name(index: int, fmt: str) -> str:
    return f"{index:06d}.{fmt}"


def durations_ms(timestamps: list[float], fps: float) -> list[int]:
    """Each frame's display time: up to the next frame's timestamp; the last one 1/fps."""
    ends = list(timestamps[1:]) + [timestamps[-1] + 1 / fps]
    return [max(1, round((b - a) * 1000)) for a, b in zip(timestamps, ends)]


class ClipWriter:
    """add(uint8 (H, W, 3)) per frame, then commit(); leaving the `with` block without commit() drops it all."""

    def __init__(self, path: Path, fmt: str, *, fps: float, timestamps: list[float] | None = None,
                 quality: int = 95):
        if fmt not in CLIP_FORMATS:
            raise ValueError(f"clip format {fmt!r}: choose {', '.join(CLIP_FORMATS)}")
        self.path, self.fmt, self.fps, self.quality = Path(path), fmt, float(fps), quality
        self.timestamps = timestamps
        self.tmp = temp_path(self.path)
        self.count = 0
        self._frames, self._video = [], None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fmt in FOLDER_FORMATS:
            shutil.rmtree(self.tmp, ignore_errors=True)  # what a killed run left
            self.tmp.mkdir()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()

    def add(self, rgb: np.ndarray) -> None:
        if self.fmt in FOLDER_FORMATS:
            (self.tmp / frame_name(self.count, self.fmt)).write_bytes(images.encode_image(rgb, self.fmt, self.quality))
        elif self.fmt == "mp4":
            if self._video is None:
                self._video = self._open_mp4(rgb.shape)
            self._video.write_frame(np.ascontiguousarray(rgb))
        else:
            self._frames.append(Image.fromarray(rgb, "RGB"))
        self.count += 1

    def _open_mp4(self, shape):
        import imageio.v3 as iio

        from .frames import _need_av

        _need_av()
        h, w = shape[:2]
        video = iio.imopen(self.tmp, "w", plugin="pyav", extension=".mp4", container="mp4")
        video.init_video_stream("libx264", fps=self.fps, pixel_format="yuv420p" if h % 2 == 0 and w % 2 == 0
                                else "yuv444p")
        return video

    def commit(self) -> None:
        if self.count == 0:
            raise ValueError("no frames to write")
        if self.fmt in FOLDER_FORMATS:
            if self.path.is_dir():
                shutil.rmtree(self.path)
            os.replace(self.tmp, self.path)
        elif self.fmt == "mp4":
            self._video.close()
            self._video = None
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.path)
        else:
            atomic_write(self.path, self._animation())
            self._frames = []

    def _animation(self) -> bytes:
        stamps = self.timestamps if self.timestamps and len(self.timestamps) == self.count else \
            [k / self.fps for k in range(self.count)]
        buf = io.BytesIO()
        kwargs = {"quality": self.quality} if self.fmt == "webp" else {}
        self._frames[0].save(buf, self.fmt.upper(), save_all=True, append_images=self._frames[1:], loop=0,
                             duration=durations_ms(stamps, self.fps), **kwargs)
        return buf.getvalue()

    def abort(self) -> None:
        """Drop everything not committed (a no-op after commit)."""
        if self._video is not None:
            try:
                self._video.close()
            except Exception:  # closing a half-written stream may fail; it is deleted anyway
                pass
            self._video = None
        self._frames = []
        if self.tmp.is_dir():
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)


def is_complete(path: Path, fmt: str, frames: int) -> bool:
    """True when `path` is a finished clip output of `frames` frames (for skipping on a rerun)."""
    try:
        if fmt in FOLDER_FORMATS:
            return path.is_dir() and all((path / frame_name(k, fmt)).is_file() for k in range(frames)) \
                and not (path / frame_name(frames, fmt)).exists()
        if not path.is_file():
            return False
        import imageio.v3 as iio

        plugin = "pyav" if fmt == "mp4" else "pillow"
        n = sum(1 for _ in iio.imiter(path, plugin=plugin))
        return n == frames
    except Exception:  # unreadable: write it again
        return False
