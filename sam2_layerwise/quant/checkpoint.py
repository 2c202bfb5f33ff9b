"""The quantized checkpoint: a SAM 2 checkpoint plus this project's `quantization` entry.

    {
      "model": {...},                      # the FLOAT state dict, SAM 2's own keys (read_state_dict works)
      "format": "sam2-layerwise/quant-checkpoint",
      "format_version": 1,
      "quantization": {
        "config": {...},                   # the adaptive-QAT config it was made with (parsed YAML)
        "quantizers": {                    # one entry per quantized site, keyed "<module>:<role>"
          "image_encoder.trunk.blocks.0.attn.qkv:weight": {
            "module": "image_encoder.trunk.blocks.0.attn.qkv", "role": "weight",
            "kind": "uniform", "bits": 8, "symmetric": true, "granularity": "per_channel", "axis": 0,
            "calibration": "minmax", "scale": Tensor[C], "zero_point": Tensor[C], "qmin": -127, "qmax": 127},
          "image_encoder.trunk.blocks.0.attn:probs": {"module": ..., "role": "probs", "kind": "log2", "bits": 4, ...},
          ...},
        "float_sites": ["sam_mask_decoder.iou_prediction_head.layers.0:input", ...],
        "calibration": {...}               # what `quantize` calibrated on (absent for QAT checkpoints)
      }
    }

Only tensors, dicts, lists, strings, numbers, booleans and None: it loads with `torch.load(weights_only=True)`.
Checkpoints from QAT trainers that keep learned step sizes inside the state dict are read through the config's
`checkpoint: {location: model, key: ...}` layout instead.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sam2_layerwise.errors import ModelError, few
from sam2_layerwise.model.loading import read_checkpoint
from sam2_layerwise.quant.config import BITS_RANGE, FLAG, QuantConfig

FORMAT = "sam2-layerwise/quant-checkpoint"
VERSION = 1
ENTRY = "quantization"


def _whole(value) -> int | None:
    """An integral number (Python or 1-element tensor) as int; None when it is not one (3.7, NaN, a list)."""
    try:
        t = torch.as_tensor(value)
        if t.numel() != 1 or t.dtype == torch.bool:
            return None
        v = t.reshape(()).double().item()
    except (TypeError, ValueError, RuntimeError):
        return None
    return int(v) if math.isfinite(v) and v == int(v) else None


def _check_values(qid: str, site, p: dict, bits: int | None, wrong: list) -> None:
    """Scale > 0 and finite; integral zero points within [qmin, qmax] (0 when symmetric); axis/granularity as
    the config says."""
    from sam2_layerwise.quant.quantizers import int_range

    if "granularity" in p and p["granularity"] != site.spec.granularity:
        wrong.append(f"{qid} is {p['granularity']} in the checkpoint, {site.spec.granularity} in the config")
    if "axis" in p and site.needs_params and p["axis"] != site.axis:
        wrong.append(f"{qid} has scales along axis {p['axis']} in the checkpoint, the config's along {site.axis}")
    if "scale" in p and site.needs_params:
        try:
            scale = torch.as_tensor(p["scale"]).double()
        except (TypeError, ValueError, RuntimeError):
            wrong.append(f"{qid} scale is not numeric")
            return
        if scale.numel() and not bool((torch.isfinite(scale) & (scale > 0)).all()):
            wrong.append(f"{qid} has a scale that is not finite and > 0 in the checkpoint")
    if p.get("zero_point") is not None and site.needs_params:
        try:
            zp = torch.as_tensor(p["zero_point"]).double()
        except (TypeError, ValueError, RuntimeError):
            wrong.append(f"{qid} zero_point is not numeric")
            return
        if not bool((torch.isfinite(zp) & (zp == zp.round())).all()):
            wrong.append(f"{qid} has a zero point that is not a whole number in the checkpoint")
        elif site.spec.symmetric and bool((zp != 0).any()):
            wrong.append(f"{qid} is symmetric but has a non-zero zero point in the checkpoint")
        elif bits is not None and zp.numel():
            qmin, qmax = int_range(bits, site.spec.symmetric)
            if not bool(((zp >= qmin) & (zp <= qmax)).all()):
                wrong.append(f"{qid} has a zero point outside [{qmin}, {qmax}] in the checkpoint")


def check_params(sites: dict, params: dict[str, dict], qcfg: QuantConfig, *, source: str, flag: str = "--checkpoint") -> None:
    """Raise naming what is missing, left over or inconsistent between the config's sites and `params`.

    Needed: a scale (and a zero point when affine) for every activation quantizer (calibrated) and every LSQ
    quantizer (learned); bits where the config says `bits: checkpoint`. Weight scales of uniform quantizers may
    be absent (they are computed from the weights). Values are checked too: bits whole and within the kind's
    range, scales finite and > 0, zero points whole and within [qmin, qmax] (0 when symmetric), axis and
    granularity as the config says.
    """
    missing, wrong = [], []
    for qid, site in sites.items():
        p = params.get(qid, {})
        needs = site.params_from_data or (site.needs_params and site.spec.kind == "lsq")
        if needs and "scale" not in p:
            missing.append(f"{qid} scale")
        if site.needs_params and "scale" in p and not site.spec.symmetric and "zero_point" not in p:
            missing.append(f"{qid} zero_point")
        if site.spec.bits == "checkpoint" and "bits" not in p:
            missing.append(f"{qid} bits")
        bits = site.spec.bits if isinstance(site.spec.bits, int) else None
        if "bits" in p:
            got = _whole(p["bits"])
            lo, hi = BITS_RANGE.get(site.spec.kind, (2, 16))
            if got is None:
                wrong.append(f"{qid} has {p['bits']!r} bits in the checkpoint, not a whole number")
            elif isinstance(site.spec.bits, int) and got != site.spec.bits:
                wrong.append(f"{qid} has {got} bits in the checkpoint, {site.spec.bits} in the config")
            elif not lo <= got <= hi:
                wrong.append(f"{qid} has {got} bits in the checkpoint, out of range for {site.spec.kind} ({lo}..{hi})")
            else:
                bits = got
        if "kind" in p and p["kind"] != site.spec.kind:
            wrong.append(f"{qid} is {p['kind']} in the checkpoint, {site.spec.kind} in the config")
        if "symmetric" in p and site.needs_params and bool(p["symmetric"]) != site.spec.symmetric:
            wrong.append(f"{qid} is {'symmetric' if p['symmetric'] else 'affine'} in the checkpoint, "
                         f"{'symmetric' if site.spec.symmetric else 'affine'} in the config")
        if "scale" in p and site.needs_params:
            n = torch.as_tensor(p["scale"]).numel()
            want = site.channels if site.axis is not None else 1
            if n != want:
                wrong.append(f"{qid} has {n} scales in the checkpoint, the config's {site.spec.granularity} needs {want}")
            elif p.get("zero_point") is not None and torch.as_tensor(p["zero_point"]).numel() != n:
                wrong.append(f"{qid} has {torch.as_tensor(p['zero_point']).numel()} zero points and {n} scales")
        _check_values(qid, site, p, bits, wrong)
    leftover = [qid for qid in params if qid not in sites]
    problems = []
    if missing:
        problems.append(f"{len(missing)} learned parameters missing: {few(missing)}")
    if leftover:
        problems.append(f"{len(leftover)} quantizers left over (not quantized by the config): {few(leftover)}")
    if wrong:
        problems.append(f"{len(wrong)} inconsistent: {few(wrong, 2)}")
    if problems:
        hint = ("; make one with `sam2-layerwise quantize` (post-training calibration)" if missing and not wrong else "")
        raise ModelError(f"does not fit {FLAG} {qcfg.source}: " + "; ".join(problems) + hint, flag=flag, value=source)


def native_params(ckpt: dict, path: str, flag: str = "--checkpoint") -> dict[str, dict] | None:
    """The `quantization.quantizers` entry of a checkpoint in this project's format; None when it has none."""
    if ENTRY not in ckpt:
        return None
    if ckpt.get("format") != FORMAT:
        raise ModelError(f"has a '{ENTRY}' entry but its format is {ckpt.get('format')!r}, not '{FORMAT}'",
                         flag=flag, value=path)
    if ckpt.get("format_version") != VERSION:
        raise ModelError(f"format_version {ckpt.get('format_version')!r} is not supported (this tool reads {VERSION})",
                         flag=flag, value=path)
    quantizers = ckpt[ENTRY].get("quantizers") if isinstance(ckpt[ENTRY], dict) else None
    if not isinstance(quantizers, dict) or not all(isinstance(v, dict) for v in quantizers.values()):
        raise ModelError(f"'{ENTRY}.quantizers' is not a mapping of quantizer entries", flag=flag, value=path)
    return quantizers


def state_dict_params(state: dict, sites: dict, qcfg: QuantConfig) -> tuple[dict[str, dict], dict]:
    """Learned parameters kept inside the model state dict (`checkpoint.location: model`): pop the keys the
    config's template names for each site. Returns (params, the remaining state dict)."""
    layout = qcfg.checkpoint
    rest = dict(state)
    params: dict[str, dict] = {}
    for qid, site in sites.items():
        for param in ("scale", "zero_point", "bits"):
            key = layout.state_key(site.module, site.role, param)
            if key in rest:
                value = rest.pop(key)
                if param == "bits":  # kept as stored: check_params rejects a non-integral width
                    t = torch.as_tensor(value)
                    value = t.reshape(()).item() if t.numel() == 1 else t
                params.setdefault(qid, {})[param] = value
    return params, rest


def quant_checkpoint(qm, calibration: dict | None = None) -> dict:
    """The checkpoint dict of a quantized model (float weights + quantizer parameters)."""
    from sam2_layerwise import __version__

    entry = {"config": qm.config.raw, "quantizers": qm.params(), "float_sites": list(qm.floats),
             "tool": {"name": "sam2-layerwise", "version": __version__}}
    if calibration is not None:
        entry["calibration"] = calibration
    state = {k: v.detach().cpu() for k, v in qm.float_state_dict().items()}
    return {"model": state, "format": FORMAT, "format_version": VERSION, ENTRY: entry}


def save_quantized_checkpoint(qm, path: str | Path, calibration: dict | None = None) -> Path:
    """Write the checkpoint atomically."""
    from sam2_layerwise.store.atomic import atomic_torch_save

    return atomic_torch_save(quant_checkpoint(qm, calibration), Path(path), remember_hash=True)


def resolve_base_config(qcfg: QuantConfig) -> str | None:
    """The config's `base_config`: a path relative to the quantization config's folder when it exists there,
    otherwise as written (a name the sam2 package knows, or a path from the working directory)."""
    base = qcfg.base_config
    if base is None or qcfg.source is None:
        return base
    beside = Path(qcfg.source).expanduser().parent / base
    return str(beside) if not Path(base).exists() and beside.is_file() else base


def load_quantized_model(config: str | None, checkpoint: str | None, qcfg: QuantConfig, *, device: str = "auto",
                         seed: int = 0, random_init: bool = False, overrides: dict | None = None, reuse=None):
    """Build SAM 2 from config + checkpoint and install the quantizers the checkpoint's parameters describe.
    `reuse`: as in `build_model` (a float model of the same architecture takes the quantized checkpoint's weights).

    Returns (LoadedModel, QuantizedModel). Raises naming --checkpoint when the checkpoint does not fit the config
    (missing learned scales, left-over quantizers, wrong bits) and --adaptive-qat-config for config mistakes.
    """
    from sam2_layerwise.model.loading import build_model, resolve_checkpoint
    from sam2_layerwise.quant.apply import QuantizedModel, build_quantizers, plan

    config = config or resolve_base_config(qcfg)
    params: dict[str, dict] = {}
    if checkpoint is None or random_init:
        loaded = build_model(config, checkpoint, random_init=random_init, device=device, seed=seed, overrides=overrides)
        sites, floats = plan(loaded.model, qcfg)
        source = None
    else:
        path = resolve_checkpoint(checkpoint)
        ckpt = read_checkpoint(path)
        native = native_params(ckpt, str(checkpoint))
        if native is not None or qcfg.checkpoint.location == "quantization":
            loaded = build_model(config, checkpoint, device=device, seed=seed, overrides=overrides, quantized=True,
                                 checkpoint_data=ckpt, reuse=reuse)
            sites, floats = plan(loaded.model, qcfg)
            params = native or {}
        else:  # learned parameters inside the state dict (a QAT trainer's layout): split them out first
            found: dict = {}

            def split(model, state):
                found["sites"], found["floats"] = plan(model, qcfg)
                found["params"], rest = state_dict_params(state, found["sites"], qcfg)
                return rest

            loaded = build_model(config, checkpoint, device=device, seed=seed, overrides=overrides, adapt_state=split,
                                 quantized=True, checkpoint_data=ckpt, reuse=reuse)
            sites, floats, params = found["sites"], found["floats"], found["params"]
        source = str(checkpoint)
    check_params(sites, params, qcfg, source=source, flag="--checkpoint" if source else "--random-init")
    qm = QuantizedModel(loaded.model, qcfg, sites, floats, build_quantizers(loaded.model, sites, params))
    return loaded, qm.install()
