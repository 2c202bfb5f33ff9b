"""Installing, failing and removing leave nothing behind; a model moved after install keeps working; the
checkpoint holds float weights even after an interrupted forward; log2 never lifts tiny probabilities."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sam2_layerwise.capture import dispatch
from sam2_layerwise.quant import apply, load_quant_config, quantize_model
from sam2_layerwise.quant.apply import _LayerQuant, installed_on
from sam2_layerwise.quant.checkpoint import quant_checkpoint
from sam2_layerwise.quant import parse_config
from sam2_layerwise.quant.quantizers import log2_quantize
from tests.quant.helpers import EXAMPLES

W8A8 = EXAMPLES / "w8a8.yaml"


def _ours(hook) -> bool:
    return isinstance(getattr(hook, "__self__", None), _LayerQuant) or hook in (dispatch._enter, dispatch._leave)


def assert_clean(model):
    assert installed_on(model) is None
    for name, m in model.named_modules():
        assert not hasattr(m, dispatch._ATTR), name
        assert not any(_ours(h) for h in m._forward_pre_hooks.values()), name
        assert not any(_ours(h) for h in m._forward_hooks.values()), name


def test_interrupted_forward_leaves_float_weights_and_checkpoint(qmodel):
    float_state = {k: v.clone() for k, v in qmodel.state_dict().items()}
    qm = quantize_model(qmodel, parse_config({"defaults": {"weight": {"bits": 4}}}, "w4.yaml"))
    try:
        name = "image_encoder.trunk.blocks.0.attn.qkv"
        lin = dict(qmodel.named_modules())[name]
        lq = qm._layers[name]

        def boom(module, args):
            raise RuntimeError("interrupted")

        h = lin.register_forward_pre_hook(boom)  # runs after ours swapped the weight in
        try:
            with pytest.raises(RuntimeError, match="interrupted"):
                lin(torch.randn(2, lin.in_features))
        finally:
            h.remove()
        assert lin.weight is lq.float_weight
        lq.pre(lin, (torch.randn(2, lin.in_features),))  # a swap whose post hook never ran
        assert lin.weight is lq.q_weight
        state = quant_checkpoint(qm)["model"]
        assert all(torch.equal(state[k], float_state[k]) for k in float_state)
    finally:
        qm.remove()
    assert_clean(qmodel)
    assert all(torch.equal(v, float_state[k]) for k, v in qmodel.state_dict().items())


def test_failed_install_removes_what_it_installed(qmodel, monkeypatch):
    routing, calls = dispatch.routing, []

    def failing(module, name):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("install failed")
        return routing(module, name)

    monkeypatch.setattr(apply.dispatch, "routing", failing)
    with pytest.raises(RuntimeError, match="install failed"):
        quantize_model(qmodel, parse_config({"defaults": {"weight": {"bits": 8},
                                                          "attention": {"probs": {"kind": "log2", "bits": 8}}}}, "p.yaml"))
    monkeypatch.undo()
    assert len(calls) >= 2  # (remove() looks the routing up again)
    assert_clean(qmodel)
    quantize_model(qmodel, load_quant_config(EXAMPLES / "passthrough.yaml")).remove()  # installs again


def test_model_moved_after_install_refreshes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    cfg = parse_config({"defaults": {"weight": {"bits": 4, "granularity": "per_channel"}}}, "w4.yaml")
    qm = quantize_model(model, cfg)
    fq = qm.quantizers["0:weight"]
    x = torch.randn(3, 8, dtype=torch.float64)
    model.double()
    s = fq.scale.double()[:, None]
    w = model[0].weight
    expected = nn.functional.linear(x, torch.clamp(torch.round(w / s), -7, 7) * s, model[0].bias)
    out = model(x)
    assert out.dtype == torch.float64 and model[0].weight is w
    torch.testing.assert_close(out, expected)
    qm.refresh_weights()
    assert fq.scale.dtype == torch.float32
    qm.remove()
    assert_clean(model)


@pytest.mark.parametrize("p", [1e-40, 1e-45, 2.0 ** -130, 2.0 ** -127])
def test_log2_does_not_lift_subnormal_probabilities(p):
    x = torch.tensor([p, 0.0, 0.5], dtype=torch.float32)
    out8 = log2_quantize(x, 8)  # codes up to 254: the nearest power of two, never 2^-126
    assert 0 < out8[0].item() <= 2 * x[0].item() and out8[0].item() >= x[0].item() / 2
    assert out8[1].item() == 0.0 and out8[2].item() == 0.5
    assert log2_quantize(x, 4)[0].item() == 0.0  # below the 4-bit grid: the zero code


def test_log2_zero_and_negative_are_zero():
    x = torch.tensor([0.0, -0.0, -1e-3, float(torch.finfo(torch.float32).tiny)])
    out = log2_quantize(x, 8)
    assert out[:3].tolist() == [0.0, 0.0, 0.0] and out[3].item() == 2.0 ** -126


def test_bf16_values_are_the_fp32_grid_rounded_to_bf16():
    """What docs/quantization.md says: the grid is exact in fp32; a bf16 input gets its bf16 rounding."""
    from sam2_layerwise.quant.quantizers import fake_quantize

    x = torch.linspace(-3, 3, 1001)
    scale, zp = torch.tensor(3 / 127 * 1.01), torch.tensor(0.0)
    grid = fake_quantize(x, scale, zp, -127, 127)
    out = fake_quantize(x.bfloat16(), scale, zp, -127, 127)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fake_quantize(x.bfloat16().float(), scale, zp, -127, 127).bfloat16())
    assert not torch.equal(out.float(), fake_quantize(x.bfloat16().float(), scale, zp, -127, 127))  # off the grid
    rel = ((out.float() - fake_quantize(x.bfloat16().float(), scale, zp, -127, 127)).abs() / grid.abs().clamp_min(1e-6))
    assert rel.max().item() <= 2.0 ** -8


def test_weight_error_is_cached_until_the_weight_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    qm = quantize_model(model, parse_config({"defaults": {"weight": {"bits": 4}}}, "w4.yaml"))
    first = qm.site_report("0:weight")["error"]
    assert qm.site_report("0:weight")["error"] == first and "0:weight" in qm._weight_error
    cached = qm._weight_error["0:weight"]
    qm.report()
    assert qm._weight_error["0:weight"] is cached  # not recomputed
    with torch.no_grad():
        model[0].weight[0, 0] += 10.0  # an in-place update (an optimizer step)
    qm.refresh_weights()
    assert qm.site_report("0:weight")["error"] != first
    qm.remove()
