"""`visualize --video` end to end on the tiny model: a frames folder and an mp4, frame selection, the run's files
and summary, and every bad input as one line naming the flag and value, exit 2, nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from sam2_layerwise.cli.main import main
from sam2_layerwise.store.atomic import safe_load
from tests.conftest import CHELSEA, COFFEE, TINY_CONFIG
from tests.video.conftest import H, NAMES, W, crops, write_frames


@pytest.fixture
def run_cli(tmp_path, tiny_checkpoint, capsys):
    out = tmp_path / "out"

    def run(*extra, video=None):
        args = ["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--device", "cpu",
                "--output-dir", str(out)]
        if video is not None:
            args += ["--video", str(video)]
        if "--points" not in extra and "--box" not in extra:
            args += ["--points", "230", "150", "1"]
        code = main([*args, *extra])
        err = capsys.readouterr().err.strip().splitlines()
        return code, err, out

    return run


def _summary(out):
    return json.loads((out / "layerwise_summary.json").read_text())


def test_frames_folder_run(run_cli, frames_dir):
    # pictures of the memory layers and one decoder layer only: drawing every layer's maps takes most of the time
    code, err, out = run_cli("--prompt-frame", "1", "--query-points", "60", "200", "--save-attn",
                             "--render-attn-overlay", "--topk-attn", "5", "--layers",
                             "memory_attention*,sam_mask_decoder_transformer_layers_0_self_attn", video=frames_dir)
    assert code == 0, err
    s = _summary(out)
    assert s["mode"] == "video" and s["video"]["kind"] == "directory" and s["video"]["frames"] == 5
    fr = s["frames"]
    assert fr["prompt_frame"] == 1 and fr["processing_order"] == [1, 2, 3, 4, 0]
    assert [f["name"] for f in fr["list"]] == [f"{n}.png" for n in NAMES]
    assert s["fidelity"]["ok"] and s["fidelity"]["max_module_abs_err"] <= 1e-4
    mem = [e for e in s["attention"] if e["kind"] == "memory_cross"]
    assert sorted({e["frame"] for e in mem}) == [0, 2, 3, 4]
    assert all("frame" in e for e in s["attention"]) and all("frame" in b for b in s["blocks"])
    for f in fr["list"]:
        assert f["tracked"] and (f["memory"] is None) == (f["index"] == 1)
        assert f"prediction_images/frame_{f['index']:04d}__overlay.png" in f["files"]["prediction_images"]
        if f["index"] != 1:
            assert f["memory"]["verified"] and 1 in f["memory"]["conditioning_frames"]
            assert (out / f["files"]["memory_chart"][0]).is_file()
    assert (out / "memory_charts" / "mass_by_age.png").is_file()
    pred = safe_load(out / "predictions.pt")
    assert pred["masks"].shape == (5, H, W) and pred["masks"].dtype == torch.bool
    assert pred["frame_indices"].tolist() == [0, 1, 2, 3, 4] and pred["low_res_logits"].shape[0] == 5
    # a memory record on frame 3: its tensors, and one overlay per memory frame, drawn on that frame
    e = next(e for e in mem if e["frame"] == 3 and e["layer_key"].endswith("layers_0_cross_attn_image"))
    attn = safe_load(out / e["files"]["attn"])
    segs = e["geometry"]["key_segments"]
    assert attn["probs"].shape[-1] == segs[-1]["stop"] and attn["segment_mass"].shape[-1] == len(segs)
    overlays = e["files"]["attn_overlays"]
    for s_ in segs:
        if s_["kind"] == "memory":
            assert any(f"__click0__mem_f{s_['frame']:04d}__mean" in p for p in overlays), (s_, overlays)
    assert e["files"]["memory_panels"] and all((out / p).is_file() for p in e["files"]["memory_panels"] + overlays)
    assert e["memory_mass"]["all_queries"]["pointer_share"] > 0
    assert e["memory_mass"]["all_queries"]["queries"] == "all"  # default: every query, tile by tile
    assert e["memory_mass"]["all_queries"]["sampled_queries"] is None
    assert attn["segment_mass"].shape[2] == 64  # the 8x8 query tokens
    assert s["capture_options"]["memory_mass"] == "all" and not s["capture_options"]["all_query_stats"]
    assert (out / "attn_topk" / "topk_memory_cross.txt").is_file()


def test_video_file_and_frame_selection(run_cli, video_mp4):
    code, err, out = run_cli("--frames", "1:4", "--frame-stride", "2", "--prompt-frame", "3", video=video_mp4)
    assert code == 0, err
    s = _summary(out)
    assert s["video"]["kind"] == "file" and s["video"]["codec"] == "mpeg4"
    assert [f["source_index"] for f in s["frames"]["list"]] == [1, 3]
    assert s["frames"]["prompt_frame"] == 1 and s["frames"]["prompt_source_index"] == 3
    assert [f["name"] for f in s["frames"]["list"]] == ["frame 1", "frame 3"]
    assert {e["frame"] for e in s["attention"] if e["kind"] == "memory_cross"} == {0}
    code, err, out2 = run_cli("--max-frames", "2", "--memory-mass", "sampled", video=video_mp4)
    assert code == 0, err
    s2 = _summary(out2)
    assert s2["frames"]["count"] == 2 and s2["capture_options"]["memory_mass"] == "sampled"
    e = next(e for e in s2["attention"] if e["kind"] == "memory_cross")
    assert e["memory_mass"]["all_queries"]["queries"] == "sampled"  # a 4x4 grid of the 8x8 tokens
    assert e["memory_mass"]["all_queries"]["sampled_queries"] == [18, 22, 50, 54]


def _bad_frames(tmp_path, what):
    d = tmp_path / what
    frames = crops(4)
    if what == "empty":
        d.mkdir()
    elif what == "no_images":
        d.mkdir()
        (d / "notes.txt").write_text("not a frame")
        (d / "clip.json").write_text("{}")
    elif what == "unreadable":
        write_frames(d, frames)
        (d / "shot_charlie.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"broken" * 10)
    elif what == "truncated":
        write_frames(d, frames, suffix=".jpg")
        data = (d / "shot_bravo.jpg").read_bytes()
        (d / "shot_bravo.jpg").write_bytes(data[:len(data) // 3])
    elif what == "sizes":
        write_frames(d, frames[:3] + [frames[3][:, :400]])
    return d


@pytest.mark.parametrize("what, needles", [
    ("empty", ["--video", "empty", "empty directory"]),
    ("no_images", ["--video", "no_images", "no JPEG or PNG frames", "notes.txt"]),
    ("unreadable", ["--video", "unreadable", "frame 2 (shot_charlie.png)"]),
    ("truncated", ["--video", "truncated", "frame 1 (shot_bravo.jpg)"]),
    ("sizes", ["--video", "sizes", "differ in size", "shot_delta.png", "400x288"]),
])
def test_bad_frame_folders(run_cli, tmp_path, what, needles):
    code, err, out = run_cli(video=_bad_frames(tmp_path, what))
    assert code == 2
    _one_line(err, *needles)
    assert not out.exists()


def test_bad_video_inputs(run_cli, tmp_path, frames_dir, video_mp4):
    text = tmp_path / "movie.mp4"
    text.write_text("this is not a video\n" * 20)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(video_mp4.read_bytes()[:300])
    cases = [
        (dict(video=text), [], ["--video", "movie.mp4", "not a video file"]),
        (dict(video=CHELSEA), [], ["--video", "chelsea.png"]),
        (dict(video=cut), [], ["--video", "cut.mp4"]),
        (dict(video=tmp_path / "missing"), [], ["--video", "missing", "no such file"]),
        (dict(video=frames_dir), ["--prompt-frame", "5"], ["--prompt-frame 5", "out of range", "5 frames"]),
        (dict(video=frames_dir), ["--prompt-frame", "2", "--frames", "3:4"], ["--prompt-frame 2", "not among"]),
        (dict(video=frames_dir), ["--frames", "7:9"], ["--frames", "7"]),
        (dict(video=frames_dir), ["--frames", "2:9"], ["--frames 2:9", "ends at frame 9", "has 5 frames"]),
        (dict(video=video_mp4), ["--frames", "2:9"], ["--frames 2:9", "ends at frame 9", "has 5 frames"]),
        (dict(video=video_mp4), ["--frames", "7:"], ["--frames 7:", "starts at frame 7", "has 5 frames"]),
        (dict(video=frames_dir), ["--frames", "4:2"], ["--frames 4:2", "backwards"]),
        (dict(video=frames_dir), ["--frame-stride", "0"], ["--frame-stride 0"]),
        (dict(video=frames_dir), ["--image", str(COFFEE)], ["--video", str(frames_dir), "--image"]),
        (dict(video=frames_dir), ["--points", "500", "10", "1"], ["--points", "outside the 448x288"]),
        (dict(video=frames_dir), ["--single-mask"], ["--single-mask", "not available with --video"]),
        (dict(), ["--prompt-frame", "1", "--image", str(COFFEE)], ["--prompt-frame 1", "only applies with --video"]),
        (dict(), [], ["--image", "--video"]),
    ]
    for kw, extra, needles in cases:
        code, err, out = run_cli(*extra, **kw)
        assert code == 2, (extra, err)
        _one_line(err, *needles)
        assert not out.exists(), extra


def test_failure_leaves_a_previous_run(run_cli, frames_dir, tmp_path):
    code, err, out = run_cli("--max-frames", "2", video=frames_dir)
    assert code == 0, err
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, err, _ = run_cli("--prompt-frame", "9", video=frames_dir)
    assert code == 2 and sorted(p.relative_to(out) for p in out.rglob("*")) == before


def _one_line(err, *needles):
    errors = [line for line in err if "error" in line]
    assert len(errors) == 1, err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]
