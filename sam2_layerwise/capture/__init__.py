"""Capture: scoped hooks, the one attention recomputation, query selection, records."""

from sam2_layerwise.capture.records import AttentionRecord, BlockRecord, QuerySpec, layer_key
from sam2_layerwise.capture.session import CaptureOptions, CaptureSession, QueryLocation

__all__ = ["AttentionRecord", "BlockRecord", "CaptureOptions", "CaptureSession", "QueryLocation", "QuerySpec", "layer_key"]
