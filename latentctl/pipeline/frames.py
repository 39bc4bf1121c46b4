"""Frames of a clip, streamed: open a video or an animated image through imageio's v3 API, pick frames by
step, rate or time, and hand them out a batch at a time, so memory does not grow with the clip's length.

Readers: pyav (FFmpeg, bundled by the `av` wheels) for .mp4 .webm .mov .mkv .avi; pillow for animated .gif,
.webp and .png. Timestamps are in seconds from the clip's first frame: for pyav the frame index over the
stream's average rate (exact for constant-rate video, which is what cameras and encoders write; a
variable-rate file gets evenly spaced times), for pillow the sum of the earlier frames' durations.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, UsageError

VIDEO_EXTS = frozenset({".mp4", ".webm", ".mov", ".mkv", ".avi"})
ANIMATED_EXTS = frozenset({".gif", ".webp", ".png", ".apng"})   # clips only when they hold more than one frame
CLIP_EXTS = VIDEO_EXTS | ANIMATED_EXTS
DEFAULT_GIF_FPS = 10.0   # a GIF frame without a delay: browsers show such frames at about 10 per second
_EPS = 1e-6              # seconds: timestamps computed as i / fps are compared with this slack


@dataclass(frozen=True)
class Selection:
    """Which frames of a clip are encoded. Times are seconds from the first frame; `end` is exclusive."""

    frame_step: int = 1             # every Nth frame (from the first one at or after `start`)
    fps: float | None = None        # or: the first frame in each 1/fps slot (resampling by timestamp)
    max_frames: int | None = None   # stop after this many selected frames
    start: float = 0.0
    end: float | None = None

    def check(self) -> None:
        if self.frame_step < 1:
            raise UsageError(f"--frame-step {self.frame_step}: must be at least 1")
        if self.fps is not None and not (self.fps > 0 and math.isfinite(self.fps)):
            raise UsageError(f"--fps {self.fps}: must be a positive number")
        if self.fps is not None and self.frame_step != 1:
            raise UsageError("--fps and --frame-step both pick frames: give one of them")
        if self.max_frames is not None and self.max_frames < 1:
            raise UsageError(f"--max-frames {self.max_frames}: must be at least 1")
        if self.start < 0 or not math.isfinite(self.start):
            raise UsageError(f"--start {self.start}: must be 0 or more seconds")
        if self.end is not None and not self.end > self.start:
            raise UsageError(f"--end {self.end}: must be after --start ({self.start})")

    def settings(self) -> dict[str, str]:
        """As recorded in a clip's latent file (and compared on resume)."""
        return {"frame_step": str(self.frame_step), "select_fps": repr(self.fps) if self.fps else "",
                "max_frames": str(self.max_frames or ""), "start": repr(float(self.start)),
                "end": repr(float(self.end)) if self.end is not None else ""}


def select(frames, selection: Selection):
    """(index, timestamp, frame) in source order -> the selected ones, lazily (stops reading at --end/--max-frames)."""
    first = last_slot = None
    kept = 0
    for index, t, frame in frames:
        if t < selection.start - _EPS:
            continue
        if selection.end is not None and t >= selection.end - _EPS:
            return
        first = index if first is None else first
        if selection.fps is not None:
            slot = math.floor((t - selection.start) * selection.fps + _EPS)
            if slot == last_slot:
                continue
            last_slot = slot
        elif (index - first) % selection.frame_step:
            continue
        yield index, t, frame
        kept += 1
        if selection.max_frames is not None and kept >= selection.max_frames:
            return


def is_clip(path: Path) -> bool:
    """A video by its extension, or a .gif/.webp/.png with more than one frame (read from the header: a
    still image of those formats stays an image). An unreadable file is not a clip: the image reader
    reports what is wrong with it."""
    ext = path.suffix.lower()
    if ext in VIDEO_EXTS:
        return True
    if ext not in ANIMATED_EXTS:
        return False
    from PIL import Image

    try:
        with Image.open(path) as im:
            return bool(getattr(im, "is_animated", False))
    except Exception:  # any failure: let the image reader say what is wrong
        return False


@dataclass
class ClipInfo:
    """What the reader learnt about a clip. `frames_read` and the pillow rate grow while reading."""

    width: int
    height: int
    reader: str                     # pyav | pillow
    codec: str
    source_fps: float               # the clip's own rate (pillow: frames over their total duration, so far)
    frames_read: int = 0            # source frames decoded (selected or not)
    declared: int = 0               # frames the container says the stream has (0: it does not say)


def _to_rgb(frame: np.ndarray, background) -> np.ndarray:
    """uint8 (H, W, 3|4) -> float32 (H, W, 3) in [0, 1]; alpha composited on `background` as images.to_rgb does."""
    a = frame.astype(np.float32) / 255.0
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.shape[2] == 4:
        alpha = a[..., 3:4]
        return a[..., :3] * alpha + np.asarray(background, np.float32) * (1.0 - alpha)
    return a[..., :3]


class FrameReader:
    """One clip opened for reading; use as a context manager, then iterate batches()."""

    def __init__(self, path: Path, *, max_pixels: int, alpha_background=(1.0, 1.0, 1.0)):
        import imageio.v3 as iio

        self.path, self.background = Path(path), alpha_background
        self.video = self.path.suffix.lower() in VIDEO_EXTS
        if self.path.stat().st_size == 0:
            raise InputError("empty file (0 bytes)")
        plugin = "pyav" if self.video else "pillow"
        if self.video:
            _need_av()
        try:
            self._file = iio.imopen(self.path, "r", plugin=plugin)
        except Exception as e:
            raise InputError(_why_unreadable(self.path, e) if self.video else
                             f"not an animation this reader can open ({_first_line(e)})") from None
        try:
            self.info = self._probe(plugin)
        except Exception:
            self._file.close()
            raise
        w, h = self.info.width, self.info.height
        if w * h > max_pixels:
            self._file.close()
            raise InputError(f"frames of {w}x{h} = {w * h:,} pixels are over the limit of {max_pixels:,} "
                             "(raise it with --max-pixels)")
        if w == 0 or h == 0:
            self._file.close()
            raise InputError(f"frames have no pixels ({w}x{h})")
        self._ms = 0  # pillow: milliseconds of the frames read so far

    def _probe(self, plugin: str) -> ClipInfo:
        try:
            if plugin == "pyav":
                meta = self._file.metadata()
                declared = self._file.properties().shape[0]
                h, w = self._file.properties(index=0).shape[:2]
                fps = float(meta.get("fps") or 0)
                if not (fps > 0 and math.isfinite(fps)):
                    raise InputError("the video stream does not say its frame rate")
                return ClipInfo(w, h, "pyav", str(meta.get("codec", "")), fps, declared=max(0, int(declared or 0)))
            h, w = self._file.properties(index=0).shape[:2]
            return ClipInfo(w, h, "pillow", self.path.suffix.lower().lstrip("."), DEFAULT_GIF_FPS)
        except InputError:
            raise
        except Exception as e:
            raise InputError(f"unreadable clip header ({_first_line(e)})") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def _source(self):
        """(index, timestamp, uint8 frame) for every frame of the file, in order."""
        if self.info.reader == "pyav":
            frames = self._file.iter(format="rgb24")
        else:
            frames = self._file.iter(mode="RGBA")
        index = 0
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                if index < self.info.declared:  # the data ran out quietly before the frames the header lists
                    raise InputError(f"truncated: the video stream ends after {index} of its "
                                     f"{self.info.declared} frames") from None
                return
            except Exception as e:  # a decoder error mid-stream: truncated or corrupt data
                raise InputError(f"corrupt or truncated clip: frame {index} does not decode "
                                 f"({_first_line(e)})") from None
            if self.info.reader == "pyav":
                t = index / self.info.source_fps
            else:
                t = self._ms / 1000
                ms = self._file.metadata(index=index).get("duration") or 0  # frame `index`: no seek
                self._ms += ms if ms > 0 else 1000 / DEFAULT_GIF_FPS
                self.info.source_fps = (index + 1) * 1000 / self._ms
            self.info.frames_read = index + 1
            if frame.shape[:2] != (self.info.height, self.info.width):
                raise InputError(f"frame {index} is {frame.shape[1]}x{frame.shape[0]}; the clip began at "
                                 f"{self.info.width}x{self.info.height}")
            yield index, t, frame
            index += 1

    def batches(self, selection: Selection, size: int):
        """Lists of up to `size` (index, timestamp, float32 RGB (H, W, 3) in [0, 1]), selected frames only."""
        batch = []
        for index, t, frame in select(self._source(), selection):
            batch.append((index, t, _to_rgb(frame, self.background)))
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch


def _need_av() -> None:
    try:
        import av  # noqa: F401  (imageio's pyav plugin needs it)
    except ImportError:
        raise InputError("reading and writing video needs PyAV: pip install 'latentctl[video]'") from None


def _why_unreadable(path: Path, error: Exception) -> str:
    """Why imageio's pyav plugin could not open `path`, asked of FFmpeg itself (imageio hides the cause)."""
    import av

    try:
        with av.open(str(path)) as container:
            kinds = sorted({s.type for s in container.streams})
    except EOFError:
        return "the file ends before its first frame (truncated, or a zero-frame video)"
    except av.FFmpegError as e:
        return f"corrupt, truncated or not a video (FFmpeg: {_first_line(e)})"
    except Exception as e:  # anything else FFmpeg raises: report it, never a traceback
        return f"not a video this reader can open ({type(e).__name__}: {_first_line(e)})"
    if "video" not in kinds:
        return (f"no video stream in this file (only {', '.join(kinds)})" if kinds else
                "no streams in this file (an empty or zero-frame video)")
    return f"not a video this reader can open ({_first_line(error)})"


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
