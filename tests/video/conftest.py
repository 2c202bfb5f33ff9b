"""Video fixtures: five frames cut from a real photograph (a crop sliding right and down, named non-numerically),
a small mp4 made from them with PyAV, and the tiny model built as SAM 2's video predictor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sam2_layerwise.inputs import load_image
from sam2_layerwise.model import build_model
from sam2_layerwise.model.video import video_overrides
from tests.conftest import COFFEE, TINY_CONFIG

NAMES = ["shot_alpha", "shot_bravo", "shot_charlie", "shot_delta", "shot_echo"]  # natural order = this order
W, H = 448, 288  # crop of coffee.png (600 x 400); even sides for the video encoder


def crops(n: int = len(NAMES)) -> list[np.ndarray]:
    photo = load_image(COFFEE)
    return [np.ascontiguousarray(photo[12 * i:12 * i + H, 24 * i:24 * i + W]) for i in range(n)]


def write_frames(folder: Path, frames: list[np.ndarray], names=NAMES, suffix=".png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(names, frames):
        Image.fromarray(arr).save(folder / f"{name}{suffix}")
    return folder


def write_mp4(path: Path, frames: list[np.ndarray], fps: int = 5) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        stream.options = {"qscale": "2"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.fixture(scope="session")
def frames_dir(tmp_path_factory) -> Path:
    return write_frames(tmp_path_factory.mktemp("video") / "frames", crops())


@pytest.fixture(scope="session")
def video_mp4(tmp_path_factory) -> Path:
    return write_mp4(tmp_path_factory.mktemp("video_file") / "clip.mp4", crops())


@pytest.fixture(scope="session")
def video_model(tiny_checkpoint):
    """The tiny model as SAM2VideoPredictor (memory attention: 2 layers, 2 heads, 8x8 tokens, 2 tokens per pointer)."""
    return build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu", overrides=video_overrides()).model
