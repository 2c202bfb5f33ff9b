"""Attention maps ready to draw: each selected query's attention placed on its layer's whole key grid.

Input is a `RecordView`: what rendering needs of one attention call, taken from a live `AttentionRecord` or
from a saved run (`attn_tensors/.../*__attn.pt`, `*__qkv.pt`). Nothing here needs the model.

Frames: a map's `grid` is indexed by key-grid (row, col); key-grid cell (r, c) of a grid of real size (h, w)
covers original pixels [c·W/w, (c+1)·W/w) × [r·H/h, (r+1)·H/h) (SAM 2 resizes to a square without keeping the
aspect ratio). Cells beyond (h, w) are window padding: keys without pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sam2_layerwise.capture.attention import attention_probs, pool_keys
from sam2_layerwise.geometry import DecoderTokenLayout, HieraLayerGeometry, ImageFrame
from sam2_layerwise.store.layout import safe_name


@dataclass
class RecordView:
    """One attention call, as rendering sees it.

    probs: [n, heads, K] fp32 of `queries` (K = keys, or pooled keys when `key_pooling` says so).
    queries: QuerySpec dicts (label, group, index, cell, pixel_box, key_block, source_cells).
    qkv: {"q","k","v": [n_groups, heads, N, d], "groups": [...], "scale": float} or None.
    probs_transformed: the kernel changed the probabilities after softmax (fake-quantized softmax), so a
    recomputation from q/k alone is not what the kernel used.
    recomputed: `probs` were recomputed from the saved q/k (a run saved with `--save-qkv` but not `--save-attn`).
    query_limit: the capture's `--max-attn-queries` (caps decoder token maps when `MapOptions.max_queries` is None).
    """

    layer_key: str
    kind: str
    call_index: int
    stem: str
    heads: int
    geometry: dict
    queries: list[dict]
    probs: torch.Tensor
    key_pooling: dict | None = None
    qkv: dict | None = None
    probs_transformed: bool = False
    recomputed: bool = False
    query_limit: int | None = None

    @classmethod
    def from_record(cls, record) -> "RecordView":
        return cls(layer_key=record.layer_key, kind=record.kind, call_index=record.call_index, stem=record.file_stem,
                   heads=record.heads, geometry=record.geometry, queries=[q.to_dict() for q in record.queries],
                   probs=record.probs, key_pooling=None, qkv=record.qkv,
                   probs_transformed=probs_transformed(record.quant))


def probs_transformed(quant) -> bool:
    """Whether a record's quantization report (`AttentionRecord.quant`) has a quantizer on the softmax output
    of the kernel itself: then probabilities recomputed from q/k alone are not the ones the kernel used."""
    if not isinstance(quant, dict):
        return False
    return "probs" in (quant.get("kernel") or {})


@dataclass
class AttentionMap:
    """One picture's worth of attention.

    display: "grid" (values on a key grid, drawable over the photograph) or "tokens" (values over named tokens).
    grid: [gh, gw] fp32 on the (padded) key grid, NaN where a cell is not a key of this query; the value is a
    probability per key token (head mean or one head; the mean over f×f tokens when keys were pooled).
    real_hw: the key grid without window padding; only these cells have pixels.
    token_values/token_roles: for display "tokens".
    query_box: the query's own pixel box [x0, y0, x1, y1) in original pixels (None for decoder tokens).
    query_cells / window: [r0, r1, c0, c1) on the key grid, drawn on the attention image.
    marks: (x, y) original pixels to mark (the click a decoder point token stands for).
    score: the largest value in the map; peak: where it is, in words.
    """

    layer_key: str
    kind: str
    call_index: int
    name: str
    label: str
    title: str
    quantity: str
    display: str
    head: int | None
    score: float
    peak: str
    grid: np.ndarray | None = None
    real_hw: tuple[int, int] | None = None
    token_values: np.ndarray | None = None
    token_roles: list[str] | None = None
    query_box: list[float] | None = None
    query_cells: list[int] | None = None
    window: list[int] | None = None
    marks: list[tuple[float, float]] = field(default_factory=list)
    pooled: int = 1
    vmax: float | None = None  # top of the colour scale when maps share one (a memory's frames); None: own maximum

    @property
    def layer_dir(self) -> str:
        return safe_name(self.layer_key)


@dataclass(frozen=True)
class MapOptions:
    """Which maps: queries per call, per-head maps too, the key cap (`--max-tokens`).

    max_queries: queries per attention call; None: the saved queries plus the extra query places (decoder token
    maps capped at the capture's own limit), nothing more.
    """

    max_queries: int | None = None
    per_head: bool = False
    max_tokens: int = 4096


def role_position(role: str, prompts) -> tuple[float, float] | None:
    """The original-pixel place a decoder prompt token stands for (pointN: click N; box_cornerK: box corner)."""
    if prompts is None:
        return None
    if role.startswith("point") and role[5:].isdecimal() and int(role[5:]) < len(prompts.points):
        p = prompts.points[int(role[5:])]
        return (p.x, p.y)
    if role.startswith("box_corner") and prompts.box:
        x0, y0, x1, y1 = prompts.box
        return (x0, y0) if role.endswith("0") else (x1, y1)
    return None


def token_priority(roles: list[str]) -> list[int]:
    """Decoder token indices in the capture's query order (points, masks, IoU, obj-score, box, padding)."""
    layout = DecoderTokenLayout(has_obj_score="obj_score" in roles,
                                num_mask_tokens=sum(r.startswith("mask") for r in roles),
                                num_box_corners=sum(r.startswith("box_corner") for r in roles),
                                num_points=sum(r.startswith("point") for r in roles), padding="padding" in roles,
                                num_no_points=sum(r == "no_point" for r in roles))
    return layout.priority() if layout.roles == list(roles) else list(range(len(roles)))


def _heads(probs: torch.Tensor, per_head: bool):
    """probs [heads, K] -> [(head or None, values [K] fp32 numpy)], the head mean first."""
    out = [(None, probs.float().mean(0).numpy())]
    if per_head:
        out += [(h, probs[h].float().numpy()) for h in range(probs.shape[0])]
    return out


def _head_tag(head: int | None) -> str:
    return "mean" if head is None else f"h{head:02d}"


def _head_words(head: int | None) -> str:
    return "head mean" if head is None else f"head {head}"


def _grid_hw(geometry: dict) -> tuple[tuple[int, int], tuple[int, int]]:
    """(displayed key grid incl. window padding, real key grid)."""
    real = tuple(geometry["key_grid_hw"])
    padded = tuple(geometry.get("padded_key_grid_hw", real))
    return padded, real


def place_on_grid(values: np.ndarray, key_block: list[int], grid_hw: tuple[int, int], pooling: dict | None):
    """values [K] over a key block (row-major; pooled f×f cells when `pooling`) -> [gh, gw] grid, NaN elsewhere.

    Pooled cells hold sums over up to f×f tokens (fewer at the block's far edges); each token of a cell gets
    the cell's mean, so the grid is always a probability per key token and still sums to 1.
    """
    r0, r1, c0, c1 = key_block
    bh, bw = r1 - r0, c1 - c0
    grid = np.full(grid_hw, np.nan, dtype=np.float32)
    if pooling:
        f = int(pooling["factor"])
        ph, pw = pooling["pooled_hw"]
        rows = np.minimum(f, bh - f * np.arange(ph))  # real tokens per pooled row / column
        cols = np.minimum(f, bw - f * np.arange(pw))
        mean = values.reshape(ph, pw) / (rows[:, None] * cols[None, :])  # [ph, pw]
        block = np.repeat(np.repeat(mean, f, 0), f, 1)[:bh, :bw]
    else:
        block = values.reshape(bh, bw)  # [bh, bw] row-major inside the block
    grid[r0:r1, c0:c1] = block
    return grid


def _peak_cell(grid: np.ndarray) -> tuple[int, int]:
    flat = np.where(np.isfinite(grid), grid, -np.inf)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(flat)), grid.shape))


def real_max(grid: np.ndarray, real_hw: tuple[int, int]) -> float:
    """The largest finite value on the real (non-padding) cells of `grid`; NaN when there is none."""
    real = grid[:real_hw[0], :real_hw[1]]
    return float(np.nanmax(real)) if np.isfinite(real).any() else float("nan")


def _token_limit(view: RecordView, opts: MapOptions) -> int:
    """How many decoder tokens get maps beyond the selected queries (token->image extras, image->token maps)."""
    if opts.max_queries is not None:
        return opts.max_queries
    return view.query_limit if view.query_limit is not None else len(view.queries)


def _grid_map(view: RecordView, q: dict, probs: torch.Tensor, opts: MapOptions, prompts,
              recomputed: bool = False) -> list[AttentionMap]:
    """Maps of one grid-keyed query (Hiera, decoder token->image, memory self-attention)."""
    geo = view.geometry
    grid_hw, real_hw = _grid_hw(geo)
    key_block = q.get("key_block") or [0, real_hw[0], 0, real_hw[1]]
    bh, bw = key_block[1] - key_block[0], key_block[3] - key_block[2]
    pooling = None if recomputed else view.key_pooling
    if pooling is None and probs.shape[-1] > opts.max_tokens:
        probs, pooling = pool_keys(probs, (bh, bw), opts.max_tokens)  # the same pooling the saved tensors use
    is_token = q.get("cell") is None
    label = q["label"]
    cells = q.get("source_cells")
    if cells is None and q.get("cell") is not None:
        r, c = q["cell"]
        cells = [r, r + 1, c, c + 1]
    window = key_block if list(key_block) != [0, grid_hw[0], 0, grid_hw[1]] else None
    marks = []
    if is_token:
        pos = role_position(label, prompts)
        marks = [pos] if pos else []
    out = []
    f = int(pooling["factor"]) if pooling else 1
    for head, values in _heads(probs, opts.per_head):
        grid = place_on_grid(values, key_block, grid_hw, pooling)
        pr, pc = _peak_cell(grid[:real_hw[0], :real_hw[1]])  # padding cells have no pixels: never the peak
        what = "token" if is_token else "query"
        notes = (", recomputed from q/k" if recomputed else "") + (f", keys pooled {f}x{f}" if f > 1 else "")
        if recomputed and view.probs_transformed:
            notes += " (without the kernel's probability quantizer)"
        out.append(AttentionMap(
            layer_key=view.layer_key, kind=view.kind, call_index=view.call_index,
            name=f"{safe_name(view.stem)}__{safe_name(label)}__{_head_tag(head)}", label=label,
            title=f"{view.layer_key} [{view.kind}] {what} {label}, {_head_words(head)}{notes}",
            quantity=f"attention probability per key token ({_head_words(head)})",
            display="grid", head=head, score=real_max(grid, real_hw), peak=f"key({pr},{pc})",
            grid=grid, real_hw=real_hw, query_box=q.get("pixel_box"), query_cells=None if is_token else cells,
            window=window, marks=marks, pooled=f))
    return out


def _token_map(view: RecordView, q: dict, probs: torch.Tensor, opts: MapOptions, prompts,
               recomputed: bool = False) -> list[AttentionMap]:
    """Maps of a query whose keys are decoder tokens (self-attention; image->token for one image query)."""
    roles = list(view.geometry.get("key_roles") or [f"token{i}" for i in range(probs.shape[-1])])
    label = q["label"]
    notes = ", recomputed from q/k" if recomputed else ""
    if recomputed and view.probs_transformed:
        notes += " (without the kernel's probability quantizer)"
    out = []
    for head, values in _heads(probs, opts.per_head):
        j = int(np.argmax(values))
        pos = role_position(label, prompts)
        out.append(AttentionMap(
            layer_key=view.layer_key, kind=view.kind, call_index=view.call_index,
            name=f"{safe_name(view.stem)}__{safe_name(label)}__{_head_tag(head)}", label=label,
            title=f"{view.layer_key} [{view.kind}] query {label}, {_head_words(head)}{notes}",
            quantity=f"attention probability per key token ({_head_words(head)})",
            display="tokens", head=head, score=float(values.max()), peak=f"token {roles[j]}",
            token_values=values, token_roles=roles, query_box=q.get("pixel_box"),
            marks=[pos] if pos else []))
    return out


def _image_to_token_maps(view: RecordView, opts: MapOptions, prompts) -> list[AttentionMap]:
    """One map per decoder token: which image tokens (pixels) attend to it. Needs the saved q/k of all image
    queries (group 0); the share each image query gives the token, recomputed by `attention_probs`."""
    if not view.qkv or 0 not in list(view.qkv["groups"]):
        return []
    gi = list(view.qkv["groups"]).index(0)
    q, k = view.qkv["q"][gi], view.qkv["k"][gi]  # [heads, Nq image tokens, d], [heads, Nk tokens, d]
    gh, gw = view.geometry["query_grid_hw"]
    probs = attention_probs(q, k, float(view.qkv["scale"]))  # [heads, Nq, Nk]
    roles = list(view.geometry.get("key_roles") or [f"token{i}" for i in range(k.shape[-2])])
    out = []
    for t in token_priority(roles)[:_token_limit(view, opts)]:
        role = roles[t]
        pos = role_position(role, prompts)
        for head, values in _heads(probs[:, :, t], opts.per_head):  # [heads, Nq] -> [Nq]
            grid = values.reshape(gh, gw).astype(np.float32)
            pr, pc = _peak_cell(grid)
            note = ", recomputed from q/k" + (" (without the kernel's probability quantizer)"
                                             if view.probs_transformed else "")
            out.append(AttentionMap(
                layer_key=view.layer_key, kind=view.kind, call_index=view.call_index,
                name=f"{safe_name(view.stem)}__to_{safe_name(role)}__{_head_tag(head)}", label=f"to_{role}",
                title=f"{view.layer_key} [{view.kind}] image tokens attending to token {role}, {_head_words(head)}{note}",
                quantity=f"share of each image token's attention given to {role} ({_head_words(head)})",
                display="grid", head=head, score=float(grid.max()), peak=f"query({pr},{pc})",
                grid=grid, real_hw=(gh, gw), marks=[pos] if pos else []))
    return out


def _extra_queries(view: RecordView, frame: ImageFrame, locations, opts: MapOptions):
    """(QuerySpec-like dict, probs [heads, K]) for query places not captured, recomputed from saved q/k.

    Only places whose window (group) was saved can be recomputed. Decoder token queries beyond the saved
    selection come from the same q/k (all tokens are in group 0).
    """
    if not view.qkv:
        return []
    geo, groups = view.geometry, list(view.qkv["groups"])
    taken = {(q["group"], q["index"]) for q in view.queries}
    # max_queries None: every extra place asked (beyond the saved queries), no decoder token beyond the limit
    want = len(locations) if opts.max_queries is None else opts.max_queries - len(view.queries)
    out = []

    def add(spec):
        gi = groups.index(spec["group"])
        qv = view.qkv["q"][gi][:, spec["index"]:spec["index"] + 1]  # [heads, 1, d]
        p = attention_probs(qv, view.qkv["k"][gi], float(view.qkv["scale"]))[:, 0]  # [heads, K]
        out.append((spec, p))
        taken.add((spec["group"], spec["index"]))

    if view.kind.startswith("hiera"):
        hg = HieraLayerGeometry(batch=geo["batch"], in_h=geo["key_grid_hw"][0], in_w=geo["key_grid_hw"][1],
                                window=geo["window"], q_stride=geo["q_stride"])
        oh, ow = hg.out_hw
        for label, x, y in locations:
            if len(out) >= want:
                break
            row, col = frame.token_at(x, y, oh, ow)
            grp, idx = hg.locate_query(row, col)
            if (grp, idx) in taken or grp not in groups:
                continue
            add({"label": label, "group": grp, "index": idx, "cell": [row, col],
                 "pixel_box": frame.token_box(row, col, oh, ow), "key_block": list(hg.key_rows_cols(grp)),
                 "source_cells": list(hg.query_source_cells(grp, idx)) if hg.q_stride > 1 else None})
    elif view.kind == "decoder_image_to_token" and 0 in groups:
        gh, gw = geo["query_grid_hw"]
        for label, x, y in locations:
            if len(out) >= want:
                break
            row, col = frame.token_at(x, y, gh, gw)
            if (0, row * gw + col) not in taken:
                add({"label": label, "group": 0, "index": row * gw + col, "cell": [row, col],
                     "pixel_box": frame.token_box(row, col, gh, gw), "key_block": None})
    elif view.kind == "decoder_token_to_image" and 0 in groups:
        roles = geo.get("query_roles") or []
        gh, gw = geo["key_grid_hw"]
        want = _token_limit(view, opts) - len(view.queries)
        for t in token_priority(roles):
            if len(out) >= want:
                break
            if (0, t) not in taken:
                add({"label": roles[t], "group": 0, "index": t, "cell": None, "pixel_box": None,
                     "key_block": [0, gh, 0, gw]})
    return out


def build_maps(view: RecordView, frame: ImageFrame, opts: MapOptions, *, prompts=None,
               extra_locations: list[tuple[str, float, float]] | None = None) -> list[AttentionMap]:
    """Every map of one attention call: its selected queries (up to `max_queries`), per head when asked,
    decoder image->token maps per token, and extra query places recomputed from saved q/k."""
    keys = view.geometry.get("keys")
    maps: list[AttentionMap] = []
    if keys == "grid":
        for q, probs in zip(view.queries[:opts.max_queries], view.probs):
            maps += _grid_map(view, q, probs, opts, prompts, recomputed=view.recomputed)
        for q, probs in _extra_queries(view, frame, extra_locations or [], opts):
            maps += _grid_map(view, q, probs, opts, prompts, recomputed=True)
    elif keys == "tokens":
        for q, probs in zip(view.queries[:opts.max_queries], view.probs):
            maps += _token_map(view, q, probs, opts, prompts, recomputed=view.recomputed)
        for q, probs in _extra_queries(view, frame, extra_locations or [], opts):
            maps += _token_map(view, q, probs, opts, prompts, recomputed=True)
        if view.kind == "decoder_image_to_token":
            maps += _image_to_token_maps(view, opts, prompts)
    return maps  # keys "sequence" (memory cross-attention over several frames) are not drawn yet
