"""`sam2-layerwise visualize-quantized`: the seed's visualize_layerwise_quantized.py, i.e. `visualize` with a
required `--adaptive-qat-config`."""

from __future__ import annotations

from sam2_layerwise.cli import visualize

RUNS_MODELS = True  # main() sets the allocator for tensors (sam2_layerwise/allocator.py)
EXAMPLES = """examples:
  # the seed's quantized command: a QAT (or 'sam2-layerwise quantize') checkpoint and its config
  sam2-layerwise visualize-quantized --config configs/sam2/sam2_hiera_b+.yaml --checkpoint adaptive_qat_ckpt.pt \\
      --adaptive-qat-config examples/quantization/w4a8_mixed.yaml --image photo.jpg --points 320 240 1 \\
      --output-dir sam2_logs/layerwise_debug_quant"""


def add_arguments(p) -> None:
    visualize.add_arguments(p)
    for action in p._actions:
        if action.dest == "adaptive_qat_config":
            action.required = True
    p.set_defaults(output_dir="sam2_logs/layerwise_debug_quant")


def run(args) -> int:
    return visualize.run(args)
