"""Every user mistake: exit 2, one line naming the flag and value, nothing written. Devices the machine cannot
use, seeds and image sizes out of range, key templates that reach into objects, checkpoints that hold
non-tensors or pickled code, a corrupt cached download, repeated flags, and a quantized checkpoint run
without its config (runs as a float model, with a note)."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import warnings
from pathlib import Path

import pytest
import torch

from sam2_layerwise.cli.main import build_parser
from sam2_layerwise.errors import condense
from sam2_layerwise.model import build_model
from tests.conftest import CHELSEA, TINY_CONFIG
from tests.hardening.helpers import cli, one_error, tree

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "quantization"


@pytest.fixture
def visualize(capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"

    def run(*extra, checkpoint=None, config=TINY_CONFIG):
        code, err = cli(capsys, "visualize", "--config", config, "--checkpoint", checkpoint or tiny_checkpoint,
                        "--image", CHELSEA, "--points", "10", "10", "1", "--output-dir", out, "-q", *extra)
        return code, err, out

    return run


# -- --device -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "cuda:99", "vulkan", "cuda:x", "gpu", "", "cpu:0"])
def test_devices_this_machine_cannot_use(visualize, device):
    code, err, out = visualize("--device", device)
    one_error(code, err, "visualize", f"--device {device}:")
    assert not out.exists()


def test_device_names_what_the_machine_has():
    from sam2_layerwise.errors import ModelError
    from sam2_layerwise.model.loading import pick_device

    assert pick_device("cpu").type == "cpu"
    for name in ("meta", "xpu", "vulkan", "cuda:99", "mps" if not torch.backends.mps.is_available() else "cuda:99"):
        with pytest.raises(ModelError, match=rf"^--device {name}: .*this machine has: auto, cpu"):
            pick_device(name)


# -- --seed, --image-size ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed, reason", [("-1", "must be 0 or more"), (str(2**63), "must be below 2**63"),
                                          ("1.5", "not a whole number"), ("9" * 5000, "must be below 2**63"),
                                          ("seven", "not a whole number")])
def test_seed_out_of_range(capsys, tmp_path, tiny_checkpoint, seed, reason):
    out = tmp_path / "o.pt"
    commands = [
        ["visualize", "--config", TINY_CONFIG, "--random-init", "--image", CHELSEA, "--points", "1", "1", "1",
         "--output-dir", tmp_path / "run"],
        ["init-checkpoint", "--config", TINY_CONFIG, "--output", out],
        ["quantize", "--config", TINY_CONFIG, "--checkpoint", tiny_checkpoint, "--adaptive-qat-config",
         EXAMPLES / "w8a8.yaml", "--calib-images", CHELSEA, "--output", out],
    ]
    for argv in commands:
        code, err = cli(capsys, *argv, "--seed", seed)
        one_error(code, err, argv[0], f"--seed {seed[:200]}", reason)
    assert tree(tmp_path) == {}


def test_output_file_never_replaces_anything_but_a_checkpoint(capsys, tmp_path, tiny_checkpoint):
    """--output of quantize and init-checkpoint: a photograph, a config or the command's own input checkpoint
    is refused (exit 2, one line) and stays byte-identical; an existing checkpoint is replaced."""
    import shutil

    photo, cfg, ckpt = tmp_path / "photo.png", tmp_path / "model.yaml", tmp_path / "float.pt"
    shutil.copy(CHELSEA, photo)
    shutil.copy(TINY_CONFIG, cfg)
    shutil.copy(tiny_checkpoint, ckpt)
    (tmp_path / "notes.pt").write_text("my notes\n")
    before = tree(tmp_path)

    def quantize(output):
        return cli(capsys, "quantize", "--config", TINY_CONFIG, "--checkpoint", ckpt, "--adaptive-qat-config",
                   EXAMPLES / "w8a8.yaml", "--calib-images", photo, "--output", output, "-q")

    for output, needle in ((photo, "is also --calib-images"), (ckpt, "is also --checkpoint"),
                           (tmp_path / "notes.pt", "exists and is not a checkpoint")):
        code, err = quantize(output)
        one_error(code, err, "quantize", f"--output {output}: {needle}")
    for output, needle in ((cfg, "is also --config"), (photo, "exists and is not a checkpoint")):
        code, err = cli(capsys, "init-checkpoint", "--config", cfg, "--output", output, "-q")
        one_error(code, err, "init-checkpoint", f"--output {output}: {needle}")
    assert tree(tmp_path) == before
    # a checkpoint (this tool's, or any torch archive) may be replaced
    out = tmp_path / "q.pt"
    shutil.copy(ckpt, out)
    assert quantize(out)[0] == 0 and tree(tmp_path)["q.pt"] != before["float.pt"]
    assert cli(capsys, "init-checkpoint", "--config", TINY_CONFIG, "--output", out, "--seed", "3", "-q")[0] == 0


@pytest.mark.parametrize("size, reason", [(str(10**9), "between 32 and 4096"), ("4128", "between 32 and 4096"),
                                          ("100", "multiple of 32"), ("0", "greater than 0"), ("-32", "greater than 0")])
def test_absurd_image_size_refused_before_the_model_is_built(visualize, monkeypatch, size, reason):
    import hydra.utils

    def never(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(hydra.utils, "instantiate", never)
    code, err, out = visualize("--image-size", size)
    one_error(code, err, "visualize", f"--image-size {size}:", reason)
    assert not out.exists()


def test_image_size_that_the_windows_do_not_tile_is_caught_from_the_config(tmp_path, monkeypatch):
    """A config whose first Hiera window is 7 tokens (28 px) at image_size 1024 (lcm(32, 28) = 224): refused
    from the config, before instantiation."""
    import hydra.utils

    from sam2_layerwise.errors import ModelError

    text = Path(TINY_CONFIG).read_text()
    assert "window_spec" in text
    monkeypatch.setattr(hydra.utils, "instantiate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("built")))
    path = tmp_path / "w7.yaml"
    path.write_text(re.sub(r"window_spec: \[\s*\d+", "window_spec: [7", text))
    with pytest.raises(ModelError, match=r"^--image-size 1024: image_size must be a multiple of 224"):
        build_model(str(path), random_init=True, device="cpu", overrides={"model.image_size": 1024})


# -- quantization key templates -------------------------------------------------------------------------------
@pytest.mark.parametrize("template, shown", [
    ("{module}.{role.__class__}.{param}", "{role.__class__}"),
    ("{module!r}.{role}.{param}", "{module!r}"),
    ("{0}{module}.{role}.{param}", "{0}"),
    ("{module:>99999999}.{role}.{param}", "{module:>99999999}"),
    ("{module[0]}.{role}.{param}", "{module[0]}"),
    ("{module}.{role}.{param", "not a valid template"),
])
def test_key_templates_are_plain_fields_only(visualize, tmp_path, template, shown):
    cfg = tmp_path / "q.yaml"
    cfg.write_text(f"defaults: {{weight: {{bits: 8}}}}\ncheckpoint: {{location: model, key: '{template}'}}\n")
    code, err, out = visualize("--adaptive-qat-config", cfg)
    one_error(code, err, "visualize", f"--adaptive-qat-config {cfg}:", "checkpoint.key", shown)
    assert not out.exists()


# -- checkpoints ----------------------------------------------------------------------------------------------
class Payload:
    """A pickled object: torch.load(weights_only=True) must refuse to import its class."""

    def __init__(self):
        self.x = 1


class RunsCode:
    """Unpickling this runs os.system: the classic malicious checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _state(tiny_checkpoint) -> dict:
    return torch.load(tiny_checkpoint, weights_only=True)["model"]


@pytest.mark.parametrize("bad, needle", [
    (3, "is a int, not a tensor"),
    ("weights", "is a str, not a tensor"),
    ([1.0, 2.0], "is a list, not a tensor"),
    (torch.eye(3).to_sparse(), "is a sparse_coo tensor"),
    (torch.empty(3, device="meta"), "is a meta tensor"),
])
def test_state_dict_values_that_are_not_dense_tensors(visualize, tmp_path, tiny_checkpoint, bad, needle):
    state = _state(tiny_checkpoint)
    key = "image_encoder.trunk.pos_embed"
    state[key] = bad
    path = tmp_path / "odd.pt"
    torch.save({"model": state}, path)
    code, err, out = visualize(checkpoint=path)
    one_error(code, err, "visualize", f"--checkpoint {path}:", f"'model' entry {key} {needle}")
    assert not out.exists()


def test_quantized_tensor_in_a_state_dict(visualize, tmp_path, tiny_checkpoint):
    state = _state(tiny_checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates quantized tensors; checkpoints holding them still exist
        state["sam_mask_decoder.iou_token.weight"] = torch.quantize_per_tensor(
            state["sam_mask_decoder.iou_token.weight"], 0.1, 0, torch.qint8)
    path = tmp_path / "q.pt"
    torch.save({"model": state}, path)
    code, err, out = visualize(checkpoint=path)
    one_error(code, err, "visualize", f"--checkpoint {path}:", "sam_mask_decoder.iou_token.weight is a quantized tensor")


def test_integer_values_for_float_weights(visualize, tmp_path, tiny_checkpoint):
    state = _state(tiny_checkpoint)
    state["sam_mask_decoder.iou_token.weight"] = state["sam_mask_decoder.iou_token.weight"].to(torch.int64)
    path = tmp_path / "ints.pt"
    torch.save({"model": state}, path)
    code, err, out = visualize(checkpoint=path)
    one_error(code, err, "visualize", "sam_mask_decoder.iou_token.weight holds int64 values")


@pytest.mark.parametrize("payload, needle", [
    (lambda m: {"model": {}, "extra": Payload()}, "GLOBAL tests.hardening.test_user_mistakes.Payload"),
    (lambda m: {"model": {}, "extra": RunsCode(m)}, "GLOBAL posix.system"),
    (lambda m: argparse.Namespace(model={}), "GLOBAL argparse.Namespace"),
])
def test_checkpoint_that_pickles_code_says_which_global(visualize, tmp_path, payload, needle):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save(payload(marker), path)
    code, err, out = visualize(checkpoint=path)
    one_error(code, err, "visualize", f"--checkpoint {path}:",
              f"contains code or objects that cannot be loaded safely (weights_only=True refused {needle})")
    assert not marker.exists() and not out.exists()


def test_corrupt_cached_download_says_which_file_to_delete(visualize, tmp_path, monkeypatch, tiny_checkpoint):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("SAM2_LAYERWISE_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    cached = cache / "sam2.1_hiera_tiny.pt"
    data = Path(tiny_checkpoint).read_bytes()
    cached.write_bytes(data[: len(data) // 3])  # an interrupted download that was renamed anyway
    code, err, out = visualize(checkpoint="sam2.1_hiera_tiny")
    one_error(code, err, "visualize", "--checkpoint", f"delete {cached} and run again to download it afresh")
    cached.write_bytes(b"<html>502 Bad Gateway</html>")  # a proxy's error page saved as the checkpoint
    code, err, out = visualize(checkpoint="sam2.1_hiera_tiny")
    one_error(code, err, "visualize", f"delete {cached}")
    assert not out.exists()


def test_a_quantized_checkpoint_without_its_config_runs_as_float(tmp_path, tiny_checkpoint):
    """The checkpoint's `model` entry is SAM 2's float state dict: it runs, and one warning says it ran as a
    float model and that --adaptive-qat-config would quantize it."""
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt.update({"format": "sam2-layerwise/quant-checkpoint", "format_version": 1,
                 "quantization": {"config": {}, "quantizers": {"a:weight": {"bits": 8}, "b:input": {"bits": 8}}}})
    path = tmp_path / "w8.pt"
    torch.save(ckpt, path)
    logger = logging.getLogger("sam2_layerwise.model.loading")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        loaded = build_model(TINY_CONFIG, str(path), device="cpu")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 1, lines
    assert "carries quantization parameters (2 quantizers)" in lines[0] and "FLOAT model" in lines[0]
    assert "--adaptive-qat-config" in lines[0] and str(path) in lines[0]
    ref = build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu").model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.model.state_dict().items())


def test_a_refused_pickle_message_is_condensed_not_cut():
    try:
        buf = io.BytesIO()
        torch.save(argparse.Namespace(a=1), buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        text = condense(exc)
    assert "\n" not in text and "\x1b" not in text and len(text) <= 244
    assert text.endswith(".") or text.endswith("...")
    assert condense(ValueError("")) == "ValueError"
    assert condense("a\n\tb  c") == "a b c"
    long = "First sentence here. Then " + "word " * 100
    assert condense(long, 60) == "First sentence here."


# -- repeated flags -------------------------------------------------------------------------------------------
def test_repeated_list_flags_accumulate():
    parser = build_parser()
    args = parser.parse_args(["visualize", "--image", "x.png", "--points", "1", "2", "1", "--points", "3", "4", "0",
                              "--query-points", "5", "6", "--query-points", "7", "8"])
    assert args.points == ["1", "2", "1", "3", "4", "0"] and args.query_points == ["5", "6", "7", "8"]
    args = parser.parse_args(["render", "--run-dir", "r", "--query-points", "1", "2", "--query-points", "3", "4"])
    assert args.query_points == ["1", "2", "3", "4"]
    args = parser.parse_args(["quantize", "--checkpoint", "c.pt", "--adaptive-qat-config", "q.yaml", "--output", "o.pt",
                              "--calib-images", "a.png", "b/", "--calib-images", "c.png"])
    assert args.calib_images == ["a.png", "b/", "c.png"]
    args = parser.parse_args(["visualize", "--image", "x.png", "--points", "1", "2", "1", "--device", "cpu",
                              "--device", "cpu"])  # the same value twice drops nothing
    assert args.device == "cpu"


@pytest.mark.parametrize("argv, line", [
    (["--box", "1", "1", "9", "9", "--box", "2", "2", "8", "8"],
     "--box 2 2 8 8: given twice (first --box 1 1 9 9); give one --box"),
    (["--image", "other.png"], "--image other.png: given twice"),
    (["--max-attn-queries", "2", "--max-attn-queries", "3"], "--max-attn-queries 3: given twice"),
    (["--output-dir", "elsewhere"], "--output-dir elsewhere: given twice"),
])
def test_single_value_flags_given_twice_are_errors(visualize, argv, line):
    code, err, out = visualize(*argv)
    one_error(code, err, "visualize", line)
    assert not out.exists() and not Path("elsewhere").exists()


def test_repeated_points_reach_the_prompts(capsys, tmp_path, tiny_checkpoint):
    """Two --points flags are two clicks (the run's summary records both)."""
    import json

    out = tmp_path / "run"
    code, err = cli(capsys, "visualize", "--config", TINY_CONFIG, "--checkpoint", tiny_checkpoint, "--image", CHELSEA,
                    "--points", "100", "100", "1", "--points", "300", "200", "0", "--layers", "sam_mask_decoder*",
                    "--query-stats", "selected", "--output-dir", out, "-q")
    assert code == 0, err
    summary = json.loads((out / "layerwise_summary.json").read_text())
    assert summary["prompts"]["points"] == [[100.0, 100.0, 1], [300.0, 200.0, 0]]


# -- paths ----------------------------------------------------------------------------------------------------
LONG = "a" * 300  # one name over the 255 bytes a Linux file system takes: ENAMETOOLONG, not "no such file"


@pytest.mark.parametrize("command, flag", [
    ("visualize", "--image"), ("visualize", "--checkpoint"), ("visualize", "--config"), ("visualize", "--output-dir"),
    ("render", "--run-dir"), ("generate", "--run_dir"), ("init-checkpoint", "--output"),
])
def test_a_name_longer_than_the_file_system_takes(capsys, tmp_path, tiny_checkpoint, command, flag):
    """Every path flag: exit 2 naming the flag (it was an internal error, exit 1), the earlier run unchanged."""
    out = tmp_path / "out"
    run = ["--config", TINY_CONFIG, "--checkpoint", tiny_checkpoint, "--image", CHELSEA, "--points", "10", "10", "1",
           "--output-dir", out]
    assert cli(capsys, "visualize", *run, "-q")[0] == 0  # the earlier run
    argv = [str(a) for a in {"visualize": run, "render": ["--run-dir", out], "generate": ["--run_dir", out],
                             "init-checkpoint": ["--config", TINY_CONFIG, "--output", tmp_path / "c.pt"]}[command]]
    argv[argv.index(flag) + 1] = str(tmp_path / f"{LONG}.x")
    before = tree(tmp_path)
    code, err = cli(capsys, command, *argv, "-q")
    one_error(code, err, command, f"{flag} {tmp_path}", "longer than the file system allows")
    assert tree(tmp_path) == before


def test_a_tilde_in_image_is_the_home_folder(capsys, tmp_path, tiny_checkpoint, monkeypatch):
    """--image ~/photo.png reads as every other path flag does (it was "no such file" when quoted)."""
    import shutil

    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copy(CHELSEA, tmp_path / "photo.png")
    out = tmp_path / "out"
    code, err = cli(capsys, "visualize", "--config", TINY_CONFIG, "--checkpoint", tiny_checkpoint, "--image",
                    "~/photo.png", "--points", "10", "10", "1", "--output-dir", out, "--save-attn", "-q")
    assert code == 0, err
    summary = json.loads((out / "layerwise_summary.json").read_text())
    assert summary["image"]["path"] == str(tmp_path / "photo.png")
    code, err = cli(capsys, "render", "--run-dir", out, "--image", "~/photo.png", "--render-attn-overlay", "-q")
    assert code == 0, err
