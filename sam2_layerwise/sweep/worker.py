"""One sweep worker: both models loaded once, then item after item (a light-mode compare in memory, generate's
metrics, optional attribution and compare run). The local engine runs one in-process; the Ray engine one per
actor.

One model object serves both: the quantized model, with its quantizers suspended and (for QAT checkpoints whose
float weights differ) the original's values put back for the float pass (`AttributionContext.float_model`), so
a worker holds one SAM 2 plus the parameters that differ. The float pass is bit-identical to the original model
(tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from sam2_layerwise.errors import LayerwiseError, condense
from sam2_layerwise.sweep.inputs import Item
from sam2_layerwise.threads import one_thread

log = logging.getLogger("sam2_layerwise")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs (plain values: it travels to Ray actors)."""

    config_original: str
    checkpoint_original: str
    config_quantized: str
    checkpoint_quantized: str
    device: str = "auto"
    precision: str = "fp32"
    image_size: int | None = None
    layers: str | None = None
    max_attn_queries: int = 4
    stats_topk: int = 5
    topk: int | None = None
    query_stats: str = "selected"
    single_mask: bool = False
    max_pixels: int = 1 << 27
    attribute: bool = False
    attribute_mode: str = "restore"
    attribute_layers: str | None = None
    runs_dir: str | None = None  # --keep-runs: OUT/runs
    model_hashes: tuple = ()  # ((half, {config_sha256, checkpoint_sha256}), ...) for the kept runs' manifests
    threads: int | None = None  # torch threads (Ray actors: their CPUs)
    argv: tuple = ()

    def args(self) -> SimpleNamespace:
        """The namespace compare's helpers take (same flag names)."""
        return SimpleNamespace(config_original=self.config_original, checkpoint_original=self.checkpoint_original,
                               config_quantized=self.config_quantized, checkpoint_quantized=self.checkpoint_quantized,
                               device=self.device, precision=self.precision, image_size=self.image_size,
                               layers=self.layers, max_attn_queries=self.max_attn_queries, stats_topk=self.stats_topk,
                               single_mask=self.single_mask, full_dtype="fp32", argv=list(self.argv), quiet=True)


ITEM_METRICS = ("iou", "iou_mean", "iou_min", "iou_loss", "chosen_fp", "chosen_q", "chosen_changed", "pred_iou_fp",
                "pred_iou_q", "area_fp", "area_q", "logit_max_abs_error", "logit_mean_abs_error", "sign_agreement",
                "gt_iou_fp", "gt_iou_q", "gt_iou_delta")
TIMINGS = ("seconds_load", "seconds_fp", "seconds_q", "seconds_metrics", "seconds_attribution", "seconds_total")


def _f(v) -> float:
    return float("nan") if v is None else float(v)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def load_mask(path: str, width: int, height: int, max_pixels: int) -> np.ndarray:
    """A ground-truth mask file -> [H, W] bool (any non-zero pixel is foreground); it must be the image's size."""
    from sam2_layerwise.errors import InputError
    from sam2_layerwise.inputs import load_image

    m = load_image(path, flag="--inputs mask", max_pixels=max_pixels)
    if m.shape[:2] != (height, width):
        raise InputError(f"is {m.shape[1]}x{m.shape[0]}, the image is {width}x{height}", flag="--inputs mask",
                         value=path)
    return m.max(axis=2) > 0


class SweepWorker:
    """Loads both models once (`spec`), then `run(item)` for each item; `run` never raises for an item's own
    problem (unreadable image, click outside it, a failing model): it returns a failed result saying why."""

    def __init__(self, spec: WorkerSpec):
        from sam2_layerwise import layers as layer_sel
        from sam2_layerwise.analysis.attribute import AttributionContext, build_units, float_differences
        from sam2_layerwise.analysis.pair import ModelSpec, _build
        from sam2_layerwise.capture import CaptureOptions
        from sam2_layerwise.quant import load_quant_config

        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        self.spec = spec
        args = spec.args()
        qcfg = load_quant_config(spec.config_quantized)
        fp_loaded, _ = _build(ModelSpec("original", spec.config_original, spec.checkpoint_original, None), args)
        fp_state = fp_loaded.model.state_dict()
        self.fp_info = fp_loaded.describe()
        loaded, qm = _build(ModelSpec("quantized", spec.config_original, spec.checkpoint_quantized, qcfg), args)
        fp_values = float_differences(qm, fp_state)
        del fp_loaded, fp_state
        gc.collect()
        self.loaded, self.qm, self.model = loaded, qm, loaded.model
        self.q_info = loaded.describe()
        keys = layer_sel.attention_layer_keys(self.model, image_mode=True)
        chosen = layer_sel.select(keys, spec.layers)
        # per-block output statistics and non-finite checks only for kept runs (the tables report neither)
        self.options = CaptureOptions(max_attn_queries=spec.max_attn_queries, stats_topk=spec.stats_topk,
                                      all_query_stats=spec.query_stats == "all", keep_qkv=True,
                                      layers=None if spec.layers is None else tuple(chosen),
                                      output_stats=bool(spec.runs_dir))
        self.k = spec.topk if spec.topk is not None else spec.stats_topk if spec.stats_topk > 0 else 5
        self.base = AttributionContext(model=self.model, qm=qm, units=build_units(self.model, qm, list(fp_values)),
                                       fp_values=fp_values, image=None, prompts=None, multimask=not spec.single_mask,
                                       precision=spec.precision)

    @property
    def units(self):
        return self.base.units

    @property
    def float_parameters_differ(self) -> int:
        return len(self.base.fp_values)

    # -- one item ------------------------------------------------------------------------------------------
    def run(self, item: Item) -> dict:
        t0 = time.perf_counter()
        result = failed_result(item, item.error)
        if item.error is not None:
            return result
        try:
            self._run(item, result)
            result["status"] = "ok"
        except LayerwiseError as exc:
            result["error"] = str(exc)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - one item's failure is recorded; the sweep goes on
            log.debug("item %s failed:\n%s", item.key, traceback.format_exc())
            result["error"] = f"internal error: {type(exc).__name__}: {condense(exc, 300)}"
        finally:
            from sam2_layerwise.capture import dispatch

            dispatch.reset()  # an exception inside a forward pass leaves nothing routed
        result["timings"]["seconds_total"] = time.perf_counter() - t0
        return result

    def _run(self, item: Item, result: dict) -> None:
        from sam2_layerwise.analysis.attribute import ForwardCache, attribute
        from sam2_layerwise.analysis.generate import measure_captures
        from sam2_layerwise.analysis.pair import _kept, selected_errors
        from sam2_layerwise.api import capture_image
        from sam2_layerwise.inputs import load_image, parse_prompts

        spec, timings = self.spec, result["timings"]
        t = time.perf_counter()
        image = load_image(item.image, flag="--inputs", max_pixels=spec.max_pixels)
        h, w = image.shape[:2]
        result["width"], result["height"] = w, h
        prompts = parse_prompts(list(item.points), list(item.box) if item.box else None, None, w, h)
        gt = load_mask(item.mask, w, h, spec.max_pixels) if item.mask else None
        timings["seconds_load"] = time.perf_counter() - t

        ctx = dataclasses.replace(self.base, image=image, prompts=prompts, _predictors={})
        attribute_on = spec.attribute
        fp_cache = ForwardCache(self.model) if attribute_on and spec.attribute_mode == "isolate" else None
        q_cache = ForwardCache(self.model) if attribute_on and spec.attribute_mode == "restore" else None
        multimask = not spec.single_mask

        t = time.perf_counter()
        with ctx.float_model(), (fp_cache or contextlib.nullcontext()):
            fp_cap = capture_image(self.model, image, prompts, self.options, multimask=multimask,
                                   precision=spec.precision)
        kept = _kept(fp_cap)
        timings["seconds_fp"] = time.perf_counter() - t
        t = time.perf_counter()
        with (self.qm.monitoring() if spec.runs_dir else contextlib.nullcontext()), \
                (q_cache or contextlib.nullcontext()):
            q_cap = capture_image(self.model, image, prompts, self.options, multimask=multimask,
                                  precision=spec.precision)
        timings["seconds_q"] = time.perf_counter() - t

        t = time.perf_counter()
        with one_thread():  # small tensors: a parallel region costs more than it saves (10-100x on busy cores)
            errors = selected_errors(kept, q_cap)
            measured = measure_captures(fp_cap, q_cap, errors, self.k)
        result["heads"] = measured["heads"]
        result["metrics"] = item_metrics(measured["impact"], fp_cap.prediction, q_cap.prediction, gt)
        timings["seconds_metrics"] = time.perf_counter() - t

        if attribute_on:
            t = time.perf_counter()
            ctx.set_baselines(fp_prediction=fp_cap.prediction, q_prediction=q_cap.prediction, fp_cache=fp_cache,
                              q_cache=q_cache)
            result["attribution"] = attribute(ctx, spec.attribute_layers, spec.attribute_mode)
            timings["seconds_attribution"] = time.perf_counter() - t
        if spec.runs_dir:
            self._keep_run(item, image, prompts, fp_cap, q_cap, kept, result)

    def _keep_run(self, item, image, prompts, fp_cap, q_cap, kept, result) -> None:
        """--keep-runs: the item's compare run (light mode), as `compare --save-raw` writes it."""
        from sam2_layerwise.analysis import pair
        from sam2_layerwise.store import compare_run as cr
        from sam2_layerwise.store.atomic import atomic_write_json
        from sam2_layerwise.store.layout import RunWriter

        args = self.spec.args()
        args.image = item.image
        info = pair.image_info(item.image, image, item.image_sha256)
        hashes = dict(self.spec.model_hashes)
        out_opts = pair.output_options(False)
        command = ["sam2-layerwise", *args.argv]
        owned = (cr.MANIFEST, *cr.HALF_ENTRIES, cr.ANALYSIS, cr.ATTRIBUTION)
        models = {}
        with RunWriter(Path(self.spec.runs_dir) / item.name, owned=owned, kind=cr.COMPARE_RUN) as writer:
            for name, cap, qm, described in (("original", fp_cap, None, self.fp_info),
                                              ("quantized", q_cap, self.qm, self.q_info)):
                if qm is not None:
                    pair.write_half(writer, name, cap, image, model_info=described, image_info=info, out_opts=out_opts,
                                    command=command, mode="light", full=False, qm=qm, kept=kept)
                else:
                    pair.write_half(writer, name, cap, image, model_info=described, image_info=info, out_opts=out_opts,
                                    command=command, mode="light", full=False)
                models[name] = pair.model_entry(SimpleNamespace(describe=lambda d=described: d), qm, cap,
                                                hashes.get(name))
            extra = None
            if result["attribution"]:
                from sam2_layerwise.analysis.attribute import ATTRIBUTION_SCHEMA, ATTRIBUTION_VERSION
                from sam2_layerwise.analysis.generate import clean

                atomic_write_json(clean({"schema": ATTRIBUTION_SCHEMA, "schema_version": ATTRIBUTION_VERSION,
                                         "mode": self.spec.attribute_mode,
                                         "float_parameters_differ": self.float_parameters_differ,
                                         "units": result["attribution"]}), writer.path(cr.ATTRIBUTION))
                extra = {"attribution": cr.ATTRIBUTION}
            manifest = pair.compare_manifest(args, mode="light", models=models, image_info=info, prompts=prompts,
                                             calls=len(q_cap.attention), qcfg=self.qm.config, extra=extra)
            atomic_write_json(manifest, writer.path(cr.MANIFEST))


def failed_result(item: Item, reason: str) -> dict:
    """The result of an item that could not run."""
    return {"key": item.key, "status": "failed", "error": reason, "width": item.width, "height": item.height,
            "metrics": {}, "heads": [], "attribution": [], "timings": {}}


def item_metrics(imp: dict, fp_pred, q_pred, gt: np.ndarray | None) -> dict:
    """The items table's output-impact columns from `output_impact`, and each model's IoU against the
    ground truth (chosen masks) when there is one."""
    ch = imp["chosen"]
    fp_mask, q_mask = imp["masks"][ch["fp"]], imp["masks"][ch["q"]]
    iou = _f(ch["iou"])
    out = {"iou": iou, "iou_mean": _f(imp["iou_mean"]), "iou_min": _f(imp["iou_min"]), "iou_loss": 1.0 - iou,
           "chosen_fp": int(ch["fp"]), "chosen_q": int(ch["q"]), "chosen_changed": bool(ch["changed"]),
           "pred_iou_fp": _f(fp_mask["pred_iou_fp"]), "pred_iou_q": _f(q_mask["pred_iou_q"]),
           "area_fp": _f(fp_mask["area_fp"]), "area_q": _f(q_mask["area_q"]),
           "logit_max_abs_error": _f(imp["logits"]["max_abs_error"]),
           "logit_mean_abs_error": _f(imp["logits"]["mean_abs_error"]),
           "sign_agreement": _f(imp["logits"]["sign_agreement"]),
           "gt_iou_fp": float("nan"), "gt_iou_q": float("nan"), "gt_iou_delta": float("nan")}
    if gt is not None:
        a, b = _iou(fp_pred.masks[ch["fp"]], gt), _iou(q_pred.masks[ch["q"]], gt)
        out.update(gt_iou_fp=a, gt_iou_q=b, gt_iou_delta=b - a)
    return out
