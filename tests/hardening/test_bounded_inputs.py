"""Bounded work for tiny inputs: a range of 10**12 layers, YAML bombs and duplicate keys, image headers that
announce hundreds of megapixels, truncated images. Each ends fast, with bounded memory, in one line."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sam2_layerwise.errors import InputError
from sam2_layerwise.inputs import DEFAULT_MAX_PIXELS, load_image
from sam2_layerwise.layers import select
from tests.conftest import CHELSEA, TINY_CONFIG
from tests.hardening.helpers import billion_laughs, cli, one_error, png_bomb, run_bounded, tree

KEYS = [f"image_encoder_trunk_blocks_{i}" for i in range(12)] + [
    f"sam_mask_decoder_transformer_layers_{i}_self_attn" for i in range(2)]


@pytest.fixture
def visualize(capsys, tmp_path, tiny_checkpoint):
    """visualize on the tiny model with one click; returns (code, stderr lines, output dir)."""
    out = tmp_path / "out"

    def run(*extra, image=CHELSEA, config=TINY_CONFIG):
        code, err = cli(capsys, "visualize", "--config", config, "--checkpoint", tiny_checkpoint, "--image", image,
                        "--points", "10", "10", "1", "--output-dir", out, "-q", *extra)
        return code, err, out

    return run


# -- --layers ranges ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["image_encoder_trunk_blocks_0:999999999999",
                                  "image_encoder_trunk_blocks_5:" + "9" * 5000])
def test_a_huge_range_is_matched_not_enumerated(spec):
    t0 = time.perf_counter()
    with pytest.raises(InputError) as info:
        select(KEYS, spec)
    assert time.perf_counter() - t0 < 0.5
    msg = str(info.value)
    assert msg.startswith("--layers ") and "'image_encoder_trunk_blocks_12' matches no layer" in msg
    assert "last layer image_encoder_trunk_blocks_11 (12 layers, 0..11)" in msg
    assert len(msg) < 600  # the 5000-digit bound is shortened, not echoed


def test_ranges_select_exactly_their_layers():
    assert select(KEYS, "image_encoder_trunk_blocks_3:5") == KEYS[3:6]
    assert select(KEYS, "image_encoder_trunk_blocks_0:0,sam*") == [KEYS[0], *KEYS[12:]]
    assert select(KEYS, "sam_mask_decoder_transformer_layers_0:1_self_attn") == KEYS[12:]
    assert select(KEYS, "*blocks_10:11") == KEYS[10:12]  # a glob prefix
    with pytest.raises(InputError, match="'sam_mask_decoder_transformer_layers_2_self_attn' matches no layer"):
        select(KEYS, "sam_mask_decoder_transformer_layers_0:2_self_attn")
    with pytest.raises(InputError, match="'blocks_0:3' matches no layer; close: |layers look like"):
        select(KEYS, "blocks_0:3")
    with pytest.raises(InputError, match="has a gap"):
        select([k for k in KEYS if not k.endswith("_4")], "image_encoder_trunk_blocks_3:5")


def test_a_huge_range_on_the_cli(visualize):
    code, err, out = visualize("--layers", "image_encoder_trunk_blocks_0:999999999999")
    one_error(code, err, "visualize", "--layers image_encoder_trunk_blocks_0:999999999999",
              "goes past the last layer image_encoder_trunk_blocks_5")
    assert not out.exists()


# -- YAML -----------------------------------------------------------------------------------------------------
def _qcfg(tmp_path, text: str, name: str = "q.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _model_cfg(tmp_path, edit) -> Path:
    text = Path(TINY_CONFIG).read_text()
    path = tmp_path / "model.yaml"
    path.write_text(edit(text))
    return path


@pytest.mark.parametrize("text, needles", [
    ("defaults:\n  weight: {bits: 8}\n  activation: {bits: 8}\n  weight: {bits: 4}\n",
     ["duplicate key 'weight'", "line 4"]),
    ("rules:\n  - match: a\n    weight: {bits: 4, bits: 6}\n", ["duplicate key 'bits'", "line 3"]),
    ("defaults: " + "[" * 200 + "]" * 200 + "\n", ["nests deeper than 64 levels"]),
    ("defaults: &d {weight: *d}\n", ["refers to a node that contains it"]),
    ("defaults: *nowhere\n", ["not valid YAML", "undefined alias", "line 1"]),
    ("a: &x [1, *x]\n", ["refers to a node that contains it"]),
    ("version: " + "9" * 5000 + "\n", ["not valid YAML: a number is too long"]),
    ("defaults: {weight: {bits: 8}}\n\x00", ["not valid YAML"]),
])
def test_quant_config_yaml_mistakes_are_one_line(visualize, tmp_path, text, needles):
    path = _qcfg(tmp_path, text)
    code, err, out = visualize("--adaptive-qat-config", path)
    one_error(code, err, "visualize", f"--adaptive-qat-config {path}:", *needles)
    assert not out.exists()


def test_quant_config_size_limit(visualize, tmp_path):
    path = _qcfg(tmp_path, "# padding\n" * 120_000 + "defaults: {weight: {bits: 8}}\n")
    code, err, out = visualize("--adaptive-qat-config", path)
    one_error(code, err, "visualize", f"--adaptive-qat-config {path}:", "at most 1048576 bytes")
    assert not out.exists()


def test_merge_keys_are_not_duplicates(tmp_path):
    from sam2_layerwise.quant import load_quant_config

    path = _qcfg(tmp_path, "defaults:\n  weight: &w {bits: 8, symmetric: true}\n"
                           "rules:\n  - match: a\n    weight: {<<: *w, bits: 4}\n")
    cfg = load_quant_config(path)
    assert cfg.defaults["weight"].bits == 8 and cfg.rules[0].roles["weight"] == {"bits": 4, "symmetric": True}


@pytest.mark.parametrize("edit, needles", [
    (lambda t: t.replace("model:\n", "model:\n  image_size: 256\n", 1), ["duplicate key 'image_size'"]),
    (lambda t: t + billion_laughs(), ["more than 100000 YAML nodes once its aliases are expanded"]),
    (lambda t: t + "bomb:\n  s0: ha\n" + "".join(f"  s{i}: ${{bomb.s{i - 1}}}${{bomb.s{i - 1}}}\n"
                                                  for i in range(1, 40)), ["interpolations expand to more than"]),
    (lambda t: t + "loop: ${loop}\n", ["refers to itself"]),
    (lambda t: t.replace("image_size: 128", "image_size: 1000000000"), ["image_size 1000000000 is outside 32..4096"]),
    (lambda t: t + "# " + "x" * (5 << 20) + "\n", ["at most 4194304 bytes"]),
])
def test_model_config_yaml_mistakes_are_one_line(visualize, tmp_path, edit, needles):
    path = _model_cfg(tmp_path, edit)
    t0 = time.perf_counter()
    code, err, out = visualize(config=path)
    assert time.perf_counter() - t0 < 5
    one_error(code, err, "visualize", f"--config {path}:", *needles)
    assert not out.exists()


# -- images ---------------------------------------------------------------------------------------------------
def test_image_bomb_is_refused_before_decoding(tmp_path, tiny_checkpoint):
    """A 0.9 MB PNG that inflates to 900 M pixels, and a calibration image the same: refused from the header,
    in a process whose address space may grow only 512 MiB (decoding it would need 900 MiB), fast, with its
    resident memory all but unchanged. The same for a YAML billion laughs, as a quantization config and as a
    model config."""
    bomb = png_bomb(tmp_path / "bomb.png", 30000, 30000)
    assert bomb.stat().st_size < 1 << 20
    laughs = _qcfg(tmp_path, "defaults: {weight: {bits: 8}}\n" + billion_laughs(), "laughs.yaml")
    model_laughs = _model_cfg(tmp_path, lambda t: t + billion_laughs())
    out = tmp_path / "out"
    base = ["--checkpoint", str(tiny_checkpoint), "--points", "1", "1", "1", "--output-dir", str(out), "-q"]
    cases = [
        ["visualize", "--config", TINY_CONFIG, "--image", str(bomb), *base],
        ["quantize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--adaptive-qat-config",
         str(Path(__file__).parents[2] / "examples" / "quantization" / "w8a8.yaml"), "--calib-images", str(CHELSEA),
         str(bomb), "--output", str(tmp_path / "q.pt"), "-q"],
        ["visualize", "--config", TINY_CONFIG, "--image", str(CHELSEA), "--adaptive-qat-config", str(laughs), *base],
        ["visualize", "--config", str(model_laughs), "--image", str(CHELSEA), *base],
        # last (ru_maxrss is a peak): --max-pixels 10**12 lets the bomb past our check, so Pillow really tries to
        # decode it, and fails inside the address-space bound, still as one line
        ["visualize", "--config", TINY_CONFIG, "--image", str(bomb), "--max-pixels", str(10**12), *base],
    ]
    results, err = run_bounded(cases, extra_mb=512)
    for case, r in zip(cases, results):
        assert r["code"] == 2, (case, r, err)
        assert r["seconds"] < 5, (case, r)
    assert all(r["grew_kb"] < 64 << 10 for r in results[:-1]), results
    assert len(err) == len(cases), err
    assert "--image " + str(bomb) in err[0] and "30000x30000 = 900000000 pixels" in err[0]
    assert "--max-pixels 134217728" in err[0] and "pass --max-pixels N" in err[0]
    assert "--calib-images " + str(bomb) in err[1] and "900000000 pixels" in err[1]
    assert "--adaptive-qat-config" in err[2] and "YAML nodes" in err[2]
    assert "--config" in err[3] and "YAML nodes" in err[3]
    assert "--image " + str(bomb) in err[4] and "not enough memory to decode its 30000x30000 pixels" in err[4]
    assert all(line.startswith("sam2-layerwise ") and ": error: " in line for line in err)
    assert not out.exists() and not (tmp_path / "q.pt").exists()


def test_our_limit_governs_not_pillows(tmp_path, monkeypatch):
    """`max_pixels` is the guard, both ways: Pillow's global limit neither lets a large image through nor
    refuses one the flag allows, and it is left as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(CHELSEA).shape == (300, 451, 3)  # 135300 pixels > Pillow's 1000: our default allows it
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(InputError, match=r"^--calib-images .*: is 451x300 = 135300 pixels, more than "
                                         r"--max-pixels 135299"):
        load_image(CHELSEA, flag="--calib-images", max_pixels=135299)
    assert load_image(CHELSEA, max_pixels=135300).shape == (300, 451, 3)
    assert DEFAULT_MAX_PIXELS == 2**27


def test_truncated_and_corrupt_images_are_one_line(visualize, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray((np.arange(200 * 300 * 3) % 251).astype(np.uint8).reshape(200, 300, 3)).save(good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    code, err, out = visualize(image=truncated)
    one_error(code, err, "visualize", f"--image {truncated}:", "cannot decode image")
    assert not out.exists()

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(data[:40] + bytes(len(data) - 40))  # header fine, IDAT zeroed (bad CRC, bad zlib)
    code, err, out = visualize(image=corrupt)
    one_error(code, err, "visualize", f"--image {corrupt}:")
    assert not out.exists()

    header_only = png_bomb(tmp_path / "empty_idat.png", 40, 30)
    header_only.write_bytes(header_only.read_bytes()[:33])  # signature + IHDR, nothing else
    code, err, out = visualize(image=header_only)
    one_error(code, err, "visualize", f"--image {header_only}:")

    gif = tmp_path / "screen.gif"  # a GIF whose logical screen is 65535 x 65535
    gif.write_bytes(b"GIF89a" + (65535).to_bytes(2, "little") * 2 + b"\x00\x00\x00" + b",\x00\x00\x00\x00\x01\x00"
                    b"\x01\x00\x00\x02\x02D\x01\x00;")
    code, err, out = visualize(image=gif)
    one_error(code, err, "visualize", f"--image {gif}:")


def test_max_pixels_flag_values(visualize):
    code, err, out = visualize("--max-pixels", "0")
    one_error(code, err, "visualize", "--max-pixels 0: must be greater than 0")
    code, err, out = visualize("--max-pixels", "1000")
    one_error(code, err, "visualize", "451x300 = 135300 pixels", "--max-pixels 1000")
    assert not out.exists()


def test_yaml_is_read_by_a_safe_loader():
    from sam2_layerwise._yaml import LimitedLoader

    with pytest.raises(yaml.YAMLError):
        yaml.load("!!python/object/apply:os.system ['true']", Loader=LimitedLoader)  # noqa: S506
    assert tree(Path("/nonexistent")) == {}
