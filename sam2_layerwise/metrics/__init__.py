"""FP-vs-quantized comparison: attention-row metrics, output impact, plots (docs/metrics.md).

Pure functions — tensors or tables in, tensors, JSON-ready dicts or PNGs at a given path out. Nothing here
reads a run directory or needs the model.
"""

from sam2_layerwise.metrics.distributions import (
    PAIR_METRICS,
    entropy,
    entropy_norm,
    js_divergence,
    mass_on_topk,
    pair_metrics,
    relative_error,
    relative_error_from_parts,
    sq_err_parts,
    summarise,
    topk_mass,
    topk_overlap,
)
from sam2_layerwise.metrics.impact import output_impact
from sam2_layerwise.metrics.plots import heatmap, heatmaps, layer_chart

__all__ = [
    "PAIR_METRICS", "entropy", "entropy_norm", "heatmap", "heatmaps", "js_divergence", "layer_chart", "mass_on_topk",
    "output_impact", "pair_metrics", "relative_error", "relative_error_from_parts", "sq_err_parts", "summarise",
    "topk_mass", "topk_overlap",
]
