"""The quantized checkpoint: `quantize` writes it, it loads back to identical outputs, and a checkpoint that does
not fit the config fails naming what is missing or left over."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from sam2_layerwise import CaptureOptions, capture_image
from sam2_layerwise.cli.main import main
from sam2_layerwise.errors import ModelError
from sam2_layerwise.model.loading import check_state_dict, read_state_dict
from sam2_layerwise.quant import FORMAT, calibrate_model, load_quant_config, load_quantized_model, parse_config
from tests.conftest import CHELSEA, COFFEE, TINY_CONFIG
from tests.quant.helpers import EXAMPLES

MIXED = str(EXAMPLES / "w4a8_mixed.yaml")


@pytest.fixture(scope="module")
def mixed_ckpt(tmp_path_factory, tiny_checkpoint):
    out = tmp_path_factory.mktemp("qckpt") / "sub" / "mixed.pt"
    code = main(["quantize", "--config", TINY_CONFIG, "--checkpoint", str(tiny_checkpoint), "--adaptive-qat-config",
                 MIXED, "--calib-images", str(CHELSEA), str(COFFEE), "--output", str(out), "-q"])
    assert code == 0 and out.is_file()
    return out


def _capture(model, image, prompts):
    return capture_image(model, image, prompts, CaptureOptions(max_attn_queries=2))


def test_checkpoint_is_a_sam2_checkpoint_with_float_weights(mixed_ckpt, tiny_checkpoint, qmodel):
    ckpt = torch.load(mixed_ckpt, map_location="cpu", weights_only=True)
    assert ckpt["format"] == FORMAT and ckpt["format_version"] == 1
    state = read_state_dict(mixed_ckpt)
    check_state_dict(qmodel, state, "--checkpoint", str(mixed_ckpt))  # SAM 2's own keys, nothing else
    float_state = torch.load(tiny_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(state[k], float_state[k]) for k in float_state)  # float weights, not quantized ones
    entry = ckpt["quantization"]
    assert entry["config"]["name"] == "w4a8_mixed" and entry["calibration"]["images"][0].endswith("chelsea.png")
    q = entry["quantizers"]["image_encoder.trunk.blocks.3.attn.qkv:weight"]
    assert (q["bits"], q["granularity"], q["axis"], q["qmin"], q["qmax"]) == (4, "per_channel", 0, -7, 7)
    assert q["scale"].shape == (qmodel.image_encoder.trunk.blocks[3].attn.qkv.out_features,)
    assert entry["quantizers"]["image_encoder.trunk.blocks.0.attn:probs"]["kind"] == "log2"
    act = entry["quantizers"]["image_encoder.trunk.blocks.0.attn.qkv:input"]
    assert act["scale"].shape == () and not act["symmetric"] and 0 <= act["zero_point"].item() <= 255


def test_checkpoint_loads_back_to_identical_outputs(mixed_ckpt, qmodel, tiny_checkpoint, chelsea, coffee, prompts):
    qcfg = load_quant_config(MIXED)
    qm = calibrate_model(qmodel, qcfg, [chelsea, coffee])  # what `quantize` computed, in this process
    try:
        direct = _capture(qmodel, chelsea, prompts)
    finally:
        qm.remove()
    loaded, qm2 = load_quantized_model(TINY_CONFIG, str(mixed_ckpt), qcfg, device="cpu")
    again = _capture(loaded.model, chelsea, prompts)
    assert not loaded.random_init and len(qm2.sites) == len(qm.sites)
    assert np.array_equal(direct.prediction.low_res_logits, again.prediction.low_res_logits)
    assert np.array_equal(direct.prediction.masks, again.prediction.masks)
    for a, b in zip(direct.attention, again.attention):
        assert torch.equal(a.probs, b.probs), a.layer_key


def _save(ckpt: dict, path):
    torch.save(ckpt, path)
    return str(path)


def _load_error(qcfg, path) -> str:
    with pytest.raises(ModelError) as info:
        load_quantized_model(TINY_CONFIG, path, qcfg, device="cpu")
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_missing_learned_scales(mixed_ckpt, tmp_path):
    ckpt = torch.load(mixed_ckpt, weights_only=True)
    del ckpt["quantization"]["quantizers"]["image_encoder.trunk.blocks.0.attn.qkv:input"]["scale"]
    del ckpt["quantization"]["quantizers"]["image_encoder.trunk.blocks.0.attn:q"]
    msg = _load_error(load_quant_config(MIXED), _save(ckpt, tmp_path / "broken.pt"))
    assert msg.startswith(f"--checkpoint {tmp_path / 'broken.pt'}: does not fit --adaptive-qat-config")
    assert "2 learned parameters missing" in msg and "image_encoder.trunk.blocks.0.attn.qkv:input scale" in msg
    assert "image_encoder.trunk.blocks.0.attn:q scale" in msg and "sam2-layerwise quantize" in msg


def test_float_checkpoint_with_activation_quantizers_needs_calibration(tiny_checkpoint):
    msg = _load_error(load_quant_config(EXAMPLES / "w8a8.yaml"), str(tiny_checkpoint))
    assert "learned parameters missing" in msg and ":input scale" in msg


def test_lsq_weights_need_their_learned_step_sizes(tiny_checkpoint):
    cfg = parse_config({"defaults": {"weight": {"kind": "lsq", "bits": 4}}}, "lsq.yaml")
    msg = _load_error(cfg, str(tiny_checkpoint))
    assert "learned parameters missing" in msg and ":weight scale" in msg
    # uniform weights need nothing: their scales come from the weights
    loaded, qm = load_quantized_model(TINY_CONFIG, str(tiny_checkpoint),
                                      parse_config({"defaults": {"weight": {"bits": 4}}}, "w4.yaml"), device="cpu")
    assert qm.sites and all(s.role == "weight" for s in qm.sites.values())


def test_left_over_and_inconsistent(mixed_ckpt):
    # the checkpoint has log2 probabilities and 4-bit weights; w8a8 has neither
    msg = _load_error(load_quant_config(EXAMPLES / "w8a8.yaml"), str(mixed_ckpt))
    assert "6 quantizers left over (not quantized by the config): image_encoder.trunk.blocks.0.attn:probs" in msg
    assert "inconsistent" in msg and "has 4 bits in the checkpoint, 8 in the config" in msg


def test_bits_from_the_checkpoint(mixed_ckpt, tmp_path):
    raw = yaml.safe_load(open(MIXED))
    raw["rules"][1]["weight"]["bits"] = "checkpoint"  # the Hiera MLPs: whatever the checkpoint learned
    loaded, qm = load_quantized_model(TINY_CONFIG, str(mixed_ckpt), parse_config(raw, "b.yaml"), device="cpu")
    assert qm.quantizers["image_encoder.trunk.blocks.0.mlp.layers.0:weight"].bits == 4
    ckpt = torch.load(mixed_ckpt, weights_only=True)
    del ckpt["quantization"]["quantizers"]["image_encoder.trunk.blocks.0.mlp.layers.0:weight"]["bits"]
    msg = _load_error(parse_config(raw, "b.yaml"), _save(ckpt, tmp_path / "nobits.pt"))
    assert "image_encoder.trunk.blocks.0.mlp.layers.0:weight bits" in msg


def test_qat_checkpoint_with_step_sizes_in_the_state_dict(tiny_checkpoint, tmp_path, qmodel, chelsea, prompts):
    """A QAT trainer's layout: LSQ step sizes as extra state-dict keys, mapped by the config's checkpoint section."""
    cfg = parse_config({
        "defaults": {"weight": {"kind": "lsq", "bits": 4, "granularity": "per_tensor"}},
        "rules": [{"match": ["memory_attention", "memory_encoder", "mask_downsample", "obj_ptr_proj",
                             "obj_ptr_tpos_proj", "sam_prompt_encoder", "sam_mask_decoder"], "float": True}],
        "checkpoint": {"location": "model", "key": "{module}.{role}_quantizer.{param}",
                       "params": {"scale": "step_size"}}}, "qat.yaml")
    state = torch.load(tiny_checkpoint, weights_only=True)["model"]
    steps = {}
    for name, m in qmodel.named_modules():
        if name.startswith("image_encoder") and type(m).__name__ in ("Linear", "Conv2d"):
            steps[name] = m.weight.abs().mean().item() / 3  # some learned value
            state[f"{name}.weight_quantizer.step_size"] = torch.tensor(steps[name])
    path = _save({"model": state}, tmp_path / "qat.pt")
    loaded, qm = load_quantized_model(TINY_CONFIG, path, cfg, device="cpu")
    assert set(qm.sites) == {f"{n}:weight" for n in steps}
    for n, s in steps.items():
        assert qm.quantizers[f"{n}:weight"].scale.item() == pytest.approx(s)
    # the layer computes with the weight quantized on that step size
    lin = dict(loaded.model.named_modules())["image_encoder.trunk.blocks.0.attn.qkv"]
    x = torch.randn(5, lin.in_features)
    s = steps["image_encoder.trunk.blocks.0.attn.qkv"]
    wq = torch.clamp(torch.round(lin.weight / s), -7, 7) * s
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, wq, lin.bias))
    del state["image_encoder.trunk.blocks.0.attn.qkv.weight_quantizer.step_size"]
    msg = _load_error(cfg, _save({"model": state}, tmp_path / "qat_missing.pt"))
    assert "image_encoder.trunk.blocks.0.attn.qkv:weight scale" in msg


def test_not_our_format(tiny_checkpoint, tmp_path):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["quantization"] = {"quantizers": {}}
    ckpt["format"] = "someone-else"
    msg = _load_error(load_quant_config(EXAMPLES / "passthrough.yaml"), _save(ckpt, tmp_path / "other.pt"))
    assert "format is 'someone-else'" in msg


W = "image_encoder.trunk.blocks.3.attn.qkv:weight"  # 4-bit symmetric per channel along axis 0
A = "image_encoder.trunk.blocks.0.attn.qkv:input"  # 8-bit affine per tensor
MLP = "image_encoder.trunk.blocks.0.mlp.layers.0:weight"  # `bits: checkpoint` in _bits_cfg


def _bits_cfg():
    raw = yaml.safe_load(open(MIXED))
    raw["rules"][1]["weight"]["bits"] = "checkpoint"
    return parse_config(raw, "b.yaml")


@pytest.mark.parametrize("qid, field, value, expect", [
    (MLP, "bits", 3.7, f"{MLP} has 3.7 bits in the checkpoint, not a whole number"),
    (MLP, "bits", 40, f"{MLP} has 40 bits in the checkpoint, out of range for uniform (2..16)"),
    (MLP, "bits", 1, "out of range for uniform (2..16)"),
    (W, "scale0", 0.0, f"{W} has a scale that is not finite and > 0"),
    (W, "scale0", -1.0, f"{W} has a scale that is not finite and > 0"),
    (W, "scale0", float("inf"), f"{W} has a scale that is not finite and > 0"),
    (W, "scale0", float("nan"), f"{W} has a scale that is not finite and > 0"),
    (W, "zero_point0", 1.0, f"{W} is symmetric but has a non-zero zero point"),
    (A, "zero_point", 2.5, f"{A} has a zero point that is not a whole number"),
    (A, "zero_point", 300.0, f"{A} has a zero point outside [0, 255]"),
    (A, "zero_point", -1.0, f"{A} has a zero point outside [0, 255]"),
    (W, "axis", 1, f"{W} has scales along axis 1 in the checkpoint, the config's along 0"),
    (W, "granularity", "per_tensor", f"{W} is per_tensor in the checkpoint, per_channel in the config"),
])
def test_checkpoint_values_are_validated(mixed_ckpt, tmp_path, qid, field, value, expect):
    ckpt = torch.load(mixed_ckpt, weights_only=True)
    entry = ckpt["quantization"]["quantizers"][qid]
    if field.endswith("0"):
        entry[field[:-1]][0] = value
    elif field == "zero_point":
        entry[field] = torch.tensor(value)
    else:
        entry[field] = value
    cfg = _bits_cfg() if qid == MLP else load_quant_config(MIXED)
    msg = _load_error(cfg, _save(ckpt, tmp_path / "bad.pt"))
    assert msg.startswith(f"--checkpoint {tmp_path / 'bad.pt'}: does not fit --adaptive-qat-config") and "inconsistent" in msg
    assert expect in msg


def test_non_integral_bits_in_a_state_dict_are_rejected_not_rounded(tiny_checkpoint, tmp_path, qmodel):
    cfg = parse_config({
        "defaults": {"weight": {"kind": "lsq", "bits": "checkpoint", "granularity": "per_tensor"}},
        "rules": [{"match": ["memory_attention", "memory_encoder", "mask_downsample", "obj_ptr_proj",
                             "obj_ptr_tpos_proj", "sam_prompt_encoder", "sam_mask_decoder"], "float": True}],
        "checkpoint": {"location": "model", "params": {"scale": "step_size", "bits": "nbits"}}}, "qat.yaml")
    state = torch.load(tiny_checkpoint, weights_only=True)["model"]
    for name, m in qmodel.named_modules():
        if name.startswith("image_encoder") and type(m).__name__ in ("Linear", "Conv2d"):
            state[f"{name}.weight_quantizer.step_size"] = torch.tensor(0.01)
            state[f"{name}.weight_quantizer.nbits"] = torch.tensor(4.0)
    loaded, qm = load_quantized_model(TINY_CONFIG, _save({"model": state}, tmp_path / "ok.pt"), cfg, device="cpu")
    assert {fq.bits for fq in qm.quantizers.values()} == {4}
    state["image_encoder.trunk.blocks.0.attn.qkv.weight_quantizer.nbits"] = torch.tensor(3.7)
    msg = _load_error(cfg, _save({"model": state}, tmp_path / "frac.pt"))
    assert "image_encoder.trunk.blocks.0.attn.qkv:weight has 3.7" in msg and "not a whole number" in msg


def test_saved_weight_scales_are_used(mixed_ckpt, tmp_path):
    """A perturbed weight scale in the checkpoint changes the layer's output exactly as that scale says: the
    saved scales are used, not recomputed from the weights."""
    qcfg = load_quant_config(MIXED)
    _, qm = load_quantized_model(TINY_CONFIG, str(mixed_ckpt), qcfg, device="cpu")
    ckpt = torch.load(mixed_ckpt, weights_only=True)
    scale = ckpt["quantization"]["quantizers"][W]["scale"]
    scale[0] *= 1.7
    loaded, qm2 = load_quantized_model(TINY_CONFIG, _save(ckpt, tmp_path / "perturbed.pt"), qcfg, device="cpu")
    assert torch.equal(qm2.quantizers[W].scale, scale)
    name = W.split(":")[0]
    lin = dict(loaded.model.named_modules())[name]
    lin0 = dict(qm.model.named_modules())[name]
    x = torch.randn(7, lin.in_features, generator=torch.Generator().manual_seed(0))
    inq = qm2.quantizers.get(f"{name}:input")
    xq = inq.quiet(x) if inq is not None else x
    wq = torch.clamp(torch.round(lin.weight / scale[:, None]), -7, 7) * scale[:, None]
    with torch.no_grad():
        out, before = lin(x), lin0(x)
    torch.testing.assert_close(out, torch.nn.functional.linear(xq, wq, lin.bias))
    assert not torch.equal(out[:, 0], before[:, 0])  # the perturbed channel changed ...
    assert torch.equal(out[:, 1:], before[:, 1:])  # ... and only it
