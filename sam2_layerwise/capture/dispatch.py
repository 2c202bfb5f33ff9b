"""Route each attention module's `F.scaled_dot_product_attention` call through a kernel and observers.

SAM 2's attention modules call `torch.nn.functional.scaled_dot_product_attention`, looked up at call time.
While an instrumented module runs, that function is swapped for `_dispatch`, which hands q/k/v to the
module's *kernel* (the float kernel is torch's own fused SDPA, so outputs are bit-identical to plain SAM 2;
quantization installs a fake-quantized kernel) and then shows every *observer* (capture) exactly what the
kernel used. The swap is scoped to the module's forward: importing this package changes nothing in torch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

ORIGINAL_SDPA = F.scaled_dot_product_attention


@dataclass
class KernelView:
    """What an attention kernel computed with. Shapes `[G, heads, N, head_dim]` (G = batch x windows).

    `probs_transform` maps fp32 softmax probabilities `[..., Nq, Nk]` to those the kernel multiplied with v
    (identity for float attention; a fake quantizer for quantized softmax). `tiled` says the kernel computed
    its output itself in `capture.attention.row_tiles` tiles, so recomputed rows must use the same tiles to
    match it bit for bit.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    probs_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    tiled: bool = False
    stats: dict | None = None  # per-query statistics [G, heads, Nq] the kernel took from its own tiles, if asked
    fast: bool = False  # computed by FastKernel (`--fast-attention`), not torch's fused kernel
    # rows an explicitly tiled kernel kept from its own tiles for the (group, query) pairs `rows_for` (asked for by
    # an observer's `picks`): probs [n, heads, Nk] fp32 and out = probs @ v [n, heads, d_v] fp32
    rows: tuple | None = None
    rows_for: list | None = None


class AttentionKernel(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, KernelView]: ...


def float_kernel(q, k, v, scale=None):
    """Torch's own SDPA: exactly what plain SAM 2 computes."""
    out = ORIGINAL_SDPA(q, k, v, scale=scale)
    return out, KernelView(q, k, v, scale if scale is not None else q.shape[-1] ** -0.5)


def flash_stats_kernel(q, k, v, scale=None, stats_topk: int | None = None):
    """Float attention when a capture wants the statistics of every query: torch's own CPU flash attention output,
    bit for bit (`native.flash_stats` repeats its operations; checked against it before first use), with the
    statistics taken from the same tiles: one q·kᵀ per call instead of a second pass over the scores. Where torch
    would not run its flash kernel (another device or dtype, autocast, reduced-precision products, a layout it
    declines) or the compiled kernel is unavailable, torch computes the output and the observers the statistics."""
    from sam2_layerwise.capture import native

    if stats_topk is None or not native.flash_usable(q, k, v):
        return float_kernel(q, k, v, scale)
    from sam2_layerwise.capture.attention import named_stats

    out, found = native.flash_stats(q, k, v, scale, stats_topk)
    return out, KernelView(q, k, v, scale if scale is not None else q.shape[-1] ** -0.5,
                           stats=named_stats(*found, k.shape[-2]))


flash_stats_kernel.tile_statistics = True


class FastKernel:
    """`--fast-attention` (opt-in): the compiled statistics kernel computes the attention output itself from the
    tiles it computes the statistics from, one q·kᵀ per call instead of two. Its output is not torch's fused
    kernel's to the last bit (another summation order), so masks may differ from plain SAM 2 in a few pixels.
    Where it cannot run (no compiled kernel, not fp32 on CPU) the call goes to torch's kernel as usual;
    `calls`/`torch_calls` count both."""

    tile_statistics = True

    def __init__(self):
        self.calls = 0
        self.torch_calls = 0

    def __call__(self, q, k, v, scale=None, stats_topk: int | None = None):
        from sam2_layerwise.capture import native

        s = scale if scale is not None else q.shape[-1] ** -0.5
        usable = (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, k, v)) and k.shape[-2] > 0
                  and q.dim() == 4 and not torch.is_autocast_enabled("cpu") and native.kernel() is not None)
        if not usable:
            self.torch_calls += 1
            return float_kernel(q, k, v, scale)
        self.calls += 1
        from sam2_layerwise.capture.attention import named_stats

        out, found = native.fast_attention(q, k, v, s, stats_topk or 0)
        stats = named_stats(*found, k.shape[-2], q.shape[:3]) if stats_topk is not None else None
        return out, KernelView(q, k, v, s, stats=stats, fast=True)


@dataclass
class ModuleAttention:
    """Per-module routing state, attached to the module as `_layerwise_attention`."""

    name: str
    kernel: AttentionKernel | None = None
    observers: list = field(default_factory=list)
    handles: list = field(default_factory=list)


class _Stack(threading.local):
    def __init__(self):
        self.frames: list[ModuleAttention] = []


_stack = _Stack()
_ATTR = "_layerwise_attention"


def _dispatch(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    if not _stack.frames or attn_mask is not None or is_causal or dropout_p or kwargs:
        return ORIGINAL_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                             is_causal=is_causal, scale=scale, **kwargs)
    frame = _stack.frames[-1]
    kernel = frame.kernel or flash_stats_kernel
    # An explicitly tiled kernel (quantized attention) can hand observers the per-query statistics of every
    # query from the probabilities it computes anyway, instead of their computing the scores a second time.
    topk = next((o.stats_topk for o in frame.observers if getattr(o, "stats_topk", None) is not None), None)
    extra = {}
    if topk is not None and getattr(kernel, "tile_statistics", False):
        extra["stats_topk"] = topk
    if getattr(kernel, "keeps_rows", False):  # the selected rows from the kernel's tiles, not computed again
        picks = next((o.picks for o in frame.observers if getattr(o, "picks", None) is not None), None)
        if picks is not None:
            extra["keep_rows"] = picks(query.shape, key.shape)
    out, view = kernel(query, key, value, scale, **extra)
    for observe in frame.observers:
        observe(view, out)
    return out


def _enter(module, args, kwargs):
    _stack.frames.append(getattr(module, _ATTR))
    F.scaled_dot_product_attention = _dispatch


def _leave(module, args, kwargs, output):
    if _stack.frames:
        _stack.frames.pop()
    if not _stack.frames:
        F.scaled_dot_product_attention = ORIGINAL_SDPA


def routing(module: nn.Module, name: str) -> ModuleAttention:
    """The module's routing state, installing the scoped swap hooks on first use."""
    state = getattr(module, _ATTR, None)
    if state is None:
        state = ModuleAttention(name=name)
        setattr(module, _ATTR, state)
        state.handles = [
            module.register_forward_pre_hook(_enter, with_kwargs=True),
            module.register_forward_hook(_leave, with_kwargs=True, always_call=True),
        ]
    return state


def release(module: nn.Module) -> None:
    """Remove the routing hooks again once no kernel and no observer needs them."""
    state = getattr(module, _ATTR, None)
    if state is not None and state.kernel is None and not state.observers:
        for h in state.handles:
            h.remove()
        delattr(module, _ATTR)


def reset() -> None:
    """Restore torch's SDPA after an exception unwound a forward pass mid-way."""
    _stack.frames.clear()
    F.scaled_dot_product_attention = ORIGINAL_SDPA
