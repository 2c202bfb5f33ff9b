"""Real but unusual inputs made from the bundled photographs: orientation written in a TIFF tag or a video's
display matrix, frames only a few pixels high. Each either runs with outputs that fit the picture as a viewer
shows it, or ends in one line; none crashes."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from sam2_layerwise.frames import open_video
from sam2_layerwise.inputs import image_header_size, load_image
from sam2_layerwise.sweep.inputs import AutoPrompts, Row, plan_items
from tests.conftest import COFFEE, TINY_CONFIG
from tests.hardening.helpers import cli, one_error
from tests.video.conftest import crops, write_frames, write_mp4

TURN = {6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90, 3: Image.Transpose.ROTATE_180,
        5: Image.Transpose.TRANSPOSE}  # EXIF orientation -> what makes the stored picture upright


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(COFFEE).convert("RGB").resize((120, 80))


def _oriented(photo: Image.Image, path, orientation: int):
    """Save `photo` at `path` with EXIF orientation `orientation` (a TIFF tag for .tiff); the upright picture."""
    if path.suffix == ".tiff":
        tags = TiffImagePlugin.ImageFileDirectory_v2()
        tags[274] = orientation
        photo.save(path, tiffinfo=tags)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        photo.save(path, exif=exif, lossless=True)  # lossless: WebP
    return np.asarray(photo.transpose(TURN[orientation]))


# -- orientation: the header's size is the decoded picture's ---------------------------------------------------
@pytest.mark.parametrize("suffix", [".tiff", ".png", ".webp"])
@pytest.mark.parametrize("orientation", [6, 8, 5, 3])
def test_header_size_is_the_upright_size(tmp_path, photo, suffix, orientation):
    path = tmp_path / f"o{orientation}{suffix}"
    upright = _oriented(photo, path, orientation)
    image = load_image(path)
    assert np.array_equal(image, upright)  # turned once, the way viewers show it
    assert image_header_size(path) == (image.shape[1], image.shape[0])


def test_sweep_centre_click_of_a_turned_tiff_is_its_centre(tmp_path, photo):
    path = tmp_path / "portrait.tiff"
    _oriented(photo, path, 6)  # stored 120 x 80, seen 80 x 120
    (item,) = plan_items([Row(path, None, None, None, "d/")], AutoPrompts.parse("center"), "models")
    assert (item.width, item.height) == (80, 120)
    assert item.points == (40.0, 60.0, 1.0)


# -- video files: the display matrix ---------------------------------------------------------------------------
def rotate_mp4(src, dst, degrees_clockwise: int):
    """Copy an mp4 with the track header's display matrix saying "turn 90/180/270 degrees clockwise to show"
    (what a phone writes for a portrait video: stored landscape, shown portrait)."""
    one, neg = 0x00010000, 0xFFFF0000
    matrix = {90: (0, one, 0, neg, 0, 0), 180: (neg, 0, 0, 0, neg, 0), 270: (0, neg, 0, one, 0, 0)}[degrees_clockwise]
    data = bytearray(src.read_bytes())
    tkhd = data.index(b"tkhd")
    assert data[tkhd + 4] == 0  # version 0: 4+4*5 bytes of flags, times, track id, duration, then 8+2+2+2+2
    at = tkhd + 4 + 4 + 20 + 16
    data[at:at + 36] = struct.pack(">9I", *matrix, 0, 0, 0x40000000)
    dst.write_bytes(bytes(data))
    return dst


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """Three 96 x 64 crops of coffee.png, as an mp4 stored landscape."""
    frames = [np.ascontiguousarray(f[:64, :96]) for f in crops(3)]
    return write_mp4(tmp_path_factory.mktemp("clip") / "clip.mp4", frames), frames


@pytest.mark.parametrize("clockwise, k", [(90, -1), (270, 1), (180, 2)])
def test_a_rotated_video_stands_upright(tmp_path, small_clip, clockwise, k):
    clip, frames = small_clip
    turned = rotate_mp4(clip, tmp_path / f"rot{clockwise}.mp4", clockwise)
    with open_video(turned) as src:
        upright = np.rot90(frames[1], k)
        assert (src.width, src.height) == (upright.shape[1], upright.shape[0])
        got = src.image(1)
        assert got.shape == upright.shape
        assert np.abs(got.astype(float) - upright).mean() < 12  # lossy, but this picture and not another turn
        assert src.describe()["rotation"] == (-clockwise) % 360
    with open_video(clip) as src:
        assert (src.width, src.height) == (96, 64) and src.describe()["rotation"] == 0


def test_clicks_on_a_portrait_video_are_portrait_pixels(capsys, tmp_path, small_clip, tiny_checkpoint):
    """A click low in the portrait picture (y = 90 of 96) exists only once the video is turned upright."""
    clip, _ = small_clip
    turned = rotate_mp4(clip, tmp_path / "portrait.mp4", 90)
    out = tmp_path / "out"
    code, err = cli(capsys, "visualize", "--config", TINY_CONFIG, "--checkpoint", tiny_checkpoint, "--video", turned,
                    "--points", "30", "90", "1", "--max-frames", "2", "--image-size", "128",
                    "--layers", "sam_mask_decoder_transformer_layers_0_self_attn", "--output-dir", out, "-q")
    assert code == 0, err
    summary = json.loads((out / "layerwise_summary.json").read_text())
    assert (summary["video"]["width"], summary["video"]["height"]) == (64, 96)
    assert Image.open(out / "prediction_images" / "frame_0000__overlay.png").size == (64, 96)


# -- pictures of frames a few pixels high ----------------------------------------------------------------------
def test_memory_panels_of_very_thin_frames(capsys, tmp_path, tiny_checkpoint):
    """1500 x 20 frames: each memory panel tile is 3 px high; the pointer bar still needs its own height."""
    photo = load_image(COFFEE)
    frames = [np.asarray(Image.fromarray(photo[10 * i:10 * i + 20]).resize((1500, 20))) for i in range(3)]
    folder = write_frames(tmp_path / "thin", frames, names=["a", "b", "c"])
    out = tmp_path / "out"
    code, err = cli(capsys, "visualize", "--config", TINY_CONFIG, "--checkpoint", tiny_checkpoint, "--video", folder,
                    "--points", "700", "10", "1", "--image-size", "128", "--render-attn-overlay",
                    "--layers", "memory_attention_layers_0_cross_attn_image", "--output-dir", out, "-q")
    assert code == 0, err
    panels = sorted((out / "attn_overlays" / "all").glob("*__memory__mean.png"))
    assert panels and all(Image.open(p).height > 64 for p in panels)


# -- file names that are not UTF-8 (an old archive's Latin-1 names) ------------------------------------------------
LATIN1 = os.fsdecode(b"caf\xe9")  # Python's name for the bytes c a f 0xE9: a lone surrogate, \udce9


def test_not_utf8_names_for_the_photograph_and_the_run(capsys, tmp_path, tiny_checkpoint):
    image = tmp_path / f"{LATIN1}.png"
    Image.open(COFFEE).convert("RGB").resize((64, 48)).save(image)
    out = tmp_path / f"run {LATIN1}"
    code, err = cli(capsys, "visualize", "--config", TINY_CONFIG, "--checkpoint", tiny_checkpoint, "--image", image,
                    "--points", "30", "20", "1", "--viewer", "--save-attn", "--image-size", "128", "--output-dir", out,
                    "--layers", "sam_mask_decoder_transformer_layers_0_self_attn", "-q")
    assert code == 0, err
    summary = json.loads((out / "layerwise_summary.json").read_text())
    assert summary["image"]["path"] == str(image.resolve())  # the real name, escaped in JSON
    index = (out / "viewer" / "viewer_data" / "index.js").read_bytes()
    assert b"caf\\udce9" in index  # valid UTF-8 JavaScript, the same string as JSON's own escape
    code, err = cli(capsys, "render", "--run-dir", out, "--render-attn-overlay", "-q")
    assert code == 0, err


def test_not_utf8_names_in_a_frames_folder_and_a_sweep_table(tmp_path):
    folder = write_frames(tmp_path / "frames", crops(2), names=["a", LATIN1])
    with open_video(folder) as src:
        assert src.frames[1].name == f"{LATIN1}.png" and len(src.sha256()) == 64  # compare's manifest hash
    from sam2_layerwise.sweep.store import _parquet_bytes, columns, frame

    df = frame([{"item": 0, "image": str(folder / f"{LATIN1}.png"), "status": "ok"}], columns()["items"])
    assert df["image"][0] == f"{folder}/caf\\xe9.png"
    assert _parquet_bytes(df)[:4] == b"PAR1"


# -- prompt numbers: every spelling is a value, and a value that is no pixel is named -----------------------------
@pytest.fixture
def visualize(capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"

    def run(*prompts):
        code, err = cli(capsys, "visualize", "--config", TINY_CONFIG, "--checkpoint", tiny_checkpoint, "--image",
                        COFFEE, *prompts, "--output-dir", out, "-q")
        return code, err, out

    return run


@pytest.mark.parametrize("prompts, needles", [
    (["--points", "-1e3", "5", "1"], ["--points -1e3 5 1:", "(-1000, 5) is outside the 600x400 image"]),
    (["--points", "-1.5E-3", "5", "1"], ["--points -1.5E-3 5 1:", "outside"]),
    (["--box", "-inf", "0", "10", "10"], ["--box -inf 0 10 10:", "'-inf' is not a finite number"]),
    (["--points", "nan", "5", "1"], ["--points nan 5 1:", "'nan' is not a finite number"]),
    (["--points", "5", "1e400", "1"], ["--points 5 1e400 1:", "'1e400' is not a finite number"]),
    (["--box", "0", "0", "nan", "300"], ["--box 0 0 nan 300:", "'nan' is not a finite number"]),
    (["--points", "5", "5", "1", "--query-points", "-NaN", "3"], ["--query-points -NaN 3:", "not a finite number"]),
    (["--points", "600", "100", "1"], ["--points 600 100 1:", "(600, 100) is outside the 600x400 image"]),
    (["--box", "300", "10", "100", "100"], ["--box 300 10 100 100:", "needs x0 < x1 and y0 < y1"]),
])
def test_odd_prompt_numbers_are_named(visualize, prompts, needles):
    code, err, out = visualize(*prompts)
    one_error(code, err, "visualize", *needles)
    assert not out.exists()


# -- integer and float pictures (scientific TIFFs) -----------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda g: g.astype(np.int32) - 128,  # signed: negative values wrapped to bright ones
    lambda g: g.astype(np.int32) * 1000,  # a 32-bit range: every pixel above 255 * 257 was white
    lambda g: np.where(g == g.max(), np.inf, g.astype(np.float32)),  # +inf made every other pixel black
])
def test_integer_and_float_images_keep_their_picture(tmp_path, photo, make):
    grey = np.asarray(photo.convert("L"))
    data = make(grey)
    floating = data.dtype.kind == "f"
    if floating:
        data[0, 0] = np.nan
    path = tmp_path / "science.tiff"
    Image.fromarray(data).save(path)
    image = load_image(path)
    assert image.shape == (80, 120, 3) and (image[..., 0] == image[..., 2]).all()
    values = data.astype(float).ravel()[1:]  # the first pixel is NaN in the float picture
    finite = values[np.isfinite(values)]
    lo, hi = finite.min(), finite.max()
    want = np.clip((values - lo) / (hi - lo) * 255, 0, 255)  # stretched from the smallest to the largest value
    assert np.abs(image[..., 0].astype(float).ravel()[1:] - want).max() <= 1
    assert not floating or image[0, 0, 0] == 0  # NaN is black


# -- folders of images as people have them ------------------------------------------------------------------------
def test_folders_copied_from_a_mac_calibrate_and_sweep(tmp_path, photo):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo.save(folder / "b.JPG", format="JPEG")
    photo.save(folder / "a.png")
    (folder / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")  # AppleDouble: not a picture
    (folder / ".DS_Store").write_bytes(b"Bud1")
    (folder / "album.png").mkdir()
    from sam2_layerwise.cli.quantize import calibration_files
    from sam2_layerwise.sweep.inputs import read_inputs

    assert [f.name for f in calibration_files([str(folder)], 64)] == ["a.png", "b.JPG"]
    kind, rows = read_inputs(str(folder))
    assert kind == "directory" and [r.image.name for r in rows] == ["a.png", "b.JPG"]
