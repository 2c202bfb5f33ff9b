"""Precompute what the browser viewer shows, into a folder of a run: `index.html` and `viewer_data/`.

    <out>/index.html                 the page (a copy of viewer/static/index.html; opens from disk)
    <out>/viewer_data/viewer.js, viewer.css
    <out>/viewer_data/index.js       the run: frame, prompts, masks, metrics table, ranking, impact, layer list,
                                     attribution (compare --attribute: per-layer change of mask IoU)
    <out>/viewer_data/layers/L<i>.js one attention call each, loaded when the page selects it
    <out>/viewer_data/photo.jpg      the photograph, long side at most 1024 px
    <out>/viewer_data/masks/<side>_<i>.png  each model's masks, tinted, at the photo's display size

Data files are JavaScript that call `SAM2LW.register(kind, id, data)`: a page opened as a file cannot fetch()
its neighbours, but it can load <script> files. Every map is computed here by the renderer's own code
(`render.maps.build_maps`: window, q-pooling, padding, decoder token roles), so the page only places values
that are already on their key grid. Values travel as little-endian float32, base64.

A map entry (one query of one attention call, both sides):
    label, kind ("query" an image place, "token" a decoder token, "to_token" image tokens attending to a token),
    display "grid" (values on a key grid: grid_hw incl. window padding, real_hw without it, block
    [r0, r1, c0, c1) the values cover, row-major) or "tokens" (values over `roles`),
    token (where the query sits: cell, grid_hw, group, index, pixel_box, key_block, source_cells, window_rc),
    query_box / query_cells / marks (what the PNG renderer outlines), notes per side (recomputed, pooled),
    heads: [{head: null (mean) | h, fp: b64, q: b64}].

Video runs (`visualize --video --viewer`, `generate` on a `compare --video` run) add `viewer_data/frames/
frame_<i>.jpg` (every selected frame), masks per frame (`masks/<side>_<i>.png`, i = frame), the index's `video`
section (frames: index, name, source index, direction, what SAM 2's memory held) and `frame` on every layer.
A memory cross-attention map has display "memory": `segments` in key order (label mem_f<j> / ptr_f<j> /
no_memory, kind, frame, conditioning, age, grid_hw, and its `offset`/`length` in the values), the values being
each memory frame's attention on that frame's token grid (`render.video.memory_grids`), then the pointer tokens.
"""

from __future__ import annotations

import base64
import datetime as _dt
import io
import json
import logging
import math
from importlib import resources
from pathlib import Path

import numpy as np

from sam2_layerwise.geometry import HieraLayerGeometry, ImageFrame
from sam2_layerwise.render.maps import AttentionMap, MapOptions, RecordView, _heads, build_maps
from sam2_layerwise.store.layout import on_disk
from sam2_layerwise.store.atomic import atomic_write_bytes

log = logging.getLogger("sam2_layerwise")

SCHEMA = "sam2-layerwise/viewer"
VERSION = 1
DATA = "viewer_data"
STATIC = ("index.html", "viewer.js", "viewer.css")
PHOTO_SIDE = 1024  # the photograph's long side in the page, as the PNG overlays
MAP_OPTIONS = MapOptions(max_queries=None, per_head=True, max_tokens=1 << 62)  # never pool: the page shows tokens
MASK_RGB = {"fp": (30, 144, 255), "q": (255, 140, 0)}
CMAPS = {"attn": "plasma", "seq": "viridis", "div": "RdBu_r"}  # the renderer's and the plots' colormaps

# Heatmap columns: (metric, label, diverging). Only columns with a finite value somewhere are shown.
COMPARE_COLUMNS = [
    ("js_mean", "JS divergence, mean over queries (bits)", False),
    ("js_p95", "JS divergence, 95th percentile (bits)", False),
    ("js_max", "JS divergence, max (bits)", False),
    ("entropy_norm_delta", "Δ normalised entropy (Q − FP)", True),
    ("entropy_norm_fp", "normalised entropy, FP", False),
    ("entropy_norm_q", "normalised entropy, Q", False),
    ("topk_overlap", "top-k overlap |T_k(FP) ∩ T_k(Q)| / k", False),
    ("q_mass_on_fp_topk", "Q's mass on FP's top-k", False),
    ("topk_mass_fp", "top-k mass, FP", False),
    ("topk_mass_q", "top-k mass, Q", False),
    ("q_rel_err", "q relative error ‖Q − FP‖ / ‖FP‖", False),
    ("k_rel_err", "k relative error", False),
    ("v_rel_err", "v relative error", False),
    ("out_rel_err", "attention output relative error", False),
    ("all_queries_entropy_norm_delta", "Δ normalised entropy over every query", True),
    ("all_queries_topk_mass_delta", "Δ top-k mass over every query", True),
    ("all_queries_max_prob_delta", "Δ max probability over every query", True),
]
SINGLE_COLUMNS = [
    ("entropy_norm", "normalised entropy, mean over every query", False),
    ("max_prob", "max probability, mean over every query", False),
    ("topk_mass", "top-k mass, mean over every query", False),
    ("entropy", "entropy (nats), mean over every query", False),
]
TOKEN_KINDS = ("decoder_self", "decoder_token_to_image")  # queries are decoder tokens, not image places


# -- values ---------------------------------------------------------------------------------------------------
def b64(values: np.ndarray) -> str:
    """float values (any shape, row-major) -> base64 of little-endian float32."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def _finite(v):
    """JSON numbers: NaN/inf -> None; numpy scalars -> Python."""
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(float(v)) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def js_file(kind: str, ident: str, data) -> bytes:
    """A data file the page loads with a <script> tag. JSON is JavaScript; `</` is escaped so the text stays
    inert even if a file is ever inlined into HTML. A file name that is not UTF-8 (a lone surrogate in Python) is
    written as the JSON escape ensure_ascii would write (`\\udce9`), which JavaScript reads as the same string."""
    text = json.dumps(_finite(data), separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    text = text.replace("</", "<\\/")
    return f"SAM2LW.register({json.dumps(kind)},{json.dumps(ident)},{text});\n".encode("utf-8", "backslashreplace")


# -- where a query sits -----------------------------------------------------------------------------------
def token_info(kind: str, geometry: dict, spec: dict | None) -> dict | None:
    """An image query's place: cell on its query grid (grid_hw), group/index in q, pixel box (original
    pixels), the key block it attends over and, for windowed blocks, the window (row, col)."""
    if spec is None or spec.get("cell") is None:
        return None
    info = {"label": spec.get("label"), "cell": list(spec["cell"]), "group": spec.get("group"),
            "index": spec.get("index"), "pixel_box": spec.get("pixel_box"), "key_block": spec.get("key_block"),
            "source_cells": spec.get("source_cells"), "window_rc": None, "grid_hw": None}
    if kind.startswith("hiera"):
        hg = HieraLayerGeometry.from_dict(geometry)
        info["grid_hw"] = list(hg.out_hw)
        if hg.window and spec.get("key_block"):
            info["window_rc"] = [spec["key_block"][0] // hg.window, spec["key_block"][2] // hg.window]
    elif geometry.get("query_grid_hw"):
        info["grid_hw"] = list(geometry["query_grid_hw"])
    return info


def _entry(m: AttentionMap, view: RecordView, spec: dict | None) -> dict:
    kind = "to_token" if m.label.startswith("to_") and spec is None else "query" if spec and spec.get("cell") \
        is not None else "token"
    e = {"label": m.label, "kind": kind, "display": m.display, "token": token_info(view.kind, view.geometry, spec),
         "query_box": m.query_box, "query_cells": m.query_cells, "window": m.window,
         "marks": [list(p) for p in m.marks], "notes": {}, "heads": []}
    if m.display == "grid":
        gh, gw = m.grid.shape
        e.update(grid_hw=[gh, gw], real_hw=list(m.real_hw), block=list(m.window or [0, gh, 0, gw]))
    else:
        e["roles"] = list(m.token_roles)
    return e


def _values(m: AttentionMap, e: dict) -> np.ndarray:
    if e["display"] == "grid":
        r0, r1, c0, c1 = e["block"]
        return m.grid[r0:r1, c0:c1]  # [bh, bw] on the key grid, row-major
    return np.asarray(m.token_values, dtype=np.float32)


def _note(m: AttentionMap, values: np.ndarray) -> str:
    """The head mean's note: what the renderer's title adds after the head, and non-finite values inside the
    drawn keys (the model's own NaN/inf: a finding the page would otherwise draw as "not a key")."""
    notes = [m.title.partition("head mean")[2].strip(" ,")]
    if not np.isfinite(values).all():
        notes.append(f"{int((~np.isfinite(values)).sum())} of {values.size} values are NaN/inf (the model's own)")
    return ", ".join(filter(None, notes))


def map_entries(views: dict[str, RecordView], frame: ImageFrame, prompts) -> list[dict]:
    """Every map of one attention call for each side ("fp", and "q" when present), paired by name and grouped
    by query: head mean first, then every head."""
    sides = list(views)
    if views[sides[0]].geometry.get("keys") == "memory":
        return memory_entries(views)
    maps = {side: build_maps(v, frame, MAP_OPTIONS, prompts=prompts) for side, v in views.items()}
    by_name = {side: {m.name: m for m in ms} for side, ms in maps.items()}
    specs = {q["label"]: q for q in views[sides[0]].queries}
    entries: dict[str, dict] = {}
    for m in maps[sides[0]]:
        pair = {side: by_name[side].get(m.name) for side in sides}
        if any(x is None for x in pair.values()):
            continue  # a map one side could not draw (its q/k were not saved): nothing to compare
        e = entries.get(m.label)
        if e is None:
            e = entries[m.label] = _entry(m, views[sides[0]], specs.get(m.label))
        values = {side: _values(x, e) for side, x in pair.items()}
        if m.head is None:  # what the renderer's title adds after the head: recomputed, pooled, quantizer missing
            e["notes"] = {side: _note(x, values[side]) for side, x in pair.items()}
        e["heads"].append({"head": m.head, **{side: b64(v) for side, v in values.items()}})
    return list(entries.values())


def memory_layout(segments: list[dict], query_grid_hw) -> list[dict]:
    """The page's view of a memory call's key segments: where each one's values sit in a map's values (a memory
    frame: its whole token grid, row-major; pointer tokens and SAM 2's no-memory token: one value each)."""
    out, at = [], 0
    for seg in segments:
        hw = list(seg.get("grid_hw") or query_grid_hw) if seg["kind"] == "memory" else None
        length = hw[0] * hw[1] if hw else int(seg["stop"]) - int(seg["start"])
        out.append({"label": str(seg["label"])[:60], "kind": seg["kind"], "frame": seg.get("frame"),
                    "conditioning": seg.get("conditioning"), "age": seg.get("age"), "grid_hw": hw,
                    "name": str(seg["name"])[:200] if seg.get("name") is not None else None,
                    "offset": at, "length": length})
        at += length
    return out


def memory_entries(views: dict[str, RecordView]) -> list[dict]:
    """The maps of one memory cross-attention call for each side: per selected query, the head mean then every
    head, values laid out as `memory_layout` says (each memory frame on its own grid, as the PNG panels draw it)."""
    from sam2_layerwise.render.video import memory_grids, segment_values

    sides = list(views)
    first = views[sides[0]]
    geo = first.geometry
    segs, grid_hw = geo["key_segments"], geo["query_grid_hw"]
    layout = memory_layout(segs, grid_hw)
    notes = {side: ("recomputed from q/k" + (" (without the kernel's probability quantizer)"
                                             if v.probs_transformed else "")) if v.recomputed else ""
             for side, v in views.items()}
    entries = []
    for qi, spec in enumerate(first.queries):
        cell = spec.get("cell")
        entry = {"label": spec["label"], "kind": "query", "display": "memory",
                 "token": token_info(first.kind, geo, spec), "query_box": spec.get("pixel_box"),
                 "query_cells": [cell[0], cell[0] + 1, cell[1], cell[1] + 1] if cell else None, "window": None,
                 "marks": [], "segments": layout, "notes": {k: v for k, v in notes.items() if v}, "heads": []}
        per_side = {side: _heads(v.probs[qi], per_head=True) for side, v in views.items()}  # [(head, [K])]
        for n, (head, _) in enumerate(per_side[sides[0]]):
            row = {"head": head}
            for side, heads in per_side.items():
                values, pooling = heads[n][1], views[side].key_pooling
                grids = {seg["label"]: grid for seg, grid, _ in memory_grids(values, segs, pooling, grid_hw)}
                parts = [grids[seg["label"]].reshape(-1) if seg["kind"] == "memory"
                         else segment_values(values, seg, pooling)[0] for seg in segs]
                row[side] = b64(np.concatenate(parts))
            entry["heads"].append(row)
        entries.append(entry)
    return entries


def click_support(kind: str, full: bool, qkv: dict | None, geometry: dict, frame: ImageFrame) -> dict:
    """What a click on the photograph can compute at this call: "any" place (every group saved), "saved"
    windows only (their key blocks, and the original-pixel boxes they cover), "none" (no q/k saved) or "tokens"
    (queries are decoder tokens)."""
    if kind in TOKEN_KINDS:
        return {"mode": "tokens"}
    if not kind.startswith(("hiera", "memory", "decoder_image_to_token")):
        return {"mode": "none"}
    if full:
        return {"mode": "any"}
    if not qkv:
        return {"mode": "none"}
    groups = [int(g) for g in qkv.get("groups", [])]
    if not kind.startswith("hiera") or not geometry.get("window"):  # one group: the whole grid
        return {"mode": "any" if 0 in groups else "none"}
    hg = HieraLayerGeometry.from_dict(geometry)
    blocks = [list(hg.key_rows_cols(g)) for g in groups if g < hg.groups]
    boxes = []
    for r0, r1, c0, c1 in blocks:  # padding cells have no pixels: the box ends at the real grid
        r1, c1 = min(r1, hg.in_h), min(c1, hg.in_w)
        x0, y0 = frame.token_box(r0, c0, hg.in_h, hg.in_w)[:2]
        boxes.append([x0, y0, *frame.token_box(r1 - 1, c1 - 1, hg.in_h, hg.in_w)[2:]])
    return {"mode": "saved", "blocks": blocks, "boxes": boxes}


# -- pictures ---------------------------------------------------------------------------------------------
def photo_jpeg(photo: np.ndarray | None, frame: ImageFrame) -> tuple[bytes, tuple[int, int]]:
    """The photograph with its long side at most PHOTO_SIDE (a grey stand-in of the right shape when the
    photograph is not available), as JPEG bytes and its (width, height)."""
    from PIL import Image

    from sam2_layerwise.render.attention import fit_photo

    if photo is None:
        s = min(1.0, PHOTO_SIDE / max(frame.orig_w, frame.orig_h))
        img = Image.new("RGB", (max(1, round(frame.orig_w * s)), max(1, round(frame.orig_h * s))), (96, 96, 96))
    else:
        img, _ = fit_photo(photo, PHOTO_SIDE)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), img.size


def mask_png(mask: np.ndarray, size: tuple[int, int], rgb: tuple[int, int, int]) -> bytes:
    """[H, W] bool mask -> RGBA PNG at `size` (nearest): the colour at alpha 0.55 inside, opaque on the edge."""
    from PIL import Image

    small = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0  # [h, w]
    pad = np.pad(small, 1, mode="edge")
    edge = small & ~(pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:])
    out = np.zeros((*small.shape, 4), dtype=np.uint8)
    out[small, :3] = rgb
    out[small, 3] = 140
    out[edge, 3] = 255
    buf = io.BytesIO()
    Image.fromarray(out, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def colormap_hex(name: str) -> str:
    """256 RGB entries of a matplotlib colormap as one hex string (the page's lookup table)."""
    from sam2_layerwise.render.colors import check_cmap

    rgb = check_cmap(name)(np.linspace(0, 1, 256), bytes=True)[:, :3]
    return rgb.astype(np.uint8).tobytes().hex()


# -- writing ----------------------------------------------------------------------------------------------
class ViewerWriter:
    """Writes one viewer folder `out` through a RunWriter (files are staged and appear with the run)."""

    def __init__(self, writer, out: str):
        self.writer, self.out = writer, out.strip("/")
        self.files: list[str] = []

    def rel(self, name: str) -> str:
        """A path relative to the page (what the page's data names)."""
        return f"{DATA}/{name}"

    def write(self, name: str, data: bytes) -> str:
        rel = f"{self.out}/{name}"
        atomic_write_bytes(data, self.writer.path(rel))
        self.files.append(rel)
        return rel

    def static(self) -> None:
        pkg = resources.files("sam2_layerwise.viewer") / "static"
        for name in STATIC:
            data = (pkg / name).read_bytes()
            self.write(name if name == "index.html" else f"{DATA}/{name}", data)


def layer_label(name: str, layer_key: str, call_index: int, kind: str, frame: int | None = None) -> str:
    """The readable layer name the analysis tables and plots use (`trunk.blocks.12 (global)`); in a video run
    the frame the call ran on instead of the call index (`memory_attention.layers.0.cross_attn_image (mem cross)
    · frame 3`)."""
    from sam2_layerwise.analysis.generate import LayerPair

    label = LayerPair(order=0, layer_key=layer_key, call_index=0 if frame is not None else call_index, name=name,
                      kind=kind, heads=0, fp={}, q={}).label
    return label if frame is None else f"{label} · frame {frame}"


def write_layers(vw: ViewerWriter, calls: list[dict], frame: ImageFrame, prompts, start: int = 0) -> list[dict]:
    """calls: [{key, call, name, kind, heads, views {side: RecordView | None}, click, frame (video runs)}] in
    model order -> the index's layer list; each call's maps go to `layers/L<i>.js` (i from `start`)."""
    layers = []
    for i, c in enumerate(calls, start):
        ident = f"L{i:03d}"
        views = {side: v for side, v in c["views"].items() if v is not None}
        entries = map_entries(views, frame, prompts) if len(views) == len(c["views"]) and views else []
        geo = c["geometry"]
        data = {"id": ident, "key": c["key"], "call": c["call"], "frame": c.get("frame"), "kind": c["kind"],
                "heads": c["heads"],
                "geometry": {k: geo.get(k) for k in ("keys", "key_grid_hw", "padded_key_grid_hw", "query_grid_hw",
                                                     "window", "q_stride", "windows_hw", "query_roles", "key_roles")},
                "maps": entries}
        file = None
        if entries:
            vw.write(f"{DATA}/layers/{ident}.js", js_file("layer", ident, data))
            file = vw.rel(f"layers/{ident}.js")
        layers.append({"id": ident, "key": c["key"], "call": c["call"], "frame": c.get("frame"), "label": c["label"],
                       "kind": c["kind"], "heads": c["heads"], "file": file, "click": c["click"],
                       "queries": [e["label"] for e in entries],
                       "note": None if entries else "no attention saved for this call"})
    return layers


def write_pictures(vw: ViewerWriter, photo, photo_note: str | None, frame: ImageFrame,
                   sides: list[dict]) -> dict:
    """photo.jpg and the tinted masks; returns the index's photo entry and fills each side's `masks`."""
    jpeg, size = photo_jpeg(photo, frame)
    vw.write(f"{DATA}/photo.jpg", jpeg)
    for side in sides:
        masks = side.pop("mask_arrays", None)
        side["masks"] = []
        if masks is None:
            continue
        for i, m in enumerate(masks):
            name = f"masks/{side['id']}_{i}.png"
            vw.write(f"{DATA}/{name}", mask_png(m, size, MASK_RGB.get(side["id"], MASK_RGB["fp"])))
            ious = side.get("pred_iou") or []
            side["masks"].append({"src": vw.rel(name), "index": i, "area": float(m.mean()),
                                  "pred_iou": ious[i] if i < len(ious) else None})
    return {"src": vw.rel("photo.jpg"), "width": size[0], "height": size[1], "note": photo_note}


def _whole_or_none(v, hi: int | None = None):
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (hi is None or v < hi)
    return v if ok else None


def frame_items(section) -> list[dict]:
    """The summary's (untrusted) `frames` section as the page's frame list: each field checked, names cut short;
    a section that names no frame of its own is an empty list."""
    items = (section or {}).get("list") if isinstance(section, dict) else None
    out = []
    for i, f in enumerate(items if isinstance(items, list) else []):
        if not isinstance(f, dict) or f.get("index") != i:
            raise ValueError(f"frames.list[{i}] is not frame {i}")
        mem = f.get("memory") if isinstance(f.get("memory"), dict) else None
        frames_of = (lambda key: [x for x in mem.get(key) or [] if _whole_or_none(x) is not None][:64]) if mem \
            else None
        out.append({"index": i, "name": str(f.get("name"))[:200], "source_index": _whole_or_none(f.get("source_index")),
                    "direction": f.get("direction") if f.get("direction") in ("prompt", "forward", "backward") else None,
                    "tracked": f.get("tracked") is True,
                    "memory": {"memory_frames": frames_of("memory_frames"),
                               "conditioning_frames": frames_of("conditioning_frames"),
                               "pointer_frames": frames_of("pointer_frames"),
                               "verified": mem.get("verified") is True} if mem else None})
    return out


def write_video_pictures(vw: ViewerWriter, section: dict, image_of, note: str | None, frame: ImageFrame,
                         sides: list[dict]) -> tuple[dict, dict]:
    """A video run's pictures: every selected frame as `frames/frame_<i>.jpg`, each side's mask of every frame
    (`sides[..]["mask_arrays"]` [T, H, W]: masks/<side>_<i>.png, i = frame) and photo.jpg (the prompt frame).
    `image_of(i)`: frame i as HWC uint8, or None (grey stand-ins). Returns the index's photo and video entries."""
    frames = frame_items(section)
    prompt = _whole_or_none(section.get("prompt_frame"), len(frames)) or 0
    photo_entry = write_pictures(vw, image_of(prompt) if image_of else None, note, frame, sides)
    for f in frames:
        jpeg, _ = photo_jpeg(image_of(f["index"]) if image_of else None, frame)
        name = f"frames/frame_{f['index']:04d}.jpg"
        vw.write(f"{DATA}/{name}", jpeg)
        f["photo"] = vw.rel(name)
    return photo_entry, {"frames": frames, "prompt_frame": prompt, "note": note}


def heatmap_table(rows: list[dict], layers: list[dict], columns) -> dict:
    """rows: one per (layer_key, call_index, head) with metric columns -> {layers: [layer ids in model order],
    heads: max heads, columns: [{key, label, diverging}], values: {key: [[value per head] per layer]}}."""
    ids = {(l["key"], l["call"]): l["id"] for l in layers}
    order = [l["id"] for l in layers]
    present: dict[str, dict[int, dict]] = {}
    for r in rows:
        ident = ids.get((r["layer_key"], int(r.get("call_index") or 0)))
        if ident is not None:
            present.setdefault(ident, {})[int(r["head"])] = r
    hm_layers = [i for i in order if i in present]
    n_heads = max((h + 1 for d in present.values() for h in d), default=0)
    cols, values = [], {}
    for key, label, diverging in columns:
        grid = [[_num(present[i].get(h, {}).get(key)) if h in present[i] else None for h in range(n_heads)]
                for i in hm_layers]
        if any(v is not None for row in grid for v in row):
            cols.append({"key": key, "label": label, "diverging": diverging})
            values[key] = grid
    heads_of = {i: sorted(present[i]) for i in hm_layers}
    return {"layers": hm_layers, "heads": n_heads, "present": [heads_of[i] for i in hm_layers], "columns": cols,
            "values": values}


def _num(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


ATTRIBUTION_TEXT = {
    "restore": "IoU of the chosen mask against FP's with only this layer restored to full precision, minus the "
               "quantized model's: > 0 means quantizing this layer costs that much IoU",
    "isolate": "IoU of the chosen mask against FP's with only this layer quantized, minus 1: < 0 is what "
               "quantizing this layer alone costs",
}


def attribution_entry(attribution: dict | None, layers: list[dict]) -> dict | None:
    """`compare --attribute`'s per-unit IoU changes (as generate read them: checked) for the page, each unit
    with the id of its attention call when it is one (a Hiera block's or decoder attention layer's unit key is
    its layer key); None without attribution."""
    if not attribution or not attribution.get("units"):
        return None
    ids: dict[str, str] = {}
    for layer in layers:
        ids.setdefault(layer["key"], layer["id"])
    units = []
    for u in attribution["units"]:
        key = str(u["unit"])[:200]
        units.append({"unit": key, "kind": str(u.get("kind"))[:40], "order": u.get("order"),
                      "sites": u.get("sites"), "layer": ids.get(key),
                      "restart": u["restart"][:80] if isinstance(u.get("restart"), str) else None,
                      "chosen_changed": u["chosen_changed"] if isinstance(u.get("chosen_changed"), bool) else None,
                      **{k: _num(u.get(k)) for k in ("iou", "baseline_iou", "delta_iou", "delta_iou_mean")}})
    mode = attribution["mode"]
    return {"mode": mode, "definition": ATTRIBUTION_TEXT[mode], "units": units}


def write_index(vw: ViewerWriter, index: dict) -> None:
    base = {"schema": SCHEMA, "version": VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cmaps": {k: colormap_hex(v) for k, v in CMAPS.items()}, "cmap_names": CMAPS}
    vw.write(f"{DATA}/index.js", js_file("index", "index", {**base, **index}))
    vw.static()


# -- a compare run (generate) ---------------------------------------------------------------------------------
def _load_masks(run, half_name: str, summary: dict, frame: ImageFrame):
    """masks [M, H, W] bool and predicted IoUs of one half, or (None, note) when they cannot be read."""
    import torch

    from sam2_layerwise.store.atomic import safe_load
    from sam2_layerwise.store.layout import PREDICTIONS

    rel = (summary.get("prediction") or {}).get("file", PREDICTIONS)
    try:
        pred = safe_load(run.path(half_name, rel))
        masks = pred["masks"]
        ious = pred["iou_predictions"]
        if not isinstance(masks, torch.Tensor) or masks.dim() != 3 or tuple(masks.shape[1:]) != (frame.orig_h,
                                                                                                frame.orig_w):
            raise ValueError("masks do not fit the photograph")
        return masks.bool().numpy(), [_num(v) for v in torch.as_tensor(ious).flatten().tolist()]
    except Exception as exc:  # noqa: BLE001 - a damaged prediction file costs the masks, not the page
        log.warning("viewer: %s/%s: cannot show its masks (%s)", half_name, rel, exc)
        return None, []


def _compare_photo(run, frame: ImageFrame):
    """The photograph the manifest names, if it is still there and is the same file (SHA-256)."""
    from sam2_layerwise.inputs import DEFAULT_MAX_PIXELS, load_image
    from sam2_layerwise.store.compare_run import sha256_file

    image = run.manifest.get("image") or {}
    path = Path(str(image.get("path") or ""))
    if not image.get("path") or not on_disk(path):
        return None, f"photograph not found ({path}); shown on grey"
    try:
        if image.get("sha256") and sha256_file(path) != image["sha256"]:
            return None, f"photograph {path} changed since the capture (SHA-256 differs); shown on grey"
        # the capture's own photograph: as large as the capture took it (its --max-pixels)
        photo = load_image(path, max_pixels=max(DEFAULT_MAX_PIXELS, frame.orig_w * frame.orig_h))
    except Exception as exc:  # noqa: BLE001 - unreadable now: the page is still written, on grey
        return None, f"photograph {path} cannot be read ({exc}); shown on grey"
    if photo.shape[:2] != (frame.orig_h, frame.orig_w):
        return None, f"photograph {path} is not {frame.orig_w}x{frame.orig_h} any more; shown on grey"
    return photo, None


def write_compare_viewer(run, result: dict, writer, out: str) -> list[str]:
    """The viewer of a compare run, next to `generate`'s tables in `out/`: `run` is the CompareRun, `result`
    what `analysis.generate.analyse` returned. Returns the files written (run-relative)."""
    from sam2_layerwise.render.saved import saved_views
    from sam2_layerwise.viewer.source import open_viewer_run

    vrun = open_viewer_run(run.run_dir, flag="--run_dir")  # both halves read by render.saved.open_run (checked)
    vw = ViewerWriter(writer, out)
    views = {h.side: {(v.layer_key, v.call_index): v for v in saved_views(h.saved)} for h in vrun.halves}
    calls = []
    full = run.mode == "full"
    video = vrun.halves[0].summary.get("mode") == "video"
    for key, call in vrun.order:
        entry = vrun.halves[0].entries[(key, call)]
        side_views = {h.side: views[h.side].get((key, call)) for h in vrun.halves}
        fp_view = side_views["fp"]
        has_full = full and all("full" in (h.entries[(key, call)].get("files") or {}) for h in vrun.halves)
        at = _call_frame(entry, vrun) if video else None
        calls.append({"key": key, "call": call, "name": entry.get("name", key), "kind": entry["kind"],
                      "heads": entry["heads"], "geometry": entry["geometry"], "views": side_views, "frame": at,
                      "label": layer_label(entry.get("name", key), key, call, entry["kind"], at),
                      "click": click_support(entry["kind"], has_full, fp_view.qkv if fp_view else None,
                                             entry["geometry"], vrun.frame)})
    del views
    if full:
        _image_to_token_qkv(vrun, calls)
    layers = write_layers(vw, calls, vrun.frame, vrun.prompts)
    sides = []
    for h in vrun.halves:
        masks, ious = _load_masks(run, "original" if h.side == "fp" else "quantized", h.summary, vrun.frame)
        sides.append({"id": h.side, "title": h.title, "mask_arrays": masks, "pred_iou": ious,
                      "best": (h.summary.get("prediction") or {}).get("best")})
    video_entry = None
    if video:
        source, note = _compare_frames(run, vrun)
        try:
            photo_entry, video_entry = write_video_pictures(vw, vrun.halves[0].summary.get("frames"),
                                                            source.image if source else None, note, vrun.frame, sides)
        except ValueError as exc:  # the summary's frames section is malformed
            from sam2_layerwise.errors import InputError

            raise InputError(f"original/layerwise_summary.json: {exc}", flag="--run_dir",
                             value=str(run.run_dir)) from None
        finally:
            if source is not None:
                source.close()
    else:
        photo, note = _compare_photo(run, vrun.frame)
        photo_entry = write_pictures(vw, photo, note, vrun.frame, sides)
    models = run.manifest.get("models") or {}
    index = {
        "kind": "compare", "mode": run.mode, "title": f"{run.run_dir.name}: float vs quantized ({run.mode} mode)",
        "run_name": run.run_dir.name, "frame": vrun.frame.to_dict(), "photo": photo_entry,
        "prompts": vrun.prompts.to_dict(), "sides": sides, "layers": layers,
        "models": {side: {k: (models.get(half) or {}).get(k) for k in ("config", "checkpoint")}
                   for half, side in (("original", "fp"), ("quantized", "q"))},
        "quantization": (run.manifest.get("quantization_config") or {}).get("path"),
        "heatmap": heatmap_table(result["heads"], layers, COMPARE_COLUMNS), "heatmap_default": "js_mean",
        "scope": result["heads"][0]["scope"] if result["heads"] else None,
        "ranking": result["ranking"], "impact": result["impact"], "topk": result.get("k"),
        "attribution": attribution_entry(result.get("attribution"), layers), "video": video_entry,
    }
    write_index(vw, index)
    return vw.files


def _call_frame(entry: dict, vrun) -> int:
    """The frame a video run's attention call ran on (untrusted: a whole number among the run's frames)."""
    from sam2_layerwise.errors import InputError

    count = ((vrun.halves[0].summary.get("frames") or {}).get("count"))
    at = _whole_or_none(entry.get("frame"), count if isinstance(count, int) else None)
    if at is None:
        raise InputError(f"{entry['layer_key']} call {entry.get('call_index', 0)} names no frame of the run "
                         f"({entry.get('frame')!r})", flag="--run_dir", value=str(vrun.run_dir))
    return at


def _compare_frames(run, vrun):
    """The frames the halves were captured on (`render.video.open_saved_frames`: the same selection, names and
    size), if they are still there and unchanged (the input's SHA-256 in the manifest); else (None, a note)."""
    from sam2_layerwise.errors import LayerwiseError
    from sam2_layerwise.inputs import DEFAULT_MAX_PIXELS
    from sam2_layerwise.render.video import open_saved_frames

    path = (run.manifest.get("image") or {}).get("video")
    try:
        source = open_saved_frames(vrun.halves[0].saved, None, DEFAULT_MAX_PIXELS)
    except LayerwiseError as exc:
        return None, f"the frames of {path} cannot be shown ({exc.detail}); shown on grey"
    sha = (run.manifest.get("image") or {}).get("sha256")
    if sha and source.sha256() != sha:
        source.close()
        return None, f"the video {path} changed since the capture (SHA-256 differs); frames shown on grey"
    return source, None


write_viewer = write_compare_viewer  # generate's entry point, by its general name


class _Scratch:
    """A writer into a scratch folder (the `path(rel)` that ViewerWriter needs)."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def path(self, rel: str) -> Path:
        p = (self.root / rel).resolve()
        if not p.is_relative_to(self.root) or p == self.root:
            raise ValueError(f"refusing to write outside the scratch folder: {rel}")
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def compare_viewer_in_memory(run, out: str = "analysis") -> dict[str, bytes]:
    """generate's viewer page of a compare run (`run`: the CompareRun), made in a scratch folder and returned as
    run-relative path -> bytes; nothing is written to the run. `view` shows a sweep's kept run (`--keep-runs`),
    which generate has not seen, this way."""
    import tempfile

    from sam2_layerwise.analysis.generate import GenerateOptions, analyse

    with tempfile.TemporaryDirectory(prefix="sam2lw-view-") as tmp:
        scratch = _Scratch(Path(tmp))
        files = write_compare_viewer(run, analyse(run, GenerateOptions(output=out)), scratch, out)
        return {rel: scratch.path(rel).read_bytes() for rel in files}


def _image_to_token_qkv(vrun, calls: list[dict]) -> None:
    """Full mode saves q/k/v once, in `__full.pt`: hand a decoder image->token call's q/k to its views, so the
    renderer can draw which image tokens attend to each decoder token (`to_<role>` maps)."""
    from sam2_layerwise.capture.attention import saved_scale
    from sam2_layerwise.store.atomic import safe_load
    from sam2_layerwise.store.compare_run import inside

    for c in calls:
        if c["kind"] != "decoder_image_to_token":
            continue
        for h in vrun.halves:
            view = c["views"].get(h.side)
            rel = (h.entries[(c["key"], c["call"])].get("files") or {}).get("full")
            if view is None or view.qkv is not None or not rel:
                continue
            try:
                full = safe_load(inside(h.run_dir, rel, "--run_dir"))
                q, k, v = full["q"], full["k"], full["v"]  # [1, heads, image tokens / tokens, d]
                if q.dim() != 4 or q.shape[0] != 1 or q.shape[1] != c["heads"] or k.shape[:2] != q.shape[:2]:
                    raise ValueError(f"q {list(q.shape)}, k {list(k.shape)}")
                scale = saved_scale(full.get("scale"))
                if scale is None:
                    raise ValueError("the attention scale is not a positive number")
                view.qkv = {"groups": [0], "q": q.float(), "k": k.float(), "v": v.float(), "scale": scale}
            except Exception as exc:  # noqa: BLE001 - the maps of the selected queries are still shown
                log.warning("viewer: %s %s: no image->token maps (%s)", h.side, rel, exc)


# -- a single visualize run -----------------------------------------------------------------------------------
def _capture_call(r, frame: ImageFrame, qkv_saved: bool, at: int | None = None) -> dict:
    """One record of a capture in memory as `write_layers` takes it (`at`: its frame in a video run)."""
    return {"key": r.layer_key, "call": r.call_index, "name": r.name, "kind": r.kind, "heads": r.heads,
            "geometry": r.geometry, "views": {"fp": RecordView.from_record(r)}, "frame": at,
            "label": layer_label(r.name, r.layer_key, r.call_index, r.kind, at),
            "click": click_support(r.kind, False, r.qkv if qkv_saved else None, r.geometry, frame)}


def _stat_rows(r) -> tuple[list[dict], bool]:
    """The heatmap's rows of one record: per head, the capture's statistics over every query (`head_stats`), or,
    where it computed none (video mode's default), the mean over the selected queries. Returns (rows, over every
    query)."""
    every = bool(r.head_stats)
    rows = []
    for h in range(r.heads):
        if every:
            values = {stat: (r.head_stats.get(stat) or {}).get("mean", [None] * r.heads)[h] for stat, _, _ in
                      SINGLE_COLUMNS}
        else:
            sel = r.selected_stats or []
            values = {stat: (sum(q[stat][h] for q in sel) / len(sel) if sel and all(stat in q for q in sel) else None)
                      for stat, _, _ in SINGLE_COLUMNS}
        rows.append({"layer_key": r.layer_key, "call_index": r.call_index, "head": h, **values})
    return rows, every


def _single_index(cap, layers: list[dict], rows: list[dict], every: bool, title: str | None, photo_entry: dict,
                  sides: list[dict], video: dict | None = None) -> dict:
    return {
        "kind": "single", "mode": None, "title": title or "one model", "frame": cap.frame.to_dict(),
        "photo": photo_entry, "prompts": cap.prompts.to_dict(), "sides": sides, "layers": layers,
        "heatmap": heatmap_table(rows, layers, SINGLE_COLUMNS), "heatmap_default": "entropy_norm",
        "scope": "every query (the capture's statistics)" if every else "the selected queries (the capture's "
                 "statistics of each; capture with --query-stats all for every query)",
        "ranking": None, "impact": None, "video": video,
    }


def write_capture_viewer(writer, cap, image: np.ndarray, *, qkv_saved: bool, out: str = "viewer",
                         title: str | None = None) -> dict:
    """The viewer of one capture (`visualize --viewer`), from the records in memory, written into `out/`
    of the run. `qkv_saved`: the run saves q/k/v (then `view` recomputes clicks in the saved windows)."""
    vw = ViewerWriter(writer, out)
    calls, rows, every = [], [], True
    for r in cap.attention:
        calls.append(_capture_call(r, cap.frame, qkv_saved))
        got, all_queries = _stat_rows(r)
        rows += got
        every = every and all_queries
    layers = write_layers(vw, calls, cap.frame, cap.prompts)
    pred = cap.prediction
    sides = [{"id": "fp", "title": "model", "mask_arrays": np.asarray(pred.masks, dtype=bool),
              "pred_iou": [_num(v) for v in np.asarray(pred.iou_predictions).tolist()], "best": int(pred.best)}]
    photo_entry = write_pictures(vw, image, None, cap.frame, sides)
    write_index(vw, _single_index(cap, layers, rows, every, title, photo_entry, sides))
    return {"viewer": f"{vw.out}/index.html"}


class VideoCaptureViewer:
    """`visualize --video --viewer`: the viewer of a video capture, written frame by frame while SAM 2 tracks
    (`frame`, from the run's frame sink: each call's maps while its record still holds q/k, before the sink
    lightens it), then the frames, masks and index (`finish`, once tracking is done)."""

    def __init__(self, writer, frame: ImageFrame, prompts, *, qkv_saved: bool, out: str = "viewer"):
        self.vw = ViewerWriter(writer, out)
        self.frame, self.prompts, self.qkv_saved = frame, prompts, qkv_saved
        self.layers: list[dict] = []
        self.rows: list[dict] = []
        self.every = True

    def on_frame(self, writer, fc) -> dict:
        calls = [_capture_call(r, self.frame, self.qkv_saved, fc.index) for r in fc.attention]
        self.layers += write_layers(self.vw, calls, self.frame, self.prompts, start=len(self.layers))
        for r in fc.attention:
            got, every = _stat_rows(r)
            self.rows += got
            self.every = self.every and every
        return {}

    def finish(self, cap, source, title: str | None = None) -> dict:
        """`cap`: the VideoCapture; `source`: its frames (frames.VideoSource)."""
        from sam2_layerwise.store.video_run import frames_section

        preds = sorted(cap.prediction.frames, key=lambda f: f.index)
        sides = [{"id": "fp", "title": "model", "mask_arrays": np.stack([f.mask for f in preds]),
                  "pred_iou": [_num(f.iou) for f in preds], "best": None}]
        photo_entry, video = write_video_pictures(self.vw, frames_section(cap, None), source.image, None, self.frame,
                                                  sides)
        write_index(self.vw, _single_index(cap, self.layers, self.rows, self.every, title, photo_entry, sides, video))
        return {"viewer": f"{self.vw.out}/index.html"}
