"""Fake-quantized SAM 2: quantizers, the adaptive-QAT config, applying it, calibration, checkpoints.

    from sam2_layerwise.quant import load_quant_config, load_quantized_model
    qcfg = load_quant_config("examples/quantization/w8a8.yaml")
    loaded, qm = load_quantized_model(None, "w8a8_sam2.pt", qcfg)   # qm.remove() gives the float model back

Knows nothing of files beyond reading a config and a checkpoint; docs/quantization.md describes both formats.
"""

from sam2_layerwise.quant.apply import QuantizedModel, plan, quantize_model
from sam2_layerwise.quant.calibrate import calibrate_model
from sam2_layerwise.quant.checkpoint import (FORMAT, load_quantized_model, quant_checkpoint,
                                             save_quantized_checkpoint)
from sam2_layerwise.quant.config import QuantConfig, load_quant_config, parse_config
from sam2_layerwise.quant.quantizers import QUANTIZER_KINDS, FakeQuantizer, QuantSpec

__all__ = [
    "FORMAT", "QUANTIZER_KINDS", "FakeQuantizer", "QuantConfig", "QuantSpec", "QuantizedModel", "calibrate_model",
    "load_quant_config", "load_quantized_model", "parse_config", "plan", "quant_checkpoint", "quantize_model",
    "save_quantized_checkpoint",
]
