"""What a capture holds: one record per attention call and per surrounding block call."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from sam2_layerwise.capture import native


def layer_key(module_name: str) -> str:
    """`image_encoder.trunk.blocks.0` -> `image_encoder_trunk_blocks_0` (SPEC.md layer keys)."""
    return module_name.replace(".", "_")


def tensor_stats(t: torch.Tensor, cache: dict | None = None) -> dict:
    """Shape, dtype, mean, std, min and max of a tensor (computed in fp32, one sync).

    With `cache`, a tensor already summarised (same storage, shape and version) is not read again: the
    image encoder hands the same feature maps to the neck, the encoder output and the predictor.
    """
    key = (id(t), tuple(t.shape), t.dtype)
    if cache is not None and key in cache:
        ref, version, stats = cache[key]
        if ref() is t and version == _version(t):  # the very same, unmodified tensor
            return stats
    f = t.detach()
    f = f if f.dtype == torch.float32 else f.float()
    n = f.numel()
    out = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
    if n:
        lo, hi, total, squares = _moments(f)
        mean = total / n
        var = (squares - total * mean) / (n - 1) if n > 1 else 0.0
        std = math.sqrt(max(var, 0.0)) if math.isfinite(var) else float("nan")
        out.update(mean=mean, std=std, min=lo, max=hi)
    else:
        out.update(mean=0.0, std=0.0, min=0.0, max=0.0)
    if cache is not None:
        cache[key] = (weakref.ref(t), _version(t), out)
    return out


def _moments(f: torch.Tensor) -> list[float]:
    """min, max, sum and sum of squares of an fp32 tensor. On CPU one read through the compiled kernel (min/max
    skip NaN there, so a non-finite sum is recomputed the torch way); otherwise one aminmax, one sum and one dot
    product (3x faster than std + mean, which read the tensor three times). The variance from them agrees with a
    two-pass std to ~1e-5 relative, enough for a summary."""
    if f.device.type == "cpu" and native.kernel() is not None:
        if not f.is_contiguous() and _dense(f):
            # a permuted layout (channels-last feature maps, transposed heads) fills one block of memory with no
            # gaps: its moments are those of that block, read in memory order with no copy
            f = f.as_strided((f.numel(),), (1,))
        found = native.kernel().tensor_moments(f.contiguous()).tolist()  # a copy reads less than three passes
        if math.isfinite(found[2]) and math.isfinite(found[3]):
            return found
    lo, hi = torch.aminmax(f)
    flat = f.reshape(-1)
    total, squares = flat.sum(dtype=torch.float32), torch.dot(flat, flat)
    return torch.stack([lo, hi, total, squares]).double().tolist()


def _dense(t: torch.Tensor) -> bool:
    """Whether `t`'s elements fill one gap-free, non-overlapping block of memory in some order of its dimensions."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot change outside inference mode)
        return None


@dataclass
class QuerySpec:
    """One selected query of an attention call.

    `group`/`index` address it in the kernel's q `[G, heads, Nq, d]`. `cell` is (row, col) on the layer's query
    grid (None for decoder prompt/output tokens, which `label` names by role). `pixel_box` is
    [x0, y0, x1, y1) in original-image pixels. `key_block` is the key-grid block [r0, r1, c0, c1) its keys
    cover (row-major inside), None when keys are tokens. `source_cells` is the key-grid block a q-pooled
    query was max-pooled from.
    """

    label: str
    group: int
    index: int
    cell: tuple[int, int] | None = None
    pixel_box: list[float] | None = None
    key_block: list[int] | None = None
    source_cells: list[int] | None = None
    is_padding: bool = False

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class AttentionRecord:
    """One call of one attention module, as its kernel computed it.

    probs: [n_selected, heads, Nk] fp32 probabilities of the selected queries (exact, not pooled).
    query_stats: name -> [G, heads, Nq] fp32 per-query statistics over all keys (see capture.attention).
    head_stats: name -> {mean, min, max} lists over heads, from real (non-padding) queries.
    qkv: q/k/v `[n_groups, heads, N, d]` of the groups holding selected queries, when asked for.
    full_qkv: q/k/v `[G, heads, N, d]` of every group (CaptureOptions.keep_all_qkv), with `scale` and `tiled`.
    """

    name: str
    layer_key: str
    module_type: str
    kind: str
    call_index: int
    q_shape: list[int]
    k_shape: list[int]
    v_shape: list[int]
    heads: int
    head_dim: int
    scale: float
    kernel_dtype: str
    geometry: dict
    queries: list[QuerySpec]
    probs: torch.Tensor
    query_stats: dict[str, torch.Tensor] | None
    head_stats: dict[str, dict[str, list[float]]]
    selected_stats: list[dict]
    kernel_max_abs_err: float
    module_max_abs_err: float | None = None
    module_output: dict | None = None
    qkv: dict | None = None
    full_qkv: dict | None = None
    quant: dict | None = None
    key_pooling: dict | None = None
    files: dict = field(default_factory=dict)
    frame_index: int | None = None  # video mode: the selected frame this call ran on (None for a single image)
    frame_call: int = 0  # video mode: the module's call index within its frame
    memory_mass: dict | None = None  # memory cross-attention: attention mass per key segment (capture.memory)
    segment_mass: torch.Tensor | None = None  # [G, heads, Nq, segments] fp32, every query (when all_query_stats)
    fast_attention: bool = False  # the output came from FastKernel (`--fast-attention`), not torch's fused kernel

    @property
    def file_stem(self) -> str:
        if self.frame_index is not None:
            stem = f"{self.layer_key}__frame{self.frame_index:04d}"
            return stem if self.frame_call == 0 else f"{stem}__call{self.frame_call}"
        return self.layer_key if self.call_index == 0 else f"{self.layer_key}__call{self.call_index}"


@dataclass
class BlockRecord:
    """One call of a block around attention (MultiScaleBlock, TwoWayAttentionBlock, neck, decoder, ...)."""

    name: str
    layer_key: str
    module_type: str
    call_index: int
    inputs: list[dict]
    outputs: list[dict]
    frame_index: int | None = None  # video mode: the selected frame this call ran on
