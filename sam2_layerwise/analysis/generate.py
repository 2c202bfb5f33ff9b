"""What quantization changed, layer by layer and head by head: metrics of a compare run (docs/compare.md).

Reads a compare run (never the model). Light mode measures the selected query rows both captures saved; full
mode recomputes every query row of every selected layer from the saved q/k/v, tile by tile, through the
capture's own `attention_tile` (never more than one tile of the two maps in memory). Both modes report the
per-query statistics over every query the capture computed (entropy, top-k mass), q/k/v and attention-output
errors, and the effect on the masks.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from sam2_layerwise.capture.attention import attention_tile, row_tiles, saved_scale
from sam2_layerwise.errors import InputError
from sam2_layerwise.geometry.hiera import HieraLayerGeometry
from sam2_layerwise.metrics import PAIR_METRICS, output_impact, pair_metrics, relative_error_from_parts, sq_err_parts
from sam2_layerwise.metrics import summarise
from sam2_layerwise.store.compare_run import METRICS_SCHEMA, CompareRun
from sam2_layerwise.store.schema import version_problem

FLAG = "--run_dir"
ALL_QUERY_STATS = ("entropy_norm", "topk_mass", "max_prob")
ERRORS = ("q_rel_err", "k_rel_err", "v_rel_err", "out_rel_err")
_SHORT_KIND = {"hiera_windowed": "win", "hiera_global": "global", "hiera_qpool": "q-pool",
               "decoder_self": "self", "decoder_token_to_image": "tok→img", "decoder_image_to_token": "img→tok",
               "memory_self": "mem self", "memory_cross": "mem cross"}


@dataclass
class LayerPair:
    order: int
    layer_key: str
    call_index: int
    name: str
    kind: str
    heads: int
    fp: dict  # the original half's summary entry
    q: dict  # the quantized half's

    @property
    def label(self) -> str:
        """A readable name for plots: `trunk.blocks.12 (global)`, `decoder.layers.0.cross_attn_token_to_image`."""
        name = re.sub(r"\.attn$", "", self.name)
        name = name.replace("image_encoder.", "").replace("sam_mask_decoder.transformer.", "decoder.")
        call = f" #{self.call_index}" if self.call_index else ""
        return f"{name}{call} ({_SHORT_KIND.get(self.kind, self.kind)})"


@dataclass
class LayerResult:
    pair: LayerPair
    heads: list[int]
    scope: str  # "selected queries" / "all queries"
    per_query: dict[str, torch.Tensor]  # metric -> [n_queries, heads] (all heads)
    query_labels: list[str] | None  # labels of the selected queries (light), None for every query (full)
    errors: dict[str, torch.Tensor]  # q/k/v/out relative error -> [heads]
    all_queries: dict[str, torch.Tensor] = field(default_factory=dict)  # "<stat>_fp/_q/_delta" -> [heads]


# -- selection -----------------------------------------------------------------------------------------------
def layer_pairs(run: CompareRun) -> list[LayerPair]:
    """Attention calls present in both halves, in model order; the halves must hold the same calls."""
    def key(e):
        return e["layer_key"], int(e.get("call_index") or 0)

    fp = {key(e): e for e in run.summaries["original"]["attention"]}
    q = {key(e): e for e in run.summaries["quantized"]["attention"]}
    if set(fp) != set(q):
        only = sorted(set(fp) ^ set(q))[:3]
        raise InputError(f"its halves captured different layers (e.g. {', '.join(k for k, _ in only)})",
                         flag=FLAG, value=str(run.run_dir))
    if not fp:
        raise InputError("captured no attention layer: there is nothing to compare", flag=FLAG, value=str(run.run_dir))
    out = []
    for i, (k, e) in enumerate(fp.items()):
        if e["heads"] != q[k]["heads"] or e.get("kind") != q[k].get("kind"):
            raise InputError(f"its halves disagree on layer {k[0]} (heads or kind)", flag=FLAG, value=str(run.run_dir))
        if _tokens(e) != _tokens(q[k]):  # compare selects the same tokens in both models; rows are paired by order
            raise InputError(f"its halves selected different query tokens in layer {k[0]}", flag=FLAG,
                             value=str(run.run_dir))
        out.append(LayerPair(order=i, layer_key=k[0], call_index=k[1], name=str(e.get("name", k[0])),
                             kind=str(e.get("kind", "")), heads=int(e["heads"]), fp=e, q=q[k]))
    return out


def _tokens(entry: dict) -> list:
    """(label, group, index) of each selected query of a summary entry, in order."""
    return [(q.get("label"), q.get("group"), q.get("index")) if isinstance(q, dict) else q
            for q in entry.get("queries") or []]


def record_pairs(fp_records: list, q_records: list) -> list[LayerPair]:
    """`layer_pairs` of two in-memory captures (`ImageCapture.attention`, no run files): the same LayerPairs,
    with each record's summary entry (`store.summary.attention_entry`) as `fp` / `q`."""
    from sam2_layerwise.store.summary import attention_entry

    q_by = {(r.layer_key, r.call_index): r for r in q_records}
    if len(q_by) != len(fp_records) or any((r.layer_key, r.call_index) not in q_by for r in fp_records):
        raise ValueError("the two captures recorded different attention calls")
    out = []
    for i, r in enumerate(fp_records):
        qr = q_by[r.layer_key, r.call_index]
        if r.heads != qr.heads or r.kind != qr.kind:
            raise ValueError(f"the two captures disagree on layer {r.layer_key} (heads or kind)")
        out.append(LayerPair(order=i, layer_key=r.layer_key, call_index=r.call_index, name=r.name, kind=r.kind,
                             heads=r.heads, fp=attention_entry(r), q=attention_entry(qr)))
    return out


def select_pairs(pairs: list[LayerPair], spec: str | None) -> list[LayerPair]:
    from sam2_layerwise import layers as layer_sel

    keys = list(dict.fromkeys(p.layer_key for p in pairs))
    chosen = set(layer_sel.select(keys, spec, flag="--layers"))
    return [p for p in pairs if p.layer_key in chosen]


_HEADS = re.compile(r"^\s*(\d+)\s*(?::\s*(\d+)\s*)?$", re.ASCII)


def parse_heads(spec: str | None, max_heads: int) -> list[int] | None:
    """`all` -> None (every head); `0,3,5`; `0:3` (inclusive, like layer ranges: 0, 1, 2, 3)."""
    if spec is not None and not spec.strip():
        raise InputError("is empty; give all, a list (0,3,5) or an inclusive range (0:3)", flag="--heads",
                         value=repr(spec))
    if spec is None or spec.strip().lower() in ("all", "*"):
        return None
    heads: list[int] = []
    for part in spec.split(","):
        m = _HEADS.match(part)
        if not m:
            raise InputError("expects all, a list (0,3,5) or an inclusive range (0:3)", flag="--heads", value=spec)
        a, b = int(m[1]), int(m[2]) if m[2] is not None else int(m[1])
        if b < a:
            raise InputError(f"range {a}:{b} runs backwards", flag="--heads", value=spec)
        if b >= max_heads:
            raise InputError(f"head {b} is out of range: the selected layers have at most {max_heads} heads "
                             f"(0-{max_heads - 1})", flag="--heads", value=spec)
        heads += [h for h in range(a, b + 1) if h not in heads]
    return heads


# -- reading tensors (untrusted) ------------------------------------------------------------------------------
def _load(run: CompareRun, half: str, entry: dict, what: str, needs: tuple[str, ...]) -> dict:
    from sam2_layerwise.store.atomic import safe_load

    rel = (entry.get("files") or {}).get(what)
    if rel is None:
        raise InputError(f"is truncated: {half} has no '{what}' tensors for {entry['layer_key']}", flag=FLAG,
                         value=str(run.run_dir))
    path = run.path(half, rel, FLAG)
    try:
        data = safe_load(path)
    except Exception as exc:  # a damaged or foreign file: say which
        raise InputError(f"{half}/{rel} cannot be loaded ({type(exc).__name__}); the run is damaged", flag=FLAG,
                         value=str(run.run_dir)) from None
    if not isinstance(data, dict) or any(not isinstance(data.get(n), torch.Tensor) or not data[n].is_floating_point()
                                         or data[n].layout != torch.strided or data[n].device.type != "cpu"
                                         for n in needs):
        raise InputError(f"{half}/{rel} does not hold {', '.join(needs)} as dense floating-point tensors", flag=FLAG,
                         value=str(run.run_dir))
    return data


PROB_MAX = 1.0 + 1e-3  # a saved probability or mass above this is not one (fake quantization rounds within it)


def _outside(t: torch.Tensor, low: float, high: float) -> bool:
    """Whether any value of `t` lies below `low` or above `high` (NaN does not: a model with NaN weights is real)."""
    return bool(((t < low) | (t > high)).any())


def _same_shape(run, pair, what, a: torch.Tensor, b: torch.Tensor):
    if a.shape != b.shape:
        raise InputError(f"{pair.layer_key}: the halves' {what} differ in shape ({list(a.shape)} vs "
                         f"{list(b.shape)})", flag=FLAG, value=str(run.run_dir))


def _float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


# -- one layer -----------------------------------------------------------------------------------------------
def _valid(pair: LayerPair, G: int, nq: int) -> torch.Tensor | None:
    """[G, Nq] bool of real (non-padding) queries of a windowed Hiera call."""
    if not pair.kind.startswith("hiera"):
        return None
    try:
        geo = HieraLayerGeometry.from_dict(pair.fp.get("geometry") or {})
    except ValueError:
        return None
    valid = geo.valid_queries()
    return valid if valid is not None and tuple(valid.shape) == (G, nq) else None


def _error_parts(fp: dict, q: dict, names=("q", "k", "v")) -> dict[str, tuple]:
    return {f"{n}_rel_err": sq_err_parts(_float(fp[n]), _float(q[n]), (0, 2, 3)) for n in names}


def _all_query_stats(run, pair, fa: dict, qa: dict, G: int | None = None) -> dict[str, torch.Tensor]:
    """Per head, over every query the capture computed statistics for: FP, Q and the mean paired change."""
    out = {}
    fs, qs = fa.get("query_stats"), qa.get("query_stats")
    if not isinstance(fs, dict) or not isinstance(qs, dict):
        return out
    for stat in ALL_QUERY_STATS:
        a, b = fs.get(stat), qs.get(stat)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dim() != 3:
            continue
        # maxima of probabilities lie in [0, 1], and so do the masses of a softmax; a quantized row's raw mass
        # passes 1 where its quantizer rounds up (log2: anything above 2^-0.5 becomes 1). Earlier runs took the
        # entropy of raw quantized rows, which may pass 1 a little, never 2. NaN is a row without a distribution.
        top = 2.0 if stat == "entropy_norm" else PROB_MAX
        if _outside(a, -1e-4, top) or _outside(b, -1e-4, math.inf if stat == "topk_mass" else top):
            raise InputError(f"{pair.layer_key}: its saved {stat} statistics lie outside [0, 1]; the run is damaged",
                             flag=FLAG, value=str(run.run_dir) if run is not None else pair.layer_key)
        g, h, nq = a.shape  # [G, heads, Nq]
        valid = _valid(pair, g, nq)
        a, b = a.permute(1, 0, 2).reshape(h, -1), b.permute(1, 0, 2).reshape(h, -1)  # [h, G*Nq]
        if valid is not None:
            a, b = a[:, valid.reshape(-1)], b[:, valid.reshape(-1)]
        # rows without a distribution (NaN statistics) are left out, as in the per-query means (`summarise`)
        out[f"{stat}_fp"], out[f"{stat}_q"], out[f"{stat}_delta"] = a.nanmean(1), b.nanmean(1), (b - a).nanmean(1)
    return out


def error_table(found, pair: LayerPair) -> dict[str, torch.Tensor] | None:
    """One call's entry of `compare.errors` (`analysis.pair.selected_errors`) as name -> [heads] tensors;
    None when it is malformed."""
    out = {}
    if found is None:
        return out
    if not isinstance(found, dict):
        return None
    for name in ERRORS:
        v = found.get(name)
        if v is None:
            continue
        # a relative error is a ratio of norms: never negative (NaN, a model's own, is JSON null)
        if not isinstance(v, list) or len(v) != pair.heads or \
                any(x is not None and (not isinstance(x, (int, float)) or isinstance(x, bool) or x < 0) for x in v):
            return None
        out[name] = torch.tensor([math.nan if x is None else float(x) for x in v], dtype=torch.float32)
    return out


def saved_errors(run: CompareRun, pair: LayerPair) -> dict[str, torch.Tensor]:
    """Light mode's q/k/v and output errors, measured by compare (the quantized summary's `compare.errors`)."""
    table = ((run.summaries["quantized"].get("compare") or {}).get("errors") or {})
    found = table.get(pair.q.get("file_stem") or pair.layer_key) if isinstance(table, dict) else None
    out = error_table(found, pair)
    if out is None:
        raise InputError(f"quantized/layerwise_summary.json: compare.errors of {pair.layer_key} is malformed",
                         flag=FLAG, value=str(run.run_dir))
    return out


def light_result(pair: LayerPair, p: torch.Tensor, q: torch.Tensor, k: int, errors: dict[str, torch.Tensor],
                 fa: dict, qa: dict) -> LayerResult:
    """Light mode's metrics of one layer: the selected rows p, q [n, heads, Nk] of both models, the q/k/v and
    output errors [heads], and both captures' per-query statistics (`fa`/`qa`: dicts with `query_stats`).
    The one implementation behind `generate` (rows read from a run) and `sweep` (rows from memory)."""
    labels = [str(d.get("label")) for d in pair.fp["queries"] if isinstance(d, dict)]
    per_query = {name: v for name, v in pair_metrics(p, q, k).items()}  # [n, heads]
    return LayerResult(pair=pair, heads=list(range(pair.heads)), scope="selected queries", per_query=per_query,
                       query_labels=labels, errors=errors, all_queries=_all_query_stats(None, pair, fa, qa))


def measure_light(run: CompareRun, pair: LayerPair, k: int) -> LayerResult:
    fa = _load(run, "original", pair.fp, "attn", ("probs",))
    qa = _load(run, "quantized", pair.q, "attn", ("probs",))
    p, q = _float(fa["probs"]), _float(qa["probs"])  # [n, heads, Nk]
    _same_shape(run, pair, "attention rows", p, q)
    if p.dim() != 3 or p.shape[1] != pair.heads:
        raise InputError(f"{pair.layer_key}: attention rows of shape {list(p.shape)} do not fit {pair.heads} heads",
                         flag=FLAG, value=str(run.run_dir))
    for half, rows in (("original", p), ("quantized", q)):  # NaN may be real (a model with NaN weights): kept
        if _outside(rows, 0.0, PROB_MAX):
            raise InputError(f"{half}: the saved attention rows of {pair.layer_key} are not probabilities (values "
                             f"below 0 or above 1); the run is damaged", flag=FLAG, value=str(run.run_dir))
    return light_result(pair, p, q, k, saved_errors(run, pair), fa, qa)


def measure_records(pair: LayerPair, fp_record, q_record, k: int, errors: dict | None) -> LayerResult:
    """`measure_light` on two in-memory AttentionRecords; `errors`: `selected_errors`'s table (by file stem)."""
    found = error_table((errors or {}).get(q_record.file_stem), pair) or {}
    fa = {"probs": fp_record.probs, "query_stats": fp_record.query_stats}
    qa = {"probs": q_record.probs, "query_stats": q_record.query_stats}
    return light_result(pair, _float(fp_record.probs), _float(q_record.probs), k, found, fa, qa)


def measure_captures(fp_cap, q_cap, errors: dict | None, k: int, heads: list[int] | None = None) -> dict:
    """Light-mode metrics of two in-memory captures of the same image and prompts (what `generate` measures
    from a compare run's files): {"heads": head_rows of every call, "impact": output_impact}."""
    pairs = record_pairs(fp_cap.attention, q_cap.attention)
    q_by = {(r.layer_key, r.call_index): r for r in q_cap.attention}
    rows = []
    for pair, fr in zip(pairs, fp_cap.attention):
        rows += head_rows(measure_records(pair, fr, q_by[fr.layer_key, fr.call_index], k, errors), heads)
    return {"heads": rows, "impact": output_impact(prediction_dict(fp_cap.prediction),
                                                   prediction_dict(q_cap.prediction))}


def prediction_dict(pred) -> dict:
    """A `model.predict.Prediction` as the `predictions.pt` dict `output_impact` takes."""
    return {"masks": torch.from_numpy(pred.masks), "iou_predictions": torch.from_numpy(pred.iou_predictions),
            "low_res_logits": torch.from_numpy(pred.low_res_logits)}


def probs_transform(full: dict, run, pair):
    """The quantized kernel's probability quantizer saved with its q/k/v (None: float softmax)."""
    from sam2_layerwise.quant.quantizers import FakeQuantizer

    payload = full.get("probs_quantizer")
    if payload is None:
        return None
    try:
        return FakeQuantizer.from_payload(payload).quiet
    except ValueError as exc:
        raise InputError(f"{pair.layer_key}: the saved probability quantizer is malformed ({exc})", flag=FLAG,
                         value=str(run.run_dir)) from None


def measure_full(run: CompareRun, pair: LayerPair, k: int, tile_elements: int = 1 << 20) -> LayerResult:
    """Every query row of the layer, recomputed from both halves' q/k/v tile by tile."""
    ff = _load(run, "original", pair.fp, "full", ("q", "k", "v"))
    qf = _load(run, "quantized", pair.q, "full", ("q", "k", "v"))
    for n in "qkv":
        _same_shape(run, pair, n, ff[n], qf[n])
    G, h, nq, _ = ff["q"].shape  # [G, heads, Nq, d]
    nk = ff["k"].shape[-2]
    scale_f, scale_q = saved_scale(ff.get("scale")), saved_scale(qf.get("scale"))
    if scale_f is None or scale_q is None:
        raise InputError(f"{pair.layer_key}: the saved attention scale is not a positive number", flag=FLAG,
                         value=str(run.run_dir))
    transform = probs_transform(qf, run, pair)
    valid = _valid(pair, G, nq)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in PAIR_METRICS}
    out_parts = [torch.zeros(h, dtype=torch.float64), torch.zeros(h, dtype=torch.float64)]
    for tile in row_tiles(G, h, nq, nk, tile_elements):
        g0, g1, r0, r1 = tile
        p, of = attention_tile(ff["q"], ff["k"], ff["v"], scale_f, None, tile)  # [g, h, r, Nk], [g, h, r, d_v]
        q, oq = attention_tile(qf["q"], qf["k"], qf["v"], scale_q, transform, tile)
        m = pair_metrics(p, q, k)  # name -> [g, h, r]
        keep = valid[g0:g1, r0:r1].reshape(-1) if valid is not None else None
        for name, v in m.items():
            rows = v.permute(0, 2, 1).reshape(-1, h)  # [g*r, h]
            values[name].append(rows[keep] if keep is not None else rows)
        if keep is not None:
            sel = valid[g0:g1, r0:r1].unsqueeze(1).unsqueeze(-1)  # [g, 1, r, 1]
            of, oq = of * sel, oq * sel  # padding rows add nothing
        e, r = sq_err_parts(of, oq, (0, 2, 3))
        out_parts[0] += e
        out_parts[1] += r
        del p, q, of, oq, m
    per_query = {name: torch.cat(v) for name, v in values.items()}
    errors = {n: relative_error_from_parts(*v) for n, v in _error_parts(ff, qf).items()}
    errors["out_rel_err"] = relative_error_from_parts(*out_parts)
    fa = _load(run, "original", pair.fp, "attn", ())
    qa = _load(run, "quantized", pair.q, "attn", ())
    return LayerResult(pair=pair, heads=list(range(h)), scope="all queries", per_query=per_query, query_labels=None,
                       errors=errors, all_queries=_all_query_stats(run, pair, fa, qa))


# -- tables --------------------------------------------------------------------------------------------------
def head_rows(res: LayerResult, heads: list[int] | None) -> list[dict]:
    p = res.pair
    chosen = [h for h in (heads if heads is not None else res.heads) if h < p.heads]
    js = summarise(res.per_query["js"], 0)
    means = {name: summarise(v, 0)["mean"] for name, v in res.per_query.items() if name != "js"}
    rows = []
    for h in chosen:
        row = {"order": p.order, "layer": p.label, "layer_key": p.layer_key, "call_index": p.call_index,
               "kind": p.kind, "head": h, "scope": res.scope, "n_queries": int(res.per_query["js"].shape[0]),
               "js_undefined": int(js["undefined"][h]),
               "js_mean": js["mean"][h], "js_p95": js["p95"][h], "js_max": js["max"][h]}
        row.update({name: means[name][h] for name in PAIR_METRICS if name != "js"})
        for name in ERRORS:
            row[name] = float(res.errors[name][h]) if name in res.errors else None
        for name, v in res.all_queries.items():
            row[f"all_queries_{name}"] = float(v[h])
        rows.append(row)
    return rows


def query_rows(res: LayerResult, heads: list[int] | None) -> list[dict]:
    """One row per layer x head x selected query (light mode; full mode keeps per-query values out of tables)."""
    if res.query_labels is None:
        return []
    p = res.pair
    chosen = [h for h in (heads if heads is not None else res.heads) if h < p.heads]
    rows = []
    for i, label in enumerate(res.query_labels):
        q = p.fp["queries"][i]
        for h in chosen:
            rows.append({"order": p.order, "layer_key": p.layer_key, "call_index": p.call_index, "kind": p.kind,
                         "head": h, "query": label, "group": q.get("group"), "index": q.get("index"),
                         **{name: float(res.per_query[name][i, h]) for name in PAIR_METRICS}})
    return rows


def clean(v):
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


def impact(run: CompareRun) -> dict:
    from sam2_layerwise.store.atomic import safe_load
    from sam2_layerwise.store.layout import PREDICTIONS

    preds = {}
    for half in ("original", "quantized"):
        rel = (run.summaries[half].get("prediction") or {}).get("file", PREDICTIONS)
        try:
            preds[half] = safe_load(run.path(half, rel, FLAG))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{half}/{rel} cannot be loaded ({type(exc).__name__}); the run is damaged", flag=FLAG,
                             value=str(run.run_dir)) from None
        if not isinstance(preds[half], dict):
            raise InputError(f"{half}/{rel} does not hold a predictions dict; the run is damaged", flag=FLAG,
                             value=str(run.run_dir))
    try:
        return output_impact(preds["original"], preds["quantized"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"its predictions cannot be compared ({exc})", flag=FLAG, value=str(run.run_dir)) from None


_ATTRIBUTION_FIELDS = {"unit": str, "kind": str, "mode": str, "order": int, "sites": int, "iou": float,
                       "baseline_iou": float, "delta_iou": float, "delta_iou_mean": float}


def read_attribution(run: CompareRun) -> dict | None:
    """`attribution.json` of a `compare --attribute` run, checked field by field (untrusted); None without one."""
    from sam2_layerwise.store.compare_run import ATTRIBUTION, _read_json

    named = run.manifest.get("attribution")
    path = run.run_dir / ATTRIBUTION
    if named is None and not path.exists():
        return None
    if named not in (None, ATTRIBUTION) or path.is_symlink():
        raise InputError(f"manifest.json names an attribution file other than {ATTRIBUTION}", flag=FLAG,
                         value=str(run.run_dir))
    data = _read_json(path, ATTRIBUTION, FLAG, run.run_dir, limit=16 << 20)
    bad = InputError(f"{ATTRIBUTION} is malformed; rerun compare --attribute", flag=FLAG, value=str(run.run_dir))
    from sam2_layerwise.analysis.attribute import ATTRIBUTION_SCHEMA, ATTRIBUTION_VERSION, MODES

    if data.get("schema") != ATTRIBUTION_SCHEMA or data.get("mode") not in MODES or \
            not isinstance(data.get("units"), list):
        raise bad
    if version_problem(data, ATTRIBUTION, ATTRIBUTION_VERSION):
        raise bad
    for row in data["units"]:
        if not isinstance(row, dict):
            raise bad
        for key, typ in _ATTRIBUTION_FIELDS.items():
            v = row.get(key)
            ok = (v is None and typ is float) or (isinstance(v, typ) and not isinstance(v, bool)) or \
                (typ is float and isinstance(v, int) and not isinstance(v, bool))
            if not ok:
                raise bad
    return data


# -- the whole analysis --------------------------------------------------------------------------------------
METRICS_VERSION = 1
PLOTTED = ("js_mean", "js_p95", "entropy_norm_delta", "topk_overlap", "q_mass_on_fp_topk", "q_rel_err",
           "k_rel_err", "v_rel_err", "out_rel_err")
RANK_COLUMNS = ("n_queries", "js_undefined", "js_mean", "js_p95", "js_max", "entropy_norm_delta", "topk_overlap",
                "q_mass_on_fp_topk", "q_rel_err", "k_rel_err", "v_rel_err", "out_rel_err")


@dataclass(frozen=True)
class GenerateOptions:
    layers: str | None = None
    heads: str | None = None
    topk: int | None = None  # k of the top-k metrics (default: the capture's --stats-topk)
    rank: int = 20  # rows of the ranked list
    output: str = "analysis"


def ranked(heads: list[dict], n: int) -> list[dict]:
    """Heads by mean JS, highest first; ties in model order. A head whose every row lost its distribution
    (`js_undefined` = `n_queries` > 0: quantized to all zeros, or NaN) ranks first: nothing of its attention is
    left. A head with no row at all ranks last."""
    def key(r):
        v = r["js_mean"]
        undefined = v is None or not math.isfinite(v)
        collapsed = undefined and r.get("js_undefined", 0) > 0
        return (not collapsed, undefined, -(v or 0.0), r["order"], r["head"])
    return [{"rank": i + 1, **{c: r[c] for c in ("layer_key", "call_index", "layer", "kind", "head")},
             **{c: r.get(c) for c in RANK_COLUMNS}} for i, r in enumerate(sorted(heads, key=key)[:n])]


def ranked_layers(heads: list[dict]) -> list[dict]:
    """Layers by the mean over their heads of mean JS, highest first, with their most changed head."""
    by_layer: dict[tuple, list[dict]] = {}
    for r in heads:
        by_layer.setdefault((r["order"], r["layer_key"], r["call_index"]), []).append(r)
    rows = []
    for (order, key, call), rs in by_layer.items():
        js = [r["js_mean"] for r in rs if r["js_mean"] is not None and math.isfinite(r["js_mean"])]
        top = max(rs, key=lambda r: -1.0 if r["js_mean"] is None or not math.isfinite(r["js_mean"]) else r["js_mean"])
        rows.append({"layer_key": key, "call_index": call, "layer": rs[0]["layer"], "kind": rs[0]["kind"],
                     "order": order, "heads": len(rs), "js_mean": sum(js) / len(js) if js else None,
                     "js_max_head": max(js) if js else None, "most_changed_head": top["head"],
                     **{n: (sum(v) / len(v) if (v := [r[n] for r in rs if r.get(n) is not None
                                                       and math.isfinite(r[n])]) else None)
                        for n in ("entropy_norm_delta", "topk_overlap", "q_rel_err", "k_rel_err", "v_rel_err",
                                  "out_rel_err")}})
    rows.sort(key=lambda r: (r["js_mean"] is None, -(r["js_mean"] or 0.0), r["order"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def impact_title(imp: dict) -> str:
    """Output impact in three short lines (plot titles)."""
    ch = imp["chosen"]
    ious = ", ".join("n/a" if m["iou"] is None else f"{m['iou']:.3f}" for m in imp["masks"])
    lines = [f"mask IoU FP vs Q per output: {ious}",
             f"chosen mask {ch['fp']} -> {ch['q']}{' (changed)' if ch['changed'] else ''}, IoU "
             f"{'n/a' if ch['iou'] is None else format(ch['iou'], '.3f')}"]
    lg = imp["logits"]
    if lg["max_abs_error"] is not None:
        lines.append(f"low-res logits max |d| {lg['max_abs_error']:.3g}, mean |d| {lg['mean_abs_error']:.3g}")
    return "\n".join(lines)


def analyse(run: CompareRun, opts: GenerateOptions, on_layer=None) -> dict:
    """Every metric of the selected layers and heads, as plain data: heads/queries rows, impact, ranking."""
    pairs = select_pairs(layer_pairs(run), opts.layers)
    heads = parse_heads(opts.heads, max(p.heads for p in pairs))
    stats_k = (run.summaries["original"].get("capture_options") or {}).get("stats_topk")
    k = opts.topk if opts.topk is not None else int(stats_k) if isinstance(stats_k, int) and stats_k > 0 else 5
    measure = measure_full if run.mode == "full" else measure_light
    head_table, query_table, layers = [], [], []
    for pair in pairs:
        res = measure(run, pair, k)
        rows = head_rows(res, heads)
        head_table += rows
        query_table += query_rows(res, heads)
        layers.append({"layer_key": pair.layer_key, "call_index": pair.call_index, "label": pair.label,
                       "kind": pair.kind, "heads": pair.heads, "scope": res.scope, "rows": len(rows)})
        if on_layer is not None:
            on_layer(pair)
    if not head_table:
        raise InputError(f"selects no head of the chosen layers (they have {', '.join(sorted({str(p.heads) for p in pairs}))} "
                         f"heads)", flag="--heads", value=opts.heads)
    imp = impact(run)
    return {"heads": head_table, "queries": query_table, "layers": layers, "impact": imp, "k": k,
            "ranking": ranked(head_table, opts.rank), "ranking_layers": ranked_layers(head_table), "attribution": read_attribution(run)}


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _csv_cells(values: list, float_format: str) -> list:
    """One column's cells as pandas writes them: by the dtype `pandas.DataFrame` infers from the values (bool,
    int64, float64 for floats or for ints with missing values, else object), missing values empty."""
    import numbers

    present = [v for v in values if not _missing(v)]
    whole = len(present) == len(values)
    if not present:
        return [""] * len(values)
    if whole and all(isinstance(v, bool) for v in present):
        return [str(v) for v in values]  # bool
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in present):
        return ["" if _missing(v) else v for v in values]  # object: the csv module writes str(v)
    if whole and all(isinstance(v, numbers.Integral) for v in present):
        return [str(v) for v in values]  # int64
    return ["" if _missing(v) else float_format % float(v) for v in values]  # float64


def csv_bytes(rows: list[dict], columns: list[str] | None = None, *, float_format: str, sep: str = ",") -> bytes:
    """`pandas.DataFrame(rows, columns=columns).to_csv(index=False, sep=sep, float_format=float_format)`, byte for
    byte (tested against pandas), for rows of str, int, float, bool and None; columns default to every key in
    order of appearance. Without pandas: importing it alone took a fifth of `generate`'s time on a light run."""
    import csv
    import io

    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    cells = [_csv_cells([r.get(c) for r in rows], float_format) for c in columns]
    buf = io.StringIO()
    out = csv.writer(buf, delimiter=sep, lineterminator="\n")
    out.writerow(columns)
    out.writerows(zip(*cells))
    return buf.getvalue().encode()


def _columns(rows: list[dict]) -> dict[str, list]:
    """rows -> {column: [value per row]} (None where a row lacks the key): a table for the plots."""
    return {c: [r.get(c) for r in rows] for c in dict.fromkeys(k for r in rows for k in r)}


def write_analysis(run: CompareRun, result: dict, opts: GenerateOptions, writer, command: list[str] | None) -> dict:
    """metrics.json, metrics_heads.csv, metrics_queries.csv, ranking.txt/.json and plots/ under `opts.output`."""
    import datetime as _dt

    from sam2_layerwise import __version__
    from sam2_layerwise.metrics import heatmaps, layer_chart
    from sam2_layerwise.store.atomic import atomic_write_bytes, atomic_write_json

    out = opts.output
    heads = _columns(result["heads"])
    files = {"metrics": f"{out}/metrics.json", "heads_csv": f"{out}/metrics_heads.csv",
             "queries_csv": f"{out}/metrics_queries.csv", "ranking_txt": f"{out}/ranking.txt",
             "ranking_json": f"{out}/ranking.json", "ranking_layers_txt": f"{out}/ranking_layers.txt", "plots": []}
    atomic_write_bytes(csv_bytes(result["heads"], float_format="%.17g"), writer.path(files["heads_csv"]))
    atomic_write_bytes(csv_bytes(result["queries"], ["order", "layer_key", "call_index", "kind", "head", "query",
                                                     "group", "index", *PAIR_METRICS], float_format="%.17g"),
                       writer.path(files["queries_csv"]))
    atomic_write_bytes(csv_bytes(result["ranking"], sep="\t", float_format="%.6g"), writer.path(files["ranking_txt"]))
    atomic_write_json(clean(result["ranking"]), writer.path(files["ranking_json"]))
    layers_rank = [{k: v for k, v in r.items() if k != "order"} for r in result["ranking_layers"]]
    atomic_write_bytes(csv_bytes(layers_rank, sep="\t", float_format="%.6g"), writer.path(files["ranking_layers_txt"]))
    title = impact_title(result["impact"])
    plotted = [m for m in PLOTTED if not all(_missing(v) for v in heads.get(m, ()))]
    rels = [f"{out}/plots/heatmap_{metric}.png" for metric in plotted]
    heatmaps(heads, [(metric, writer.path(rel), f"{metric} per layer and head ({heads['scope'][0]})")
                     for metric, rel in zip(plotted, rels)])
    files["plots"] += rels
    rel = f"{out}/plots/layers_js_mean.png"
    layer_chart(heads, "js_mean", writer.path(rel), title="mean JS divergence per layer (FP vs Q)\n" + title)
    files["plots"].append(rel)
    attribution = result.get("attribution")
    if attribution and attribution["units"]:
        from sam2_layerwise.metrics.plots import attribution_chart

        units = attribution["units"]
        files["attribution_csv"] = f"{out}/attribution.csv"
        atomic_write_bytes(csv_bytes(units, float_format="%.17g"), writer.path(files["attribution_csv"]))
        rel = f"{out}/plots/attribution.png"
        what = ("IoU with the layer restored to full precision minus the quantized model's" if attribution["mode"] ==
                "restore" else "IoU with only the layer quantized minus 1")
        attribution_chart([u.get("unit") for u in units],
                          [math.nan if u.get("delta_iou") is None else float(u["delta_iou"]) for u in units],
                          writer.path(rel),
                          title=f"attribution ({attribution['mode']}): {what}\n(chosen masks against the FP model's)")
        files["plots"].append(rel)
    metrics = clean({
        "schema": METRICS_SCHEMA, "schema_version": METRICS_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__, "command": command,
        "run": {"mode": run.mode, "image": run.manifest.get("image"), "prompts": run.manifest.get("prompts"),
                "models": {h: {k: (run.manifest.get("models") or {}).get(h, {}).get(k)
                               for k in ("config", "checkpoint", "checkpoint_sha256")} for h in ("original", "quantized")}},
        "selection": {"layers": opts.layers, "heads": opts.heads, "topk": result["k"]},
        "definitions": "docs/metrics.md; JS in bits (log base 2, in [0, 1]); entropy normalised by ln N_keys; "
                       "relative errors ||Q - FP|| / ||FP|| per head",
        "output_impact": result["impact"],
        "layers": result["layers"],
        "heads": result["heads"],
        "ranking": result["ranking"],
        "ranking_layers": result["ranking_layers"],
        "attribution": attribution,
        "files": files,
    })
    atomic_write_json(metrics, writer.path(files["metrics"]))
    return metrics
