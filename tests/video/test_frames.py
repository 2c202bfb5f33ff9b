"""Video input without a model: natural order, frame selection, what a folder may hold, video files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sam2_layerwise.errors import InputError
from sam2_layerwise.frames import FrameSelection, natural_key, open_video, parse_frame_range, resolve_prompt_frame
from tests.video.conftest import H, W, crops, write_frames, write_mp4


def test_natural_order():
    names = ["f10.png", "f2.png", "F1.png", "f2b.png", "f02.jpg", "a.png"]
    assert sorted(names, key=natural_key) == ["a.png", "F1.png", "f02.jpg", "f2.png", "f2b.png", "f10.png"]


@pytest.mark.parametrize("text, want", [("2:5", (2, 5)), ("3:", (3, None)), (":4", (0, 4)), ("7", (7, 7)),
                                        (" 1 : 2 ", (1, 2)), (None, (0, None))])
def test_frame_ranges(text, want):
    assert parse_frame_range(text) == want


@pytest.mark.parametrize("text", ["", ":", "a:b", "5:2", "-1:3", "1:2:3"])
def test_bad_frame_ranges(text):
    with pytest.raises(InputError, match="--frames"):
        parse_frame_range(text)


def test_folder_holds_more_than_frames(tmp_path):
    d = write_frames(tmp_path / "f", crops(3), names=["00010", "00002", "00001"], suffix=".jpg")
    (d / ".hidden.png").write_bytes(b"not read")
    (d / "notes.txt").write_text("ignored")
    (d / "sub").mkdir()
    grey = Image.fromarray(crops(1)[0]).convert("L")
    grey.save(d / "00003.PNG")  # grey and an upper-case suffix: read as RGB
    with open_video(d) as src:
        assert [f.name for f in src.frames] == ["00001.jpg", "00002.jpg", "00003.PNG", "00010.jpg"]
        assert src.image(2).shape == (H, W, 3)
    with open_video(d, FrameSelection(start=1, stop=3, stride=2)) as src:
        assert [(f.index, f.source_index, f.name) for f in src.frames] == [(0, 1, "00002.jpg"), (1, 3, "00010.jpg")]
        assert resolve_prompt_frame(src, 3) == 1
        with pytest.raises(InputError, match="not among the selected"):
            resolve_prompt_frame(src, 2)


def test_video_file_selection(video_mp4):
    with open_video(video_mp4, FrameSelection(start=1, stride=2)) as src:
        assert [f.source_index for f in src.frames] == [1, 3] and src.total == 5
        frame = src.image(0)
        assert frame.shape == (H, W, 3) and frame.dtype == np.uint8
        # lossy, but the same picture as the crop it was made from
        assert np.abs(frame.astype(float) - crops()[1].astype(float)).mean() < 12
        cache = src._cache_dir
    assert not cache.exists()  # the decoded frames are removed on close
    with open_video(video_mp4, FrameSelection(max_frames=2)) as src:
        assert len(src) == 2


@pytest.mark.parametrize("spec, stride, most, want", [
    ("1:4", 1, None, [1, 2, 3, 4]), ("0:", 2, None, [0, 2, 4]), ("1:9", 1, 2, [1, 2]), ("0:9", 3, 1, [0]),
    ("1:9", 1, None, "ends at frame 9"), ("0:5", 2, None, "ends at frame 5"), ("4:9", 1, 3, "ends at frame 9"),
    ("5:", 1, None, "starts at frame 5"), ("6", 1, None, "starts at frame 6")])
def test_selection_inside_the_input(tmp_path, spec, stride, most, want):
    """`--frames A:B` names source frames: B past the last one is an error, unless --max-frames is reached
    first (the same for a folder and a video file)."""
    d = write_frames(tmp_path / "f", crops(5))
    mp4 = write_mp4(tmp_path / "clip.mp4", crops(5))
    start, stop = parse_frame_range(spec)
    sel = FrameSelection(start=start, stop=stop, stride=stride, max_frames=most)
    for src in (d, mp4):
        if isinstance(want, str):
            with pytest.raises(InputError, match=rf"--frames \S+: {want}, but .* has 5 frames"):
                open_video(src, sel)
        else:
            with open_video(src, sel) as video:
                assert [f.source_index for f in video.frames] == want
