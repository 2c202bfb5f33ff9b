"""Independent reference computations for the quantization tests (plain torch, float64 where it matters)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "quantization"


def js_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (log base 2) over the last axis; p, q rows sum to 1 (q may be a quantized row:
    it is renormalised first)."""
    p = p.double() / p.double().sum(-1, keepdim=True)
    q = q.double() / q.double().sum(-1, keepdim=True).clamp_min(1e-300)
    m = (p + q) / 2

    def kl(a, b):
        return (torch.special.xlogy(a, a) - torch.special.xlogy(a, b.clamp_min(1e-300))).sum(-1)

    return (kl(p, m) + kl(q, m)) / 2 / np.log(2)


def mean_js(ref_records, q_records) -> float:
    """Mean JS over every captured (call, selected query, head)."""
    vals = []
    for a, b in zip(ref_records, q_records):
        assert a.name == b.name and a.call_index == b.call_index
        vals.append(js_bits(a.probs, b.probs).reshape(-1))
    return torch.cat(vals).mean().item()


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def mean_mask_iou(pa, pb) -> float:
    return float(np.mean([mask_iou(x, y) for x, y in zip(pa.masks, pb.masks)]))
