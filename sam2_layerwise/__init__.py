"""sam2-layerwise: open SAM 2 up layer by layer.

    from sam2_layerwise import build_model, load_image, parse_prompts, capture_image
    m = build_model("configs/sam2.1/sam2.1_hiera_t.yaml", "sam2.1_hiera_tiny.pt").model
    img = load_image("cat.png")
    cap = capture_image(m, img, parse_prompts([220, 150, 1], None, None, img.shape[1], img.shape[0]))
    cap.record("image_encoder_trunk_blocks_5").probs   # [queries, heads, keys]
"""

from sam2_layerwise.api import ImageCapture, capture_image, query_locations
from sam2_layerwise.api_video import VideoCapture, capture_video
from sam2_layerwise.capture import AttentionRecord, BlockRecord, CaptureOptions, QuerySpec, layer_key
from sam2_layerwise.errors import LayerwiseError
from sam2_layerwise.frames import FrameSelection, open_video
from sam2_layerwise.inputs import Point, Prompts, load_image, parse_prompts
from sam2_layerwise.model import LoadedModel, build_model
from sam2_layerwise.model.predict import Prediction, run_plain

__version__ = "0.1.0"

__all__ = [
    "AttentionRecord", "BlockRecord", "CaptureOptions", "ImageCapture", "LayerwiseError", "LoadedModel", "Point",
    "Prediction", "Prompts", "QuerySpec", "build_model", "capture_image", "layer_key", "load_image",
    "parse_prompts", "query_locations", "run_plain", "VideoCapture", "capture_video", "FrameSelection", "open_video",
]
