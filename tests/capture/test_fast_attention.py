"""`--fast-attention` (opt-in): attention outputs and statistics from one pass of the compiled kernel's tiles.

Its outputs are checked against float64 (not against torch's kernel bit for bit: they are not, which is why it is
opt-in and the summary says masks may differ); the default capture stays bit-identical to plain SAM 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sam2_layerwise import CaptureOptions, capture_image, parse_prompts, run_plain
from sam2_layerwise.capture import dispatch, native
from sam2_layerwise.capture.attention import query_statistics
from sam2_layerwise.cli.main import main
from tests.capture.test_stats_kernel import STATS, reference
from tests.conftest import CHELSEA, REPO, TINY_CONFIG



def _reference(q, k, v, scale, topk=5):
    """float64 output and statistics (the statistics from test_stats_kernel's one reference)."""
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, -1)
    return p @ v.double(), reference(q, k, scale, topk)


@pytest.mark.parametrize("nk", [1, 17, 196, 300, 1031])
@pytest.mark.parametrize("sharpen", [1, 64])
@pytest.mark.parametrize("layout", ["qkv_view", "contiguous", "broadcast_kv"])
def test_output_and_statistics_against_float64(compiled, nk, sharpen, layout):
    gen = torch.Generator().manual_seed(nk + sharpen)
    G, h, nq, d = 3, 4, 37, 16
    if layout == "qkv_view":  # SAM 2's: views into one [B, N, 3, heads, d] projection (needs Nq == Nk)
        nq = nk
        qkv = torch.randn(G, nk, 3, h, d, generator=gen)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    elif layout == "contiguous":
        q, k, v = torch.randn(G, h, nq, d, generator=gen), torch.randn(G, h, nk, d, generator=gen), \
            torch.randn(G, h, nk, 24, generator=gen)
    else:
        q = torch.randn(G, h, nq, d, generator=gen)
        k = torch.randn(G, 1, nk, d, generator=gen).expand(G, h, nk, d)
        v = torch.randn(G, 1, nk, d, generator=gen).expand(G, h, nk, d)
    q = q * sharpen
    out, view = dispatch.FastKernel()(q, k, v, 0.25, stats_topk=5)
    want_out, want = _reference(q, k, v, 0.25)
    assert view.fast and out.shape == want_out.shape and out.dtype == torch.float32
    exact = query_statistics(q, k, 0.25, topk=5)  # the default capture's statistics: the same tiles, same bits
    for name in STATS:
        assert torch.equal(view.stats[name], exact[name]), name
        if sharpen == 1:  # (x64 rows carry fp32 rounding of the scores, ~1e-5, on every fp32 path)
            assert (view.stats[name].double() - want[name]).abs().max().item() <= 1e-5, name
    # the output: as close to float64 as torch's own fp32 kernel is (sharpened rows carry fp32 rounding of the
    # scores themselves, ~1e-5 at x64, in any fp32 kernel)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25)
    torch_err = (sdpa.double() - want_out).abs().max().item()
    assert (out.double() - want_out).abs().max().item() <= max(1e-5, 2 * torch_err)


@pytest.fixture(scope="module")
def prompts():
    return parse_prompts([220, 150, 1], None, None, 451, 300)


def test_capture_uses_it_for_float_modules_only_when_asked(compiled, tiny_model, chelsea, prompts):
    plain = run_plain(tiny_model, chelsea, prompts)
    default = capture_image(tiny_model, chelsea, prompts, CaptureOptions())
    fast = capture_image(tiny_model, chelsea, prompts, CaptureOptions(fast_attention=True))
    assert not any(r.fast_attention for r in default.attention)
    assert np.array_equal(default.prediction.masks, plain.masks)  # the default stays bit-identical
    assert all(r.fast_attention for r in fast.attention) and len(fast.attention) == len(default.attention)
    # masks may differ in a few pixels; logits agree to float rounding
    assert np.abs(fast.prediction.low_res_logits - plain.low_res_logits).max() <= 1e-3
    assert (fast.prediction.masks != plain.masks).mean() <= 1e-3
    for a, b in zip(default.attention, fast.attention):
        assert a.layer_key == b.layer_key
        for name in STATS:
            assert (a.query_stats[name] - b.query_stats[name]).abs().max().item() <= 1e-5, (a.layer_key, name)
        assert b.kernel_max_abs_err <= 1e-5 and b.module_max_abs_err <= 1e-4  # the rows shown are its rows
    # nothing stays installed: a later plain run is plain SAM 2 again
    assert np.array_equal(run_plain(tiny_model, chelsea, prompts).masks, plain.masks)
    assert all(getattr(m, dispatch._ATTR, None) is None for m in tiny_model.modules())


def test_quantized_modules_keep_their_kernel(compiled, tiny_checkpoint, chelsea, prompts):
    from sam2_layerwise.model import build_model
    from sam2_layerwise.quant import calibrate_model, load_quant_config

    model = build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu").model
    qm = calibrate_model(model, load_quant_config(REPO / "examples" / "quantization" / "w8a8.yaml"), [chelsea])
    try:
        plain = run_plain(model, chelsea, prompts)
        cap = capture_image(model, chelsea, prompts, CaptureOptions(fast_attention=True))
    finally:
        qm.remove()
    assert cap.attention and not any(r.fast_attention for r in cap.attention)  # W8A8 quantizes every one
    assert np.array_equal(plain.masks, cap.prediction.masks)


def test_without_the_compiled_kernel_torch_computes_the_outputs(monkeypatch, tiny_model, chelsea, prompts):
    monkeypatch.setenv(native.MODE_ENV, "torch")
    plain = run_plain(tiny_model, chelsea, prompts)
    cap = capture_image(tiny_model, chelsea, prompts, CaptureOptions(fast_attention=True))
    assert not any(r.fast_attention for r in cap.attention)
    assert np.array_equal(cap.prediction.masks, plain.masks)


def test_cli_flag_and_summary(compiled, tmp_path, tiny_checkpoint, capfd):
    base = ["visualize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--image", str(CHELSEA),
            "--points", "220", "150", "1"]
    assert main([*base, "--output-dir", str(tmp_path / "fast"), "--fast-attention"]) == 0
    said = capfd.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "exact"), "-q"]) == 0
    fast = json.loads((tmp_path / "fast" / "layerwise_summary.json").read_text())
    exact = json.loads((tmp_path / "exact" / "layerwise_summary.json").read_text())
    calls = len(fast["attention"])
    assert fast["capture_options"]["fast_attention"] is True
    assert fast["fidelity"]["masks_may_differ"] is True and fast["fidelity"]["fast_attention_calls"] == calls
    assert "masks may differ" in fast["fidelity"]["note"]
    assert all(a.get("fast_attention") is True for a in fast["attention"])
    assert "fast_attention" not in exact["capture_options"] and "masks_may_differ" not in exact["fidelity"]
    assert not any("fast_attention" in a for a in exact["attention"])
    assert "--fast-attention: " in said and "masks may differ from plain SAM 2" in said

