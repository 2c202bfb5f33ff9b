"""Video capture on the tiny model: memory records on every tracked frame, key segments checked against SAM 2's
own memory bank (output_dict) and the memory tensor memory attention received, exact recomputation (RoPE and
un-roped object pointers included), masks unchanged by capture, segment mass over every query."""

from __future__ import annotations

import math

import pytest
import torch

from sam2_layerwise.api_video import capture_video
from sam2_layerwise.capture import CaptureOptions
from sam2_layerwise.capture.attention import attention_probs, query_statistics
from sam2_layerwise.frames import open_video
from sam2_layerwise.inputs import parse_prompts
from sam2_layerwise.model.video import track_plain
from tests.video.conftest import H, NAMES, W

PROMPT_FRAME = 1  # tracked forward to the last frame, then back to frame 0


@pytest.fixture(scope="module")
def source(frames_dir):
    with open_video(frames_dir) as src:
        yield src


@pytest.fixture(scope="module")
def prompts():
    return parse_prompts([230, 150, 1], None, [60, 200], W, H)


@pytest.fixture(scope="module")
def tracked(video_model, source, prompts):
    """One capture with SAM 2's inference state and every memory tensor memory attention received (a test-side
    hook, independent of the capture's own)."""
    seen = {"memory": [], "state": None}

    def grab(module, args, kwargs):
        seen["memory"].append((kwargs["memory"].detach().clone(), int(kwargs.get("num_obj_ptr_tokens", 0))))

    handle = video_model.memory_attention.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        cap = capture_video(video_model, source, prompts,
                            CaptureOptions(max_attn_queries=2, keep_qkv=True, memory_mass="all"),
                            prompt_frame=PROMPT_FRAME, on_state=lambda s: seen.__setitem__("state", s))
    finally:
        handle.remove()
    return cap, seen


def test_frames_are_read_in_natural_order(source):
    assert [f.name for f in source.frames] == [f"{n}.png" for n in NAMES]
    assert (source.width, source.height) == (W, H)


def test_every_tracked_frame_after_the_prompt_has_memory_records(tracked, video_model):
    cap, _ = tracked
    order = [f.index for f in cap.prediction.frames]
    assert order == [1, 2, 3, 4, 0]  # forward from the prompt frame, then backward
    n_layers = len(video_model.memory_attention.layers)
    for i in order:
        kinds = [r.kind for r in cap.records(i)]
        assert sum(k.startswith("hiera") for k in kinds) == len(video_model.image_encoder.trunk.blocks)
        assert kinds.count("decoder_token_to_image") > 0
        mem = [r for r in cap.records(i) if r.kind.startswith("memory")]
        # SAM 2.1 adds no_mem_embed on the prompt frame instead of running memory attention
        assert len(mem) == (0 if i == PROMPT_FRAME else 2 * n_layers), (i, len(mem))
        assert all(r.frame_index == i for r in cap.records(i))
    assert all(r.frame_index is not None for r in cap.attention)


def _expected(cap, state, frame: int) -> tuple[list[int], list[int]]:
    """Memory frames and pointer frames SAM 2's own bank holds for `frame`: the conditioning frame first, then
    every frame tracked before it (the tiny model keeps 7 memories and 16 pointers: all of these 5 frames)."""
    out = state["output_dict_per_obj"][0]
    cond = sorted(out["cond_frame_outputs"])
    order = [f.index for f in cap.prediction.frames]
    before = [t for t in order[:order.index(frame)] if t in out["non_cond_frame_outputs"]]
    return cond, before


def test_key_segments_are_what_sam2_assembled(tracked, video_model):
    cap, seen = tracked
    state = seen["state"]
    out = state["output_dict_per_obj"][0]
    stores = {**{t: o for t, o in out["non_cond_frame_outputs"].items()}, **out["cond_frame_outputs"]}
    mem_by_frame = {}
    for (memory, n_ptr), lay in zip(seen["memory"], cap.memory):
        mem_by_frame[lay.frame] = (memory, n_ptr, lay)
    assert sorted(mem_by_frame) == [0, 2, 3, 4]
    for frame, (memory, n_ptr, lay) in mem_by_frame.items():
        assert lay.verified, lay.problem
        segs = lay.segments
        assert segs[0].start == 0 and all(a.stop == b.start for a, b in zip(segs, segs[1:]))
        assert segs[-1].stop == lay.keys == memory.shape[0]  # segments add up to the key count
        assert sum(s.stop - s.start for s in segs if s.kind == "object_pointer") == n_ptr == lay.pointer_tokens
        cond, before = _expected(cap, state, frame)
        spatial = [s for s in segs if s.kind == "memory"]
        pointers = [s for s in segs if s.kind == "object_pointer"]
        assert [s.frame for s in spatial if s.conditioning] == cond
        assert sorted(s.frame for s in spatial if not s.conditioning) == sorted(before)
        assert sorted(s.frame for s in pointers) == sorted(cond + before)
        for s in segs:  # each segment's keys are that frame's entry in SAM 2's memory bank, token for token
            entry = stores[s.frame]
            if s.kind == "memory":
                want = entry["maskmem_features"].flatten(2).permute(2, 0, 1).float()  # [h*w, B, C]
                assert s.age == (frame - s.frame) * (-1 if frame < PROMPT_FRAME else 1) and s.age > 0
            else:
                want = entry["obj_ptr"].reshape(1, s.stop - s.start, -1).permute(1, 0, 2)
            assert torch.equal(memory[s.start:s.stop], want)
    # every cross-attention record carries its frame's layout, and its key count
    for r in cap.attention:
        if r.kind == "memory_cross":
            g = r.geometry
            assert g["keys"] == "memory" and g["segmentation"]["verified"]
            assert g["key_segments"][-1]["stop"] == r.k_shape[2]
            assert g["rope_keys"] == r.k_shape[2] - g["pointer_tokens"] > 0


def test_memory_attention_is_reproduced_exactly(tracked):
    cap, _ = tracked
    mem = [r for r in cap.attention if r.kind.startswith("memory")]
    assert mem and all(r.kernel_dtype == "float32" for r in mem)
    with_ptrs = [r for r in mem if r.kind == "memory_cross" and r.geometry["pointer_tokens"] > 0]
    assert len(with_ptrs) == 8  # 4 tracked frames x 2 layers, all with un-roped pointer tokens
    for r in mem:
        assert r.module_max_abs_err is not None and r.module_max_abs_err <= 1e-4, (r.name, r.frame_index)
        assert r.kernel_max_abs_err <= 1e-4
        assert len(r.queries) == 2 and r.queries[0].label == "click0"


def test_segment_mass_over_every_query(tracked):
    cap, _ = tracked
    for r in cap.attention:
        if r.kind != "memory_cross":
            continue
        mm = r.memory_mass
        assert mm["segments"] == [s["label"] for s in r.geometry["key_segments"]]
        # over every query: recomputed here from the kept q/k with the one recomputation, then summed per segment
        q, k = r.qkv["q"], r.qkv["k"]  # [1, h, Nq, d], [1, h, Nk, d]
        probs = attention_probs(q, k, r.scale)  # [1, h, Nq, Nk]
        want = torch.stack([probs[..., s["start"]:s["stop"]].sum(-1) for s in r.geometry["key_segments"]], -1)
        assert torch.allclose(r.segment_mass, want, atol=1e-6)
        assert torch.allclose(r.segment_mass.sum(-1), torch.ones_like(r.segment_mass[..., 0]), atol=1e-5)
        per_head = want.mean(dim=(0, 2))  # [h, S]
        assert torch.allclose(torch.tensor(mm["all_queries"]["per_head"]), per_head, atol=1e-6)
        ptr = [i for i, s in enumerate(r.geometry["key_segments"]) if s["kind"] == "object_pointer"]
        assert math.isclose(mm["all_queries"]["pointer_share"], float(per_head.mean(0)[ptr].sum()), abs_tol=1e-6)
        # the fused path (torch's own kernel, indicator values) on a sample of queries: the same masses
        rows = [0, 9, 27, 63]
        fused = query_statistics(q[:, :, rows], k, r.scale, segments=[(s["start"], s["stop"]) for s in
                                                                       r.geometry["key_segments"]], stats=False)
        assert torch.allclose(fused["segment_mass"], r.segment_mass[:, :, rows], atol=1e-6)
        for n, sel in enumerate(mm["selected"]):  # selected rows: the recorded probabilities summed per segment
            rows = torch.stack([r.probs[n, :, s["start"]:s["stop"]].sum(-1) for s in r.geometry["key_segments"]], -1)
            assert torch.allclose(torch.tensor(sel["per_head"]), rows, atol=1e-6)


def test_masks_identical_with_and_without_capture(tracked, video_model, source, prompts):
    cap, _ = tracked
    plain = track_plain(video_model, source, prompts, PROMPT_FRAME)
    assert [f.index for f in plain.frames] == [f.index for f in cap.prediction.frames]
    for a, b in zip(plain.frames, cap.prediction.frames):
        assert (a.mask == b.mask).all() and (a.logits == b.logits).all() and a.object_score == b.object_score
    # nothing of the capture is left on the model
    assert not any(k.startswith("_") and k in ("_prepare_memory_conditioned_features", "_get_image_feature")
                   for k in vars(video_model))


def test_queries_follow_the_click_on_every_frame(tracked):
    cap, _ = tracked
    cells = {(r.layer_key, tuple(r.queries[0].cell)) for r in cap.attention if r.kind.startswith("memory")}
    assert len({c for _, c in cells}) == 1  # the same pixel -> the same token on every frame
    for f in cap.prediction.frames:
        dec = [r for r in cap.records(f.index) if r.kind == "decoder_self"]
        roles = dec[0].geometry["query_roles"]
        assert ("point0" in roles) == (f.index == PROMPT_FRAME)
        assert ("no_point" in roles) == (f.index != PROMPT_FRAME)
