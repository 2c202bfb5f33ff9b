"""Re-render a saved run without the model: a different colormap, overlays, more queries from saved q/k.

Reads `layerwise_summary.json`, the saved attention tensors (`*__attn.pt`, `*__qkv.pt`, loaded with
`weights_only=True`) and the photograph the summary names. Rewrites the run's pictures: `attn_images/`,
`attn_overlays/` and `attn_topk/` are replaced by what this pass draws (folders it does not draw are removed,
so nothing stale points at old pictures), and the summary records the new files and options. Tensors and
predictions are left as they are.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sam2_layerwise.capture.attention import attention_probs
from sam2_layerwise.errors import InputError, condense
from sam2_layerwise.geometry import HieraLayerGeometry, ImageFrame
from sam2_layerwise.inputs import DEFAULT_MAX_PIXELS, Point, Prompts, load_image
from sam2_layerwise.render.maps import RecordView, probs_transformed
from sam2_layerwise.render.run import RenderPlan, render_views
from sam2_layerwise.store import layout
from sam2_layerwise.store.atomic import atomic_write_json, safe_load
from sam2_layerwise.store.layout import RunWriter
from sam2_layerwise.store.schema import version_problem
from sam2_layerwise.store.summary import SCHEMA, SCHEMA_VERSION

log = logging.getLogger("sam2_layerwise")

RENDER_DIRS = (layout.ATTN_IMAGES, layout.ATTN_OVERLAYS, layout.ATTN_TOPK)


@dataclass
class SavedRun:
    """A run directory as rendering needs it."""

    run_dir: Path
    summary: dict
    frame: ImageFrame
    prompts: Prompts
    locations: list[tuple[str, float, float]]
    image_path: Path | None


MAX_SUMMARY_BYTES = 256 << 20  # a b+ run's summary is a few MiB
MAX_SIDE = 1 << 20  # photograph sides, in pixels
MAX_GRID = 1 << 14  # token-grid sides (1024 px at image_size 4096 is 1024 tokens)


class _Summary:
    """Checks one untrusted summary value at a time; every failure is one line naming --run-dir and the field."""

    def __init__(self, run_dir: Path, flag: str):
        self.run_dir, self.flag = run_dir, flag
        self.last_frame = 1 << 40  # a video run's frame indices go up to its last tracked frame

    def fail(self, what: str) -> InputError:
        return InputError(f"{layout.SUMMARY} is malformed: {what}", flag=self.flag, value=str(self.run_dir))

    def get(self, d: dict, key: str, where: str, *, required: bool = True):
        if key not in d:
            if required:
                raise self.fail(f"{where}{'.' if where else ''}{key} is missing")
            return None
        return d[key]

    def dict(self, v, where: str) -> dict:
        if not isinstance(v, dict):
            raise self.fail(f"{where} is {_kind(v)}, expected a mapping")
        return v

    def list(self, v, where: str, n: int | None = None) -> list:
        if not isinstance(v, list):
            raise self.fail(f"{where} is {_kind(v)}, expected a list")
        if n is not None and len(v) != n:
            raise self.fail(f"{where} has {len(v)} items, expected {n}")
        return v

    def str(self, v, where: str) -> str:
        if not isinstance(v, str):
            raise self.fail(f"{where} is {_kind(v)}, expected a string")
        return v

    def int(self, v, where: str, lo: int = 0, hi: int | None = None) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(f"{where} is {_kind(v)}, expected a whole number")
        if v < lo or (hi is not None and v > hi):
            raise self.fail(f"{where} is {v}, expected {lo}..{hi}" if hi is not None else f"{where} is {v}, "
                            f"expected at least {lo}")
        return v

    def num(self, v, where: str) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.fail(f"{where} is {_kind(v)}, expected a finite number")
        return float(v)

    def ints(self, v, where: str, n: int, lo: int = 0, hi: int | None = None) -> list[int]:
        return [self.int(x, f"{where}[{i}]", lo, hi) for i, x in enumerate(self.list(v, where, n))]

    def nums(self, v, where: str, n: int) -> list[float]:
        return [self.num(x, f"{where}[{i}]") for i, x in enumerate(self.list(v, where, n))]

    def optional(self, v, check, *args):
        return None if v is None else check(v, *args)


def _kind(v) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text[:40]}{'...' if len(text) > 40 else ''}" if v is not None else "null"


def _check_query(c: _Summary, q, where: str, size: tuple[int, int]) -> dict:
    """A selected query: label, group, index, and its places on the grids (each null where it has none); its
    pixel box lies on the photograph (`size`: width, height)."""
    c.dict(q, where)
    c.str(c.get(q, "label", where), f"{where}.label")
    c.int(c.get(q, "group", where), f"{where}.group")
    c.int(c.get(q, "index", where), f"{where}.index")
    c.optional(q.get("cell"), c.ints, f"{where}.cell", 2)
    box = c.optional(q.get("pixel_box"), c.nums, f"{where}.pixel_box", 4)
    if box is not None and not (0 <= box[0] < box[2] <= size[0] * (1 + 1e-9) and
                                0 <= box[1] < box[3] <= size[1] * (1 + 1e-9)):
        raise c.fail(f"{where}.pixel_box {[round(v, 3) for v in box]} is not a box on the {size[0]}x{size[1]} image")
    for key in ("key_block", "source_cells"):
        block = c.optional(q.get(key), c.ints, f"{where}.{key}", 4, 0, MAX_GRID)
        if block is not None and not (block[0] < block[1] and block[2] < block[3]):
            raise c.fail(f"{where}.{key} {block} is empty or reversed")
    return q


def _check_geometry(c: _Summary, geo, kind: str, where: str) -> None:
    c.dict(geo, where)
    keys = geo.get("keys")
    if keys not in (None, "grid", "tokens", "sequence", "memory"):
        raise c.fail(f"{where}.keys is {_kind(keys)}, expected grid, tokens, sequence or memory")
    if keys == "memory":
        _check_segments(c, geo, where)
    if keys == "grid" or kind.startswith("hiera"):
        real = c.ints(c.get(geo, "key_grid_hw", where), f"{where}.key_grid_hw", 2, 1, MAX_GRID)
        padded = c.optional(geo.get("padded_key_grid_hw"), c.ints, f"{where}.padded_key_grid_hw", 2, 1, MAX_GRID)
        if padded is not None and (padded[0] < real[0] or padded[1] < real[1]):
            raise c.fail(f"{where}.padded_key_grid_hw {padded} is smaller than key_grid_hw {real}")
    if kind.startswith("hiera"):
        c.int(c.get(geo, "batch", where), f"{where}.batch", 1, 1 << 16)
        c.int(c.get(geo, "window", where), f"{where}.window", 0, MAX_GRID)
        c.int(c.get(geo, "q_stride", where), f"{where}.q_stride", 1, MAX_GRID)
        try:
            HieraLayerGeometry.from_dict(geo)
        except ValueError as exc:
            raise c.fail(f"{where}: {exc}") from None
    if kind == "decoder_image_to_token" or "query_grid_hw" in geo:
        c.ints(c.get(geo, "query_grid_hw", where), f"{where}.query_grid_hw", 2, 1, MAX_GRID)
    for key in ("query_roles", "key_roles"):
        if geo.get(key) is not None:
            for i, role in enumerate(c.list(geo[key], f"{where}.{key}")):
                c.str(role, f"{where}.{key}[{i}]")


SEGMENT_KINDS = ("memory", "object_pointer", "no_memory")


def _check_segments(c: _Summary, geo: dict, where: str) -> None:
    """A memory cross-attention's key segments: contiguous [start, stop) from 0, a known kind, a frame index,
    and for a frame's memory a grid whose tokens are the segment's keys."""
    c.ints(c.get(geo, "query_grid_hw", where), f"{where}.query_grid_hw", 2, 1, MAX_GRID)
    segs = c.list(c.get(geo, "key_segments", where), f"{where}.key_segments")
    if not segs:
        raise c.fail(f"{where}.key_segments is empty")
    at = 0
    for j, seg in enumerate(segs):
        w = f"{where}.key_segments[{j}]"
        c.dict(seg, w)
        c.str(c.get(seg, "label", w), f"{w}.label")
        if seg.get("kind") not in SEGMENT_KINDS:
            raise c.fail(f"{w}.kind is {_kind(seg.get('kind'))}, expected one of {', '.join(SEGMENT_KINDS)}")
        start = c.int(c.get(seg, "start", w), f"{w}.start", 0, 1 << 40)
        stop = c.int(c.get(seg, "stop", w), f"{w}.stop", start + 1, 1 << 40)
        if start != at:
            raise c.fail(f"{w}.start is {start}, expected {at} (segments are contiguous from 0)")
        at = stop
        if seg["kind"] != "no_memory":
            c.int(c.get(seg, "frame", w), f"{w}.frame", 0, c.last_frame)
        if seg["kind"] == "memory":
            gh, gw = c.ints(c.get(seg, "grid_hw", w), f"{w}.grid_hw", 2, 1, MAX_GRID)
            if gh * gw != stop - start:
                raise c.fail(f"{w}.grid_hw {gh}x{gw} does not hold its {stop - start} keys")


def _check_entry(c: _Summary, e, i: int, size: tuple[int, int]) -> None:
    """One attention entry: the fields rendering reads, with their types (docs/summary_schema.md)."""
    where = f"attention[{i}]"
    c.dict(e, where)
    if not c.str(c.get(e, "layer_key", where), f"{where}.layer_key"):
        raise c.fail(f"{where}.layer_key is empty")
    kind = c.str(c.get(e, "kind", where), f"{where}.kind")
    c.int(e.get("call_index", 0), f"{where}.call_index")
    c.optional(e.get("frame"), c.int, f"{where}.frame", 0, c.last_frame)
    c.optional(e.get("file_stem"), c.str, f"{where}.file_stem")
    c.int(c.get(e, "heads", where), f"{where}.heads", 1, 1 << 12)
    c.optional(e.get("keys_per_group"), c.int, f"{where}.keys_per_group")
    _check_geometry(c, c.get(e, "geometry", where), kind, f"{where}.geometry")
    for j, q in enumerate(c.list(c.get(e, "queries", where), f"{where}.queries")):
        _check_query(c, q, f"{where}.queries[{j}]", size)
    files = c.dict(e.get("files", {}), f"{where}.files")
    for key in ("attn", "qkv"):
        c.optional(files.get(key), c.str, f"{where}.files.{key}")
    if e.get("quant") is not None:
        c.dict(e["quant"], f"{where}.quant")


def check_summary(summary, run_dir: Path, flag: str = "--run-dir") -> None:
    """Refuse a summary whose structure is not what `sam2-layerwise visualize` writes: a missing field or a
    value of the wrong type ends as one line naming --run-dir and the field, never deeper in rendering."""
    c = _Summary(run_dir, flag)
    if not isinstance(summary, dict) or summary.get("schema") != SCHEMA:
        raise InputError(f"{layout.SUMMARY} is not a sam2-layerwise summary (schema {SCHEMA!r})", flag=flag,
                         value=str(run_dir))
    if problem := version_problem(summary, layout.SUMMARY, SCHEMA_VERSION):
        raise InputError(problem, flag=flag, value=str(run_dir))
    fr = c.dict(c.get(summary, "frame", ""), "frame")
    c.int(c.get(fr, "orig_w", "frame"), "frame.orig_w", 1, MAX_SIDE)
    c.int(c.get(fr, "orig_h", "frame"), "frame.orig_h", 1, MAX_SIDE)
    c.int(c.get(fr, "image_size", "frame"), "frame.image_size", 1, 4 * MAX_GRID)
    pr = c.dict(summary.get("prompts") or {}, "prompts")
    for i, pt in enumerate(c.list(pr.get("points") or [], "prompts.points")):
        x, y, label = c.nums(pt, f"prompts.points[{i}]", 3)
        if label not in (0.0, 1.0):
            raise c.fail(f"prompts.points[{i}] has label {label:g}, expected 0 or 1")
    c.optional(pr.get("box"), c.nums, "prompts.box", 4)
    for i, q in enumerate(c.list(pr.get("queries") or [], "prompts.queries")):
        c.nums(q, f"prompts.queries[{i}]", 2)
    for i, d in enumerate(c.list(summary.get("query_locations") or [], "query_locations")):
        where = f"query_locations[{i}]"
        c.str(c.get(c.dict(d, where), "label", where), f"{where}.label")
        c.num(c.get(d, "x", where), f"{where}.x")
        c.num(c.get(d, "y", where), f"{where}.y")
    image = c.dict(summary.get("image") or {}, "image")
    c.optional(image.get("path"), c.str, "image.path")
    options = c.dict(summary.get("capture_options") or {}, "capture_options")
    c.optional(options.get("max_attn_queries"), c.int, "capture_options.max_attn_queries", 1)
    c.dict(summary.get("files", {}), "files")
    if summary.get("mode") == "video":
        frames = c.dict(c.get(summary, "frames", ""), "frames")
        tracked = c.list(c.get(frames, "list", "frames"), "frames.list")
        if not tracked:
            raise c.fail("frames.list is empty")
        for i, f in enumerate(tracked):
            c.int(c.get(c.dict(f, f"frames.list[{i}]"), "source_index", f"frames.list[{i}]"),
                  f"frames.list[{i}].source_index", 0, 1 << 40)
            c.str(c.get(f, "name", f"frames.list[{i}]"), f"frames.list[{i}].name")
        c.last_frame = len(tracked) - 1
        c.optional(frames.get("prompt_frame"), c.int, "frames.prompt_frame", 0, c.last_frame)
    for i, e in enumerate(c.list(c.get(summary, "attention", ""), "attention")):
        _check_entry(c, e, i, (fr["orig_w"], fr["orig_h"]))


def open_run(run_dir: str | Path, flag: str = "--run-dir") -> SavedRun:
    """Check that `run_dir` is a sam2-layerwise run directory and read its summary (checked: `check_summary`)."""
    p = Path(run_dir).expanduser()
    if not p.is_dir():
        raise InputError("is not a directory", flag=flag, value=str(run_dir))
    summary_path = p / layout.SUMMARY
    if not summary_path.is_file():
        raise InputError(f"is not a run directory (no {layout.SUMMARY}; make one with 'sam2-layerwise visualize')",
                         flag=flag, value=str(run_dir))
    try:
        size = summary_path.stat().st_size
        if size > MAX_SUMMARY_BYTES:
            raise InputError(f"{layout.SUMMARY} is {size} bytes, more than a run's summary can be "
                             f"({MAX_SUMMARY_BYTES})", flag=flag, value=str(run_dir))
        summary = json.loads(summary_path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not JSON, not UTF-8; RecursionError: [[[[...
        raise InputError(f"cannot read {layout.SUMMARY}: {condense(exc)}", flag=flag, value=str(run_dir)) from None
    check_summary(summary, p, flag)
    fr = summary["frame"]
    pr = summary.get("prompts") or {}
    prompts = Prompts(points=[Point(float(x), float(y), int(lab)) for x, y, lab in pr.get("points") or []],
                      box=tuple(float(v) for v in pr["box"]) if pr.get("box") else None,
                      queries=[(float(x), float(y)) for x, y in pr.get("queries") or []])
    locations = [(d["label"], float(d["x"]), float(d["y"])) for d in summary.get("query_locations") or []]
    image_path = (summary.get("image") or {}).get("path")
    return SavedRun(run_dir=p, summary=summary, frame=ImageFrame(fr["orig_w"], fr["orig_h"], fr["image_size"]),
                    prompts=prompts, locations=locations, image_path=Path(image_path) if image_path else None)


def load_photo(run: SavedRun, override: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The photograph the run was captured on (or `--image`), checked against the run's size. It is the user's
    own file, so it may lie outside the run; it must be an image (`load_image`)."""
    if override is None and (run.image_path is None or not layout.on_disk(run.image_path)):
        raise InputError(f"the photograph this run names is missing ({run.image_path}); pass --image PATH",
                         flag="--run-dir", value=str(run.run_dir))
    path = Path(override) if override is not None else run.image_path
    photo = load_image(path, flag="--image", max_pixels=max_pixels)
    h, w = photo.shape[:2]
    if (w, h) != (run.frame.orig_w, run.frame.orig_h):
        raise InputError(f"is {w}x{h}; the run was captured on a {run.frame.orig_w}x{run.frame.orig_h} image",
                         flag="--image", value=str(path))
    return photo


def _stem(entry: dict) -> str:
    """The record's file stem, as the summary stores it (older summaries: derived the way records do)."""
    if entry.get("file_stem"):
        return entry["file_stem"]
    return entry["layer_key"] if not entry.get("call_index") else f"{entry['layer_key']}__call{entry['call_index']}"


def _tensor_file(run: SavedRun, rel: str, where: str) -> dict:
    """A tensor file the summary names: a relative path that stays inside the run directory once symlinks are
    resolved, present, and loadable with weights_only=True as a dict. Anything else is one line."""
    def bad(what):
        return InputError(f"{layout.SUMMARY} {where} = {rel!r}: {what}", flag="--run-dir", value=str(run.run_dir))

    rel_path = Path(rel)
    if not rel or rel_path.is_absolute() or ".." in rel_path.parts or "\x00" in rel:
        raise bad("not a path inside the run directory (absolute paths and '..' are refused)")
    path = run.run_dir / rel_path
    try:
        inside = path.resolve().is_relative_to(run.run_dir.resolve())
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        inside = False
    if not inside:
        raise bad("resolves outside the run directory (through a symbolic link); refused")
    if not layout.on_disk(path):
        raise bad("no such file (deleted or moved?); capture the run again or draw without it")
    try:
        data = safe_load(path)
    except Exception as exc:  # noqa: BLE001 - whatever the file holds, it is the file's problem
        raise bad(f"cannot be loaded with torch.load(weights_only=True): {condense(exc)}") from None
    if not isinstance(data, dict):
        raise bad(f"holds {_kind(data)}, expected a mapping of tensors")
    return data


def _float_tensor(run: SavedRun, data: dict, key: str, dims: int, where: str) -> torch.Tensor:
    t = data.get(key)
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_quantized or t.is_meta \
            or not t.is_floating_point() or t.dim() != dims:
        shown = f"a {t.dim()}-d {t.dtype} tensor" if isinstance(t, torch.Tensor) else _kind(t)
        raise InputError(f"{where}: '{key}' is {shown}, expected a {dims}-d floating-point tensor", flag="--run-dir",
                         value=str(run.run_dir))
    return t


def _check_tensors(run: SavedRun, entry: dict, attn: dict | None, qkv: dict | None, queries: list[dict],
                   where: str) -> None:
    """The saved tensors fit the entry: shapes against heads, queries, key blocks and the geometry."""
    def bad(what):
        return InputError(f"{where}: {what}", flag="--run-dir", value=str(run.run_dir))

    heads, geo = entry["heads"], entry["geometry"]
    padded = tuple(geo.get("padded_key_grid_hw") or geo.get("key_grid_hw") or (0, 0))
    if attn is not None:
        probs = _float_tensor(run, attn, "probs", 3, where)
        if probs.shape[0] < len(queries) or probs.shape[1] != heads:
            raise bad(f"probs is {list(probs.shape)}, expected [{len(queries)} queries, {heads} heads, keys]")
        pooling = attn.get("key_pooling")
        if pooling is not None and not (geo.get("keys") == "memory" and isinstance(pooling, dict)):
            hw = pooling.get("pooled_hw") if isinstance(pooling, dict) else None
            if not (isinstance(pooling, dict) and _whole(pooling.get("factor")) and isinstance(hw, list)
                    and len(hw) == 2 and all(_whole(x) for x in hw)):
                raise bad(f"key_pooling is {_kind(pooling)}, expected null or {{factor, pooled_hw [h, w]}} of "
                          f"whole numbers > 0")
        keys = probs.shape[2]
    if qkv is not None:
        q, k, v = (_float_tensor(run, qkv, name, 4, where) for name in ("q", "k", "v"))
        groups = qkv.get("groups")
        if not isinstance(groups, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in groups):
            raise bad(f"groups is {_kind(groups)}, expected a list of whole numbers")
        scale = qkv.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise bad(f"scale is {_kind(scale)}, expected a finite number")
        if not (q.shape[0] == k.shape[0] == v.shape[0] == len(groups)) or q.shape[1] != heads \
                or k.shape[1] != heads or q.shape[3] != k.shape[3] or k.shape[2] != v.shape[2]:
            raise bad(f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not fit {len(groups)} groups of "
                      f"{heads} heads ([groups, heads, tokens, head_dim])")
        if attn is None:
            keys = k.shape[2]
        if entry["kind"].startswith("hiera"):
            hg = HieraLayerGeometry.from_dict(geo)
            for g in groups:
                r0, r1, c0, c1 = hg.key_rows_cols(g) if g < hg.groups else (0, 0, 0, 0)
                if g >= hg.groups or (r1 - r0) * (c1 - c0) != k.shape[2]:
                    raise bad(f"saved group {g} does not fit the geometry ({hg.groups} groups of {hg.keys_per_group} "
                              f"keys; k has {k.shape[2]})")
        for j, qs in enumerate(queries):
            if qs["group"] not in groups or qs["index"] >= q.shape[2]:
                raise bad(f"query {j} ({qs['label']}) is group {qs['group']} index {qs['index']}, not among the saved "
                          f"groups {groups[:8]} of {q.shape[2]} queries")
        if entry["kind"] == "decoder_image_to_token" and 0 in groups:
            gh, gw = geo["query_grid_hw"]
            if q.shape[2] != gh * gw:
                raise bad(f"q holds {q.shape[2]} image tokens, the geometry's query grid {gh}x{gw}")
        if entry["kind"] == "decoder_token_to_image" and 0 in groups:
            gh, gw = geo["key_grid_hw"]
            if k.shape[2] != gh * gw or q.shape[2] < len(geo.get("query_roles") or []):
                raise bad(f"q {list(q.shape)} and k {list(k.shape)} do not fit {len(geo.get('query_roles') or [])} "
                          f"token queries over a {gh}x{gw} key grid")
        if geo.get("key_roles") is not None and k.shape[2] != len(geo["key_roles"]) and geo.get("keys") == "tokens":
            raise bad(f"k holds {k.shape[2]} keys, the geometry names {len(geo['key_roles'])} key roles")
    if geo.get("keys") == "grid":
        for j, qs in enumerate(queries):
            r0, r1, c0, c1 = qs.get("key_block") or [0, geo["key_grid_hw"][0], 0, geo["key_grid_hw"][1]]
            if r1 > padded[0] or c1 > padded[1]:
                raise bad(f"query {j} ({qs['label']}) key_block {[r0, r1, c0, c1]} lies outside the "
                          f"{padded[0]}x{padded[1]} key grid")
            pooling = attn.get("key_pooling") if attn is not None else None
            if pooling:
                f, (ph, pw) = pooling["factor"], pooling["pooled_hw"]
                want = ph * pw if (ph, pw) == (-(-(r1 - r0) // f), -(-(c1 - c0) // f)) else None
            else:
                want = (r1 - r0) * (c1 - c0)
            if want != keys:
                raise bad(f"query {j} ({qs['label']}) has {keys} keys saved for a {r1 - r0}x{c1 - c0} key block"
                          + (f" pooled {pooling['factor']}x{pooling['factor']} to {pooling['pooled_hw']}" if pooling
                             else ""))
    elif geo.get("keys") == "tokens" and geo.get("key_roles") is not None and keys != len(geo["key_roles"]):
        raise bad(f"{keys} keys saved, {len(geo['key_roles'])} key roles in the geometry")
    elif geo.get("keys") == "memory":
        pooling = attn.get("key_pooling") if attn is not None else None
        segs = geo["key_segments"]
        if pooling:
            ps = pooling.get("segments") if isinstance(pooling, dict) else None
            if not (isinstance(ps, list) and len(ps) == len(segs) and all(
                    isinstance(p, dict) and p.get("label") == s["label"] and _whole(p.get("factor"))
                    and isinstance(p.get("start"), int) and isinstance(p.get("stop"), int) for p, s in zip(ps, segs))):
                raise bad("key_pooling does not name the geometry's key segments")
            for p, s in zip(ps, segs):
                hw = p.get("pooled_hw")
                if s["kind"] == "memory" and not (isinstance(hw, list) and len(hw) == 2 and all(_whole(x) for x in hw)
                                                  and hw[0] * hw[1] == p["stop"] - p["start"]):
                    raise bad(f"key_pooling segment {s['label']} does not hold its pooled grid")
            want = ps[-1]["stop"]
        else:
            want = segs[-1]["stop"]
        if keys != want:
            raise bad(f"{keys} keys saved, the key segments hold {want}")


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_GRID


def saved_views(run: SavedRun) -> list[RecordView]:
    """A RecordView per attention call whose tensors were saved (`--save-attn` and/or `--save-qkv`).

    Probabilities come from `__attn.pt` (exact, possibly key-pooled); without it they are recomputed from
    `__qkv.pt` by `attention_probs`, the capture's own recomputation. Tensor paths must stay inside the run
    directory, files are loaded with weights_only=True, and their shapes are checked against the summary.
    """
    views = []
    limit = (run.summary.get("capture_options") or {}).get("max_attn_queries")
    c = _Summary(run.run_dir, "--run-dir")
    for i, entry in enumerate(run.summary["attention"]):
        files = entry.get("files") or {}
        where = f"attention[{i}] ({entry['layer_key']})"
        attn = _tensor_file(run, files["attn"], f"attention[{i}].files.attn") if files.get("attn") else None
        qkv = _tensor_file(run, files["qkv"], f"attention[{i}].files.qkv") if files.get("qkv") else None
        if attn is None and qkv is None:
            continue
        queries = (attn or qkv).get("queries") or entry["queries"]
        for j, q in enumerate(c.list(queries, f"{where} queries")):
            _check_query(c, q, f"{where} queries[{j}]", (run.frame.orig_w, run.frame.orig_h))
        _check_tensors(run, entry, attn, qkv, queries, where)
        if attn is not None:
            probs, pooling = attn["probs"], attn.get("key_pooling")
        else:
            groups = list(qkv["groups"])
            rows = []
            for q in queries:
                gi = groups.index(q["group"])
                qv = qkv["q"][gi][:, q["index"]:q["index"] + 1]  # [heads, 1, d]
                rows.append(attention_probs(qv, qkv["k"][gi], float(qkv["scale"]))[:, 0])  # [heads, K]
            probs = torch.stack(rows) if rows else torch.zeros((0, entry["heads"], qkv["k"].shape[2]))
            pooling = None
        views.append(RecordView(layer_key=entry["layer_key"], kind=entry["kind"], call_index=entry.get("call_index", 0),
                                stem=_stem(entry), heads=entry["heads"], geometry=entry["geometry"], queries=queries,
                                probs=probs, key_pooling=pooling, qkv=qkv,
                                probs_transformed=probs_transformed(entry.get("quant")), recomputed=attn is None,
                                query_limit=int(limit) if limit is not None else None))
    return views


def rerender_writer(run_dir: Path) -> RunWriter:
    """A RunWriter that owns only the pictures (`attn_images/`, `attn_overlays/`, `attn_topk/`) and the summary:
    the run's tensors and predictions stay; picture folders this pass did not draw are removed with the old
    summary, so no top-k link points at an old picture."""
    return RunWriter(run_dir, owned=(layout.SUMMARY, *RENDER_DIRS), flag="--run-dir")


def extra_locations(views: list[RecordView], points) -> list[tuple[str, float, float]]:
    """`--query-points` as labelled places (extra0, extra1, ...); they are recomputed from saved q/k, so a run
    that saved none is refused rather than drawn without them."""
    extra = [(f"extra{i}", float(x), float(y)) for i, (x, y) in enumerate(points)]
    if extra and not any(v.qkv is not None for v in views):
        raise InputError("new places are recomputed from saved q/k, and this run saved attention rows only "
                         "(capture with --save-qkv)", flag="--query-points",
                         value=" ".join(f"{x:g} {y:g}" for _, x, y in extra))
    return extra


def rerender(run: SavedRun, photo: np.ndarray | None, plan: RenderPlan, *, extra_points=()) -> dict:
    """Draw the saved run again into its own directory; returns the updated summary."""
    views = saved_views(run)
    if not views:
        raise InputError("holds no saved attention tensors (capture with --save-attn and/or --save-qkv)",
                         flag="--run-dir", value=str(run.run_dir))
    extra = extra_locations(views, extra_points)
    # without --max-attn-queries: the saved queries plus the extra points, not the run's uncaptured places
    locations = (run.locations if plan.maps.max_queries is not None else []) + extra
    summary = run.summary
    with rerender_writer(run.run_dir) as writer:
        try:
            result, files = render_views(views, photo, run.frame, plan, writer, prompts=run.prompts,
                                         extra_locations=locations)
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            # the summary and tensors are untrusted input: what the checks above did not foresee is still the
            # run's problem, in one line (the cause stays chained for --traceback)
            raise InputError(f"the saved tensors and {layout.SUMMARY} do not fit together: {condense(exc)}",
                             flag="--run-dir", value=str(run.run_dir)) from exc
        for key in (*RENDER_DIRS, "attn_topk_links"):
            summary.setdefault("files", {}).pop(key, None)
        summary["files"].update(files)
        per_record = result.by_record()
        for entry in summary["attention"]:
            ef = entry.setdefault("files", {})
            ef.pop(layout.ATTN_IMAGES, None)
            ef.pop(layout.ATTN_OVERLAYS, None)
            ef.update(per_record.get((entry["layer_key"], entry.get("call_index", 0)), {}))
        summary["render"] = {**plan.to_dict(), "command": "render", "skipped_calls_without_tensors":
                             len(summary["attention"]) - len(views)}
        atomic_write_json(summary, writer.path(layout.SUMMARY))
    return summary
