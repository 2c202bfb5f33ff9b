"""sam2-layerwise: open SAM 2 up layer by layer.

    from sam2_layerwise import build_model, load_image, parse_prompts, capture_image
    m = build_model("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt").model
    img = load_image("cat.png")
    cap = capture_image(m, img, parse_prompts([220, 150, 1], None, None, img.shape[1], img.shape[0]))
    cap.record("image_encoder_trunk_blocks_5").probs   # [queries, heads, keys]
"""

import importlib

# The public API, imported on first use (PEP 562): `import sam2_layerwise` and the command line's start do not pay
# for torch and SAM 2 until a command needs them (`--help` answers at once, Ctrl-C while starting is clean).
_EXPORTS = {
    "sam2_layerwise.api": ("ImageCapture", "capture_image", "query_locations"),
    "sam2_layerwise.api_video": ("VideoCapture", "capture_video"),
    "sam2_layerwise.capture": ("AttentionRecord", "BlockRecord", "CaptureOptions", "QuerySpec", "layer_key"),
    "sam2_layerwise.errors": ("LayerwiseError",),
    "sam2_layerwise.frames": ("FrameSelection", "open_video"),
    "sam2_layerwise.inputs": ("Point", "Prompts", "load_image", "parse_prompts"),
    "sam2_layerwise.model": ("LoadedModel", "build_model"),
    "sam2_layerwise.model.predict": ("Prediction", "run_plain"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sam2_layerwise' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


__version__ = "0.1.0"

__all__ = [
    "AttentionRecord", "BlockRecord", "CaptureOptions", "ImageCapture", "LayerwiseError", "LoadedModel", "Point",
    "Prediction", "Prompts", "QuerySpec", "build_model", "capture_image", "layer_key", "load_image",
    "parse_prompts", "query_locations", "run_plain", "VideoCapture", "capture_video", "FrameSelection", "open_video",
]
