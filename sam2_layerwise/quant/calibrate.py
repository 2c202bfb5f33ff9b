"""Calibration: turn observed tensors into scales and zero points (min-max, percentile, MSE, LSQ init).

Weights are calibrated from the weight tensor itself; activations (layer inputs, attention q/k/v) from what a
float model computes on a few images (`calibrate_model`), so post-training quantization needs no training.
"""

from __future__ import annotations

import numpy as np
import torch

from sam2_layerwise.capture import dispatch
from sam2_layerwise.errors import ModelError
from sam2_layerwise.model.predict import make_predictor
from sam2_layerwise.quant.apply import (ATTENTION_TYPES, QuantizedModel, build_quantizers, installed_on, plan,
                                        quantizable_modules, site_id)
from sam2_layerwise.quant.config import FLAG
from sam2_layerwise.quant.quantizers import QuantSpec, fake_quantize, int_range, scale_from_range

SAMPLE_PER_UPDATE = 1 << 16  # values kept per channel set per observed call (percentile, MSE)
SAMPLE_TOTAL = 1 << 20  # values kept per quantizer over all calls
MSE_GRID = torch.linspace(0.2, 1.0, 41)  # clipping ratios of the observed range tried by MSE (steps of 0.02)
IMAGE_PATH = ("image_encoder", "sam_prompt_encoder", "sam_mask_decoder")  # what SAM2ImagePredictor runs
MSE_WEIGHT_SAMPLE = 1 << 18  # weight values MSE looks at (a fixed, evenly spread subset of large weights)


def _channels_first(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """x -> [C, M] fp32 (C = 1 per tensor)."""
    x = x.detach().float()
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class Observer:
    """Accumulates what one activation quantizer sees; `finalize()` -> (scale, zero_point).

    Exact running min/max and mean |x| per channel; a bounded random sample (seeded) for percentile and MSE.
    """

    def __init__(self, spec: QuantSpec, axis: int | None, seed: int = 0):
        self.spec = spec
        self.axis = axis if spec.granularity == "per_channel" else None
        self.lo = self.hi = None
        self.abs_sum = None
        self.count = 0
        self.sample: list[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def seen(self) -> bool:
        return self.count > 0

    def update(self, x: torch.Tensor) -> None:
        cm = _channels_first(x, self.axis)  # [C, M]
        if cm.shape[1] == 0:
            return
        lo, hi = cm.amin(1), cm.amax(1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)
        s = cm.abs().sum(1)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += cm.shape[1]
        if self.spec.calibration in ("percentile", "mse"):
            keep = max(1, SAMPLE_PER_UPDATE // cm.shape[0])
            if cm.shape[1] > keep:
                idx = torch.randperm(cm.shape[1], generator=self.gen)[:keep].to(cm.device)
                cm = cm[:, idx]
            self.sample.append(cm.cpu())
            total = sum(t.shape[1] for t in self.sample)
            limit = max(1, SAMPLE_TOTAL // cm.shape[0])
            if total > limit:
                allv = torch.cat(self.sample, 1)
                idx = torch.randperm(allv.shape[1], generator=self.gen)[:limit]
                self.sample = [allv[:, idx]]

    def finalize(self, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.lo.cpu(), self.hi.cpu()
        sample = torch.cat(self.sample, 1) if self.sample else None
        scale, zero = range_to_params(self.spec, bits, lo, hi, sample, (self.abs_sum.cpu() / self.count))
        return _squeeze(scale, self.axis), _squeeze(zero, self.axis)


def _squeeze(t: torch.Tensor, axis) -> torch.Tensor:
    return t.reshape(()) if axis is None else t


def range_to_params(spec: QuantSpec, bits: int, lo: torch.Tensor, hi: torch.Tensor, sample: torch.Tensor | None,
                    abs_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel [C] scale and zero point from min/max, a [C, M] sample, and mean |x| (LSQ init)."""
    method = spec.calibration
    if method == "minmax" or (method in ("percentile", "mse") and (sample is None or sample.shape[1] == 0)):
        return scale_from_range(lo, hi, bits, spec.symmetric)
    if method == "lsq":
        # LSQ's initialisation (Esser et al. 2020): s = 2 mean|x| / sqrt(qmax); affine (LSQ+) starts from min-max.
        if not spec.symmetric:
            return scale_from_range(lo, hi, bits, spec.symmetric)
        _, qmax = int_range(bits, True)
        s = (2 * abs_mean / qmax ** 0.5).clamp_min(1e-12)
        return s, torch.zeros_like(s)
    if method == "percentile":
        p = spec.percentile / 100.0
        if spec.symmetric:
            top = torch.quantile(sample.abs(), p, dim=1)
            return scale_from_range(-top, top, bits, True)
        return scale_from_range(torch.quantile(sample, 1 - p, dim=1), torch.quantile(sample, p, dim=1), bits, False)
    if method == "mse":
        return mse_search(sample, lo, hi, bits, spec.symmetric)
    raise ValueError(f"unknown calibration {method!r}")


def mse_search(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool):
    """Per channel, the clipping ratio a (of the observed range) whose quantizer minimises the mean squared
    error on the sample [C, M]; the range shrinks towards 0 on both sides."""
    qmin, qmax = int_range(bits, symmetric)
    best_err = torch.full((sample.shape[0],), float("inf"))
    best_s, best_z = scale_from_range(lo, hi, bits, symmetric)
    for a in MSE_GRID.tolist():
        s, z = scale_from_range(lo * a, hi * a, bits, symmetric)
        err = (fake_quantize(sample, s, z, qmin, qmax, axis=0) - sample).square().mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def calibrate_weight(w: torch.Tensor, spec: QuantSpec, bits: int, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of a weight tensor: [] per tensor, [C] per channel along `axis`."""
    ax = axis if spec.granularity == "per_channel" else None
    cm = _channels_first(w, ax).cpu()  # [C, M]
    sample = cm
    if spec.calibration == "mse" and cm.numel() > MSE_WEIGHT_SAMPLE:
        step = -(-cm.numel() // MSE_WEIGHT_SAMPLE)
        sample = cm[:, ::step]
    scale, zero = range_to_params(spec, bits, cm.amin(1), cm.amax(1), sample, cm.abs().mean(1))
    return _squeeze(scale, ax), _squeeze(zero, ax)


def calibration_prompts(width: int, height: int) -> list[dict]:
    """The prompts each calibration image is run with, in original-image pixels: a foreground click at the
    centre, then a box over the central half with the first prediction's best logits as mask input (so the
    prompt encoder's mask path is calibrated too)."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    return [{"point_coords": [[cx, cy]], "point_labels": [1]},
            {"box": [width * 0.25, height * 0.25, width * 0.75, height * 0.75], "mask_input": "previous"}]


def calibration_plan(model, qcfg):
    """The config's sites on `model`, checked for what image calibration can do: (sites, float site ids).
    Raises before anything runs when bits come from a checkpoint or activations sit in video-only modules."""
    sites, floats = plan(model, qcfg)
    for qid, site in sites.items():
        if site.spec.bits == "checkpoint":
            raise ModelError(f"{site.origin}: bits: checkpoint cannot be calibrated (no checkpoint gives them); "
                             f"give a number of bits for {qid}", flag=FLAG, value=qcfg.source)
    video = [q for q, s in sites.items() if s.params_from_data and not s.module.startswith(IMAGE_PATH)]
    if video:  # known before running anything
        mods = sorted({sites[q].module.split(".")[0] for q in video})
        raise ModelError(f"{len(video)} activation quantizers are in video-only modules the image predictor never "
                         f"runs, so images cannot calibrate them: {', '.join(video[:3])}"
                         f"{f' (+{len(video) - 3} more)' if len(video) > 3 else ''}; leave them in float with a rule "
                         f"such as {{match: [{', '.join(mods)}], float: true}}", flag=FLAG, value=qcfg.source)
    return sites, floats


def calibrate_model(model, qcfg, images, *, seed: int = 0, on_image=None):
    """Post-training quantization: observe the float model on `images` (HWC uint8 RGB) with the real image
    predictor, turn what every activation quantizer saw into scales (its spec's calibration method), compute
    weight scales from the weights, and install the quantizers. Returns a `QuantizedModel`.

    Raises naming the quantizers that saw no data (modules the image predictor never runs, such as memory
    attention: leave them in float with a rule).
    """
    if installed_on(model) is not None:
        raise ModelError("calibrate the float model: this one already has quantizers installed (remove() them)")
    sites, floats = calibration_plan(model, qcfg)
    observers = {qid: Observer(s.spec, s.axis, seed) for qid, s in sites.items() if s.params_from_data}
    modules = dict(model.named_modules())
    handles, routed = [], []
    predictor, ok = None, False
    try:
        for name, (cls, roles) in quantizable_modules(model).items():
            module = modules[name]
            if cls in ATTENTION_TYPES:
                obs = {r: observers.get(site_id(name, r)) for r in ("q", "k", "v")}
                if any(obs.values()):
                    def observe(view, out, obs=obs):
                        for role, o in obs.items():
                            if o is not None:
                                o.update(getattr(view, role))
                    state = dispatch.routing(module, name)
                    state.observers.append(observe)
                    routed.append((module, state, observe))
            else:
                o = observers.get(site_id(name, "input"))
                if o is not None:
                    handles.append(module.register_forward_pre_hook(lambda m, args, o=o: o.update(args[0])))
        predictor = make_predictor(model)
        with torch.inference_mode():
            for n, image in enumerate(images):
                predictor.set_image(image)
                h, w = image.shape[:2]
                previous = None
                for prompt in calibration_prompts(w, h):
                    kwargs = {k: np.asarray(v, dtype=np.float32 if k != "point_labels" else np.int32)
                              for k, v in prompt.items() if k != "mask_input"}
                    if prompt.get("mask_input") == "previous" and previous is not None:
                        kwargs["mask_input"] = previous
                    masks, ious, low = predictor.predict(multimask_output=True, **kwargs)
                    previous = low[int(np.argmax(ious))][None]
                if on_image is not None:
                    on_image(n)
        ok = True
    finally:
        for h in handles:
            h.remove()
        for module, state, observe in routed:
            state.observers.remove(observe)
            dispatch.release(module)
        if not ok:
            dispatch.reset()  # an exception may have unwound a forward pass with torch's SDPA still swapped
        if predictor is not None:
            predictor.reset_predictor()

    unseen = [qid for qid, o in observers.items() if not o.seen]
    if unseen:
        mods = sorted({sites[q].module.split(".")[0] for q in unseen})
        raise ModelError(f"{len(unseen)} quantizers saw no calibration data: {', '.join(unseen[:3])}"
                         f"{f' (+{len(unseen) - 3} more)' if len(unseen) > 3 else ''}; image calibration runs only "
                         f"what the image predictor runs: leave the rest in float with a rule such as "
                         f"{{match: [{', '.join(mods)}], float: true}}", flag=FLAG, value=qcfg.source)
    params = {}
    for qid, site in sites.items():
        if qid in observers:
            scale, zero = observers[qid].finalize(int(site.spec.bits))
            params[qid] = {"scale": scale, "zero_point": zero, "bits": int(site.spec.bits)}
        elif site.needs_params:  # weights: from the weight tensor itself
            scale, zero = calibrate_weight(modules[site.module].weight, site.spec, int(site.spec.bits), site.axis)
            params[qid] = {"scale": scale, "zero_point": zero, "bits": int(site.spec.bits)}
    qm = QuantizedModel(model, qcfg, sites, floats, build_quantizers(model, sites, params))
    return qm.install()
