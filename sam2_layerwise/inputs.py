"""User inputs: the photograph and the prompts, validated before anything is written."""

from __future__ import annotations

import re
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sam2_layerwise.errors import InputError, condense


@contextmanager
def _our_pixel_limit():
    """Pillow's own decompression-bomb check (a warning, then an error, at a fixed global limit) stands aside
    while `load_image` applies `max_pixels` itself, before decoding; restored afterwards."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


def image_files(directory: Path, flag: str, value: str) -> list[Path]:
    """The images of a folder (`quantize --calib-images DIR`, `sweep --inputs DIR`): regular files with an image
    suffix, sorted by name. Hidden entries are skipped: a folder copied from a Mac holds `._IMG_1.jpg` resource
    forks and `.DS_Store`, which are no pictures."""
    try:
        return sorted(f for f in directory.iterdir()
                      if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file())
    except OSError as exc:
        raise InputError(f"cannot list it ({exc.strerror or exc})", flag=flag, value=value) from None


DEFAULT_MAX_PIXELS = 1 << 27  # 134 M pixels: a 100 MP camera photograph fits; decoding it takes ~0.4 GB as RGB


def load_image(path: str | Path, flag: str = "--image", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read any image Pillow reads -> HWC uint8 RGB, EXIF orientation applied.

    Grey, palette, CMYK and RGBA images are converted to RGB (alpha dropped); 16-bit and float images are
    scaled to 8 bits. The size the header announces is checked against `max_pixels` (`--max-pixels`) before
    a single pixel is decoded, so a small file claiming 30000x30000 costs nothing.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError("no such file", flag=flag, value=str(path))
    if not p.is_file():
        raise InputError("not a file", flag=flag, value=str(path))
    # read from a file object, not a name: Pillow 13 maps an uncompressed TIFF opened by name straight into memory
    # at the size its Orientation tag already turned, so grey, palette, RGBA, CMYK and 16-bit pixels with
    # orientations 5-8 come out scrambled; read from a file, the same pixels load right
    with ExitStack() as files:
        try:
            with _our_pixel_limit():
                im = files.enter_context(Image.open(files.enter_context(p.open("rb"))))
        except UnidentifiedImageError:
            raise InputError("not an image file Pillow can read", flag=flag, value=str(path)) from None
        except Exception as exc:  # noqa: BLE001 - any failure to parse a user's header is that file's problem
            raise InputError(f"cannot read image: {condense(exc)}", flag=flag, value=str(path)) from None
        w, h = im.size
        if w * h > max_pixels:
            raise InputError(f"is {w}x{h} = {w * h} pixels, more than --max-pixels {max_pixels}; refusing to decode "
                             f"it (pass --max-pixels N to allow a larger image)", flag=flag, value=str(path))
        try:
            with _our_pixel_limit():
                im.load()
                rgb = _to_rgb(ImageOps.exif_transpose(im))
        except MemoryError:
            raise InputError(f"not enough memory to decode its {w}x{h} pixels", flag=flag, value=str(path)) from None
        except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, a decoder's own limits, odd modes
            raise InputError(f"cannot decode image: {condense(exc)}", flag=flag, value=str(path)) from None
    if rgb.ndim != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise InputError("empty image", flag=flag, value=str(path))
    return np.ascontiguousarray(rgb)


def image_header_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the array `load_image` returns (EXIF orientation applied), from the header only."""
    with _our_pixel_limit(), Image.open(path) as im:
        tags = getattr(im, "tag_v2", None)
        # TIFF: Pillow reports a size already turned by the Orientation tag (it turns the pixels as it loads
        # them, and exif_transpose then finds nothing to do); the stored dimensions are the header's own
        w, h = (tags[256], tags[257]) if tags is not None and 256 in tags and 257 in tags else im.size
        try:
            orientation = im.getexif().get(0x0112)
        except Exception:  # noqa: BLE001 - a broken EXIF block: exif_transpose ignores it too
            orientation = None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any Pillow mode -> HWC uint8 RGB. 16-bit images are scaled to 8 bits (/257; values that all fit 8 bits are
    kept). Integer images whose values leave 0..65535 (negative, or a 32-bit range) and float images are stretched
    from their smallest to their largest finite value; NaN and -inf are black, +inf white."""
    if im.mode == "F" or im.mode == "I" or im.mode.startswith("I;"):
        a = np.asarray(im, dtype=np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if im.mode != "F" and lo >= 0 and hi <= 65535:
            a = a / 257.0 if hi > 255 else a
        else:
            a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        a = np.nan_to_num(np.clip(a, 0, 255), nan=0.0)  # before the cast: NaN and out-of-range values wrap
        im = Image.fromarray(a.astype(np.uint8), "L")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: int  # 1 foreground, 0 background


@dataclass
class Prompts:
    """Clicks and box in original-image pixels, and extra query locations to inspect."""

    points: list[Point] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    queries: list[tuple[float, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"points": [[p.x, p.y, p.label] for p in self.points], "box": list(self.box) if self.box else None,
                "queries": [list(q) for q in self.queries], "frame": "original image pixels (x right, y down)"}


# a decimal number as written on a command line or in a manifest; float() also takes "1_0" and other scripts'
# digits ("١٠"), which no one types as a pixel coordinate on purpose
NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?|[+-]?(?:inf|infinity|nan)", re.I | re.ASCII)


def decimal(v) -> float:
    """float(v), where a string must be a plain decimal number (NUMBER). ValueError otherwise."""
    if isinstance(v, str) and not NUMBER.fullmatch(v.strip()):
        raise ValueError(f"not a decimal number: {v!r}")
    return float(v)


def _numbers(values, flag) -> list[float]:
    out = []
    for v in values:
        try:
            out.append(decimal(v))
        except (TypeError, ValueError):
            raise InputError(f"'{v}' is not a number", flag=flag, value=list(values)) from None
        if not np.isfinite(out[-1]):  # nan, inf, 1e400: no pixel, and a NaN box corner compares false to all
            raise InputError(f"'{v}' is not a finite number", flag=flag, value=list(values))
    return out


def _inside(x, y, w, h, flag, values):
    """A click at pixel coordinates (x, y) must lie on the w x h image: 0 <= x < w, 0 <= y < h (shown in full: a
    value just past the edge is not rounded onto it)."""
    if not (0 <= x < w and 0 <= y < h):
        raise InputError(f"({x:.12g}, {y:.12g}) is outside the {w}x{h} image", flag=flag, value=values)


def parse_query_points(values, width: int, height: int) -> list[tuple[float, float]]:
    """`--query-points x y ...` (visualize and render) -> [(x, y)] in original pixels, on the w x h image."""
    if len(values) % 2:
        raise InputError(f"expects x y pairs; got {len(values)} values", flag="--query-points", value=list(values))
    nums = _numbers(values, "--query-points")
    pts = list(zip(nums[0::2], nums[1::2]))
    for x, y in pts:
        _inside(x, y, width, height, "--query-points", list(values))
    return pts


def parse_prompts(points, box, queries, width: int, height: int) -> Prompts:
    """Validate `--points x y label ...`, `--box x0 y0 x1 y1` and `--query-points x y ...` for a w x h image."""
    prompts = Prompts()
    if points:
        if len(points) % 3:
            raise InputError(f"expects x y label triples; got {len(points)} values", flag="--points", value=list(points))
        nums = _numbers(points, "--points")
        for i in range(0, len(nums), 3):
            x, y, label = nums[i:i + 3]
            if label not in (0.0, 1.0):
                raise InputError(f"label {label:g} is not 0 (background) or 1 (foreground)", flag="--points", value=list(points))
            _inside(x, y, width, height, "--points", list(points))
            prompts.points.append(Point(x, y, int(label)))
    if box:
        if len(box) != 4:
            raise InputError(f"expects 4 numbers x0 y0 x1 y1; got {len(box)}", flag="--box", value=list(box))
        x0, y0, x1, y1 = _numbers(box, "--box")
        if not (x1 > x0 and y1 > y0):
            raise InputError("needs x0 < x1 and y0 < y1", flag="--box", value=list(box))
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise InputError(f"is outside the {width}x{height} image", flag="--box", value=list(box))
        prompts.box = (x0, y0, x1, y1)
    if queries:
        prompts.queries.extend(parse_query_points(queries, width, height))
    if not prompts.points and prompts.box is None:
        raise InputError("give at least one click (--points x y label) or a --box", flag="--points")
    return prompts
