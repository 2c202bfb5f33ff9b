"""Counterfactual attribution: which layers' quantization costs mask quality (the causal answer beside the
correlational attention metrics).

- `restore` mode: the quantized model with one unit restored to full precision (its quantizers out, and its
  float parameters set to the original model's where a QAT checkpoint changed them). Recorded: the chosen
  mask's IoU against the FP model's and `delta_iou` = IoU(restored, FP) − IoU(Q, FP) — how much of the loss
  that unit alone gives back.
- `isolate` mode: the float model with only that unit quantized. `delta_iou` = IoU(isolated, FP) − 1 — how
  much quantizing that unit alone costs.

Units partition everything that differs between the two models on the image path: one per Hiera block
(`image_encoder_trunk_blocks_N`: every quantizer and parameter under the block), one per decoder attention
layer (`sam_mask_decoder_transformer_layers_0_self_attn`, ...: the module with its projections), and the rest
grouped by component (`image_encoder_trunk` patch and position embedding, `image_encoder_neck`,
`sam_mask_decoder_conv_s0`, `sam_mask_decoder_transformer_layers_0` MLP and norms, `sam_prompt_encoder`,
`sam_mask_decoder_iou_prediction_head`, ...). Restoring every unit at once gives the float model exactly.

Cheap by restarting: a unit changes nothing that runs before it. During the baseline run (`ForwardCache`) the
outputs of the patch embedding, of every Hiera block, of the trunk and of the image encoder are kept; a
restoration of block i replays blocks 0..i-1 from that cache (their `forward` returns the cached output) and
runs SAM 2's own modules from block i on — the rest of the trunk, the neck, the decoder — through the real
`SAM2ImagePredictor`. A neck restoration replays the whole trunk; decoder and prompt-encoder restorations
reuse the image embedding and run `predict` only. Results are bit-identical to a full rerun (tested).
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sam2_layerwise.errors import InputError

MODES = ("restore", "isolate")
FLAG = "--attribute-layers"

# Restart points, in forward order: (stage, index). A unit restarts at the earliest module it changes.
FULL, BLOCK, NECK, AFTER_ENCODER, PREDICT = range(5)
_START_NAMES = {FULL: "full rerun", BLOCK: "from Hiera block {i}", NECK: "from the neck",
                AFTER_ENCODER: "after the image encoder", PREDICT: "decoder only (image embedding reused)"}

# Modules the image predictor never runs (video mode only): not part of any unit.
_NOT_IMAGE_PATH = ("memory_attention", "memory_encoder", "mask_downsample", "obj_ptr_proj", "obj_ptr_tpos_proj")
_TOP_LEVEL_IMAGE_PATH = ("no_mem_embed",)  # a top-level parameter set_image adds to the embedding
_BLOCK = re.compile(r"^image_encoder\.trunk\.blocks\.(\d+)(?:\.|$)")
_DECODER_LAYER = re.compile(r"^sam_mask_decoder\.transformer\.layers\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class Unit:
    """One thing attribution restores. `modules`: names of the modules whose quantizers it owns; `params`:
    state-dict names whose float values differ between the two models (QAT); `start`: (stage, index)."""

    key: str
    kind: str  # hiera_block / decoder_attention / other
    order: int
    modules: tuple[str, ...]
    sites: tuple[str, ...]
    params: tuple[str, ...]
    start: tuple[int, int]

    @property
    def changes_anything(self) -> bool:
        return bool(self.sites or self.params)

    @property
    def start_label(self) -> str:
        return _START_NAMES[self.start[0]].format(i=self.start[1])


def _classify(name: str, decoder_attention: list[str]) -> tuple[str, str, tuple[int, int]] | None:
    """A module or parameter name (dotted) -> (unit key, kind, restart point), None off the image path."""
    parts = name.split(".")
    if parts[0] in _NOT_IMAGE_PATH:
        return None
    m = _BLOCK.match(name)
    if m:
        return f"image_encoder_trunk_blocks_{m[1]}", "hiera_block", (BLOCK, int(m[1]))
    for a in decoder_attention:
        if name == a or name.startswith(a + "."):
            return a.replace(".", "_"), "decoder_attention", (PREDICT, 0)
    if name.startswith("image_encoder.trunk"):
        return "image_encoder_trunk", "other", (FULL, 0)
    if name.startswith("image_encoder.neck"):
        return "image_encoder_neck", "other", (NECK, 0)
    if parts[0] == "image_encoder":
        return "image_encoder", "other", (FULL, 0)
    if parts[0] == "sam_prompt_encoder":
        return "sam_prompt_encoder", "other", (PREDICT, 0)
    if parts[0] == "sam_mask_decoder":
        m = _DECODER_LAYER.match(name)
        if m:
            return f"sam_mask_decoder_transformer_layers_{m[1]}", "other", (PREDICT, 0)
        sub = parts[1] if len(parts) > 2 else parts[-1] if len(parts) == 2 else ""
        key = f"sam_mask_decoder_{sub}" if sub else "sam_mask_decoder"
        # conv_s0 / conv_s1 project the high-resolution features inside set_image
        return key, "other", ((AFTER_ENCODER, 0) if sub.startswith("conv_s") else (PREDICT, 0))
    if len(parts) == 1 and name in _TOP_LEVEL_IMAGE_PATH:
        return name, "other", (AFTER_ENCODER, 0)
    return None


def build_units(model: nn.Module, qm, diff_params: list[str] = ()) -> list[Unit]:
    """Every unit of `model` in forward order: each Hiera block and decoder attention layer (even when it has
    nothing quantized: its change is then exactly 0), and the other components that hold a quantizer or a
    differing parameter."""
    from sam2_layerwise.capture.session import ATTENTION_TYPES

    index = {n: i for i, (n, _) in enumerate(model.named_modules())}
    decoder_attention = [n for n, m in model.named_modules()
                         if type(m).__name__ in ATTENTION_TYPES and n.startswith("sam_mask_decoder")]
    found: dict[str, dict] = {}

    def unit(name: str):
        c = _classify(name, decoder_attention)
        if c is None:
            return None
        key, kind, start = c
        u = found.setdefault(key, {"kind": kind, "start": start, "modules": [], "sites": [], "params": [],
                                   "anchor": len(index)})
        owner = name if name in index else name.rsplit(".", 1)[0] if "." in name else ""
        u["anchor"] = min(u["anchor"], index.get(owner, len(index)))  # model order of its first module
        return u

    for name in index:  # structural units first, so they exist even when they hold nothing quantized
        if _BLOCK.match(name) and name.count(".") == 3 or name in decoder_attention:
            unit(name)
    for qid, site in (qm.sites.items() if qm is not None else ()):
        u = unit(site.module)
        if u is not None:
            u["sites"].append(qid)
            if site.module not in u["modules"]:
                u["modules"].append(site.module)
    for pname in diff_params:
        u = unit(pname)
        if u is not None:
            u["params"].append(pname)
    ordered = sorted(found.items(), key=lambda kv: (kv[1]["start"], kv[1]["anchor"], kv[0]))
    kept = [(k, u) for k, u in ordered if u["kind"] != "other" or u["sites"] or u["params"]]
    return [Unit(key=k, kind=u["kind"], order=i, modules=tuple(u["modules"]), sites=tuple(u["sites"]),
                 params=tuple(u["params"]), start=u["start"]) for i, (k, u) in enumerate(kept)]


def select_units(units: list[Unit], spec: str | None) -> list[Unit]:
    """`--attribute-layers`: names, globs, comma lists and inclusive ranges over the unit keys."""
    from sam2_layerwise import layers as layer_sel

    chosen = set(layer_sel.select([u.key for u in units], spec, flag=FLAG))
    return [u for u in units if u.key in chosen]


# -- the cache of a baseline run -----------------------------------------------------------------------------
class ForwardCache:
    """While active (a context manager), keeps the outputs of the image encoder's stages: the patch embedding,
    every Hiera block, the trunk and the image encoder (of the last `set_image`). References, not copies:
    SAM 2 never modifies them in place (the encoder's output dict is copied, `forward_image` rewrites it)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.input: torch.Tensor | None = None  # the image encoder's input [1, 3, S, S] (resized, normalised)
        self.patch: torch.Tensor | None = None
        self.blocks: dict[int, torch.Tensor] = {}
        self.trunk: list[torch.Tensor] | None = None
        self.encoder: dict | None = None
        self._handles: list = []

    def __enter__(self):
        trunk = self.model.image_encoder.trunk
        self._handles.append(trunk.patch_embed.register_forward_hook(self._keep_patch))
        for i, blk in enumerate(trunk.blocks):
            self._handles.append(blk.register_forward_hook(self._keep_block(i)))
        self._handles.append(trunk.register_forward_hook(self._keep_trunk))
        self._handles.append(self.model.image_encoder.register_forward_hook(self._keep_encoder))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _keep_patch(self, module, args, output):
        self.patch = output

    def _keep_block(self, i):
        def keep(module, args, output):
            self.blocks[i] = output  # [B, H, W, C]
        return keep

    def _keep_trunk(self, module, args, output):
        self.trunk = list(output)

    def _keep_encoder(self, module, args, output):
        self.input = args[0] if args else None
        self.encoder = _copy_encoder_output(output)

    @property
    def complete(self) -> bool:
        return self.patch is not None and self.trunk is not None and self.encoder is not None and \
            len(self.blocks) == len(self.model.image_encoder.trunk.blocks)


def _copy_encoder_output(out: dict) -> dict:
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in out.items()}


@contextlib.contextmanager
def _replaying(model: nn.Module, cache: ForwardCache, start: tuple[int, int]):
    """Modules that run before `start` return their cached output instead of computing it."""
    enc = model.image_encoder
    trunk = enc.trunk
    replaced: list[nn.Module] = []

    def replay(module, value):
        module.forward = value  # an instance attribute: nn.Module.__call__ looks up self.forward
        replaced.append(module)

    stage, index = start
    try:
        if stage == BLOCK:
            replay(trunk.patch_embed, lambda *a, **k: cache.patch)
            if index > 0:  # block 0 replays too: the position embedding it would have been given is not needed
                trunk._get_pos_embed = lambda *a, **k: 0.0
                replaced.append(_Attr(trunk, "_get_pos_embed"))
            for j in range(index):
                replay(trunk.blocks[j], lambda *a, _j=j, **k: cache.blocks[_j])
        elif stage == NECK:
            replay(trunk, lambda *a, **k: list(cache.trunk))
        elif stage >= AFTER_ENCODER:
            replay(enc, lambda *a, **k: _copy_encoder_output(cache.encoder))
        yield
    finally:
        for module in replaced:
            if isinstance(module, _Attr):
                delattr(module.obj, module.name)
            else:
                del module.forward


class _Attr:
    """An instance attribute set for the duration of a replay (deleted again after)."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name


class _CachedTransforms:
    """A predictor's SAM2Transforms whose image transform returns the baseline's resized, normalised input
    (the same tensor `set_image` computed then); everything else (prompt coordinates, mask postprocessing) is
    the real one's."""

    def __init__(self, real, image_input: torch.Tensor):
        self._real, self._input = real, image_input

    def __call__(self, image):
        return self._input[0]  # set_image adds the batch axis back

    def __getattr__(self, name):
        return getattr(self._real, name)


@contextlib.contextmanager
def _values(model: nn.Module, values: dict[str, torch.Tensor]):
    """Parameters and buffers set to `values` (by state-dict name) for the duration of the block."""
    saved = []
    try:
        for name, value in values.items():
            t = _tensor(model, name)
            saved.append((t, t.data))
            t.data = value
        yield
    finally:
        for t, data in reversed(saved):
            t.data = data


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


# -- the context of one image --------------------------------------------------------------------------------
@dataclass
class AttributionContext:
    """One model object with the quantizers installed (`qm`), the float values of parameters that differ
    between the two models (`fp_values`, on the model's device; empty when the quantized checkpoint's float
    weights are the original's), one image and prompts, and the baselines: both models' predictions and
    forward caches."""

    model: nn.Module
    qm: object
    units: list[Unit]
    fp_values: dict[str, torch.Tensor]
    image: np.ndarray
    prompts: object
    multimask: bool = True
    precision: str = "fp32"
    fp_prediction: object = None
    q_prediction: object = None
    fp_cache: ForwardCache | None = None
    q_cache: ForwardCache | None = None
    _predictors: dict = field(default_factory=dict)

    @classmethod
    def for_models(cls, model, qm, *, fp_state: dict | None, image, prompts, multimask=True, precision="fp32"):
        """`fp_state`: the original model's state dict (None: the quantized model's float weights are it)."""
        fp_values = float_differences(qm, fp_state) if fp_state is not None else {}
        return cls(model=model, qm=qm, units=build_units(model, qm, list(fp_values)), fp_values=fp_values,
                   image=image, prompts=prompts, multimask=multimask, precision=precision)

    def set_baselines(self, *, fp_prediction, q_prediction, fp_cache=None, q_cache=None) -> None:
        self.fp_prediction, self.q_prediction = fp_prediction, q_prediction
        self.fp_cache, self.q_cache = fp_cache, q_cache
        self._predictors.clear()

    # model states ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def float_model(self):
        """The original float model: every quantizer out, every differing parameter at its float value."""
        with self.qm.suspended(), _values(self.model, self.fp_values):
            yield

    @contextlib.contextmanager
    def state(self, mode: str, units: list[Unit]):
        """restore: the quantized model with `units` in full precision; isolate: the float model with only
        `units` quantized."""
        mods = {m for u in units for m in u.modules}
        params = {p for u in units for p in u.params}
        if mode == "restore":
            with self.qm.suspended(mods), _values(self.model, {p: self.fp_values[p] for p in params}):
                yield
        elif mode == "isolate":
            rest = {p: v for p, v in self.fp_values.items() if p not in params}
            with self.qm.suspended(lambda name: name not in mods), _values(self.model, rest):
                yield
        else:
            raise ValueError(f"attribution mode {mode!r} (expected one of {', '.join(MODES)})")

    # running -------------------------------------------------------------------------------------------
    def run(self, mode: str, start: tuple[int, int], naive: bool = False):
        """The prediction of the model in its current state, restarted at `start` from the `mode`'s baseline
        cache (restore: the quantized run; isolate: the float run); `naive` reruns everything."""
        from sam2_layerwise.model.predict import make_predictor, precision_context, predict, set_image, run_plain

        device = next(self.model.parameters()).device
        if naive or start[0] == FULL:
            return run_plain(self.model, self.image, self.prompts, multimask=self.multimask, precision=self.precision)
        cache = self.q_cache if mode == "restore" else self.fp_cache
        if cache is None or not cache.complete:
            raise RuntimeError(f"attribution in {mode} mode needs the baseline's ForwardCache")
        with precision_context(device, self.precision):
            if start[0] == PREDICT:
                predictor = self._predictors.get(mode)
                if predictor is None:  # the unit runs after set_image: its image embedding is the baseline's
                    predictor = make_predictor(self.model)
                    if cache.input is not None:
                        predictor._transforms = _CachedTransforms(predictor._transforms, cache.input)
                    with _replaying(self.model, cache, (AFTER_ENCODER, 0)):
                        set_image(predictor, self.image)
                    self._predictors[mode] = predictor
                return predict(predictor, self.prompts, self.multimask)
            predictor = make_predictor(self.model)
            if cache.input is not None:  # the image is not resized and normalised again
                predictor._transforms = _CachedTransforms(predictor._transforms, cache.input)
            with _replaying(self.model, cache, start):
                set_image(predictor, self.image)
            return predict(predictor, self.prompts, self.multimask)

    def prediction_with(self, units: list[Unit], mode: str = "restore", naive: bool = False):
        """The prediction with `units` restored (or, isolate, alone quantized) at once."""
        if not any(u.changes_anything for u in units):
            return self.q_prediction if mode == "restore" else self.fp_prediction
        start = min(u.start for u in units if u.changes_anything)
        with self.state(mode, units):
            return self.run(mode, start, naive=naive)


def float_differences(qm, fp_state: dict) -> dict[str, torch.Tensor]:
    """State-dict entries whose float value in the quantized model differs from the original's (QAT
    fine-tuning); the original's values, on the quantized model's device. Empty for post-training quantization."""
    out = {}
    for name, value in qm.float_state_dict().items():
        ref = fp_state.get(name)
        if ref is None:
            continue
        ref = ref.to(device=value.device, dtype=value.dtype)
        if ref.shape != value.shape or not torch.equal(ref, value):
            out[name] = ref
    return out


# -- attribution ---------------------------------------------------------------------------------------------
def _impact(fp_pred, pred) -> dict:
    from sam2_layerwise.analysis.generate import prediction_dict
    from sam2_layerwise.metrics import output_impact

    return output_impact(prediction_dict(fp_pred), prediction_dict(pred))


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


ROW_COLUMNS = ("order", "unit", "kind", "mode", "sites", "params", "restart", "iou", "iou_mean", "baseline_iou",
               "baseline_iou_mean", "delta_iou", "delta_iou_mean", "chosen_changed", "logit_mean_abs_error",
               "seconds")


def attribute(ctx: AttributionContext, layers: str | None = None, mode: str = "restore", *,
              naive: bool = False, on_unit=None) -> list[dict]:
    """One row per selected unit (`--attribute-layers`; default every unit): the chosen mask's IoU against the
    FP model's with that unit restored (isolate: alone quantized), and its change from the baseline (the
    quantized model; isolate: the float model, IoU 1). Units that change nothing are not run: their change is
    exactly 0."""
    if mode not in MODES:
        raise InputError(f"expected one of {', '.join(MODES)}", flag="--attribute-mode", value=mode)
    units = select_units(ctx.units, layers)
    base_pred = ctx.q_prediction if mode == "restore" else ctx.fp_prediction
    base = _impact(ctx.fp_prediction, base_pred)
    rows = []
    for u in units:
        t0 = time.perf_counter()
        pred = ctx.prediction_with([u], mode, naive=naive)
        imp = base if pred is base_pred else _impact(ctx.fp_prediction, pred)
        iou, iou_mean = _nan(imp["chosen"]["iou"]), _nan(imp["iou_mean"])
        b_iou, b_mean = _nan(base["chosen"]["iou"]), _nan(base["iou_mean"])
        rows.append({"order": u.order, "unit": u.key, "kind": u.kind, "mode": mode, "sites": len(u.sites),
                     "params": len(u.params), "restart": "not run (nothing to change)" if not u.changes_anything
                     else ("full rerun (naive)" if naive else u.start_label),
                     "iou": iou, "iou_mean": iou_mean, "baseline_iou": b_iou, "baseline_iou_mean": b_mean,
                     "delta_iou": iou - b_iou, "delta_iou_mean": iou_mean - b_mean,
                     "chosen_changed": bool(imp["chosen"]["changed"]),
                     "logit_mean_abs_error": _nan(imp["logits"]["mean_abs_error"]),
                     "seconds": time.perf_counter() - t0})
        if on_unit is not None:
            on_unit(u)
    return rows


ATTRIBUTION_SCHEMA = "sam2-layerwise/attribution"
ATTRIBUTION_VERSION = 1


def attribution_report(rows: list[dict], ctx: AttributionContext, mode: str) -> dict:
    """`attribution.json` of a compare run."""
    from sam2_layerwise.analysis.generate import clean

    return clean({
        "schema": ATTRIBUTION_SCHEMA, "schema_version": ATTRIBUTION_VERSION, "mode": mode,
        "definition": ("restore: IoU(Q with the unit in full precision, FP) - IoU(Q, FP); isolate: IoU(FP with "
                       "only the unit quantized, FP) - 1; IoU of the chosen (highest predicted IoU) masks"),
        "float_parameters_differ": len(ctx.fp_values),
        "units": rows,
    })
