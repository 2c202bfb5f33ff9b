"""Quantizer conventions, checked against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from sam2_layerwise.quant.calibrate import Observer, calibrate_weight
from sam2_layerwise.quant.quantizers import (FakeQuantizer, QuantSpec, fake_quantize, int_range, log2_quantize,
                                             scale_from_range)


def test_integer_ranges():
    assert int_range(8, True) == (-127, 127)  # narrow: -128 is never used
    assert int_range(8, False) == (0, 255)
    assert int_range(4, True) == (-7, 7)
    assert int_range(2, False) == (0, 3)


def test_round_half_to_even_then_clamp():
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 6.4, 7.6, 100.0, -100.0])
    got = fake_quantize(x, one, zero, -7, 7)
    assert got.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 6.0, 7.0, 7.0, -7.0]


def test_symmetric_scale_and_clipping_statistics():
    spec = QuantSpec(kind="uniform", bits=4, symmetric=True)
    fq = FakeQuantizer("m:input", spec, scale=torch.tensor(0.1), zero_point=torch.tensor(0.0), monitor=True)
    x = torch.tensor([0.0, 0.04, 0.06, 0.33, 0.7, 1.0, -1.0])
    got = fq(x)
    torch.testing.assert_close(got, torch.tensor([0.0, 0.0, 0.1, 0.3, 0.7, 0.7, -0.7]))
    s = fq.stats.to_dict()
    assert s["elements"] == 7 and s["clip_rate"] == pytest.approx(2 / 7)  # 1.0 and -1.0 fall outside +-7 codes
    assert s["max_abs_err"] == pytest.approx(0.3, abs=1e-6)


def test_affine_range_includes_zero_and_zero_is_exact():
    scale, zero = scale_from_range(torch.tensor(-1.0), torch.tensor(3.0), 8, symmetric=False)
    assert scale.item() == pytest.approx(4 / 255)
    assert zero.item() == 64  # round(1 / (4/255)) = round(63.75)
    x = torch.tensor([0.0, -1.0, 3.0, 1.234])
    got = fake_quantize(x, scale, zero, 0, 255)
    assert got[0].item() == 0.0
    assert (got - x).abs().max().item() <= scale.item() / 2 + 1e-6
    # an all-positive range is widened to contain 0: zero point 0
    s2, z2 = scale_from_range(torch.tensor(2.0), torch.tensor(4.0), 8, symmetric=False)
    assert z2.item() == 0 and s2.item() == pytest.approx(4 / 255)


def test_per_channel_keeps_small_channels_per_tensor_does_not():
    w = torch.tensor([[0.01, -0.02, 0.015], [10.0, -5.0, 2.5]])  # [out=2, in=3]
    per_ch = QuantSpec(bits=8, symmetric=True, granularity="per_channel")
    s, z = calibrate_weight(w, per_ch, 8, axis=0)
    assert s.shape == (2,)
    torch.testing.assert_close(s, torch.tensor([0.02 / 127, 10.0 / 127]))
    q_ch = fake_quantize(w, s, z, -127, 127, axis=0)
    assert (q_ch[0] - w[0]).abs().max() <= 0.02 / 127 / 2 + 1e-9
    per_t = QuantSpec(bits=8, symmetric=True, granularity="per_tensor")
    s_t, z_t = calibrate_weight(w, per_t, 8, axis=0)
    assert s_t.shape == () and s_t.item() == pytest.approx(10.0 / 127)
    q_t = fake_quantize(w, s_t, z_t, -127, 127)
    assert q_t[0].abs().max().item() == 0.0  # 0.02 / 0.0787 rounds to 0: the small channel is wiped out


def test_weight_axis_for_transposed_convolution():
    w = torch.zeros(3, 5, 2, 2)  # ConvTranspose2d: [in, out, kh, kw]
    w[:, 1] = 4.0
    s, _ = calibrate_weight(w, QuantSpec(granularity="per_channel"), 8, axis=1)
    assert s.shape == (5,) and s[1].item() == pytest.approx(4 / 127) and s[0].item() < 1e-9


def test_log2_codes():
    x = torch.tensor([1.0, 0.5, 0.3, 0.25, 0.7, 2.0 ** -14, 2.0 ** -15, 2.0 ** -14.6, 0.0])
    got = log2_quantize(x, bits=4)  # codes 0..14 -> 2^-c, code 15 -> 0
    # 0.3: -log2 = 1.74 -> 2 -> 0.25; 0.7: 0.51 -> 1 -> 0.5; 2^-14.6: 14.6 -> 15 -> 0
    assert got.tolist() == [1.0, 0.5, 0.25, 0.25, 0.5, 2.0 ** -14, 0.0, 0.0, 0.0]
    got3 = log2_quantize(torch.tensor([2.0 ** -6, 2.0 ** -7]), bits=3)
    assert got3.tolist() == [2.0 ** -6, 0.0]


def test_log2_quantizer_counts_flushed_values():
    fq = FakeQuantizer("a:probs", QuantSpec(kind="log2", bits=3), monitor=True)
    fq(torch.tensor([0.5, 0.5, 0.001, 0.0]))
    assert fq.stats.clipped == 1  # 0.001 < 2^-6.5 becomes 0; an exact 0 is not clipping


def test_uniform_probabilities_fixed_unit_range():
    fq = FakeQuantizer("a:probs", QuantSpec(kind="probs_uniform", bits=8))
    x = torch.tensor([0.5 / 255, 1.5 / 255, 1.0, 0.2])
    assert fq(x).tolist() == pytest.approx([0.0, 2 / 255, 1.0, round(0.2 * 255) / 255])


def test_dtype_is_kept_and_math_is_fp32():
    fq = FakeQuantizer("m:input", QuantSpec(bits=8), scale=torch.tensor(0.01), zero_point=torch.tensor(0.0))
    x = torch.linspace(-1, 1, 101, dtype=torch.bfloat16)
    out = fq(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fq(x.float()).bfloat16().float())


def test_lsq_uses_the_given_step_size():
    spec = QuantSpec(kind="lsq", bits=3, symmetric=True)
    fq = FakeQuantizer("m:weight", spec, scale=torch.tensor(0.25), zero_point=torch.tensor(0.0))
    x = torch.tensor([0.1, 0.13, 0.4, 2.0, -0.9])
    assert fq(x).tolist() == [0.0, 0.25, 0.5, 0.75, -0.75]  # codes clamp at +-3


def test_observers_minmax_percentile_mse():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    x[0, 0] = 40.0  # one outlier
    mm = Observer(QuantSpec(bits=4, symmetric=True, calibration="minmax"), axis=None)
    pc = Observer(QuantSpec(bits=4, symmetric=True, calibration="percentile", percentile=99.0), axis=None)
    ms = Observer(QuantSpec(bits=4, symmetric=True, calibration="mse"), axis=None)
    for half in (x[:32], x[32:]):
        for o in (mm, pc, ms):
            o.update(half)
    s_mm, _ = mm.finalize(4)
    assert s_mm.item() == pytest.approx(40.0 / 7)
    s_pc, _ = pc.finalize(4)
    assert s_pc.item() == pytest.approx(torch.quantile(x.abs().reshape(-1), 0.99).item() / 7, rel=1e-5)
    s_ms, z_ms = ms.finalize(4)
    assert s_ms.item() < s_mm.item()  # MSE clips the outlier

    def mse(s):
        return (fake_quantize(x, s, torch.tensor(0.0), -7, 7) - x).square().mean().item()

    assert mse(s_ms) < mse(s_mm)


def test_per_channel_activation_observer():
    x = torch.stack([torch.linspace(-1, 3, 50), torch.linspace(0, 8, 50)], dim=-1)  # [tokens, channels=2]
    o = Observer(QuantSpec(bits=8, symmetric=False, granularity="per_channel"), axis=-1)
    o.update(x.reshape(5, 10, 2))
    s, z = o.finalize(8)
    torch.testing.assert_close(s, torch.tensor([4 / 255, 8 / 255]))
    assert z.tolist() == [64.0, 0.0]  # round(1 / (4/255)) = round(63.75)


def test_stats_add_accumulates_like_the_plain_sums():
    from sam2_layerwise.quant.quantizers import QuantStats

    x = torch.tensor([1.0, -2.0, 3.0, 0.5])
    xq = torch.tensor([1.0, -2.5, 2.0, 0.5])
    st = QuantStats()
    st.add(x, xq, torch.tensor([False, True, True, False]))
    st.add(x, xq, 1)
    st.add(torch.empty(0), torch.empty(0), 0)
    assert (st.elements, st.calls, st.clipped) == (8, 3, 3)
    assert st.sq_err == pytest.approx(2 * 1.25) and st.sq_ref == pytest.approx(2 * 14.25) and st.max_abs_err == 1.0
