"""Apply a quantization config to a built SAM 2, without editing SAM 2's code.

- Layers (`nn.Linear`, `nn.Conv2d`, `nn.ConvTranspose2d`): a forward pre-hook fake-quantizes the input and swaps
  the weight for its fake-quantized copy for the duration of the call; a forward hook (always called) puts the
  float weight back. Outside a forward pass `model.state_dict()` is the float model.
- Attention modules (`MultiScaleAttention`, `Attention`, `RoPEAttention`): their routing state in
  `capture.dispatch` gets a quantized kernel. It fake-quantizes q/k/v (`[G, heads, N, head_dim]`) and, when the
  probabilities are quantized, computes probs_transform(softmax(q kᵀ·scale)) @ v itself, tile by tile
  (`capture.attention.attention_tile`, the same tiles capture recomputes), and reports what it used in its
  `KernelView`, so a capture records the quantized q/k and probabilities, not a float recomputation.

The hooks are persistent: the real `SAM2ImagePredictor` runs the quantized model until `QuantizedModel.remove()`.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from dataclasses import dataclass, replace

import torch
from torch import nn

from sam2_layerwise.capture import dispatch
from sam2_layerwise.capture.attention import attention_tile, row_tiles
from sam2_layerwise.errors import ModelError
from sam2_layerwise.quant.config import ATTENTION_ROLES, FLAG, LAYER_ROLES, ROLE_BASE, QuantConfig, check_spec
from sam2_layerwise.quant.quantizers import (QUANTIZER_KINDS, FakeQuantizer, QuantSpec, QuantStats,
                                             quantization_error, quantized_with_error)

# Layer class -> (default weight channel axis, input channel axis).
LAYER_TYPES = {"Linear": (0, -1), "Conv2d": (0, 1), "ConvTranspose2d": (1, 1)}
ATTENTION_TYPES = ("MultiScaleAttention", "RoPEAttention", "Attention")
HEAD_AXIS = 1  # q/k/v are [G, heads, N, head_dim]
_ATTR = "_layerwise_quantized"  # set on a model while a QuantizedModel is installed on it


def installed_on(model: nn.Module):
    """The QuantizedModel installed on `model`, or None."""
    return getattr(model, _ATTR, None)


def site_id(module: str, role: str) -> str:
    """`image_encoder.trunk.blocks.0.attn.qkv` + `weight` -> `image_encoder.trunk.blocks.0.attn.qkv:weight`."""
    return f"{module}:{role}"


@dataclass(frozen=True)
class Site:
    """One quantizer position: a layer's weight or input, an attention kernel's q, k, v or probs.

    axis: channel axis of the tensor it applies to (None per tensor); channels: how many scales per channel.
    origin: which part of the config set it last (`defaults.weight`, `rules[3]`).
    """

    qid: str
    module: str
    role: str
    spec: QuantSpec
    axis: int | None
    channels: int | None
    origin: str

    @property
    def kind(self):
        return QUANTIZER_KINDS[self.spec.kind]

    @property
    def needs_params(self) -> bool:
        return self.kind.needs_params

    @property
    def params_from_data(self) -> bool:
        """Activation scales come from calibration data (or the checkpoint); weight scales from the weights."""
        return self.needs_params and self.role != "weight"


def quantizable_modules(model: nn.Module) -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (class name, roles) of every layer and attention module, in module order."""
    out = {}
    for name, m in model.named_modules():
        cls = type(m).__name__
        if cls in LAYER_TYPES and isinstance(getattr(m, "weight", None), torch.Tensor):
            out[name] = (cls, LAYER_ROLES)
        elif cls in ATTENTION_TYPES:
            out[name] = (cls, ATTENTION_ROLES)
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def rule_matches(patterns, name: str) -> bool:
    """A rule reaches a module when a glob matches its name or an ancestor's (`sam_mask_decoder` reaches all
    of the decoder)."""
    return any(fnmatch.fnmatchcase(a, p) for a in _ancestors(name) for p in patterns)


def plan(model: nn.Module, qcfg: QuantConfig) -> tuple[dict[str, Site], list[str]]:
    """Resolve defaults and rules to the quantizer of every site: (enabled sites by id, ids left in float)."""
    modules = dict(model.named_modules())
    targets = quantizable_modules(model)
    current: dict[tuple[str, str], tuple[QuantSpec | None, str]] = {}
    for name, (_, roles) in targets.items():
        for role in roles:
            spec = qcfg.defaults.get(role)
            kind = "attention" if role in ATTENTION_ROLES else ("weight" if role == "weight" else "activation")
            current[(name, role)] = (spec, f"defaults.{kind}" + (f".{role}" if kind == "attention" else ""))
    for rule in qcfg.rules:
        reached = 0
        for name, (_, roles) in targets.items():
            if not rule_matches(rule.patterns, name):
                continue
            touched = False
            for role in roles:
                if rule.to_float:
                    current[(name, role)] = (None, rule.label)
                    touched = True
                if role in rule.roles:
                    setting = rule.roles[role]
                    if setting is False:
                        current[(name, role)] = (None, rule.label)
                    else:
                        base = current[(name, role)][0] or qcfg.defaults.get(role) or ROLE_BASE[role]
                        merged = replace(base, **setting)
                        check_spec(merged, rule.label, qcfg.source, role)
                        current[(name, role)] = (merged, rule.label)
                    touched = True
            reached += touched
        if not reached:
            names = list(targets)
            close = difflib.get_close_matches(rule.patterns[0], names, n=3, cutoff=0.5)
            hint = f"; close names: {', '.join(close)}" if close else f"; module names look like {names[1] if len(names) > 1 else names[0]}"
            what = "module" if not rule.roles or rule.to_float else "module with the quantizers it sets"
            raise ModelError(f"{rule.label}.match {list(rule.patterns) if len(rule.patterns) > 1 else rule.patterns[0]!r} "
                             f"matches no {what}{hint}", flag=FLAG, value=qcfg.source)

    sites: dict[str, Site] = {}
    floats: list[str] = []
    for (name, role), (spec, origin) in current.items():
        qid = site_id(name, role)
        if spec is None or not spec.enabled:
            floats.append(qid)
            continue
        module = modules[name]
        cls = targets[name][0]
        axis, channels = None, None
        if role == "probs":
            if spec.kind == "uniform":
                spec = replace(spec, kind="probs_uniform", symmetric=False)
        elif spec.granularity == "per_channel":
            if role == "weight":
                w = module.weight
                axis = spec.axis if spec.axis is not None else LAYER_TYPES[cls][0]
                if not -w.dim() <= axis < w.dim():
                    raise ModelError(f"{origin}: weight axis {axis} is out of range for {name} (weight "
                                     f"{list(w.shape)})", flag=FLAG, value=qcfg.source)
                axis = axis % w.dim()
                channels = w.shape[axis]
            elif role == "input":
                axis = LAYER_TYPES[cls][1]
                channels = module.in_features if cls == "Linear" else module.in_channels
            else:
                axis, channels = HEAD_AXIS, int(module.num_heads)
        sites[qid] = Site(qid=qid, module=name, role=role, spec=spec, axis=axis, channels=channels, origin=origin)
    return sites, floats


def weight_key(w: torch.Tensor, fq: FakeQuantizer) -> tuple:
    """What a weight's quantization error depends on: the weight's and the scale's storage and versions, the bits."""
    return (w.data_ptr(), w._version, w.device, w.dtype, fq.scale.data_ptr(), fq.scale._version, fq.bits)


class _LayerQuant:
    """Hooks of one layer: input fake-quantized, weight swapped for its fake-quantized copy during forward."""

    def __init__(self, module: nn.Module, weight_q: FakeQuantizer | None, input_q: FakeQuantizer | None):
        self.module, self.weight_q, self.input_q = module, weight_q, input_q
        self.float_weight = module.weight
        self.q_weight = None
        self.weight_error = None  # (weight_key, error dict) of the float weight the fake-quantized copy came from
        self.refresh()
        self.handles = [module.register_forward_pre_hook(self.pre),
                        module.register_forward_hook(self.post, always_call=True)]

    def refresh(self) -> None:
        """Recompute the fake-quantized weight (after the float weight changed or moved): the quantizers'
        scales follow the float weight's device (they stay fp32); the fake-quantized copy has its dtype."""
        current = self.module._parameters.get("weight")
        if current is not None and current is not self.q_weight:
            self.float_weight = current  # `model.to()` may have replaced the parameter object
        device = self.float_weight.device
        for fq in (self.weight_q, self.input_q):
            if fq is not None:
                fq.to(device)
        if self.weight_q is not None:
            with torch.no_grad():
                w = self.float_weight.detach()
                q, stats = quantized_with_error(self.weight_q, w)
                self.q_weight = nn.Parameter(q, requires_grad=False)
                # the weight's quantization error, from the same read (what the summary reports per weight)
                self.weight_error = (weight_key(w, self.weight_q), stats.to_dict()) if stats is not None else None

    def pre(self, module, args):
        if self.q_weight is not None:
            w = module._parameters["weight"]
            if w is not self.q_weight and (w is not self.float_weight or self.q_weight.device != w.device
                                           or self.q_weight.dtype != w.dtype):
                self.refresh()  # the model was moved (`.to("cuda")`, `.half()`) after install
            module._parameters["weight"] = self.q_weight
        if self.input_q is not None and args and isinstance(args[0], torch.Tensor):
            return (self.input_q(args[0]), *args[1:])
        return None

    def post(self, module, args, output):
        if self.q_weight is not None:
            module._parameters["weight"] = self.float_weight

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.module._parameters["weight"] = self.float_weight

    def attach(self) -> None:
        """Hooks back after `remove()`, with the fake-quantized weight computed at install (nothing recomputed)."""
        if not self.handles:
            self.handles = [self.module.register_forward_pre_hook(self.pre),
                            self.module.register_forward_hook(self.post, always_call=True)]


class QuantKernel:
    """The attention kernel of one quantized module (see the module docstring). `tiled` makes it compute the
    output itself even without quantized probabilities: needed when the output projection's input is
    quantized, so the capture's recomputed rows are the ones the projection really quantized."""

    def __init__(self, q: FakeQuantizer | None, k: FakeQuantizer | None, v: FakeQuantizer | None,
                 probs: FakeQuantizer | None, tiled: bool):
        self.q, self.k, self.v, self.probs = q, k, v, probs
        self.tiled = tiled or probs is not None

    @property
    def tile_statistics(self) -> bool:
        """Whether `stats_topk` can be asked for: per-query statistics from the tiles this kernel computes."""
        return self.tiled

    @property
    def keeps_rows(self) -> bool:
        """Whether `keep_rows` can be asked for: the probabilities and outputs of chosen query rows, taken from the
        tiles this kernel computes (what `capture.attention.attention_rows` would compute again)."""
        return self.tiled

    def __call__(self, q, k, v, scale, stats_topk: int | None = None, keep_rows: list | None = None):
        s = scale if scale is not None else q.shape[-1] ** -0.5
        q = self.q(q) if self.q is not None else q  # [G, h, Nq, d]
        k = self.k(k) if self.k is not None else k  # [G, h, Nk, d]
        v = self.v(v) if self.v is not None else v  # [G, h, Nk, d_v]
        if not self.tiled:
            return dispatch.ORIGINAL_SDPA(q, k, v, scale=scale), dispatch.KernelView(q, k, v, s)
        G, h, nq, _ = q.shape
        out = q.new_empty((G, h, nq, v.shape[-1]))  # [G, h, Nq, d_v]
        stats = None
        kept = {}  # pick -> (probs [h, Nk], out [h, d_v]) from its tile
        for tile in row_tiles(G, h, nq, k.shape[-2]):
            g0, g1, r0, r1 = tile
            if stats_topk is None:
                p, o = attention_tile(q, k, v, s, self.probs, tile)  # probs [g, h, r, Nk] never leave the tile
            else:
                p, o, found = attention_tile(q, k, v, s, self.probs, tile, stats_topk)
                if stats is None:
                    stats = {name: torch.empty((G, h, nq), dtype=torch.float32, device=q.device) for name in found}
                for name, values in found.items():
                    stats[name][g0:g1, :, r0:r1] = values
            for g, i in keep_rows or ():
                if g0 <= g < g1 and r0 <= i < r1:
                    kept[g, i] = (p[g - g0, :, i - r0].clone(), o[g - g0, :, i - r0].clone())
            out[g0:g1, :, r0:r1] = o.to(out.dtype)
        rows = None
        if keep_rows and len(kept) == len(set(keep_rows)):
            rows = (torch.stack([kept[g, i][0] for g, i in keep_rows]), torch.stack([kept[g, i][1] for g, i in keep_rows]))
        return out, dispatch.KernelView(q, k, v, s, self.probs.quiet if self.probs is not None else None, tiled=True,
                                        stats=stats, rows=rows, rows_for=list(keep_rows) if rows is not None else None)


def _output_projection(module: nn.Module) -> str:
    return "proj" if type(module).__name__ == "MultiScaleAttention" else "out_proj"


class QuantizedModel:
    """A SAM 2 model with fake quantizers installed. `quantizers` maps site ids to `FakeQuantizer`s.

    Build it with `quantize_model` (from parameters) or `calibrate.calibrate_model`; `remove()` gives the float
    model back. `params()` is what a checkpoint stores; `report()` what the run summary shows.
    """

    def __init__(self, model: nn.Module, config: QuantConfig, sites: dict[str, Site], floats: list[str],
                 quantizers: dict[str, FakeQuantizer]):
        self.model, self.config, self.sites, self.floats, self.quantizers = model, config, sites, floats, quantizers
        self._modules = dict(model.named_modules())
        self._layers: dict[str, _LayerQuant] = {}
        self._kernels: dict[str, nn.Module] = {}
        self._weight_error: dict[str, tuple] = {}  # qid -> (weight/scale identity, error dict)
        self.installed = False

    def install(self) -> "QuantizedModel":
        if getattr(self.model, _ATTR, None) is not None:
            raise ModelError("this model already has quantizers installed; call remove() on them first")
        setattr(self.model, _ATTR, self)
        try:
            self._install()
        except BaseException:
            self.remove()  # nothing half-installed stays behind
            raise
        self.installed = True
        return self

    def _install(self) -> None:
        modules = dict(self.model.named_modules())
        targets = quantizable_modules(self.model)
        for name, (cls, roles) in targets.items():
            qs = {r: self.quantizers.get(site_id(name, r)) for r in roles}
            if not any(qs.values()):
                continue
            module = modules[name]
            if cls in LAYER_TYPES:
                self._layers[name] = _LayerQuant(module, qs["weight"], qs["input"])
            else:
                proj = f"{name}.{_output_projection(module)}"
                tiled = site_id(proj, "input") in self.quantizers
                state = dispatch.routing(module, name)
                self._kernels[name] = module
                state.kernel = QuantKernel(qs["q"], qs["k"], qs["v"], qs["probs"], tiled)
        # An output projection with a quantized input needs its attention module's kernel to be tiled too.
        for name, (cls, _) in targets.items():
            if cls in ATTENTION_TYPES and name not in self._kernels:
                proj = f"{name}.{_output_projection(modules[name])}"
                if site_id(proj, "input") in self.quantizers:
                    state = dispatch.routing(modules[name], name)
                    self._kernels[name] = modules[name]
                    state.kernel = QuantKernel(None, None, None, None, tiled=True)

    def remove(self) -> None:
        """Take every hook and kernel out: the model is the float model again."""
        for lq in self._layers.values():
            lq.remove()
        for name, module in self._kernels.items():
            state = dispatch.routing(module, name)
            state.kernel = None
            dispatch.release(module)
        self._layers.clear()
        self._kernels.clear()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self.installed = False

    @contextlib.contextmanager
    def suspended(self, modules=None):
        """Run some modules in float for the duration of the block: their layer hooks and quantized kernels are
        taken out (all of them when `modules` is None; else a container of module names or a predicate on a
        name), the other modules stay quantized. Fake-quantized weights are kept, so switching back costs
        nothing. Inside, those modules compute exactly what the float model computes (torch's own SDPA, the
        float weight objects)."""
        if modules is None:
            pick = lambda name: True  # noqa: E731
        elif callable(modules):
            pick = modules
        else:
            names = set(modules)
            pick = names.__contains__
        layers = [lq for name, lq in self._layers.items() if pick(name) and lq.handles]
        kernels = [dispatch.routing(m, name) for name, m in self._kernels.items() if pick(name)]
        saved = [(state, state.kernel) for state in kernels]
        for lq in layers:
            lq.remove()
        for state in kernels:
            state.kernel = None
        try:
            yield self
        finally:
            for state, kernel in saved:
                state.kernel = kernel
            for lq in layers:
                lq.attach()

    def refresh_weights(self) -> None:
        """Recompute the fake-quantized weights from the float ones (after they changed, e.g. in training) and
        move every quantizer's scales to the model's device. Moving the model (`.to("cuda")`, `.half()`) after
        install needs no call: a layer refreshes itself when its weight's device or dtype changed, and the
        quantizers follow their input's device."""
        for lq in self._layers.values():
            lq.refresh()
        device = next(self.model.parameters()).device
        for fq in self.quantizers.values():
            fq.to(device)

    def float_state_dict(self) -> dict:
        """`model.state_dict()` with every quantized layer's float weight (never a fake-quantized copy, even
        if an interrupted forward left one in place)."""
        state = dict(self.model.state_dict())
        for name, lq in self._layers.items():
            state[f"{name}.weight" if name else "weight"] = lq.float_weight
        return state

    def params(self) -> dict:
        """site id -> checkpoint entry (module, role, kind, bits, scale, zero point, ...)."""
        return {qid: {"module": s.module, "role": s.role, **self.quantizers[qid].params()} for qid, s in self.sites.items()}

    @contextlib.contextmanager
    def monitoring(self):
        """Accumulate per-quantizer statistics (clip rate, error) over what runs inside the block."""
        for fq in self.quantizers.values():
            fq.stats = QuantStats()
            fq.monitor = True
        try:
            yield self
        finally:
            for fq in self.quantizers.values():
                fq.monitor = False

    def site_report(self, qid: str) -> dict:
        site, fq = self.sites[qid], self.quantizers[qid]
        entry = {"id": qid, "module": site.module, "role": site.role, "origin": site.origin, **fq.describe()}
        if site.role == "weight":
            lq = self._layers.get(site.module)
            w = (lq.float_weight if lq is not None else self._modules[site.module].weight).detach()
            key = weight_key(w, fq)
            cached = self._weight_error.get(qid)
            if (cached is None or cached[0] != key) and lq is not None and lq.weight_q is fq and lq.weight_error:
                cached = self._weight_error[qid] = lq.weight_error  # taken with the fake-quantized copy
            if cached is None or cached[0] != key:  # computed once per weight and scale, not per report
                cached = self._weight_error[qid] = (key, quantization_error(fq, w).to_dict())
            entry["error"] = {**cached[1], "on": "the weights"}
        else:
            entry["error"] = {**fq.stats.to_dict(), "on": "this input" if fq.stats.calls else "nothing (did not run)"}
        return entry

    def bits_histogram(self) -> dict[str, int]:
        bits: dict[str, int] = {}
        for qid in self.sites:
            b = str(self.quantizers[qid].bits)
            bits[b] = bits.get(b, 0) + 1
        return bits

    def site_reports(self) -> dict[str, dict]:
        """`site_report` of every site, by id: taken once for a summary's `report` and `module_report`s."""
        return {qid: self.site_report(qid) for qid in self.sites}

    def report(self, reports: dict[str, dict] | None = None) -> dict:
        """The run summary's `quantization` section: every quantizer, and which sites stayed float. `reports`:
        `site_reports()` already taken."""
        bits = self.bits_histogram()
        reports = reports if reports is not None else self.site_reports()
        return {
            "config": self.config.source,
            "base_config": self.config.base_config,
            "quantizers": [reports[qid] for qid in self.sites],
            "float_sites": len(self.floats),
            "quantized_sites": len(self.sites),
            "bits_histogram": bits,
            "conventions": "round half to even of x / scale; codes clamped to [qmin, qmax]; symmetric narrow range; "
                           "log2: code 2^b - 1 is zero (docs/quantization.md)",
        }

    def module_report(self, module: str, reports: dict[str, dict] | None = None) -> dict | None:
        """Quantizers of one module and of the layers inside it, by role: what an `AttentionRecord.quant` holds.
        `reports`: `site_reports()` already taken (else each site's is taken now)."""
        site = reports.__getitem__ if reports is not None else self.site_report
        prefix = module + "."
        kernel = {s.role: site(q) for q, s in self.sites.items() if s.module == module}
        layers: dict[str, dict] = {}
        for q, s in self.sites.items():
            if s.module.startswith(prefix):
                layers.setdefault(s.module[len(prefix):], {})[s.role] = site(q)
        floats = [f for f in self.floats if f.startswith(prefix) or f.rsplit(":", 1)[0] == module]
        if not kernel and not layers:
            return {"float": True, "float_sites": floats}
        return {"float": False, "kernel": kernel, "layers": layers, "float_sites": floats}


def build_quantizers(model: nn.Module, sites: dict[str, Site], params: dict[str, dict]) -> dict[str, FakeQuantizer]:
    """Make the quantizer of every site from its parameters (scale, zero point, bits); weight scales not in
    `params` are calibrated from the weights."""
    from sam2_layerwise.quant.calibrate import calibrate_weight

    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    out = {}
    for qid, site in sites.items():
        p = params.get(qid, {})
        spec = site.spec
        if spec.bits == "checkpoint":
            spec = spec.with_bits(int(p["bits"]))
        fq = FakeQuantizer(qid=qid, spec=spec, axis=site.axis)
        if site.needs_params:
            if "scale" in p:
                fq.scale = torch.as_tensor(p["scale"], dtype=torch.float32).reshape(-1 if site.axis is not None else ())
                zp = p.get("zero_point")
                fq.zero_point = (torch.as_tensor(zp, dtype=torch.float32).reshape(fq.scale.shape) if zp is not None
                                 else torch.zeros_like(fq.scale))
            elif site.role == "weight":
                fq.scale, fq.zero_point = calibrate_weight(modules[site.module].weight, spec, fq.bits, site.axis)
            else:
                raise KeyError(qid)
        out[qid] = fq.to(device)
    return out


def quantize_model(model: nn.Module, qcfg: QuantConfig, params: dict[str, dict] | None = None) -> QuantizedModel:
    """Install the config's quantizers on `model` (already on its device) with the given parameters.

    `params`: site id -> {scale, zero_point, bits}, e.g. from a checkpoint (see quant.checkpoint). Every
    activation quantizer and every LSQ quantizer needs its parameters; missing ones raise naming them.
    """
    from sam2_layerwise.quant.checkpoint import check_params

    sites, floats = plan(model, qcfg)
    params = params or {}
    check_params(sites, params, qcfg, source="parameters", flag=FLAG)
    qm = QuantizedModel(model, qcfg, sites, floats, build_quantizers(model, sites, params))
    return qm.install()
