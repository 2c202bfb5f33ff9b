"""Image loading conventions and prompt validation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sam2_layerwise.errors import InputError
from sam2_layerwise.inputs import load_image, parse_prompts


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :10] = 255  # white stripe on the left of a 40-wide, 20-high image
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "rot.jpg")
    assert out.shape == (40, 20, 3)  # displayed upright: portrait
    assert out[:10, :, 0].mean() > 200 and out[-10:, :, 0].mean() < 50  # the stripe is now at the top


TURNS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
         5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_90}


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK"])
@pytest.mark.parametrize("orientation", sorted(TURNS))
def test_uncompressed_tiff_orientation_in_every_mode(tmp_path, mode, orientation):
    """Uncompressed TIFFs with an Orientation tag: the stored pixels turned as the tag says, whatever the mode
    (Pillow's by-name reading scrambled grey, palette, RGBA and CMYK ones with tags 5-8), at the size the header
    check announces."""
    from sam2_layerwise.inputs import image_header_size

    rgb = (np.arange(12 * 7 * 3) * 37 % 256).astype(np.uint8).reshape(7, 12, 3)
    stored = Image.fromarray(rgb).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "turned.tif"
    stored.save(path, exif=exif)
    out = load_image(path)
    assert np.array_equal(out, np.asarray(stored.transpose(TURNS[orientation]).convert("RGB")))
    assert image_header_size(path) == (out.shape[1], out.shape[0])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK"])
def test_modes_become_rgb(tmp_path, mode):
    rgb = (np.arange(30 * 20 * 3) % 256).astype(np.uint8).reshape(20, 30, 3)
    im = Image.fromarray(rgb).convert(mode)
    path = tmp_path / f"im.{'jpg' if mode == 'CMYK' else 'png'}"
    im.save(path)
    out = load_image(path)
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert np.array_equal(out, np.asarray(Image.open(path).convert("RGB")))


def test_16_bit_grey_is_scaled(tmp_path):
    a = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png")
    assert out.shape == (2, 2, 3)
    assert out[..., 0].tolist() == [[0, 255], [128, 1]]


def test_prompt_validation():
    p = parse_prompts(["10", "20", "1", "5.5", "6", "0"], ["1", "2", "30", "40"], ["3", "4"], 50, 50)
    assert [(q.x, q.y, q.label) for q in p.points] == [(10, 20, 1), (5.5, 6, 0)]
    assert p.box == (1, 2, 30, 40) and p.queries == [(3, 4)]
    with pytest.raises(InputError, match=r"^--points 50 1 1: \(50, 1\) is outside the 50x50 image"):
        parse_prompts(["50", "1", "1"], None, None, 50, 50)
    with pytest.raises(InputError, match="--box.*x0 < x1"):
        parse_prompts(None, ["30", "2", "10", "40"], None, 50, 50)
    with pytest.raises(InputError, match="--points: give at least one click"):
        parse_prompts(None, None, ["1", "1"], 50, 50)


@pytest.mark.parametrize("text", ["1_0", "\u0661\u0660", "\uff12\uff10", "0x10", "1,5", "", " "])
def test_coordinates_are_plain_decimal_numbers(text):
    """float() takes "1_0" and other scripts' digits; a coordinate is written in ASCII decimals (and 1e2, .5, +3)."""
    with pytest.raises(InputError, match=r"^--points .*is not a number"):
        parse_prompts([text, "5", "1"], None, None, 50, 50)
    with pytest.raises(InputError, match=r"^--box .*is not a number"):
        parse_prompts(["5", "5", "1"], [text, "1", "40", "40"], None, 50, 50)
    p = parse_prompts(["1e1", " .5", "+1"], None, None, 50, 50)
    assert (p.points[0].x, p.points[0].y, p.points[0].label) == (10.0, 0.5, 1)
