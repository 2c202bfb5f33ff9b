"""`render` reads only its own run: a summary is untrusted input. Malformed fields, tensor paths that leave the
run (absolute, `..`, a symbolic link), deleted or wrong tensor files, pickles that run code and a photograph
that is not an image all end as one line naming --run-dir (or --image), exit 2, and the run left byte for byte
as it was."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import CHELSEA, TINY_CONFIG
from tests.hardening.helpers import cli, one_error, tree

ENTRY = 0  # attention[0]: image_encoder_trunk_blocks_0, a windowed Hiera block


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, tiny_checkpoint) -> Path:
    from sam2_layerwise.cli.main import main

    out = tmp_path_factory.mktemp("untrusted") / "run"
    code = main(["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(CHELSEA),
                 "--points", "220", "150", "1", "--max-attn-queries", "2", "--save-attn", "--save-qkv",
                 "--output-dir", str(out), "-q"])
    assert code == 0
    return out


@pytest.fixture
def run_copy(saved_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(saved_run, dst, symlinks=True)
    return dst


def _summary(run: Path) -> dict:
    return json.loads((run / "layerwise_summary.json").read_text())


def _write(run: Path, summary: dict) -> None:
    (run / "layerwise_summary.json").write_text(json.dumps(summary))


def _render_refuses(capsys, run: Path, *needles, extra=(), flag="--run-dir") -> str:
    before = tree(run)
    code, err = cli(capsys, "render", "--run-dir", run, "-q", *extra)
    line = one_error(code, err, "render", *((f"--run-dir {run}:",) if flag == "--run-dir" else ()), *needles)
    assert tree(run) == before, "the run changed"
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".run.")], "staging left behind"
    return line


def test_the_untouched_copy_renders(capsys, run_copy):
    code, err = cli(capsys, "render", "--run-dir", run_copy, "-q")
    assert code == 0, err


@pytest.mark.parametrize("edit, needles", [
    (lambda s: s["frame"].pop("orig_w"), ["frame.orig_w is missing"]),
    (lambda s: s["frame"].update(orig_h="300"), ["frame.orig_h is str '300', expected a whole number"]),
    (lambda s: s["frame"].update(image_size=-128), ["frame.image_size is -128"]),
    (lambda s: s.update(frame=[451, 300, 128]), ["frame is list"]),
    (lambda s: s.update(attention={"a": 1}), ["attention is dict", "expected a list"]),
    (lambda s: s["attention"][ENTRY].pop("heads"), ["attention[0].heads is missing"]),
    (lambda s: s["attention"][ENTRY].update(heads=True), ["attention[0].heads is bool"]),
    (lambda s: s["attention"][ENTRY].update(layer_key=7), ["attention[0].layer_key is int"]),
    (lambda s: s["attention"][ENTRY].update(geometry="grid"), ["attention[0].geometry is str"]),
    (lambda s: s["attention"][ENTRY]["geometry"].update(window="8"), ["attention[0].geometry.window is str '8'"]),
    (lambda s: s["attention"][ENTRY]["geometry"].pop("q_stride"), ["attention[0].geometry.q_stride is missing"]),
    (lambda s: s["attention"][ENTRY]["geometry"].update(key_grid_hw=[32]), ["key_grid_hw has 1 items, expected 2"]),
    (lambda s: s["attention"][ENTRY].update(queries="click0"), ["attention[0].queries is str"]),
    (lambda s: s["attention"][ENTRY]["queries"][0].update(group=None), ["attention[0].queries[0].group is null"]),
    (lambda s: s["attention"][ENTRY]["queries"][0].update(key_block=[8, 0, 0, 8]),
     ["attention[0].queries[0].key_block [8, 0, 0, 8] is empty or reversed"]),
    (lambda s: s["attention"][ENTRY].update(files=None), ["attention[0].files is null"]),
    (lambda s: s["attention"][ENTRY]["files"].update(attn=["a.pt"]), ["attention[0].files.attn is list"]),
    (lambda s: s["attention"][ENTRY]["queries"][0].update(pixel_box=[0, 0, 1e20, 1e20]),
     ["attention[0].queries[0].pixel_box", "is not a box on the 451x300 image"]),
    (lambda s: s["attention"][ENTRY]["queries"][0].update(pixel_box=[50, 10, 40, 20]), ["is not a box on the"]),
    (lambda s: s["prompts"].update(points=[[1, 2]]), ["prompts.points[0] has 2 items, expected 3"]),
    (lambda s: s["prompts"].update(points=[[1, 2, 5]]), ["prompts.points[0] has label 5"]),
    (lambda s: s["prompts"].update(box=[1, 2, 3, float("nan")]), ["prompts.box[3]", "expected a finite number"]),
    (lambda s: s.update(query_locations=[{"label": "q", "x": 1}]), ["query_locations[0].y is missing"]),
    (lambda s: s.update(files=None), ["files is null"]),
    (lambda s: s.update(schema="someone-else/summary"), ["is not a sam2-layerwise summary"]),
    (lambda s: s.update(schema_version=999), ["layerwise_summary.json is schema version 999", "newer"]),
    (lambda s: s.update(schema_version="1"), ["layerwise_summary.json has no valid schema_version"]),
])
def test_malformed_summaries_are_one_line(capsys, run_copy, edit, needles):
    summary = _summary(run_copy)
    edit(summary)
    _write(run_copy, summary)
    _render_refuses(capsys, run_copy, *needles)


@pytest.mark.parametrize("text, needle", [
    ("{" * 1, "cannot read layerwise_summary.json"),
    ("[" * 100_000, "cannot read layerwise_summary.json"),  # deeper than json's recursion
    ("\xff\xfe", "cannot read layerwise_summary.json"),
    ("[]", "not a sam2-layerwise summary"),
])
def test_summaries_that_are_not_json_objects(capsys, run_copy, text, needle):
    (run_copy / "layerwise_summary.json").write_bytes(text.encode("latin-1"))
    _render_refuses(capsys, run_copy, needle)


@pytest.mark.parametrize("make_path, needle", [
    (lambda run, out: str(out / "outside.pt"), "absolute paths and '..' are refused"),
    (lambda run, out: "../outside.pt", "absolute paths and '..' are refused"),
    (lambda run, out: "attn_tensors/../../outside.pt", "absolute paths and '..' are refused"),
    (lambda run, out: "attn_tensors/link.pt", "resolves outside the run directory"),
    (lambda run, out: "attn_tensors/dirlink/outside.pt", "resolves outside the run directory"),
])
def test_tensor_paths_must_stay_inside_the_run(capsys, run_copy, tmp_path, make_path, needle):
    """A tensor file outside the run is never opened, even when it is a perfectly loadable one."""
    outside_dir = tmp_path / "elsewhere"
    outside_dir.mkdir()
    entry = _summary(run_copy)["attention"][ENTRY]
    shutil.copy(run_copy / entry["files"]["attn"], outside_dir / "outside.pt")
    shutil.copy(run_copy / entry["files"]["attn"], tmp_path / "outside.pt")
    os.symlink(outside_dir / "outside.pt", run_copy / "attn_tensors" / "link.pt")
    os.symlink(outside_dir, run_copy / "attn_tensors" / "dirlink")
    summary = _summary(run_copy)
    rel = make_path(run_copy, outside_dir)
    summary["attention"][ENTRY]["files"]["attn"] = rel
    _write(run_copy, summary)
    line = _render_refuses(capsys, run_copy, "attention[0].files.attn", needle)
    assert repr(rel) in line


def test_a_deleted_tensor_file_is_named(capsys, run_copy):
    rel = _summary(run_copy)["attention"][3]["files"]["qkv"]
    (run_copy / rel).unlink()
    _render_refuses(capsys, run_copy, "attention[3].files.qkv", rel, "no such file")


def test_names_too_long_for_the_file_system(capsys, run_copy):
    """A name over 255 bytes in the summary (tensor file, photograph): one line naming --run-dir, not an internal
    error from the file system's ENAMETOOLONG."""
    summary = _summary(run_copy)
    summary["attention"][3]["files"]["qkv"] = "a" * 300 + ".pt"
    _write(run_copy, summary)
    _render_refuses(capsys, run_copy, "attention[3].files.qkv", "no such file")
    summary = _summary(run_copy)
    summary["attention"][3]["files"]["qkv"] = None
    summary["image"]["path"] = "/" + "b" * 300 + ".png"
    _write(run_copy, summary)
    _render_refuses(capsys, run_copy, "the photograph this run names is missing", extra=("--render-attn-overlay",))


@pytest.mark.parametrize("payload, needle", [
    (lambda t: {**t, "probs": [[0.5, 0.5]]}, "'probs' is list"),
    (lambda t: {k: v for k, v in t.items() if k != "probs"}, "'probs' is null"),
    (lambda t: {**t, "probs": t["probs"][:, :, :10]}, "has 10 keys saved for a 8x8 key block"),
    (lambda t: {**t, "probs": t["probs"][0]}, "'probs' is a 2-d torch.float32 tensor"),
    (lambda t: {**t, "probs": t["probs"].to(torch.int64)}, "expected a 3-d floating-point tensor"),
    (lambda t: {**t, "probs": torch.zeros(2, 7, 64)}, "probs is [2, 7, 64], expected [1 queries, 1 heads, keys]"),
    (lambda t: {**t, "key_pooling": {"factor": 0}}, "key_pooling is dict"),
    (lambda t: [t["probs"]], "holds list"),
    (lambda t: {**t, "queries": [{**t["queries"][0], "pixel_box": [-1e20, 0, 1e20, 10]}]},
     "queries[0].pixel_box [-1e+20, 0.0, 1e+20, 10.0] is not a box on the 451x300 image"),
])
def test_attention_tensor_files_that_are_not_what_the_summary_says(capsys, run_copy, payload, needle):
    rel = _summary(run_copy)["attention"][ENTRY]["files"]["attn"]
    original = torch.load(run_copy / rel, weights_only=True)
    torch.save(payload(original), run_copy / rel)
    _render_refuses(capsys, run_copy, needle)


@pytest.mark.parametrize("payload, needle", [
    (lambda t: {**t, "groups": [3]}, "query 0 (click0) is group 9 index 7, not among the saved groups [3]"),
    (lambda t: {**t, "groups": [99]}, "saved group 99 does not fit the geometry (16 groups of 64 keys"),
    (lambda t: {**t, "groups": "9,3"}, "groups is str"),
    (lambda t: {**t, "scale": float("inf")}, "scale is float inf"),
    (lambda t: {**t, "k": t["k"][:, :, :5]}, "k [1, 1, 5, 16], v [1, 1, 64, 16] do not fit 1 groups of 1 heads"),
    (lambda t: {**t, "q": t["q"][:, :, :3]}, "query 0 (click0) is group 9 index 7, not among the saved groups [9] of 3"),
    (lambda t: {**t, "groups": [9, 3]}, "do not fit 2 groups"),
])
def test_qkv_files_that_do_not_fit(capsys, run_copy, payload, needle):
    summary = _summary(run_copy)
    rel = summary["attention"][ENTRY]["files"]["qkv"]
    summary["attention"][ENTRY]["files"].pop("attn")  # draw from q/k only
    _write(run_copy, summary)
    torch.save(payload(torch.load(run_copy / rel, weights_only=True)), run_copy / rel)
    _render_refuses(capsys, run_copy, needle)


def test_a_tensor_file_that_pickles_code_is_never_run(capsys, run_copy, tmp_path):
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    rel = _summary(run_copy)["attention"][ENTRY]["files"]["attn"]
    torch.save({"probs": torch.zeros(1), "x": RunsCode()}, run_copy / rel)
    _render_refuses(capsys, run_copy, "attention[0].files.attn", "weights_only=True")
    assert not marker.exists()


def test_the_photograph_may_be_outside_but_must_be_an_image(capsys, run_copy, tmp_path):
    """The summary's photograph is the user's own file: outside the run is fine, a non-image is one line."""
    photo = tmp_path / "photo.png"
    shutil.copy(CHELSEA, photo)
    summary = _summary(run_copy)
    summary["image"]["path"] = str(photo)
    _write(run_copy, summary)
    code, err = cli(capsys, "render", "--run-dir", run_copy, "--render-attn-overlay", "-q")
    assert code == 0, err
    photo.write_text("not an image")
    before = tree(run_copy)
    code, err = cli(capsys, "render", "--run-dir", run_copy, "--render-attn-overlay", "-q")
    one_error(code, err, "render", f"--image {photo}:", "not an image")
    assert tree(run_copy) == before
    code, err = cli(capsys, "render", "--run-dir", run_copy, "--render-attn-overlay", "--max-pixels", "100", "-q",
                    "--image", CHELSEA)
    one_error(code, err, "render", f"--image {CHELSEA}:", "more than --max-pixels 100")
    assert tree(run_copy) == before


def test_queries_in_the_tensor_file_are_checked_too(capsys, run_copy):
    rel = _summary(run_copy)["attention"][ENTRY]["files"]["attn"]
    data = torch.load(run_copy / rel, weights_only=True)
    data["queries"][0]["index"] = "7"
    torch.save(data, run_copy / rel)
    _render_refuses(capsys, run_copy, "queries[0].index is str")


def test_query_points_need_saved_qkv(capsys, run_copy):
    """--query-points are recomputed from saved q/k: a run that saved attention rows only refuses them (it drew
    without them before, silently)."""
    summary = _summary(run_copy)
    for entry in summary["attention"]:
        (entry.get("files") or {}).pop("qkv", None)
    _write(run_copy, summary)
    line = _render_refuses(capsys, run_copy, "--query-points 100 100:", "saved attention rows only",
                           extra=("--query-points", "100", "100"), flag="--query-points")
    assert "--save-qkv" in line
