"""A click on the photograph -> the query token under it at one attention call, and its attention in both models,
recomputed from the saved q/k/v by the capture's own functions. No model, no forward pass.

The pixel goes through the project's geometry (`ImageFrame.token_at` at the call's own query grid, then
`HieraLayerGeometry.locate_query` for the window and index; q-pooling and window padding included). Rows come
from `capture.attention.attention_rows` over a compare run's `__full.pt` (every group; the quantized half with
its saved probability quantizer, so the row is the one the kernel used) or `attention_probs` over a `__qkv.pt`
(only the windows holding the captured queries). The maps are built by `render.maps.build_maps` and encoded
like the precomputed ones (`viewer.export.map_entries`).
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict

import torch

from sam2_layerwise.capture.attention import attention_probs, attention_rows, saved_scale
from sam2_layerwise.errors import condense
from sam2_layerwise.geometry import HieraLayerGeometry
from sam2_layerwise.inputs import decimal
from sam2_layerwise.render.maps import RecordView, probs_transformed
from sam2_layerwise.viewer.export import TOKEN_KINDS, map_entries
from sam2_layerwise.viewer.source import Half, ViewerRun


class BadRequest(ValueError):
    """A parameter the page (or a caller) got wrong: answered with HTTP 400 and this message."""


class NotAvailable(Exception):
    """The run cannot answer this place (not saved there, damaged file): the page shows the message."""


def _number(text, name: str) -> float:
    try:
        v = decimal(text)
    except (TypeError, ValueError):
        raise BadRequest(f"{name} must be a number (got {str(text)[:40]!r})") from None
    if not math.isfinite(v):
        raise BadRequest(f"{name} must be finite (got {text})")
    return v


_WHOLE = re.compile(r"-?[0-9]{1,9}")


def _whole(text, name: str) -> int:
    if text is None or not _WHOLE.fullmatch(str(text).strip()):
        raise BadRequest(f"{name} must be a whole number (got {str(text)[:40]!r})")
    return int(text)


class Recomputer:
    """Answers clicks for one run. Tensor files are memory-mapped and kept open for the last few calls, so a
    click reads only the pages of its own group."""

    def __init__(self, vrun: ViewerRun, cache_calls: int = 8):
        self.vrun = vrun
        self.cache: OrderedDict = OrderedDict()
        self.cache_calls = cache_calls
        self.lock = threading.Lock()

    # -- parameters ---------------------------------------------------------------------------------------
    def call(self, layer, call) -> tuple[str, int]:
        """(layer_key, call_index) of a captured attention call; BadRequest naming what exists otherwise."""
        if not isinstance(layer, str) or not layer:
            raise BadRequest("layer is missing (a layer key such as image_encoder_trunk_blocks_0)")
        idx = _whole(call if call is not None else "0", "call")
        calls = [c for k, c in self.vrun.order if k == layer]
        if not calls:
            raise BadRequest(f"unknown layer {layer[:120]!r}; this run captured {len(self.vrun.order)} attention "
                             f"calls, e.g. {', '.join(k for k, _ in self.vrun.order[:3])}")
        if idx not in calls:
            raise BadRequest(f"layer {layer} has call indices {calls}, not {idx}")
        return layer, idx

    def point(self, x, y) -> tuple[float, float]:
        """(x, y) in original pixels, inside the photograph."""
        fx, fy = _number(x, "x"), _number(y, "y")
        w, h = self.vrun.frame.orig_w, self.vrun.frame.orig_h
        if not (0 <= fx < w and 0 <= fy < h):
            raise BadRequest(f"({fx:g}, {fy:g}) is outside the {w}x{h} photograph (original pixels)")
        return fx, fy

    # -- tensors ------------------------------------------------------------------------------------------
    def _load(self, half: Half, entry: dict, what: str) -> dict:
        from sam2_layerwise.store.atomic import safe_load
        from sam2_layerwise.store.compare_run import inside

        rel = (entry.get("files") or {}).get(what)
        if not rel:
            raise NotAvailable(f"{what} tensors were not saved")
        try:
            path = inside(half.run_dir, rel, "RUN_DIR")
            try:
                # memory-mapped: a click reads one group's rows, not a b+ stage-1 block's ~90 MiB of q/k/v
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # an old-format file cannot be mapped
                data = safe_load(path)
        except Exception as exc:  # noqa: BLE001 - the run's problem, shown on the page
            raise NotAvailable(f"{half.title}: {rel} cannot be read ({condense(exc)})") from None
        if not isinstance(data, dict):
            raise NotAvailable(f"{half.title}: {rel} is not a tensor file of this tool")
        for n in ("q", "k", "v"):
            t = data.get(n)
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point() \
                    or t.layout != torch.strided:
                raise NotAvailable(f"{half.title}: {rel} has no 4-d '{n}' tensor")
        q, k, v = data["q"], data["k"], data["v"]
        if not (q.shape[0] == k.shape[0] == v.shape[0] and q.shape[1] == k.shape[1] == v.shape[1] == entry["heads"]
                and q.shape[3] == k.shape[3] and k.shape[2] == v.shape[2]):
            raise NotAvailable(f"{half.title}: {rel}: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not "
                               f"fit {entry['heads']} heads")
        scale = saved_scale(data.get("scale"))
        if scale is None:
            raise NotAvailable(f"{half.title}: {rel}: the attention scale is not a positive number")
        return {**data, "scale": scale}

    def tensors(self, key: tuple[str, int]) -> dict:
        """side -> {"what": "full"/"qkv", "data": dict, "transform": probs quantizer or None} for one call."""
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
        out = {}
        for half in self.vrun.halves:
            entry = half.entries[key]
            files = entry.get("files") or {}
            what = "full" if files.get("full") else "qkv" if files.get("qkv") else None
            if what is None:
                out[half.side] = None
                continue
            data = self._load(half, entry, what)
            transform = None
            if what == "full" and data.get("probs_quantizer") is not None:
                from sam2_layerwise.quant.quantizers import FakeQuantizer

                try:
                    transform = FakeQuantizer.from_payload(data["probs_quantizer"]).quiet
                except ValueError as exc:
                    raise NotAvailable(f"{half.title}: the saved probability quantizer is malformed ({exc})") from None
            out[half.side] = {"what": what, "data": data, "transform": transform}
        with self.lock:
            self.cache[key] = out
            while len(self.cache) > self.cache_calls:
                self.cache.popitem(last=False)
        return out

    def prepare(self, layer, call) -> dict:
        """Load a call's tensors ahead of the first click (the page asks when a layer is selected)."""
        key = self.call(layer, call)
        entry = self.vrun.halves[0].entries[key]
        if entry["kind"] in TOKEN_KINDS:
            return {"ok": True, "loaded": False}
        try:
            loaded = self.tensors(key)
        except NotAvailable as exc:
            return {"ok": False, "message": str(exc)}
        return {"ok": True, "loaded": all(v is not None for v in loaded.values())}

    # -- a click --------------------------------------------------------------------------------------------
    def locate(self, entry: dict, x: float, y: float) -> dict:
        """The query under original pixel (x, y) at this call, as a QuerySpec dict (label "click")."""
        frame, kind, geo = self.vrun.frame, entry["kind"], entry["geometry"]
        if kind.startswith("hiera"):
            hg = HieraLayerGeometry.from_dict(geo)
            oh, ow = hg.out_hw  # the call's own query grid (q-pooled blocks: half the key grid)
            row, col = frame.token_at(x, y, oh, ow)
            group, index = hg.locate_query(row, col)  # window padding: the real token's window and place in it
            return {"label": "click", "group": group, "index": index, "cell": [row, col],
                    "pixel_box": frame.token_box(row, col, oh, ow), "key_block": list(hg.key_rows_cols(group)),
                    "source_cells": list(hg.query_source_cells(group, index)) if hg.q_stride > 1 else None}
        if kind == "decoder_image_to_token" or kind.startswith("memory"):  # one group: the frame's token grid
            gh, gw = geo["query_grid_hw"]
            row, col = frame.token_at(x, y, gh, gw)
            return {"label": "click", "group": 0, "index": row * gw + col, "cell": [row, col],
                    "pixel_box": frame.token_box(row, col, gh, gw), "key_block": None, "source_cells": None}
        raise NotAvailable("this call's queries are decoder tokens, not image places: pick a token from the query "
                           "list" if kind in TOKEN_KINDS else f"clicking is not supported for {kind} attention")

    def _rows(self, side: str, t: dict | None, spec: dict, entry: dict) -> tuple[torch.Tensor, bool]:
        """probs [heads, K] of the clicked query on one side, and whether they lack the kernel's quantizer."""
        if t is None:
            raise NotAvailable("q/k were not saved for this call (capture with --save-qkv, or compare "
                               "--save-full-attn for every place)")
        d, g, i = t["data"], spec["group"], spec["index"]
        q, k, v = d["q"], d["k"], d["v"]
        if t["what"] == "full":
            if not (0 <= g < q.shape[0] and 0 <= i < q.shape[2]):
                raise NotAvailable(f"the saved tensors hold {q.shape[0]} groups of {q.shape[2]} queries; group {g} "
                                   f"index {i} is not among them (the run and its summary do not fit)")
            probs, _ = attention_rows(q, k, v, float(d["scale"]), t["transform"], [(g, i)],
                                      bool(d.get("tiled", False)))  # [1, heads, K]
            return probs[0], False
        groups = d.get("groups")
        if not isinstance(groups, list) or g not in groups:
            raise NotAvailable("not saved for this place: this run kept q/k only for the windows holding its "
                               "captured queries (use compare --save-full-attn to click anywhere)")
        gi = groups.index(g)
        if gi >= q.shape[0] or i >= q.shape[2]:
            raise NotAvailable(f"the saved q holds {q.shape[2]} queries a group; index {i} is not among them")
        probs = attention_probs(q[gi][:, i:i + 1], k[gi], float(d["scale"]))[:, 0]  # [heads, K]
        return probs, side == "q" and probs_transformed(entry.get("quant"))

    def query(self, layer, call, x, y) -> dict:
        """The answer to a click: {ok, token, map} (the map entry in the precomputed format), or {ok: False,
        message, token}. BadRequest for parameters that are wrong."""
        key = self.call(layer, call)
        fx, fy = self.point(x, y)
        entry = self.vrun.halves[0].entries[key]
        answer = {"layer": key[0], "call": key[1], "x": fx, "y": fy}
        try:
            spec = self.locate(entry, fx, fy)
            from sam2_layerwise.viewer.export import token_info

            answer["token"] = token_info(entry["kind"], entry["geometry"], spec)
            loaded = self.tensors(key)
            views = {}
            for half in self.vrun.halves:
                probs, lacks_quantizer = self._rows(half.side, loaded.get(half.side), spec, half.entries[key])
                he = half.entries[key]
                views[half.side] = RecordView(
                    layer_key=key[0], kind=he["kind"], call_index=key[1], stem=he.get("file_stem") or key[0],
                    heads=he["heads"], geometry=he["geometry"], queries=[spec], probs=probs.unsqueeze(0),
                    probs_transformed=lacks_quantizer, recomputed=True)
            entries = map_entries(views, self.vrun.frame, self.vrun.prompts)
        except NotAvailable as exc:
            return {**answer, "ok": False, "message": str(exc)}
        except (ValueError, IndexError, KeyError, TypeError, RuntimeError) as exc:
            # the run's files are untrusted: what the checks did not foresee is the run's problem, in one line
            return {**answer, "ok": False, "message": f"the saved tensors do not fit this call: {condense(exc)}"}
        if not entries:
            return {**answer, "ok": False, "message": "nothing to draw for this place"}
        return {**answer, "ok": True, "map": entries[0]}
