"""Video input: a directory of frames or a video file, selected and checked before anything is loaded or written.

- A directory holds JPEG or PNG frames under any names; they are taken in natural order (`frame_2.png` before
  `frame_10.png`), hidden files and files of other kinds ignored.
- A video file (mp4, mov, webm, avi, mkv, ...) is decoded with PyAV (FFmpeg) once, up front, into raw frames in
  a temporary folder (removed on `close`), so pictures and SAM 2 read any frame again without seeking and memory
  stays bounded whatever the video's length.

Frame numbers: a *source* frame is the n-th frame of the directory (natural order) or of the video (decode
order), from 0. The *selected* frames (`--frames A:B` inclusive, `--frame-stride S`, `--max-frames N`) are what
SAM 2 sees as its frames 0..T-1; the summary, file names and memory segments use that index (`frame`) and
name the source frame beside it (`source_index`, `name`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sam2_layerwise.errors import InputError, condense
from sam2_layerwise.inputs import DEFAULT_MAX_PIXELS, load_image

FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")
VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".avi", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ogv", ".3gp")
FLAG = "--video"
IMAGE_FILE_SUFFIXES = FRAME_SUFFIXES + (".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".heic")


@dataclass(frozen=True)
class FrameSelection:
    """Which source frames are tracked: `start..stop` inclusive (stop None: to the end), every `stride`-th, at
    most `max_frames` of them (None: all)."""

    start: int = 0
    stop: int | None = None
    stride: int = 1
    max_frames: int | None = None

    def picks(self, n: int) -> bool:
        """Whether source frame `n` is selected, ignoring `max_frames`."""
        return n >= self.start and (self.stop is None or n <= self.stop) and (n - self.start) % self.stride == 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def parse_frame_range(text: str | None, flag: str = "--frames") -> tuple[int, int | None]:
    """`A:B` (inclusive), `A:` (to the end), `:B`, or a single frame `A` -> (start, stop or None)."""
    if text is None:
        return 0, None
    m = re.fullmatch(r"\s*(\d*)\s*(:?)\s*(\d*)\s*", text)
    if not m or (not m[1] and not m[3]) or (not m[2] and not m[1]):
        raise InputError("expects A:B (source frame numbers from 0, inclusive), A: or :B", flag=flag, value=text)
    if len(m[1]) > 12 or len(m[3]) > 12:
        raise InputError("frame numbers that large do not exist", flag=flag, value=text)
    start = int(m[1]) if m[1] else 0
    stop = (int(m[3]) if m[3] else None) if m[2] else start
    if stop is not None and stop < start:
        raise InputError(f"the range runs backwards ({start} > {stop})", flag=flag, value=text)
    return start, stop


@dataclass(frozen=True)
class FrameInfo:
    """One selected frame: `index` as SAM 2 numbers it (0..T-1), `source_index` in the input, `name` (file name,
    or `frame <n>` of a video file)."""

    index: int
    source_index: int
    name: str

    def to_dict(self) -> dict:
        return {"index": self.index, "source_index": self.source_index, "name": self.name}


def natural_key(name: str):
    """`frame_10.png` after `frame_2.png`: digit runs compare as numbers, the rest case-insensitively."""
    return [(0, int(t), t) if t.isdecimal() else (1, t.lower(), t) for t in re.split(r"(\d+)", name) if t]


class VideoSource:
    """The selected frames of a directory or a video file, each readable again as HWC uint8 RGB (original size).

    Use as a context manager (or call `close`): a decoded video file's temporary frames are removed then.
    """

    def __init__(self, path: Path, kind: str, frames: list[FrameInfo], width: int, height: int, total: int | None,
                 selection: FrameSelection, files: list[Path], cache_dir: Path | None = None, fps: float | None = None,
                 codec: str | None = None, rotation: int = 0):
        self.path, self.kind, self.frames = path, kind, frames
        self.width, self.height, self.total = width, height, total
        self.selection, self.fps, self.codec = selection, fps, codec
        self.rotation = rotation  # degrees counter-clockwise the decoded frames were turned to stand upright
        self._files = files  # per selected frame: the image file, or the decoded raw frame (.npy)
        self._cache_dir = cache_dir
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.cache_size = 10  # memory frames (7) + the current one + a cond frame: what one frame's pictures read

    def __len__(self) -> int:
        return len(self.frames)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        self._cache.clear()
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None

    def image(self, index: int) -> np.ndarray:
        """Selected frame `index` (0..T-1) as HWC uint8 RGB at its original size (a few recent ones are cached)."""
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        f = self._files[index]
        arr = np.load(f) if f.suffix == ".npy" else load_image(f, flag=FLAG, max_pixels=1 << 62)
        self._cache[index] = arr
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return arr

    def source_file(self, index: int) -> Path | None:
        """The image file of a selected frame (directories only)."""
        return self._files[index] if self.kind == "directory" else None

    def sha256(self) -> str:
        """A fingerprint of the input: the video file's bytes, or the selected frame files' names and bytes."""
        h = hashlib.sha256()
        paths = [self.path] if self.kind == "file" else self._files
        for p in paths:
            if self.kind == "directory":
                h.update(os.fsencode(p.name) + b"\0")
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        return h.hexdigest()

    def describe(self) -> dict:
        """The summary's `video` section (the path absolute, as typed otherwise: `render` finds the frames from
        any working directory)."""
        return {"path": os.path.abspath(self.path), "kind": self.kind, "width": self.width, "height": self.height,
                "source_frames": self.total, "selection": self.selection.to_dict(), "frames": len(self.frames),
                "fps": self.fps, "codec": self.codec, "rotation": self.rotation}


def _kind_of(path: Path) -> str:
    return "directory" if path.is_dir() else "file"


def open_video(path: str | Path, selection: FrameSelection = FrameSelection(), *, max_pixels: int = DEFAULT_MAX_PIXELS,
               flag: str = FLAG) -> VideoSource:
    """Check and open `--video PATH`: every selected frame is decoded once here (a bad one is named), all must be
    the same size. Raises InputError naming `flag` and the path (or the bad frame) for anything wrong."""
    p = Path(str(path)).expanduser()
    if not str(path).strip():
        raise InputError("is empty; give a directory of frames or a video file", flag=flag, value=repr(str(path)))
    if not p.exists():
        raise InputError("no such file or directory", flag=flag, value=str(path))
    if p.is_dir():
        return _open_directory(p, selection, max_pixels, flag)
    if not p.is_file():
        raise InputError("is neither a directory of frames nor a video file", flag=flag, value=str(path))
    return _open_file(p, selection, max_pixels, flag)


def _open_directory(p: Path, sel: FrameSelection, max_pixels: int, flag: str) -> VideoSource:
    try:
        entries = [e for e in p.iterdir() if not e.name.startswith(".")]
    except OSError as exc:
        raise InputError(f"cannot list the directory ({exc.strerror or exc})", flag=flag, value=str(p)) from None
    if not entries:
        raise InputError("is an empty directory; give a directory of JPEG or PNG frames, or a video file",
                         flag=flag, value=str(p))
    files = sorted((e for e in entries if e.suffix.lower() in FRAME_SUFFIXES and e.is_file()),
                   key=lambda e: natural_key(e.name))
    if not files:
        others = sorted(e.name for e in entries)[:3]
        raise InputError(f"holds no JPEG or PNG frames ({len(entries)} other entries, e.g. {', '.join(others)})",
                         flag=flag, value=str(p))
    picked = _pick(len(files), sel, flag, p)
    size = None
    first = None
    for n in picked:
        f = files[n]
        try:
            arr = load_image(f, flag=flag, max_pixels=max_pixels)
        except InputError as exc:
            raise InputError(f"frame {n} ({f.name}) {exc.detail}", flag=flag, value=str(p)) from None
        h, w = arr.shape[:2]
        if size is None:
            size, first = (w, h), f.name
        elif (w, h) != size:
            raise InputError(f"frames differ in size: {first} is {size[0]}x{size[1]}, {f.name} (frame {n}) is "
                             f"{w}x{h}; all frames must be the same size", flag=flag, value=str(p))
    frames = [FrameInfo(i, n, files[n].name) for i, n in enumerate(picked)]
    return VideoSource(p, "directory", frames, size[0], size[1], len(files), sel, [files[n] for n in picked])


def _past_the_end(sel: FrameSelection, what: str, total: int) -> InputError:
    """`--frames A:B` that names frames the input does not have (A, or B of an explicit range)."""
    end = "starts" if sel.start >= total else "ends"
    frame = sel.start if sel.start >= total else sel.stop
    hint = f"; {sel.start}: runs to the last frame" if end == "ends" else ""
    return InputError(f"{end} at frame {frame}, but {what} has {total} frames (0..{total - 1}){hint}",
                      flag="--frames", value=f"{sel.start}:{'' if sel.stop is None else sel.stop}")


def _pick(total: int, sel: FrameSelection, flag: str, p: Path) -> list[int]:
    picked = [n for n in range(sel.start, total if sel.stop is None else min(total, sel.stop + 1), sel.stride)]
    if sel.max_frames:
        picked = picked[:sel.max_frames]
    if sel.start >= total or (sel.stop is not None and sel.stop >= total and picked[-1] + sel.stride >= total):
        raise _past_the_end(sel, p.name, total)  # (max frames taken before the end: B was never needed)
    return picked


def display_turns(frame) -> int:
    """Quarter turns counter-clockwise (np.rot90's k) that stand a decoded video frame upright the way players
    do. A phone's portrait video is stored landscape with a display matrix saying "turn 90 degrees clockwise";
    FFmpeg reports that as -90 (counter-clockwise), so k = -90 / 90 mod 4 = 3. Clicks are given on the upright
    picture, as EXIF orientation is applied to photographs."""
    try:
        degrees = float(getattr(frame, "rotation", 0) or 0)
    except (TypeError, ValueError):  # an older PyAV, or a matrix it cannot read: as stored
        return 0
    return int(round(degrees / 90)) % 4 if np.isfinite(degrees) else 0


def _open_file(p: Path, sel: FrameSelection, max_pixels: int, flag: str) -> VideoSource:
    try:
        import av
    except ImportError:  # pragma: no cover - a dependency of this package
        raise InputError("reading video files needs PyAV (pip install av)", flag=flag, value=str(p)) from None
    try:
        container = av.open(str(p))
    except Exception as exc:  # noqa: BLE001 - FFmpeg's verdict on a user's file
        hint = " (a folder of frames or a video file is expected)" if p.suffix.lower() not in VIDEO_SUFFIXES else ""
        raise InputError(f"not a video file FFmpeg can read{hint}: {condense(exc)}", flag=flag, value=str(p)) from None
    fmt = getattr(container.format, "name", "") or ""
    if fmt == "image2" or fmt.endswith("_pipe") or p.suffix.lower() in IMAGE_FILE_SUFFIXES:
        container.close()
        raise InputError(f"is a single image ({fmt or p.suffix}), not a video; give it as --image, or a folder of "
                         f"frames as --video", flag=flag, value=str(p))
    cache = Path(tempfile.mkdtemp(prefix="sam2-layerwise-frames-"))
    try:
        with container:
            if not container.streams.video:
                raise InputError("holds no video stream", flag=flag, value=str(p))
            stream = container.streams.video[0]
            ctx = stream.codec_context
            codec = getattr(getattr(ctx, "codec", None), "name", None) or getattr(ctx, "name", None)
            w0, h0 = int(ctx.width or 0), int(ctx.height or 0)
            if w0 * h0 > max_pixels:
                raise InputError(f"frames are {w0}x{h0} = {w0 * h0} pixels, more than --max-pixels {max_pixels}",
                                 flag=flag, value=str(p))
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate) if stream.average_rate else None
            files, source, n = [], [], -1
            rotation = 0  # degrees counter-clockwise applied to the selected frames (display matrix)
            first_shape = None  # [H, W, 3] of the first selected frame
            want = sel.max_frames
            try:
                for n, frame in enumerate(container.decode(stream)):
                    if sel.stop is not None and n > sel.stop or (want and len(files) >= want):
                        break
                    if not sel.picks(n):
                        continue
                    if frame.width * frame.height > max_pixels:
                        raise InputError(f"frame {n} is {frame.width}x{frame.height}, more than --max-pixels "
                                         f"{max_pixels}", flag=flag, value=str(p))
                    turns = display_turns(frame)
                    arr = frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8, as stored
                    if turns:  # as players show it (and `ffmpeg -i clip.mp4 frames/%05d.png` writes it)
                        arr = np.ascontiguousarray(np.rot90(arr, turns))
                    if not files:
                        rotation = turns * 90
                    if files and arr.shape != first_shape:
                        raise InputError(f"frames differ in size: frame {source[0]} is {first_shape[1]}x"
                                         f"{first_shape[0]}, frame {n} is {arr.shape[1]}x{arr.shape[0]}", flag=flag,
                                         value=str(p))
                    first_shape = first_shape or arr.shape
                    out = cache / f"{len(files):06d}.npy"
                    np.save(out, arr)
                    files.append(out)
                    source.append(n)
            except InputError:
                raise
            except Exception as exc:  # noqa: BLE001 - a codec FFmpeg lacks, corrupt packets
                where = f"frame {n + 1}" if n >= 0 else "the first frame"
                raise InputError(f"cannot decode {where} ({codec or 'unknown'} codec): {condense(exc)}", flag=flag,
                                 value=str(p)) from None
        total = n + 1 if (sel.stop is None and not (want and len(files) >= want)) else None
        if not files and n < 0:
            raise InputError(f"no frame could be decoded ({codec or 'unknown'} codec)", flag=flag, value=str(p))
        ended = not (want and len(files) >= want) and (sel.stop is None or n < sel.stop)  # decoded to the end
        if not files or (ended and sel.stop is not None):
            raise _past_the_end(sel, "the video", n + 1)
        h, w = first_shape[:2]
        frames = [FrameInfo(i, s, f"frame {s}") for i, s in enumerate(source)]
        return VideoSource(p, "file", frames, w, h, total, sel, files, cache_dir=cache, fps=fps, codec=codec,
                           rotation=rotation)
    except BaseException:
        shutil.rmtree(cache, ignore_errors=True)
        raise


def resolve_prompt_frame(source: VideoSource, prompt_frame: int | None, flag: str = "--prompt-frame") -> int:
    """`--prompt-frame N` (a source frame number; default the first selected frame) -> the selected index."""
    if prompt_frame is None:
        return 0
    for f in source.frames:
        if f.source_index == prompt_frame:
            return f.index
    if source.total is not None and prompt_frame >= source.total:
        raise InputError(f"out of range: the {'video' if source.kind == 'file' else 'directory'} has "
                         f"{source.total} frames (0..{source.total - 1})", flag=flag, value=prompt_frame)
    shown = [f.source_index for f in source.frames]
    listed = ", ".join(map(str, shown[:6])) + (f", ... {shown[-1]}" if len(shown) > 6 else "")
    raise InputError(f"is not among the selected frames ({listed}); pick one of them or change --frames, "
                     f"--frame-stride, --max-frames", flag=flag, value=prompt_frame)
