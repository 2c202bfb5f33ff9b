"""What a sweep runs on: the items of `--inputs` (a directory of images or a manifest), each an image with its
prompts, planned before any model is loaded.

A manifest is untrusted input: it is read whole and checked line by line before any work (its size, encoding,
columns, every point list and box), and a mistake is one line naming the file and the line. What can only be
known from an image (that it decodes, that a click falls inside it) is found per item by the worker and recorded
as that item's failure; the sweep goes on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sam2_layerwise.errors import InputError, one_line
from sam2_layerwise.inputs import IMAGE_SUFFIXES, decimal, image_files, image_header_size
from sam2_layerwise.store.hashing import sha256_file

FLAG = "--inputs"
MANIFEST_LIMIT = 64 << 20  # bytes
MAX_ROWS = 1_000_000
MAX_AUTO = {"grid": 32, "random": 1000}  # grid:N is N x N clicks; random:N is N clicks
MASK_KEYS = ("mask", "gt_mask")  # the ground-truth mask column (either name)


@dataclass(frozen=True)
class Item:
    """One image and one prompt set. Pixel coordinates are in the original image (x right, y down).

    `points`: flat x y label triples; `box`: x0 y0 x1 y1 or None; `mask`: ground-truth mask path or None.
    `source`: where it came from (`photos/` or `list.csv line 4`); `prompt`: `manifest`, `center`, `grid 3/16`,
    `random 2/5`. `key`: SHA-256 of the image, prompts, mask and models (what resume matches). `error`: why it
    cannot run at all (a missing or unreadable file), found while planning.
    """

    index: int
    image: str
    image_sha256: str | None
    points: tuple[float, ...]
    box: tuple[float, ...] | None
    mask: str | None
    mask_sha256: str | None
    source: str
    prompt: str
    key: str
    width: int | None = None
    height: int | None = None
    error: str | None = None

    @property
    def points_text(self) -> str:
        return " ".join(_num(v) for v in self.points)

    @property
    def box_text(self) -> str | None:
        return None if self.box is None else " ".join(_num(v) for v in self.box)

    @property
    def name(self) -> str:
        """A short readable name: image stem and key prefix."""
        from sam2_layerwise.store.layout import safe_name

        return f"{safe_name(Path(self.image).stem, 60)}-{self.key[:12]}"


def _num(v: float) -> str:
    return f"{v:g}" if float(v) != int(v) else str(int(v))


@dataclass(frozen=True)
class AutoPrompts:
    """`--auto-prompts`: center (one click in the middle), grid:N (N x N clicks at cell centres, one item each),
    random:N (N uniformly random clicks, one item each, seeded by --seed and the image's SHA-256)."""

    kind: str
    n: int = 1
    seed: int = 0

    @classmethod
    def parse(cls, text: str, seed: int = 0) -> "AutoPrompts":
        t = (text or "").strip().lower()
        if t == "center" or t == "centre":
            return cls("center", 1, seed)
        m = re.fullmatch(r"(grid|random):(\d{1,7})", t)
        if not m or not 1 <= int(m[2]) <= MAX_AUTO[m[1]]:
            raise InputError(f"expects center, grid:N (1 <= N <= {MAX_AUTO['grid']}, N x N clicks) or random:N "
                             f"(1 <= N <= {MAX_AUTO['random']})", flag="--auto-prompts", value=text)
        return cls(m[1], int(m[2]), seed)

    def clicks(self, width: int, height: int, image_sha256: str) -> list[tuple[str, tuple[float, float]]]:
        """(label, (x, y)) of each item's single foreground click, in original-image pixels."""
        if self.kind == "center":
            return [("center", (width / 2, height / 2))]
        if self.kind == "grid":
            n, total = self.n, self.n * self.n
            return [(f"grid {j * n + i + 1}/{total}", ((i + 0.5) * width / n, (j + 0.5) * height / n))
                    for j in range(n) for i in range(n)]
        rng = np.random.default_rng([self.seed, int(image_sha256[:15], 16)])
        xy = rng.random((self.n, 2))
        return [(f"random {i + 1}/{self.n}", (round(float(x) * width, 2) % width, round(float(y) * height, 2) % height))
                for i, (x, y) in enumerate(xy)]

    def describe(self) -> str:
        return self.kind if self.kind == "center" else f"{self.kind}:{self.n}" + (
            f" seed {self.seed}" if self.kind == "random" else "")


# -- files ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One manifest row or directory entry before the image is looked at."""

    image: Path
    points: tuple[float, ...] | None
    box: tuple[float, ...] | None
    mask: Path | None
    source: str


def _parse_numbers(text, what: str, where: str, spec: str) -> tuple[float, ...] | None:
    if text is None or (isinstance(text, str) and not text.strip()) or (isinstance(text, list) and not text):
        return None
    if isinstance(text, list):  # [x, y, l, ...] or [[x, y, l], ...]
        parts = [v for p in text for v in (p if isinstance(p, list) else [p])]
    elif isinstance(text, str):  # "x y l ...", also with commas, semicolons or brackets
        parts = [p for p in re.split(r"[\s,;()\[\]]+", text.strip()) if p]
    else:
        raise InputError(f"{where}: {what} must be a list of numbers or a string of them", flag=FLAG, value=spec)
    out = []
    for p in parts:
        try:
            if isinstance(p, bool):
                raise ValueError
            v = decimal(p)
        except (TypeError, ValueError):
            raise InputError(f"{where}: {what} value {one_line(str(p), 40)!r} is not a number", flag=FLAG,
                             value=spec) from None
        if not np.isfinite(v):
            raise InputError(f"{where}: {what} value {p!r} is not finite", flag=FLAG, value=spec)
        out.append(v)
    return tuple(out)


def _check_prompts(points, box, where: str, spec: str) -> None:
    if points is not None:
        if len(points) % 3:
            raise InputError(f"{where}: points has {len(points)} values, not x y label triples", flag=FLAG, value=spec)
        bad = [lab for lab in points[2::3] if lab not in (0.0, 1.0)]
        if bad:
            raise InputError(f"{where}: point label {bad[0]:g} is not 0 (background) or 1 (foreground)", flag=FLAG,
                             value=spec)
    if box is not None:
        if len(box) != 4:
            raise InputError(f"{where}: box has {len(box)} values, not x0 y0 x1 y1", flag=FLAG, value=spec)
        if not (box[2] > box[0] and box[3] > box[1]):
            raise InputError(f"{where}: box needs x0 < x1 and y0 < y1", flag=FLAG, value=spec)


def _resolve(base: Path, text, what: str, where: str, spec: str) -> Path | None:
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if not isinstance(text, str):
        raise InputError(f"{where}: {what} must be a path (a string)", flag=FLAG, value=spec)
    if "\x00" in text:
        raise InputError(f"{where}: {what} path holds a NUL character", flag=FLAG, value=spec)
    p = Path(text.strip()).expanduser()
    return p if p.is_absolute() else base / p


def _read_text(path: Path, spec: str) -> str:
    try:
        size = path.stat().st_size
        if size > MANIFEST_LIMIT:
            raise InputError(f"the manifest is {size >> 20} MiB, more than {MANIFEST_LIMIT >> 20} MiB", flag=FLAG,
                             value=spec)
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read it ({exc.strerror or exc})", flag=FLAG, value=spec) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise InputError(f"line {line}: not UTF-8 text", flag=FLAG, value=spec) from None


def _csv_rows(path: Path, spec: str) -> list[Row]:
    text = _read_text(path, spec)
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise InputError(f"line {line}: holds a NUL character", flag=FLAG, value=spec)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise InputError(f"line 1: {exc}", flag=FLAG, value=spec) from None
    if not header or not any(h.strip() for h in header):
        raise InputError("is empty: the first line must name the columns (image, points, box, mask)", flag=FLAG,
                         value=spec)
    cols = [h.strip().lower() for h in header]
    if "image" not in cols:
        raise InputError(f"line 1: no 'image' column (columns: {', '.join(cols)}); expected image, points, "
                         f"optional box and mask", flag=FLAG, value=spec)
    if "points" not in cols and "box" not in cols:
        raise InputError(f"line 1: no 'points' column (columns: {', '.join(cols)}); expected image, points "
                         f"(x y label ...), optional box and mask", flag=FLAG, value=spec)
    dup = sorted({c for c in cols if c and cols.count(c) > 1})
    if dup:
        raise InputError(f"line 1: column {dup[0]!r} given twice", flag=FLAG, value=spec)
    idx = {c: i for i, c in enumerate(cols)}
    mask_col = next((idx[k] for k in MASK_KEYS if k in idx), None)
    rows = []
    base = path.parent
    try:
        for fields in reader:
            line = reader.line_num
            if not any(f.strip() for f in fields):
                continue
            if len(fields) > len(cols):
                raise InputError(f"line {line}: {len(fields)} fields, more than the {len(cols)} columns", flag=FLAG,
                                 value=spec)
            fields = fields + [""] * (len(cols) - len(fields))
            where = f"line {line}"
            image = _resolve(base, fields[idx["image"]], "image", where, spec)
            if image is None:
                raise InputError(f"{where}: the image field is empty", flag=FLAG, value=spec)
            points = _parse_numbers(fields[idx["points"]], "points", where, spec) if "points" in idx else None
            box = _parse_numbers(fields[idx["box"]], "box", where, spec) if "box" in idx else None
            _check_prompts(points, box, where, spec)
            mask = _resolve(base, fields[mask_col], "mask", where, spec) if mask_col is not None else None
            rows.append(Row(image, points, box, mask, f"{path.name} line {line}"))
            if len(rows) > MAX_ROWS:
                raise InputError(f"has more than {MAX_ROWS} rows", flag=FLAG, value=spec)
    except csv.Error as exc:
        raise InputError(f"line {reader.line_num}: {exc}", flag=FLAG, value=spec) from None
    return rows


def _jsonl_rows(path: Path, spec: str) -> list[Row]:
    text = _read_text(path, spec)
    rows = []
    base = path.parent
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{where}: not valid JSON ({exc.msg})", flag=FLAG, value=spec) from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object with image, points, box, mask", flag=FLAG, value=spec)
        if "image" not in obj:
            raise InputError(f"{where}: no 'image' key (keys: {', '.join(map(str, list(obj)[:6]))})", flag=FLAG,
                             value=spec)
        image = _resolve(base, obj.get("image"), "image", where, spec)
        if image is None:
            raise InputError(f"{where}: the image is empty", flag=FLAG, value=spec)
        points = _parse_numbers(obj.get("points"), "points", where, spec)
        box = _parse_numbers(obj.get("box"), "box", where, spec)
        _check_prompts(points, box, where, spec)
        mask = next((obj[k] for k in MASK_KEYS if obj.get(k) is not None), None)
        rows.append(Row(image, points, box, _resolve(base, mask, "mask", where, spec), f"{path.name} line {n}"))
        if len(rows) > MAX_ROWS:
            raise InputError(f"has more than {MAX_ROWS} rows", flag=FLAG, value=spec)
    return rows


def read_inputs(spec: str) -> tuple[str, list[Row]]:
    """`--inputs`: ("directory" | "manifest", rows), checked before any work."""
    text = str(spec)
    if not text.strip():
        raise InputError("is empty; give a directory of images or a manifest (.csv, .jsonl)", flag=FLAG,
                         value=repr(text))
    p = Path(text).expanduser()
    if not p.exists():
        raise InputError("no such file or directory", flag=FLAG, value=text)
    if p.is_dir():
        files = image_files(p, FLAG, text)
        if not files:
            raise InputError(f"holds no image ({', '.join(IMAGE_SUFFIXES[:5])}, ...); give a directory of images or "
                             f"a manifest", flag=FLAG, value=text)
        return "directory", [Row(f.absolute(), None, None, None, f"{p.name}/") for f in files]
    suffix = p.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(p, text)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(p, text)
    else:
        raise InputError("is neither a directory nor a manifest (.csv or .jsonl)", flag=FLAG, value=text)
    if not rows:
        raise InputError("the manifest lists no item", flag=FLAG, value=text)
    return "manifest", rows


def _key(image_sha: str, points, box, mask_sha, models: str) -> str:
    payload = json.dumps({"image": image_sha, "points": list(points), "box": list(box) if box else None,
                          "mask": mask_sha, "models": models}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def plan_items(rows: list[Row], auto: AutoPrompts, models_fingerprint: str) -> list[Item]:
    """Rows -> items: each image hashed (and, for automatic prompts, its size read from the header); a file that
    cannot be read becomes a failed item, not an error."""
    items: list[Item] = []
    hashes: dict[Path, str] = {}

    def sha(path: Path) -> str:
        if path not in hashes:
            hashes[path] = sha256_file(path)
        return hashes[path]

    for row in rows:
        image = str(row.image)
        try:
            if not row.image.is_file():
                raise OSError("no such file" if not row.image.exists() else "not a file")
            image_sha = sha(row.image)
        except OSError as exc:
            reason = f"--inputs {image}: {exc.strerror or exc}"
            named = f"unreadable\0{image}\0{row.points}\0{row.box}".encode("utf-8", "surrogateescape")  # any file name
            key = hashlib.sha256(named).hexdigest()
            items.append(Item(len(items), image, None, row.points or (), row.box, str(row.mask) if row.mask else None,
                              None, row.source, "manifest" if row.points or row.box else auto.describe(), key,
                              error=reason))
            continue
        mask_sha = None
        if row.mask is not None:
            try:
                mask_sha = sha(row.mask)
            except OSError:
                mask_sha = "unreadable"  # the worker says why
        if row.points is not None or row.box is not None:
            items.append(Item(len(items), image, image_sha, row.points or (), row.box,
                              str(row.mask) if row.mask else None, mask_sha, row.source, "manifest",
                              _key(image_sha, row.points or (), row.box, mask_sha, models_fingerprint)))
            continue
        try:
            w, h = image_header_size(row.image)
        except Exception as exc:  # noqa: BLE001 - not an image: that item fails, the sweep goes on
            from sam2_layerwise.errors import condense

            key = _key(image_sha, (), None, mask_sha, models_fingerprint)
            items.append(Item(len(items), image, image_sha, (), None, str(row.mask) if row.mask else None, mask_sha,
                              row.source, auto.describe(), key,
                              error=f"--inputs {image}: not an image file Pillow can read ({condense(exc, 120)})"))
            continue
        for label, (x, y) in auto.clicks(w, h, image_sha):
            points = (float(x), float(y), 1.0)
            items.append(Item(len(items), image, image_sha, points, None, str(row.mask) if row.mask else None,
                              mask_sha, row.source, label, _key(image_sha, points, None, mask_sha, models_fingerprint),
                              width=w, height=h))
    return items
