"""Each bad input: one line naming the flag and value, exit 2, no output directory left behind."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch

from sam2_layerwise.cli.main import main
from tests.conftest import CHELSEA, TINY_CONFIG


@pytest.fixture
def run_cli(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"

    def run(*extra, base=True):
        """visualize with the base flags, except those `extra` gives itself (so a test's --points replaces the
        base click rather than adding to it: repeated --points accumulate, other repeated flags are errors)."""
        args = ["visualize"]
        if base:
            for flag, *values in (("--config", TINY_CONFIG), ("--checkpoint", str(tiny_checkpoint)),
                                  ("--image", str(CHELSEA)), ("--points", "220", "150", "1")):
                if flag not in extra:
                    args += [flag, *values]
        args += ["--output-dir", str(out), *extra]
        code = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        return code, err, out

    return run


def _one_line(err, *needles):
    errors = [line for line in err if "error" in line]
    assert len(errors) == 1, err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.mark.parametrize("extra, needles", [
    (["--points", "220", "150"], ["--points", "220 150", "triples"]),
    (["--points", "220", "150", "2"], ["--points", "label 2"]),
    (["--points", "500", "150", "1"], ["--points", "outside the 451x300 image"]),
    (["--points", "10", "abc", "1"], ["--points", "'abc' is not a number"]),
    (["--box", "10", "10", "500", "100"], ["--box", "10 10 500 100", "outside"]),
    (["--box", "10", "10", "5"], ["--box", "4 numbers"]),
    (["--max-attn-queries", "0"], ["--max-attn-queries", "0"]),
    (["--max-tokens", "-3"], ["--max-tokens", "-3"]),
    (["--layers", "image_encoder_trunk_blocks_40:41"], ["--layers", "image_encoder_trunk_blocks_40"]),
    (["--query-points", "1", "2", "3"], ["--query-points", "pairs"]),
])
def test_bad_flag_values(run_cli, extra, needles):
    code, err, out = run_cli(*extra)
    assert code == 2
    _one_line(err, *needles)
    assert not out.exists()
    assert not list(out.parent.glob(".out.partial-*"))


def test_missing_image(run_cli, tmp_path, tiny_checkpoint):
    code, err, out = run_cli("--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint),
                             "--image", str(tmp_path / "nope.png"), "--points", "1", "1", "1", base=False)
    assert code == 2 and not out.exists()
    _one_line(err, "--image", "nope.png", "no such file")


def test_not_an_image(run_cli, tmp_path, tiny_checkpoint):
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a PNG")
    code, err, out = run_cli("--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint),
                             "--image", str(bad), "--points", "1", "1", "1", base=False)
    assert code == 2 and not out.exists()
    _one_line(err, "--image", "notes.png", "not an image")


def test_unknown_config_lists_close_names(run_cli, tiny_checkpoint):
    code, err, out = run_cli("--config", "configs/sam2.1/sam2.1_hiera_bb.yaml", "--checkpoint", str(tiny_checkpoint),
                             "--image", str(CHELSEA), "--points", "1", "1", "1", base=False)
    assert code == 2 and not out.exists()
    line = _one_line(err, "--config", "sam2.1_hiera_bb.yaml")
    assert "configs/sam2.1/sam2.1_hiera_b+.yaml" in line


def test_checkpoint_that_does_not_fit_names_keys(run_cli, tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)["model"]
    state.pop("image_encoder.trunk.pos_embed")
    state["extra.weight"] = torch.zeros(3)
    state["sam_mask_decoder.iou_token.weight"] = torch.zeros(2, 2)
    bad = tmp_path / "bad.pt"
    torch.save({"model": state}, bad)
    code, err, out = run_cli("--config", TINY_CONFIG, "--checkpoint", str(bad), "--image", str(CHELSEA),
                             "--points", "1", "1", "1", base=False)
    assert code == 2 and not out.exists()
    _one_line(err, "--checkpoint", "bad.pt", "image_encoder.trunk.pos_embed", "extra.weight",
              "sam_mask_decoder.iou_token.weight")


@pytest.mark.parametrize("payload, needle", [
    ({"state_dict": {}}, "not a SAM 2 checkpoint"),
    (argparse.Namespace(model={}), "weights_only=True"),
])
def test_checkpoint_that_is_not_sam2(run_cli, tmp_path, payload, needle):
    bad = tmp_path / "other.pt"
    torch.save(payload, bad)
    code, err, out = run_cli("--config", TINY_CONFIG, "--checkpoint", str(bad), "--image", str(CHELSEA),
                             "--points", "1", "1", "1", base=False)
    assert code == 2 and not out.exists()
    _one_line(err, "--checkpoint", "other.pt", needle)


def test_checkpoint_garbage_file(run_cli, tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"\x00\x01 not a zip or pickle")
    code, err, out = run_cli("--config", TINY_CONFIG, "--checkpoint", str(bad), "--image", str(CHELSEA),
                             "--points", "1", "1", "1", base=False)
    assert code == 2 and not out.exists()
    _one_line(err, "--checkpoint", "garbage.pt")


def test_unknown_model_id_and_no_weights(run_cli):
    code, err, out = run_cli("--config", TINY_CONFIG, "--checkpoint", "sam2.1_hiera_tinyy", "--image", str(CHELSEA),
                             "--points", "1", "1", "1", base=False)
    assert code == 2 and not out.exists()
    _one_line(err, "--checkpoint", "sam2.1_hiera_tinyy", "sam2.1_hiera_tiny")
    code, err, out = run_cli("--config", TINY_CONFIG, "--image", str(CHELSEA), "--points", "1", "1", "1", base=False)
    assert code == 2 and not out.exists()
    _one_line(err, "--checkpoint", "--random-init")


def test_output_dir_that_is_a_file(tmp_path, tiny_checkpoint, capsys):
    target = tmp_path / "taken"
    target.write_text("keep me")
    code = main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(CHELSEA),
                 "--points", "1", "1", "1", "--output-dir", str(target)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    _one_line(err, "--output-dir", "taken", "not a directory")
    assert target.read_text() == "keep me"


def test_offline_download_fails_clearly(tmp_path, monkeypatch):
    """An official model id that is not cached: the download fails (no network here) with a clear message."""
    from sam2_layerwise.errors import ModelError
    from sam2_layerwise.model import loading

    monkeypatch.setenv("SAM2_LAYERWISE_CACHE", str(tmp_path / "cache"))

    def no_network(url, dst, progress=True):
        raise __import__("urllib.error").error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(loading.torch.hub, "download_url_to_file", no_network)
    with pytest.raises(ModelError) as info:
        loading.resolve_checkpoint("facebook/sam2.1-hiera-tiny")
    msg = str(info.value)
    assert msg.startswith("--checkpoint facebook/sam2.1-hiera-tiny:") and "sam2.1_hiera_tiny.pt" in msg
    assert not (tmp_path / "cache" / "sam2.1_hiera_tiny.pt").exists()


def test_image_size_that_does_not_fit(run_cli):
    code, err, out = run_cli("--image-size", "100")
    assert code == 2 and not out.exists()
    _one_line(err, "--image-size 100", "multiple of 32")
