"""Pictures of a video run, frame by frame (live while SAM 2 tracks, or again from a saved run).

- Every attention call except memory cross-attention: the image-mode maps (attention images, overlays), drawn on
  the frame the call ran on.
- Memory cross-attention: for each selected query and each memory frame in its keys, the query's attention over
  that frame's memory tokens **overlaid on the frame the memory came from** (the query's own place outlined in
  cyan there too), all memory frames of one query on one colour scale; object-pointer tokens as a row of cells;
  and one panel per query: the query's own frame (marked), every memory frame with its heatmap and share of the
  attention, and the object-pointer share as a bar.
- `memory_charts/frame_<i>.png`: the attention mass each memory frame (by age) and the object pointers receive,
  per memory-attention layer; `memory_charts/mass_by_age.png`: the same over all frames.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sam2_layerwise.render import colors
from sam2_layerwise.render.attention import QUERY_RGB, RenderResult, _outline, render_maps
from sam2_layerwise.render.maps import AttentionMap, RecordView, _head_tag, _head_words, _heads, build_maps, place_on_grid
from sam2_layerwise.render.topk import write_topk
from sam2_layerwise.store import layout
from sam2_layerwise.store.atomic import atomic_save_png, link_or_copy

log = logging.getLogger("sam2_layerwise")

PANEL_TILE = 256  # px, long side of one frame in a memory panel
PANEL_BAR_MIN = 64  # px, least height of a memory panel (the pointer bar's scale), however thin the frames


def frame_tag(index: int) -> str:
    return f"frame_{index:04d}"


def segment_values(probs_row: np.ndarray, seg: dict, pooling: dict | None) -> tuple[np.ndarray, dict | None]:
    """One segment's values of a (possibly per-segment pooled) probability row, and that segment's pooling."""
    if pooling and pooling.get("per_segment"):
        ps = next(p for p in pooling["segments"] if p["label"] == seg["label"])
        vals = probs_row[ps["start"]:ps["stop"]]
        if seg["kind"] == "memory" and ps.get("factor", 1) > 1:
            return vals, {"factor": ps["factor"], "pooled_hw": ps["pooled_hw"]}
        return vals, None
    return probs_row[seg["start"]:seg["stop"]], None


def memory_grids(values: np.ndarray, segs: list[dict], pooling: dict | None,
                 query_grid_hw) -> list[tuple[dict, np.ndarray, float]]:
    """One memory cross-attention row [K] (one query, one head or the head mean; possibly pooled per segment)
    over each frame's memory: (segment, values on that frame's token grid [h, w] (a probability per key token;
    pooled cells spread over their tokens), the segment's share of the row) for every `memory` segment."""
    out = []
    for s in segs:
        if s["kind"] != "memory":
            continue
        vals, seg_pooling = segment_values(values, s, pooling)
        hw = tuple(s.get("grid_hw") or query_grid_hw)
        out.append((s, place_on_grid(vals, [0, hw[0], 0, hw[1]], hw, seg_pooling), float(vals.sum())))
    return out


@dataclass
class VideoRenderer:
    """Draws a video run's pictures; `frame(writer, frame_capture)` per frame, `finish(writer)` at the end."""

    plan: object  # render.run.RenderPlan
    source: object  # frames.VideoSource
    prompts: object
    prompt_frame: int
    image_size: int = 1024  # the model's input size (token boxes in original pixels depend on it)
    rendered: list = field(default_factory=list)
    per_record: dict = field(default_factory=dict)  # (layer_key, call_index) -> {attn_images: [...], ...}
    ages: dict = field(default_factory=dict)  # layer -> age -> [mass]; "cond"/"pointers" keys too
    charts: list = field(default_factory=list)

    # -- entry points -----------------------------------------------------------------------------------------
    def frame(self, writer, fc) -> dict:
        """Live: the records of one frame just captured (before they are lightened)."""
        views = [RecordView.from_record(r) for r in fc.attention]
        masses = {(r.layer_key, r.call_index): r.memory_mass for r in fc.attention if r.memory_mass}
        files = self.draw_frame(writer, fc.index, views, masses)
        for r in fc.attention:
            r.files.update(self.per_record.get((r.layer_key, r.call_index), {}))
        return files

    def draw_frame(self, writer, index: int, views: list[RecordView], masses: dict, frame_geo: dict | None = None,
                   extra_locations=None) -> dict:
        from sam2_layerwise.geometry import ImageFrame

        frame = ImageFrame(self.source.width, self.source.height,
                           int(frame_geo["image_size"]) if frame_geo else self.image_size)
        photo = self._photo(index)
        plain = [v for v in views if v.geometry.get("keys") != "memory"]
        maps = [m for v in plain for m in build_maps(v, frame, self.plan.maps, prompts=self.prompts,
                                                      extra_locations=extra_locations)]
        self._collect(render_maps(maps, photo, self.plan.draw, writer))
        for v in views:
            if v.geometry.get("keys") == "memory":
                self._memory(writer, index, v, photo)
        files = {}
        chart = self._chart(writer, index, views, masses)
        if chart:
            files["memory_chart"] = chart
        return files

    def finish(self, writer) -> dict:
        files = dict(write_topk(self.rendered, self.plan.topk, writer, symlink=self.plan.topk_symlink))
        if any(r.image for r in self.rendered):
            files[layout.ATTN_IMAGES] = f"{layout.ATTN_IMAGES}/"
        if any(r.overlay for r in self.rendered):
            files[layout.ATTN_OVERLAYS] = f"{layout.ATTN_OVERLAYS}/"
        if self.ages:
            files[layout.MEMORY_CHARTS] = f"{layout.MEMORY_CHARTS}/"
            files["memory_mass_by_age"] = self._age_chart(writer)
        return files

    def _photo(self, index: int):
        """The frame as a photograph, when overlays are drawn (attention images need none)."""
        return self.source.image(index) if self.plan.draw.overlays else None

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def _collect(self, result: RenderResult) -> None:
        self.rendered += result.rendered
        for key, d in result.by_record().items():
            mine = self.per_record.setdefault(key, {})
            for what, paths in d.items():
                mine.setdefault(what, []).extend(paths)

    # -- memory cross-attention -------------------------------------------------------------------------------
    def _memory(self, writer, index: int, v: RecordView, photo: np.ndarray) -> None:
        geo = v.geometry
        segs = geo["key_segments"]
        gh, gw = geo["query_grid_hw"]
        by_frame: dict[int, list[AttentionMap]] = {}
        token_maps: list[AttentionMap] = []
        opts = self.plan.maps
        for qi, q in enumerate(v.queries[:opts.max_queries]):
            for head, values in _heads(v.probs[qi], opts.per_head):  # values [K] fp32
                spatial = memory_grids(values, segs, v.key_pooling, (gh, gw))
                vmax = max((float(np.nanmax(g)) for _, g, _ in spatial), default=0.0)
                tag, words = _head_tag(head), _head_words(head)
                for s, grid, mass in spatial:
                    r, c = divmod(int(np.nanargmax(grid)), grid.shape[1])
                    cells = None
                    if q.get("cell") is not None:
                        qr, qc = q["cell"]
                        cells = [qr, qr + 1, qc, qc + 1]
                    cond = "cond, " if s.get("conditioning") else ""
                    by_frame.setdefault(s["frame"], []).append(AttentionMap(
                        layer_key=v.layer_key, kind=v.kind, call_index=v.call_index,
                        name=f"{layout.safe_name(v.stem)}__{layout.safe_name(q['label'])}__mem_f{s['frame']:04d}__{tag}",
                        label=q["label"],
                        title=(f"{v.layer_key} frame {index} {q['label']}: {mass:.1%} of its attention on the "
                               f"memory of frame {s['frame']} ({cond}age {s.get('age')}), drawn here on frame "
                               f"{s['frame']}; {words}, one scale for all its memory frames"),
                        quantity=f"attention probability per memory token ({words})", display="grid", head=head,
                        score=float(np.nanmax(grid)), peak=f"f{s['frame']} key({r},{c})", grid=grid,
                        real_hw=grid.shape, query_box=q.get("pixel_box"), query_cells=cells, vmax=vmax))
                ptr = [s for s in segs if s["kind"] == "object_pointer"]
                if ptr and self.plan.draw.images:
                    tv, roles = [], []
                    for s in ptr:
                        vals, _ = segment_values(values, s, v.key_pooling)
                        tv += list(vals)
                        roles += [f"f{s['frame']}.{t}" for t in range(len(vals))]
                    token_maps.append(AttentionMap(
                        layer_key=v.layer_key, kind=v.kind, call_index=v.call_index,
                        name=f"{layout.safe_name(v.stem)}__{layout.safe_name(q['label'])}__pointers__{tag}",
                        label=q["label"], title=(f"{v.layer_key} [memory_cross] frame {index}, query {q['label']}: "
                                                 f"object-pointer tokens ({sum(tv):.1%} of the attention), {words}"),
                        quantity=f"attention probability per pointer token ({words})", display="tokens", head=head,
                        score=float(max(tv)), peak=f"token {roles[int(np.argmax(tv))]}",
                        token_values=np.asarray(tv, dtype=np.float32), token_roles=roles))
                if self.plan.draw.overlays:
                    self._panel(writer, index, v, q, head, spatial, vmax, values, segs, photo)
        for j, maps in sorted(by_frame.items()):
            self._collect(render_maps(maps, self._photo(j), self.plan.draw, writer))
        if token_maps:
            self._collect(render_maps(token_maps, photo, self.plan.draw, writer))

    def _panel(self, writer, index, v, q, head, spatial, vmax, values, segs, photo) -> None:
        """The query's own frame, each memory frame with its heatmap, and the pointer share, side by side."""
        cmap = self.plan.draw.cmap
        fnt = colors.font(12)
        tiles = []
        box = q.get("pixel_box")

        def fitted(img: np.ndarray):
            im = Image.fromarray(img).convert("RGB")
            s = PANEL_TILE / max(im.size)
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
            return im, (im.width / img.shape[1], im.height / img.shape[0])

        def mark(im, scale):
            if box:
                sx, sy = scale
                _outline(ImageDraw.Draw(im), (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx),
                                              round(box[3] * sy)), QUERY_RGB)
            return im

        own, scale = fitted(photo)
        tiles.append((mark(own, scale), f"frame {index}: the query ({q['label']})", (255, 255, 255)))
        for s, grid, mass in sorted(spatial, key=lambda t: (not t[0].get("conditioning"), t[0].get("age") or 0)):
            im, sc = fitted(self.source.image(s["frame"]))
            rgb, _ = colors.colorize(grid, cmap, vmax)
            heat = Image.fromarray(rgb).resize(im.size, Image.NEAREST)
            im = mark(Image.blend(im, heat, self.plan.draw.overlay_alpha), sc)
            cond = " cond" if s.get("conditioning") else ""
            tiles.append((im, f"f{s['frame']}{cond} age {s.get('age')}: {mass:.1%}", (235, 235, 235)))
        ptr_share = float(sum(segment_values(values, s, v.key_pooling)[0].sum() for s in segs
                              if s["kind"] == "object_pointer"))
        th = max(PANEL_BAR_MIN, *(t[0].height for t in tiles))  # a 1500x20 frame's tile is 3 px high: the bar needs room
        bar_w = 90
        width = sum(t[0].width + 6 for t in tiles) + bar_w
        canvas = Image.new("RGB", (width, th + 22), colors.LEGEND_BG)
        draw = ImageDraw.Draw(canvas)
        x = 0
        for im, text, color in tiles:
            canvas.paste(im, (x, 0))
            draw.text((x + 3, th + 4), text, fill=color, font=fnt)
            x += im.width + 6
        h = int(round((th - 20) * min(1.0, ptr_share)))
        draw.rectangle([x + 30, th - h, x + 60, th], fill=(255, 200, 0))
        draw.rectangle([x + 30, 10, x + 60, th], outline=(235, 235, 235))
        draw.text((x + 4, th + 4), f"pointers {ptr_share:.1%}", fill=(255, 200, 0), font=fnt)
        words = _head_words(head)
        title = (f"{v.layer_key} [memory_cross] frame {index}, query {q['label']} ({words}): the query's frame (cyan: "
                 f"its token), then each memory frame with the query's attention on it (share of the attention "
                 f"under it), and the object pointers' share")
        img = colors.stack(canvas, colors.legend_strip(canvas.width, title, cmap, vmax,
                                                       f"attention probability per memory token ({words})"))
        name = f"{layout.safe_name(v.stem)}__{layout.safe_name(q['label'])}__memory__{_head_tag(head)}"
        rel = f"{layout.ATTN_OVERLAYS}/by_layer/{layout.safe_name(v.layer_key)}/{name}.png"
        atomic_save_png(img, writer.path(rel), compress_level=self.plan.draw.png_level)
        link_or_copy(writer.path(rel), writer.path(f"{layout.ATTN_OVERLAYS}/all/{name}.png"))
        self.per_record.setdefault((v.layer_key, v.call_index), {}).setdefault("memory_panels", []).append(rel)

    # -- charts -------------------------------------------------------------------------------------------------
    def _chart(self, writer, index: int, views: list[RecordView], masses: dict) -> str | None:
        rows = []  # (layer, segments, values)
        for v in views:
            if v.geometry.get("keys") != "memory":
                continue
            mm = masses.get((v.layer_key, v.call_index))
            if not mm:
                continue
            vals = (mm.get("all_queries") or {}).get("head_mean")
            if vals is None:
                sel = [s["head_mean"] for s in mm.get("selected", [])]
                vals = list(np.mean(sel, axis=0)) if sel else None
            if vals is None:
                continue
            rows.append((v.layer_key, v.geometry["key_segments"], vals, mm.get("all_queries") is not None))
        if not rows:
            return None
        from sam2_layerwise.metrics.plots import _figure

        segs = rows[0][1]
        spatial = sorted([i for i, s in enumerate(segs) if s["kind"] == "memory"],
                         key=lambda i: (not segs[i].get("conditioning"), segs[i].get("age") or 0))
        ptr = [i for i, s in enumerate(segs) if s["kind"] == "object_pointer"]
        labels = [f"f{segs[i]['frame']}{' cond' if segs[i].get('conditioning') else ''}\nage {segs[i].get('age')}"
                  for i in spatial] + (["pointers\n(all)"] if ptr else [])
        fig = _figure(max(4.0, 0.9 * len(labels) + 1.5), 3.0)
        ax = fig.add_axes((0.1, 0.25, 0.85, 0.62))
        width = 0.8 / len(rows)
        for n, (layer, lsegs, vals, every) in enumerate(rows):
            ys = [vals[i] for i in spatial] + ([sum(vals[i] for i in ptr)] if ptr else [])
            xs = np.arange(len(ys)) + (n - (len(rows) - 1) / 2) * width
            short = layer.replace("memory_attention_layers_", "L").replace("_cross_attn_image", "")
            ax.bar(xs, ys, width=width, label=short)
            store = self.ages.setdefault(short, {})
            for i in spatial:
                key = "cond" if lsegs[i].get("conditioning") else int(lsegs[i].get("age") or 0)
                store.setdefault(key, []).append(vals[i])
            if ptr:
                store.setdefault("pointers", []).append(sum(vals[i] for i in ptr))
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("attention mass", fontsize=8)
        ax.tick_params(labelsize=7)
        over = "every query" if rows[0][3] else "the selected queries"
        ax.set_title(f"frame {index}: memory attention mass by memory frame (head mean over {over})", fontsize=8)
        ax.legend(fontsize=6, loc="upper right")
        rel = f"{layout.MEMORY_CHARTS}/{frame_tag(index)}.png"
        fig.savefig(writer.path(rel), format="png")
        return rel

    def _age_chart(self, writer) -> str:
        from sam2_layerwise.metrics.plots import _figure

        fig = _figure(5.0, 3.0)
        ax = fig.add_axes((0.12, 0.18, 0.6, 0.7))
        for layer, store in self.ages.items():
            ages = sorted(k for k in store if isinstance(k, int))
            if ages:
                ax.plot(ages, [float(np.mean(store[a])) for a in ages], marker="o", label=f"{layer} recent")
            if "cond" in store:
                ax.axhline(float(np.mean(store["cond"])), linestyle="--", linewidth=0.8,
                           label=f"{layer} conditioning", color=ax.lines[-1].get_color() if ax.lines else None)
            if "pointers" in store:
                ax.axhline(float(np.mean(store["pointers"])), linestyle=":", linewidth=0.8,
                           label=f"{layer} pointers", color=ax.lines[-1].get_color() if ax.lines else None)
        ax.set_xlabel("memory age (frames ago, in tracking order)", fontsize=8)
        ax.set_ylabel("mean attention mass", fontsize=8)
        ax.set_title("memory attention mass by frame age, over all frames", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        rel = f"{layout.MEMORY_CHARTS}/mass_by_age.png"
        fig.savefig(writer.path(rel), format="png")
        return rel


# -- a saved video run, drawn again ---------------------------------------------------------------------------------
class _NoFrames:
    """Stands in for the frames when only attention images are drawn (no overlay needs a photograph)."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height

    def image(self, index):  # pragma: no cover - only reached when overlays are drawn, which open the frames
        raise RuntimeError("frames are not open")

    def close(self):
        pass


def open_saved_frames(run, override: str | None, max_pixels: int):
    """The frames a saved video run was captured on (or `--video PATH` where they moved), selected as the run
    selected them and checked against the summary: same count, source frames and size."""
    from sam2_layerwise.errors import InputError
    from sam2_layerwise.frames import FrameSelection, open_video

    vid = run.summary.get("video") or {}
    path = override or vid.get("path")

    def mismatch(detail: str) -> InputError:
        """Frames given with --video are the user's; frames the summary names are the run's (--run-dir)."""
        if override is not None:
            return InputError(detail, flag="--video", value=path)
        return InputError(f"the video this run names ({path}) {detail}; pass --video PATH if the frames moved",
                          flag="--run-dir", value=str(run.run_dir))

    if not isinstance(path, str) or not path:
        raise InputError("the run names no video; pass --video PATH", flag="--run-dir", value=str(run.run_dir))
    sel = vid.get("selection") or {}
    try:
        selection = FrameSelection(start=int(sel.get("start", 0)), stop=None if sel.get("stop") is None else
                                   int(sel["stop"]), stride=int(sel.get("stride", 1)),
                                   max_frames=None if sel.get("max_frames") is None else int(sel["max_frames"]))
    except (TypeError, ValueError):
        raise InputError("video.selection in the summary is malformed", flag="--run-dir", value=str(run.run_dir)) from None
    if not layout.on_disk(path, "any") and override is None:
        raise mismatch("is missing")
    try:
        source = open_video(path, selection, max_pixels=max_pixels)
    except InputError as exc:
        if override is not None:
            raise
        raise mismatch(f"cannot be read: {exc.detail}") from None
    want = [(f.get("source_index"), f.get("name")) for f in (run.summary.get("frames") or {}).get("list", [])]
    got = [(f.source_index, f.name) for f in source.frames]
    if got != want or (source.width, source.height) != (run.frame.orig_w, run.frame.orig_h):
        source.close()
        raise mismatch(f"holds frames {got[:6]} of {source.width}x{source.height}; the run was captured on frames "
                       f"{want[:6]} of {run.frame.orig_w}x{run.frame.orig_h}")
    return source


def rerender_video(run, plan, *, video: str | None = None, max_pixels: int | None = None, extra_points=()) -> dict:
    """Draw a saved video run again into its own directory (attention images, overlays on each frame, memory maps
    on their source frames, panels, charts, top-k); returns the updated summary. Never loads the model."""
    from sam2_layerwise.errors import InputError
    from sam2_layerwise.inputs import DEFAULT_MAX_PIXELS
    from sam2_layerwise.render.saved import RENDER_DIRS, extra_locations, saved_views
    from sam2_layerwise.store.atomic import atomic_write_json
    from sam2_layerwise.store.layout import RunWriter

    views = saved_views(run)
    if not views:
        raise InputError("holds no saved attention tensors (capture with --save-attn and/or --save-qkv)",
                         flag="--run-dir", value=str(run.run_dir))
    summary = run.summary
    entries = {(e["layer_key"], e.get("call_index", 0)): e for e in summary["attention"]}
    frames = summary.get("frames") or {}
    prompt_frame = int(frames.get("prompt_frame", 0) or 0)
    source = (open_saved_frames(run, video, max_pixels or DEFAULT_MAX_PIXELS) if plan.draw.overlays
              else _NoFrames(run.frame.orig_w, run.frame.orig_h))
    extra = extra_locations(views, extra_points)
    owned = (layout.SUMMARY, *RENDER_DIRS, layout.MEMORY_CHARTS)
    try:
        with RunWriter(run.run_dir, owned=owned, flag="--run-dir") as writer:
            renderer = VideoRenderer(plan, source, run.prompts, prompt_frame)
            by_frame: dict[int, list] = {}
            for v in views:
                by_frame.setdefault(int(entries[v.layer_key, v.call_index].get("frame", 0)), []).append(v)
            chart_files = {}
            try:
                for index, vs in sorted(by_frame.items()):
                    masses = {(v.layer_key, v.call_index): entries[v.layer_key, v.call_index].get("memory_mass")
                              for v in vs}
                    got = renderer.draw_frame(writer, index, vs, {k: m for k, m in masses.items() if m},
                                              frame_geo=summary["frame"], extra_locations=extra)
                    chart_files[index] = got.get("memory_chart")
                files = renderer.finish(writer)
            except (ValueError, IndexError, KeyError, TypeError, StopIteration) as exc:
                from sam2_layerwise.errors import condense

                raise InputError(f"the saved tensors and {layout.SUMMARY} do not fit together: {condense(exc)}",
                                 flag="--run-dir", value=str(run.run_dir)) from exc
            for key in (*RENDER_DIRS, "attn_topk_links", layout.MEMORY_CHARTS, "memory_mass_by_age"):
                summary.setdefault("files", {}).pop(key, None)
            summary["files"].update(files)
            for key, entry in entries.items():
                ef = entry.setdefault("files", {})
                for what in (layout.ATTN_IMAGES, layout.ATTN_OVERLAYS, "memory_panels"):
                    ef.pop(what, None)
                ef.update(renderer.per_record.get(key, {}))
            for f in frames.get("list", []):
                ff = f.setdefault("files", {})
                ff.pop("memory_chart", None)
                if chart_files.get(f.get("index")):
                    ff["memory_chart"] = [chart_files[f["index"]]]
            summary["render"] = {**plan.to_dict(), "command": "render", "skipped_calls_without_tensors":
                                 len(summary["attention"]) - len(views)}
            atomic_write_json(summary, writer.path(layout.SUMMARY))
    finally:
        source.close()
    return summary
