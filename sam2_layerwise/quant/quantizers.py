"""Fake quantizers: quantize then dequantize, in fp32, on whatever device the tensor lives on.

Conventions (every kind):
- rounding is round-half-to-even (`torch.round`) of `x / scale` (a division, not a multiplication by 1/scale;
  uniform probabilities, whose scale is 1 / (2^b - 1), round `x * (2^b - 1)`);
- the integer code is clamped to [qmin, qmax] after the zero point is added; the result is (code - z) * scale;
- uniform symmetric: z = 0 and codes in [-(2^(b-1) - 1), 2^(b-1) - 1] (narrow range: the grid is symmetric
  around an exact 0; -2^(b-1) is never used);
- uniform affine: codes in [0, 2^b - 1]; the calibrated range is widened to contain 0 and
  z = round(-lo / scale), so 0 is exact;
- log2 (attention probabilities, x in [0, 1]): code c = clamp(round(-log2(x / scale)), 0, 2^b - 1); codes
  0 .. 2^b - 2 dequantize to scale * 2^-c, the last code (and x <= 0) to exactly 0, so tiny probabilities
  vanish instead of being lifted to the smallest power of two;
- per-channel: one scale (and zero point) per index along `axis`; per-tensor: one of each;
- computation is fp32 whatever the input dtype (bf16 under autocast); the result has the input's dtype. The
  values are exactly on the grid in fp32 only: for a bf16 (fp16) input, `(code - z) * scale` is rounded again
  to bf16 (fp16) by that cast, so most grid points (any non-power-of-two scale) come out as their bf16
  roundings, off the grid by up to 2^-8 relative (fp16: 2^-11).

Kinds are a plain dict, `QUANTIZER_KINDS`: adding one is adding an entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

GRANULARITIES = ("per_tensor", "per_channel")
CALIBRATIONS = ("minmax", "percentile", "mse", "lsq")
MIN_SCALE = 1e-12  # a channel that is all zeros still gets a usable (tiny) step


@dataclass(frozen=True)
class QuantSpec:
    """What one quantizer does. `bits` may be the string "checkpoint": the bit width is read from the checkpoint.

    kind: uniform | lsq | log2. symmetric: uniform/lsq only. granularity/axis: per_tensor, or per_channel
    with one scale per index along `axis` (None = the role's default axis). calibration: how `quantize`
    sets the scale (minmax | percentile | mse | lsq init); lsq scales are otherwise read from the checkpoint.
    """

    kind: str = "uniform"
    bits: int | str = 8
    symmetric: bool = True
    granularity: str = "per_tensor"
    axis: int | None = None
    calibration: str = "minmax"
    percentile: float = 99.99
    enabled: bool = True

    def with_bits(self, bits: int) -> "QuantSpec":
        return replace(self, bits=int(bits))

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer codes: narrow signed range when symmetric, [0, 2^b - 1] when affine."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def _broadcast(p: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """A per-channel parameter [C] shaped to broadcast along `axis` of x; scalars pass through."""
    if axis is None or p.dim() == 0:
        return p
    shape = [1] * x.dim()
    shape[axis] = p.numel()
    return p.reshape(shape)


def uniform_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Unclamped codes round(x / scale) + z (fp32) and the clamped ones."""
    s = _broadcast(scale, x, axis)
    z = _broadcast(zero_point, x, axis)
    raw = torch.round(x.float() / s) + z
    return raw, raw.clamp(qmin, qmax)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  axis: int | None = None) -> torch.Tensor:
    """Uniform quantize-dequantize: (clamp(round(x / s) + z, qmin, qmax) - z) * s, in x's dtype."""
    _, codes = uniform_codes(x, scale, zero_point, qmin, qmax, axis)
    return ((codes - _broadcast(zero_point, x, axis)) * _broadcast(scale, x, axis)).to(x.dtype)


def log2_quantize(x: torch.Tensor, bits: int, scale: float = 1.0) -> torch.Tensor:
    """Power-of-two quantization of non-negative values (attention probabilities): see the module docstring."""
    xf = x.float()
    top = 2 ** bits - 1
    with torch.no_grad():
        code = torch.round(-torch.log2(xf / scale)).clamp(0, top)  # log2(0) = -inf: the zero code
    out = torch.where((code >= top) | (xf <= 0), torch.zeros_like(xf), scale * torch.exp2(-code))
    return out.to(x.dtype)


def scale_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (fp32 tensors of lo's shape) covering [lo, hi]. Symmetric: s = max|.| / qmax, z = 0.
    Affine: the range is widened to contain 0, s = (hi - lo) / (2^b - 1), z = round(-lo / s)."""
    qmin, qmax = int_range(bits, symmetric)
    lo, hi = lo.float(), hi.float()
    if symmetric:
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(MIN_SCALE)
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(MIN_SCALE)
    zero = torch.round(-lo / scale).clamp(qmin, qmax)
    return scale, zero


@dataclass
class QuantStats:
    """What a quantizer did to the data it saw (accumulated while monitoring).

    clipped: elements whose code fell outside [qmin, qmax] (log2: non-zero values flushed to 0).
    """

    elements: int = 0
    clipped: int = 0
    sq_err: float = 0.0
    sq_ref: float = 0.0
    max_abs_err: float = 0.0
    calls: int = 0

    def add(self, x: torch.Tensor, xq: torch.Tensor, clipped: torch.Tensor | int) -> None:
        if not x.numel():
            self.calls += 1
            return
        xf, qf = x.detach().float(), xq.detach().float()
        n_clip = clipped.sum() if isinstance(clipped, torch.Tensor) else torch.tensor(clipped)
        sums = self._sums_compiled(xf, qf, None, 0, 0)
        if sums is None:
            err = qf - xf
            sums = torch.stack([t.to(torch.float64) for t in (err.square().sum(), xf.square().sum(), err.abs().max())])
            sums = torch.cat([sums[:1], sums])
        sums[0] = n_clip.to(sums.device, torch.float64)
        # one device-to-host transfer per call, not four (float64: counts stay exact)
        self.add_sums(x.numel(), sums)

    def add_codes(self, x: torch.Tensor, xq: torch.Tensor, raw: torch.Tensor, qmin: int, qmax: int) -> None:
        """`add` for a uniform quantizer, with the clipped codes counted from its unclamped codes `raw`."""
        sums = self._sums_compiled(x.detach().float(), xq.detach().float(), raw.detach(), qmin, qmax)
        if sums is None or not x.numel():
            return self.add(x, xq, (raw < qmin) | (raw > qmax))
        self.add_sums(x.numel(), sums)

    def add_sums(self, elements: int, sums: torch.Tensor) -> None:
        """Add what was summed over `elements` values: (clipped, sum err^2, sum x^2, max |err|), float64."""
        c, se, sr, mx = sums.tolist()
        self.elements += elements
        self.calls += 1
        self.clipped += int(c)
        self.sq_err += se
        self.sq_ref += sr
        self.max_abs_err = max(self.max_abs_err, mx)

    @staticmethod
    def _sums_compiled(xf, qf, raw, qmin, qmax) -> torch.Tensor | None:
        """`add_sums`' sums in one read through the compiled kernel (CPU); None where it does not apply."""
        from sam2_layerwise.capture import native

        if xf.device.type != "cpu" or xf.shape != qf.shape or not xf.numel() or native.kernel() is None:
            return None
        if raw is not None and (raw.dtype != torch.float32 or raw.shape != xf.shape):
            return None
        return native.kernel().quant_error(xf.contiguous(), qf.contiguous(),
                                           raw.contiguous() if raw is not None else torch.empty(0),
                                           float(qmin), float(qmax))

    def to_dict(self) -> dict:
        rel = math.sqrt(self.sq_err / self.sq_ref) if self.sq_ref > 0 else 0.0
        return {
            "elements": self.elements,
            "calls": self.calls,
            "clip_rate": self.clipped / self.elements if self.elements else 0.0,
            "rel_rmse": rel,  # ||Q(x) - x|| / ||x|| over everything seen
            "sqnr_db": (10 * math.log10(self.sq_ref / self.sq_err)) if self.sq_err > 0 and self.sq_ref > 0 else None,
            "max_abs_err": self.max_abs_err,
        }


@dataclass
class FakeQuantizer:
    """One quantizer of one site (a layer's weight or input, an attention kernel's q/k/v or probabilities).

    `scale`/`zero_point` are fp32 tensors: [] per tensor, [C] per channel along `axis` of the tensor it is
    applied to. Call it on a tensor to fake-quantize it; with `monitor` on it also accumulates `stats`.
    """

    qid: str
    spec: QuantSpec
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None
    axis: int | None = None
    monitor: bool = False
    stats: QuantStats = field(default_factory=QuantStats)

    @property
    def bits(self) -> int:
        return int(self.spec.bits)

    @property
    def qrange(self) -> tuple[int, int]:
        return int_range(self.bits, self.spec.symmetric)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return QUANTIZER_KINDS[self.spec.kind].forward(self, x, self.monitor)

    def quiet(self, x: torch.Tensor) -> torch.Tensor:
        """The same fake quantization without touching `stats` (capture's recomputations use this)."""
        return QUANTIZER_KINDS[self.spec.kind].forward(self, x, False)

    def to(self, device) -> "FakeQuantizer":
        if self.scale is not None:
            self.scale = self.scale.to(device)
        if self.zero_point is not None:
            self.zero_point = self.zero_point.to(device)
        return self

    def params(self) -> dict:
        """The checkpoint entry of this quantizer (tensors on CPU; plain types otherwise)."""
        d = {"kind": self.spec.kind, "bits": self.bits, "symmetric": bool(self.spec.symmetric),
             "granularity": self.spec.granularity, "axis": self.axis, "calibration": self.spec.calibration}
        if self.scale is not None:
            qmin, qmax = self.qrange
            d.update(scale=self.scale.detach().float().cpu().clone(),
                     zero_point=self.zero_point.detach().float().cpu().clone(), qmin=qmin, qmax=qmax)
        return d

    def to_payload(self) -> dict:
        """Everything needed to apply this quantizer again without the model (saved with compare's full mode)."""
        return {"qid": self.qid, "spec": self.spec.to_dict(), "axis": self.axis,
                "scale": None if self.scale is None else self.scale.detach().float().cpu().clone(),
                "zero_point": None if self.zero_point is None else self.zero_point.detach().float().cpu().clone()}

    @classmethod
    def from_payload(cls, d) -> "FakeQuantizer":
        """The quantizer `to_payload` saved; `d` is untrusted (read from a run directory): ValueError if malformed."""
        if not isinstance(d, dict) or not isinstance(d.get("spec"), dict):
            raise ValueError("not a quantizer entry")
        fields = set(QuantSpec.__dataclass_fields__)
        spec_d = d["spec"]
        if not set(spec_d) <= fields or spec_d.get("kind") not in QUANTIZER_KINDS:
            raise ValueError(f"unknown quantizer kind or fields: {sorted(spec_d)[:6]}")
        bits = spec_d.get("bits")
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
            raise ValueError(f"bits {bits!r} out of range")
        axis = d.get("axis")
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise ValueError("axis is not an integer")
        tensors = {}
        for name in ("scale", "zero_point"):
            t = d.get(name)
            if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() > 1 << 20):
                raise ValueError(f"{name} is not a small float tensor")
            tensors[name] = t
        if QUANTIZER_KINDS[spec_d["kind"]].needs_params and tensors["scale"] is None:
            raise ValueError("a uniform quantizer without a scale")
        return cls(qid=str(d.get("qid", "")), spec=QuantSpec(**spec_d), axis=axis, **tensors)

    def describe(self) -> dict:
        """Bits, kind, granularity and scale statistics (for the run summary)."""
        d = {"kind": self.spec.kind, "bits": self.bits, "granularity": self.spec.granularity,
             "symmetric": self.spec.symmetric if self.spec.kind != "log2" else None}
        if self.scale is not None:
            s = self.scale.float()
            d["scale"] = {"min": s.min().item(), "mean": s.mean().item(), "max": s.max().item(), "count": s.numel()}
            zp = self.zero_point.float()
            d["zero_point"] = {"min": zp.min().item(), "max": zp.max().item()}
            d["range"] = list(self.qrange)
        elif self.spec.kind == "log2":
            d["scale"] = {"min": 1.0, "mean": 1.0, "max": 1.0, "count": 1}
            d["range"] = [0, 2 ** self.bits - 1]
        return d


def _fake_quant_compiled(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                         axis: int | None, stats: QuantStats | None) -> torch.Tensor | None:
    """Uniform fake quantization of a float32 CPU tensor in one read through the compiled kernel, bit-identical
    to `fake_quantize`'s torch ops (about 8x faster: they write five temporaries), with `stats` updated from the
    same read. Per tensor on any dense layout, per channel on contiguous tensors. None where it does not apply
    (other dtypes or devices, autograd, a layout with gaps, no compiled kernel): the torch ops run instead."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or scale.dtype != torch.float32
            or zero_point.dtype != torch.float32 or scale.device.type != "cpu" or x.requires_grad or not x.numel()
            or scale.numel() != zero_point.numel() or (scale.numel() > 1 and axis is None)):
        return None
    from sam2_layerwise.capture import native

    module = native.kernel()
    if module is None:
        return None
    found = module.fake_quant(x, scale.reshape(-1).contiguous(), zero_point.reshape(-1).contiguous(),
                              -1 if axis is None else axis % x.dim(), float(qmin), float(qmax), stats is not None)
    if not found:
        return None
    if stats is not None:
        stats.add_sums(x.numel(), found[1])
    return found[0]


def quantization_error(fq: "FakeQuantizer", x: torch.Tensor) -> "QuantStats":
    """What fake-quantizing x with the uniform quantizer `fq` does to it (clipped codes, error), in one read where
    the compiled kernel applies; fq's own `stats` are not touched."""
    stats = QuantStats()
    qmin, qmax = fq.qrange
    if _fake_quant_compiled(x, fq.scale, fq.zero_point, qmin, qmax, fq.axis, stats) is None:
        raw, _ = uniform_codes(x, fq.scale, fq.zero_point, qmin, qmax, fq.axis)
        stats.add_codes(x, fq.quiet(x), raw, qmin, qmax)
    return stats


def quantized_with_error(fq: "FakeQuantizer", x: torch.Tensor):
    """(`fq.quiet(x)`, `quantization_error(fq, x)`) from one read where the compiled kernel applies to a uniform
    quantizer; elsewhere (`fq.quiet(x)`, None): the error is left for whoever asks for it."""
    if fq.spec.kind == "uniform" and fq.scale is not None:
        stats = QuantStats()
        found = _fake_quant_compiled(x, fq.scale, fq.zero_point, *fq.qrange, fq.axis, stats)
        if found is not None:
            return found, stats
    return fq.quiet(x), None


class UniformKind:
    """Uniform affine or symmetric quantization with a calibrated (or checkpointed) scale."""

    needs_params = True
    learned = False

    @staticmethod
    def forward(fq: FakeQuantizer, x: torch.Tensor, monitor: bool = False) -> torch.Tensor:
        if fq.scale is None:
            raise RuntimeError(f"quantizer {fq.qid} has no scale: calibrate it or load it from a checkpoint")
        if fq.scale.device != x.device:
            fq.to(x.device)  # the model was moved after install
        qmin, qmax = fq.qrange
        fast = _fake_quant_compiled(x, fq.scale, fq.zero_point, qmin, qmax, fq.axis,
                                    fq.stats if monitor else None)
        if fast is not None:
            return fast
        raw, codes = uniform_codes(x, fq.scale, fq.zero_point, qmin, qmax, fq.axis)
        out = ((codes - _broadcast(fq.zero_point, x, fq.axis)) * _broadcast(fq.scale, x, fq.axis)).to(x.dtype)
        if monitor:
            fq.stats.add_codes(x, out, raw, qmin, qmax)
        return out


class LsqKind(UniformKind):
    """Learned step size (LSQ; LSQ+ when affine): the same forward as uniform, with the step size learned
    during QAT and read from the checkpoint. `quantize` (no training) only initialises it."""

    learned = True


class Log2Kind:
    """Power-of-two codes for attention probabilities; no parameters (scale 1: probabilities are <= 1)."""

    needs_params = False
    learned = False

    @staticmethod
    def forward(fq: FakeQuantizer, x: torch.Tensor, monitor: bool = False) -> torch.Tensor:
        out = log2_quantize(x, fq.bits)
        if monitor:
            fq.stats.add(x, out, (x > 0) & (out == 0))
        return out


class FixedUnitKind:
    """Uniform unsigned codes over [0, 1] with scale 1 / (2^b - 1): attention probabilities, no calibration."""

    needs_params = False
    learned = False

    @staticmethod
    def forward(fq: FakeQuantizer, x: torch.Tensor, monitor: bool = False) -> torch.Tensor:
        top = 2 ** fq.bits - 1
        out = (torch.round(x.float() * top).clamp(0, top) / top).to(x.dtype)
        if monitor:
            fq.stats.add(x, out, 0)
        return out


# kind name -> behaviour. "probs_uniform" is what a `kind: uniform` spec becomes on attention probabilities.
QUANTIZER_KINDS = {"uniform": UniformKind, "lsq": LsqKind, "log2": Log2Kind, "probs_uniform": FixedUnitKind}
SPEC_KINDS = ("uniform", "lsq", "log2")
