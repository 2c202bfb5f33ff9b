"""Scoped capture over a built SAM 2 model: hooks in, run the real predictors, hooks out."""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
from torch import nn

from sam2_layerwise.capture import dispatch, native
from sam2_layerwise.capture.attention import (STAT_NAMES, attention_rows, query_statistics, rows_one_by_one,
                                              segment_sums)
from sam2_layerwise.capture.records import AttentionRecord, BlockRecord, QuerySpec, layer_key, tensor_stats
from sam2_layerwise.errors import CaptureError
from sam2_layerwise.geometry import DecoderTokenLayout, GridGeometry, HieraLayerGeometry, ImageFrame

# Blocks whose outputs are recorded (shape and statistics), by class name.
BLOCK_TYPES = {
    "MultiScaleBlock", "Hiera", "FpnNeck", "ImageEncoder", "TwoWayAttentionBlock", "TwoWayTransformer",
    "MaskDecoder", "PromptEncoder", "MemoryAttentionLayer", "MemoryAttention", "MemoryEncoder",
}
ATTENTION_TYPES = ("MultiScaleAttention", "RoPEAttention", "Attention")


@dataclass(frozen=True)
class CaptureOptions:
    """What a capture keeps. Written into the summary so a run explains itself.

    max_attn_queries: selected queries per attention call (clicks first).
    stats_topk: k of the per-query top-k mass statistic (0 disables it).
    all_query_stats: per-head statistics over every query (chunked); off = selected queries only.
    keep_qkv: keep q/k/v of the windows/groups that hold selected queries.
    keep_all_qkv: keep q/k/v of every group (compare's full mode: any row can be recomputed later).
    layers: fnmatch patterns over layer keys; only matching modules are captured (None = all).
    chunk_elements: scores per tile of the chunked statistics.
    all_query_kinds: with all_query_stats, only attention kinds starting with one of these run the all-query
    statistics; None = every kind.
    memory_mass: memory cross-attention's mass per memory frame / object pointer beyond the selected queries:
    "all" (every query, tile by tile, by the compiled kernel: the default; always with all-query statistics),
    "sampled" (the queries on a regular grid, every `memory_mass_stride`-th token per row and column: 1/16 of
    the cost), "selected" (only the selected queries).
    output_stats: shape, mean, std, min and max of every block's and attention module's output, and the check
    for non-finite q/k/v and outputs (a few passes over every activation); off = only the attention records
    (sweep's per-item capture, which reports neither).
    fast_attention: float attention modules compute their output with the compiled statistics kernel, from the
    tiles their statistics come from (`dispatch.FastKernel`): one q·kᵀ per call instead of two, but the output
    is not torch's to the last bit, so masks may differ from plain SAM 2. Off (the default): torch computes every
    output and masks are bit-identical. Quantized modules keep their own kernel either way.
    """

    max_attn_queries: int = 4
    stats_topk: int = 5
    all_query_stats: bool = True
    keep_qkv: bool = False
    layers: tuple[str, ...] | None = None
    chunk_elements: int = 1 << 20
    keep_all_qkv: bool = False
    all_query_kinds: tuple[str, ...] | None = None
    memory_mass: str = "all"
    memory_mass_stride: int = 4
    output_stats: bool = True
    fast_attention: bool = False

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["layers"] = list(self.layers) if self.layers else None
        if self.output_stats:
            d.pop("output_stats")  # the default: summaries read as before
        if not self.fast_attention:
            d.pop("fast_attention")
        if self.all_query_kinds is None:
            d.pop("all_query_kinds")
        else:
            d["all_query_kinds"] = list(self.all_query_kinds)
        return d

    def all_queries_for(self, kind: str) -> bool:
        return self.all_query_stats and (self.all_query_kinds is None or kind.startswith(self.all_query_kinds))


@dataclass
class QueryLocation:
    """A place to look at, in original-image pixels: a click, a box centre or a user's query point."""

    label: str
    x: float
    y: float


def attention_kind(name: str, module: nn.Module) -> str:
    cls = type(module).__name__
    attr = name.rsplit(".", 1)[-1]
    if cls == "MultiScaleAttention":
        return "hiera"
    if name.startswith("memory_attention"):
        return "memory_cross" if "cross" in attr else "memory_self"
    if attr == "self_attn":
        return "decoder_self"
    if attr == "cross_attn_image_to_token":
        return "decoder_image_to_token"
    return "decoder_token_to_image"


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _flat_tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _flat_tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flat_tensors(o)]
    return []


def _summarise(values: torch.Tensor) -> dict[str, list[float]]:
    """values: [h, n] -> per-head mean/min/max lists."""
    if values.shape[-1] == 0:
        z = [float("nan")] * values.shape[0]
        return {"mean": z, "min": z, "max": z}
    return {"mean": values.mean(-1).tolist(), "min": values.amin(-1).tolist(), "max": values.amax(-1).tolist()}


@dataclass
class _Pending:
    record: AttentionRecord
    picks: list[tuple[int, int]]
    rows_out: torch.Tensor  # [n, h, d] recomputed kernel output rows


class CaptureSession:
    """Context manager that records every attention call and block output of `model` while it runs.

    frame: original image <-> model input. locations: places (original pixels) whose tokens are selected
    as queries, in priority order. Set `decoder_layout` before the mask decoder runs.
    """

    def __init__(self, model: nn.Module, options: CaptureOptions, frame: ImageFrame,
                 locations: list[QueryLocation], on_record=None):
        self.model = model
        self.on_record = on_record
        self.options = options
        self.frame = frame
        self.locations = locations
        self.decoder_layout: DecoderTokenLayout | None = None
        self.attention: list[AttentionRecord] = []
        self.blocks: list[BlockRecord] = []
        self._handles: list = []
        self._routed: list[nn.Module] = []
        self._calls: dict[str, int] = {}
        self._block_in: dict[str, tuple] = {}
        self._pending: dict[str, _Pending] = {}
        self._decoder_grid: tuple[int, int] | None = None
        self._stats_cache: dict = {}
        self.selected_modules: list[str] = []
        self.nonfinite: list[dict] = []  # where NaN/inf appeared, in the order the model computed it
        # Video mode (capture.memory.MemoryTap sets these): the frame SAM 2 is working on, the memory-attention
        # token grid, and what SAM 2 assembled as memory while memory attention runs.
        self.frame_index: int | None = None
        self.memory_grid: tuple[int, int] | None = None
        self.memory_layout = None
        self._frame_calls: dict[tuple[str, int], int] = {}
        self.fast_kernel = dispatch.FastKernel() if options.fast_attention else None
        self._fast_modules: list[nn.Module] = []

    # -- install / remove -------------------------------------------------------------------------
    def _wanted(self, name: str, module: nn.Module | None = None) -> bool:
        pats = self.options.layers
        if pats is None:
            return True
        key = layer_key(_parent(name)) if type(module).__name__ == "MultiScaleAttention" else layer_key(name)
        return any(fnmatch.fnmatchcase(key, p) for p in pats)

    def __enter__(self):
        if getattr(self.model, "compile_image_encoder", False) or hasattr(self.model, "_orig_mod"):
            raise CaptureError("torch.compile'd models run hooks unreliably; build the model with "
                               "compile_image_encoder=False to capture it", flag="--config")
        native.reset_taken()
        modules = self._modules = dict(self.model.named_modules())
        for name, module in modules.items():
            cls = type(module).__name__
            if cls in ATTENTION_TYPES and self._wanted(name, module):
                self.selected_modules.append(name)
                state = dispatch.routing(module, name)
                if self.fast_kernel is not None and state.kernel is None:  # float modules only
                    state.kernel = self.fast_kernel
                    self._fast_modules.append(module)
                observer = self._make_observer(name, module)
                state.observers.append(observer)
                self._routed.append(module)
                self._handles.append(module.register_forward_hook(self._make_post(name, module), always_call=True))
                self._handles.append(_Detach(state.observers, observer))
                if cls == "MultiScaleAttention":
                    parent = modules[_parent(name)]
                    self._handles.append(parent.register_forward_pre_hook(self._make_block_pre(name)))
            elif cls in BLOCK_TYPES and self.options.output_stats and self._wanted(name):
                self._handles.append(module.register_forward_hook(self._make_block_post(name, module)))
            if cls == "TwoWayTransformer":
                self._handles.append(module.register_forward_pre_hook(self._decoder_pre, with_kwargs=True))
        return self

    def __exit__(self, exc_type, exc, tb):
        for h in self._handles:
            h.remove()
        for m in self._fast_modules:
            dispatch.routing(m, "").kernel = None
        for m in self._routed:
            dispatch.release(m)
        if exc_type is not None:
            dispatch.reset()
        return False

    # -- hooks ------------------------------------------------------------------------------------
    def _make_block_pre(self, attn_name):
        def pre(module, args):
            self._block_in[attn_name] = tuple(args[0].shape)  # [B, H, W, C] before norm1 / windowing
        return pre

    def _decoder_pre(self, module, args, kwargs):
        emb = kwargs.get("image_embedding", args[0] if args else None)
        self._decoder_grid = tuple(emb.shape[-2:])  # [B, C, h, w]

    def _make_block_post(self, name, module):
        def post(mod, args, output):
            idx = self._calls.get(name, 0)
            self._calls[name] = idx + 1
            outputs = [tensor_stats(t, self._stats_cache) for t in _flat_tensors(output)]
            for n, st in enumerate(outputs):
                if not all(math.isfinite(st[s]) for s in ("mean", "std", "min", "max")):
                    self._note_nonfinite(name, idx, f"output[{n}]")
            self.blocks.append(BlockRecord(
                name=name, layer_key=layer_key(name), module_type=type(mod).__name__, call_index=idx,
                inputs=[{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in _flat_tensors(args)],
                outputs=outputs, frame_index=self.frame_index,
            ))
        return post

    def _make_post(self, name, module):
        def post(mod, args, output):
            pending = self._pending.pop(name, None)
            if pending is None or not isinstance(output, torch.Tensor):
                return
            rec = pending.record
            if self.options.output_stats:
                rec.module_output = tensor_stats(output, self._stats_cache)
            if not pending.picks:
                rec.module_max_abs_err = 0.0
                return
            proj = mod.proj if hasattr(mod, "proj") else mod.out_proj
            G = rec.q_shape[0]
            real = output.reshape(G, -1, output.shape[-1])  # [G, Nq, C]
            g = torch.tensor([p[0] for p in pending.picks], device=output.device)
            i = torch.tensor([p[1] for p in pending.picks], device=output.device)
            real_rows = real[g, i].float()  # [n, C]
            n, h, d = pending.rows_out.shape
            with torch.no_grad(), torch.autocast(output.device.type, enabled=False):
                mine = proj(pending.rows_out.reshape(n, h * d).to(proj.weight.dtype)).float()  # heads-major concat
            rec.module_max_abs_err = (mine - real_rows).abs().max().item()
        return post

    def _make_observer(self, name, module):
        kind = attention_kind(name, module)

        def observe(view: dispatch.KernelView, out: torch.Tensor):
            with torch.no_grad():
                self._observe(name, module, kind, view, out)
        # asks a tiled kernel for the statistics of every query from its own tiles (`view.stats`)
        observe.stats_topk = self.options.stats_topk if self.options.all_queries_for(kind) else None
        # and for the selected rows (`view.rows`): the same (group, query) pairs `_observe` will select
        observe.picks = lambda q_shape, k_shape: [
            (s.group, s.index) for s in self._geometry_and_queries(name, kind, q_shape, k_shape)[1]]
        return observe

    def _note_nonfinite(self, name: str, call_index: int, tensor: str) -> None:
        self.nonfinite.append({"module": name, "call_index": call_index, "tensor": tensor})

    def _check_finite(self, name: str, call_index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Record which of `tensors` hold NaN/inf (`finite.nonfinite`: one sync when all are finite, the common
        case). The attention output is read first: NaN/inf in q, k or v reaches it (all but a -inf score, whose
        key then gets probability 0 and changes nothing), so q/k/v are read only when it is not finite."""
        from sam2_layerwise.finite import nonfinite

        last = tensors.get("attention output")
        if last is not None and not nonfinite({"attention output": last}):
            return
        for what in nonfinite(tensors):
            self._note_nonfinite(name, call_index, what)

    # -- the record -------------------------------------------------------------------------------
    def _observe(self, name, module, kind, view, out):
        q, k, v = view.q, view.k, view.v  # [G, h, N, d]
        if self.options.output_stats:
            self._check_finite(name, self._calls.get(name, 0), {"q": q, "k": k, "v": v, "attention output": out})
        G, h, nq, hd = q.shape
        nk = k.shape[-2]
        geometry, queries, valid = self._geometry_and_queries(name, kind, q.shape, k.shape)
        layout = self.memory_layout if kind == "memory_cross" else None
        segments = layout.bounds if layout is not None and layout.verified and layout.keys == nk else None
        picks = [(s.group, s.index) for s in queries]
        # large groups (global blocks, memory attention's 28,736 x 256 keys): one row at a time on views of k/v, not a
        # gathered copy of k and v per selected query (`rows_one_by_one`)
        if view.rows is not None and view.rows_for == picks:  # kept by a tiled kernel from the tiles it computed
            probs, rows_out = view.rows
        else:
            probs, rows_out = attention_rows(q, k, v, view.scale, view.probs_transform, picks, view.tiled)
        kernel_err = 0.0
        if picks:
            g = torch.tensor([p[0] for p in picks], device=q.device)
            i = torch.tensor([p[1] for p in picks], device=q.device)
            kernel_err = (out[g, :, i].float() - rows_out).abs().max().item()

        query_stats, head_stats, segment_mass = None, {}, None
        every = self.options.all_queries_for(kind)
        mass_rows = None  # query indices of a sampled segment mass
        if every and view.stats is not None and not segments:  # from the kernel's own tiles (quantized kernels)
            query_stats = dict(view.stats)
        elif every or (segments and self.options.memory_mass == "all"):
            query_stats = query_statistics(q, k, view.scale, view.probs_transform, self.options.stats_topk,
                                           self.options.chunk_elements, segments=segments, stats=every)
            segment_mass = query_stats.pop("segment_mass", None)  # [G, h, Nq, S]
            query_stats = query_stats or None
        elif segments and self.options.memory_mass == "sampled":
            gh, gw = geometry["query_grid_hw"]
            st = self.options.memory_mass_stride
            rows = torch.arange(st // 2, gh, st)
            cols = torch.arange(st // 2, gw, st)
            mass_rows = (rows[:, None] * gw + cols[None, :]).reshape(-1).tolist()  # row-major grid cells
            part = query_statistics(q[:, :, mass_rows], k, view.scale, view.probs_transform, self.options.stats_topk,
                                    self.options.chunk_elements, segments=segments, stats=False)
            segment_mass = part["segment_mass"]  # [G, h, n_sampled, S]
        for stat, values in (query_stats or {}).items():
            per_head = values.permute(1, 0, 2).reshape(h, -1)  # [h, G*Nq]
            if valid is not None:
                per_head = per_head[:, valid.reshape(-1)]
            head_stats[stat] = _summarise(per_head)
        selected = []
        if picks:
            if rows_one_by_one(k, picks):  # views, no gathered copy of k per query (see above)
                parts = [query_statistics(q[a:a + 1, :, b:b + 1], k[a:a + 1], view.scale, view.probs_transform,
                                          self.options.stats_topk, self.options.chunk_elements) for a, b in picks]
                sel = {st: torch.cat([p_[st] for p_ in parts]) for st in STAT_NAMES}  # [n, h, 1]
            else:
                sel = query_statistics(q[g, :, i].unsqueeze(2), k[g], view.scale, view.probs_transform,
                                       self.options.stats_topk, self.options.chunk_elements)
            for n, spec in enumerate(queries):
                selected.append({"label": spec.label, **{s: sel[s][n, :, 0].tolist() for s in STAT_NAMES}})

        qkv = None
        if self.options.keep_qkv and picks:
            groups = sorted({p[0] for p in picks})
            gi = torch.tensor(groups, device=q.device)
            qkv = {"groups": groups, "q": _owned(q[gi]), "k": _owned(k[gi]), "v": _owned(v[gi]), "scale": view.scale}

        full_qkv = None
        if self.options.keep_all_qkv:
            full_qkv = {"q": q.detach().cpu().clone(), "k": k.detach().cpu().clone(), "v": v.detach().cpu().clone(),
                        "scale": view.scale, "tiled": bool(view.tiled)}

        memory_mass = _memory_mass(layout, probs, queries, segment_mass, mass_rows,
                                   self.options.memory_mass_stride) if segments else None
        idx = self._calls.get(name, 0)
        self._calls[name] = idx + 1
        frame_call = 0
        if self.frame_index is not None:
            frame_call = self._frame_calls.get((name, self.frame_index), 0)
            self._frame_calls[name, self.frame_index] = frame_call + 1
        # A Hiera attention belongs to its block's layer key (image_encoder_trunk_blocks_N), as SPEC.md names layers.
        key = layer_key(_parent(name)) if kind == "hiera" else layer_key(name)
        record = AttentionRecord(
            name=name, layer_key=key, module_type=type(module).__name__, kind=geometry["kind"],
            call_index=idx, q_shape=list(q.shape), k_shape=list(k.shape), v_shape=list(v.shape), heads=h,
            head_dim=hd, scale=float(view.scale), kernel_dtype=str(q.dtype).replace("torch.", ""),
            geometry=geometry, queries=queries, probs=probs.cpu(),
            query_stats={s: t.cpu() for s, t in query_stats.items()} if query_stats else None,
            head_stats=head_stats, selected_stats=selected, kernel_max_abs_err=kernel_err, qkv=qkv,
            full_qkv=full_qkv, frame_index=self.frame_index, frame_call=frame_call, memory_mass=memory_mass,
            segment_mass=segment_mass.cpu() if segment_mass is not None else None, fast_attention=view.fast,
        )
        self.attention.append(record)
        self._pending[name] = _Pending(record, picks, rows_out)
        if self.on_record is not None:
            self.on_record(record)

    def _geometry_and_queries(self, name, kind, q_shape, k_shape):
        """Geometry dict, selected queries and the mask of real (non-padding) queries [G, Nq] or None."""
        G, h, nq, _ = q_shape
        nk = k_shape[-2]
        limit = self.options.max_attn_queries
        frame = self.frame
        if kind == "hiera":
            B, H, W, _ = self._block_in[name]
            block = self._modules[_parent(name)]
            geo = HieraLayerGeometry(batch=B, in_h=H, in_w=W, window=block.window_size,
                                     q_stride=block.q_stride[0] if block.q_stride else 1)
            assert geo.groups == G and geo.queries_per_group == nq and geo.keys_per_group == nk, (name, geo, q_shape, k_shape)
            oh, ow = geo.out_hw
            queries = []
            for loc in self.locations:
                row, col = frame.token_at(loc.x, loc.y, oh, ow)
                grp, idx = geo.locate_query(row, col)
                if any(s.group == grp and s.index == idx for s in queries):
                    continue
                queries.append(QuerySpec(
                    label=loc.label, group=grp, index=idx, cell=(row, col),
                    pixel_box=frame.token_box(row, col, oh, ow), key_block=list(geo.key_rows_cols(grp)),
                    source_cells=list(geo.query_source_cells(grp, idx)) if geo.q_stride > 1 else None))
                if len(queries) == limit:
                    break
            valid = geo.valid_queries()
            geometry = {**geo.to_dict(), "keys": "grid", "frame": frame.to_dict()}
            return geometry, queries, valid

        grid = self._decoder_grid or (int(round(nq ** 0.5)),) * 2
        if kind.startswith("memory") and self.memory_grid is not None:
            grid = self.memory_grid
        gh, gw = grid
        grid_geo = GridGeometry(gh, gw)

        def image_queries():
            out = []
            for loc in self.locations:
                row, col = frame.token_at(loc.x, loc.y, gh, gw)
                idx = grid_geo.index(row, col)
                if not any(s.index == idx for s in out):
                    out.append(QuerySpec(label=loc.label, group=0, index=idx, cell=(row, col),
                                         pixel_box=frame.token_box(row, col, gh, gw)))
                if len(out) == limit:
                    break
            return out

        def token_queries():
            layout = self.decoder_layout
            roles = layout.roles if layout and len(layout.roles) == nq else [f"token{i}" for i in range(nq)]
            order = layout.priority() if layout and len(layout.roles) == nq else list(range(nq))
            return roles, [QuerySpec(label=roles[i], group=0, index=i) for i in order[:limit]]

        if kind == "decoder_token_to_image":
            roles, queries = token_queries()
            for s in queries:
                s.key_block = [0, gh, 0, gw]
            geometry = {"kind": kind, "query_roles": roles, "keys": "grid", "key_grid_hw": [gh, gw],
                        **grid_geo.to_dict(), "frame": frame.to_dict()}
        elif kind == "decoder_self":
            roles, queries = token_queries()
            geometry = {"kind": kind, "query_roles": roles, "keys": "tokens", "key_roles": roles}
        elif kind == "decoder_image_to_token":
            layout = self.decoder_layout
            key_roles = layout.roles if layout and len(layout.roles) == nk else [f"token{i}" for i in range(nk)]
            queries = image_queries()
            geometry = {"kind": kind, "query_grid_hw": [gh, gw], "keys": "tokens", "key_roles": key_roles,
                        **grid_geo.to_dict(), "frame": frame.to_dict()}
        else:  # memory attention: queries are the current frame's image tokens
            queries = image_queries() if gh * gw == nq else []
            layout = self.memory_layout if kind == "memory_cross" else None
            keys = "grid" if kind == "memory_self" and nk == gh * gw else \
                "memory" if layout is not None and layout.verified and layout.keys == nk else "sequence"
            geometry = {"kind": kind, "query_grid_hw": [gh, gw], "keys": keys, "key_grid_hw": [gh, gw],
                        **grid_geo.to_dict(), "frame": frame.to_dict()}
            if layout is not None:
                geometry.update(layout.to_dict())
            if keys == "grid":
                for s in queries:
                    s.key_block = [0, gh, 0, gw]
        return geometry, queries, None


def _memory_mass(layout, probs: torch.Tensor, queries, segment_mass: torch.Tensor | None, mass_rows=None,
                 stride: int = 4) -> dict:
    """The attention mass each memory segment (a frame's memory, an object pointer) receives: per selected query
    and head, and over every query (mean per head; over a regular grid of queries when `mass_rows` says which).
    The pointer share is the mass of all object-pointer segments together."""
    segs = layout.segments
    ptr = [i for i, s in enumerate(segs) if s.kind == "object_pointer"]
    sel = segment_sums(probs, layout.bounds) if len(queries) else probs.new_zeros((0, probs.shape[1], len(segs)))

    def share(m: torch.Tensor) -> list:  # [..., S] -> [...] pointer share
        return m[..., ptr].sum(-1).tolist() if ptr else torch.zeros(m.shape[:-1]).tolist()

    out = {"segments": [s.label for s in segs],
           "selected": [{"label": spec.label, "per_head": sel[n].tolist(), "head_mean": sel[n].mean(0).tolist(),
                         "pointer_share": share(sel[n].mean(0))} for n, spec in enumerate(queries)],
           "all_queries": None}
    if segment_mass is not None:
        per_head = segment_mass.float().mean(dim=(0, 2))  # [G, h, Nq, S] -> [h, S]
        over = "every query, mean" if mass_rows is None else \
            f"mean over {len(mass_rows)} queries on a regular grid (every {stride}th token per row and column)"
        out["all_queries"] = {"per_head": per_head.tolist(), "head_mean": per_head.mean(0).tolist(),
                              "pointer_share": share(per_head.mean(0)), "over": over,
                              "queries": "all" if mass_rows is None else "sampled", "sampled_queries": mass_rows}
    return out


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor of its own: `t` comes from advanced indexing (already a copy), so on the CPU no second copy."""
    t = t.detach()
    return t.cpu() if t.device.type != "cpu" else t


class _Detach:
    """A removable handle that takes an observer off a module's routing state."""

    def __init__(self, observers: list, observer):
        self.observers, self.observer = observers, observer

    def remove(self):
        if self.observer in self.observers:
            self.observers.remove(self.observer)
