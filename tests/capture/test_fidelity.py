"""Every captured map proves itself, and capture does not change SAM 2's result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam2_layerwise import CaptureOptions, capture_image, parse_prompts, run_plain
from sam2_layerwise.capture.attention import query_statistics

KINDS = {"hiera_windowed", "hiera_qpool", "hiera_global", "decoder_self", "decoder_token_to_image",
         "decoder_image_to_token"}


@pytest.fixture(scope="module")
def capture(tiny_model, chelsea):
    prompts = parse_prompts([220, 150, 1, 60, 40, 0], None, [400, 260], chelsea.shape[1], chelsea.shape[0])
    return capture_image(tiny_model, chelsea, prompts, CaptureOptions(keep_qkv=True, max_attn_queries=3))


def test_every_attention_kind_is_captured(capture, tiny_model):
    assert {r.kind for r in capture.attention} == KINDS
    ran = [n for n, m in tiny_model.named_modules()
           if type(m).__name__ in ("MultiScaleAttention", "Attention") and not n.startswith("memory_attention")]
    assert sorted(r.name for r in capture.attention) == sorted(ran)


def test_probs_times_v_through_projection_reproduces_module_output(capture):
    for r in capture.attention:
        assert r.queries, r.layer_key
        assert r.kernel_max_abs_err <= 1e-4, (r.layer_key, r.kernel_max_abs_err)
        assert r.module_max_abs_err is not None and r.module_max_abs_err <= 1e-4, (r.layer_key, r.module_max_abs_err)


def test_probs_equal_softmax_of_saved_qk(capture):
    """Recompute each selected row with plain torch ops from the saved q/k and compare."""
    for r in capture.attention:
        groups = r.qkv["groups"]
        for n, spec in enumerate(r.queries):
            g = groups.index(spec.group)
            q = r.qkv["q"][g, :, spec.index]  # [h, d]
            k = r.qkv["k"][g]  # [h, Nk, d]
            expected = torch.softmax((k @ q.unsqueeze(-1)).squeeze(-1) / q.shape[-1] ** 0.5, dim=-1)
            torch.testing.assert_close(r.probs[n], expected, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(r.probs[n].sum(-1), torch.ones(r.heads), atol=1e-5, rtol=0)


def test_query_statistics_match_full_maps(capture):
    """Chunked per-query statistics equal those of the full map, for the saved groups."""
    for r in capture.attention:
        q, k = r.qkv["q"], r.qkv["k"]
        p = torch.softmax(q @ k.transpose(-1, -2) * r.scale, -1)  # [g, h, Nq, Nk]
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)
        kk = min(5, p.shape[-1])
        expected = {"entropy": ent, "max_prob": p.amax(-1), "topk_mass": p.sort(-1, descending=True).values[..., :kk].sum(-1),
                    "entropy_norm": ent / np.log(p.shape[-1])}
        for name, values in expected.items():
            got = r.query_stats[name][r.qkv["groups"]]
            torch.testing.assert_close(got, values, atol=2e-5, rtol=1e-4, msg=f"{r.layer_key} {name}")
        # tile size must not matter
        small = query_statistics(q, k, r.scale, None, 5, chunk_elements=37)
        for name in expected:
            torch.testing.assert_close(small[name], r.query_stats[name][r.qkv["groups"]], atol=1e-5, rtol=1e-5)


def test_head_stats_exclude_padding_queries(tiny160_model, chelsea):
    prompts = parse_prompts([220, 150, 1], None, None, chelsea.shape[1], chelsea.shape[0])
    cap = capture_image(tiny160_model, chelsea, prompts)
    rec = cap.record("image_encoder_trunk_blocks_5")  # 10x10 keys padded to 12x12, 5x5 queries padded to 6x6
    geo = rec.geometry
    assert geo["padded_key_grid_hw"] == [12, 12] and geo["query_grid_hw"] == [5, 5]
    qs = rec.query_stats["max_prob"]  # [9 windows, heads, 4 queries]
    real = []
    for g in range(9):
        wy, wx = divmod(g, 3)
        for i in range(4):
            r, c = wy * 2 + i // 2, wx * 2 + i % 2
            if r < 5 and c < 5:
                real.append(qs[g, :, i])
    real = torch.stack(real, -1)  # [h, 25]
    assert real.shape[-1] == 25
    torch.testing.assert_close(torch.tensor(rec.head_stats["max_prob"]["mean"]), real.mean(-1), atol=1e-6, rtol=1e-6)
    assert rec.module_max_abs_err <= 1e-4


def test_masks_identical_with_and_without_capture(tiny_model, coffee):
    prompts = parse_prompts([300, 200, 1, 120, 80, 0], [250, 120, 420, 320], None, coffee.shape[1], coffee.shape[0])
    plain = run_plain(tiny_model, coffee, prompts)
    cap = capture_image(tiny_model, coffee, prompts, CaptureOptions(keep_qkv=True))
    assert np.array_equal(plain.masks, cap.prediction.masks)
    assert np.array_equal(plain.low_res_logits, cap.prediction.low_res_logits)
    assert np.array_equal(plain.iou_predictions, cap.prediction.iou_predictions)
    again = run_plain(tiny_model, coffee, prompts)  # hooks are gone afterwards
    assert np.array_equal(plain.low_res_logits, again.low_res_logits)
    assert not any(hasattr(m, "_layerwise_attention") for m in tiny_model.modules())
