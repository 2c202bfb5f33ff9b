"""The adaptive-QAT config: the shipped examples, rule resolution, and errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from sam2_layerwise.errors import ModelError
from sam2_layerwise.quant import load_quant_config, parse_config, plan
from tests.quant.helpers import EXAMPLES


def _error(raw, model=None) -> str:
    with pytest.raises(ModelError) as info:
        cfg = parse_config(raw, "q.yaml")
        if model is not None:
            plan(model, cfg)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("--adaptive-qat-config q.yaml: "), msg
    return msg


W8 = {"defaults": {"weight": {"bits": 8}, "activation": {"bits": 8}}}


def test_examples_resolve_on_the_tiny_model(qmodel):
    w8, _ = plan(qmodel, load_quant_config(EXAMPLES / "w8a8.yaml"))
    assert w8 and {s.spec.bits for s in w8.values()} == {8}
    assert not any(s.role == "probs" for s in w8.values())
    assert not any(s.module.startswith(("memory_attention", "memory_encoder")) for s in w8.values())
    lin = w8["image_encoder.trunk.blocks.0.attn.qkv:weight"]
    assert lin.axis == 0 and lin.channels == qmodel.image_encoder.trunk.blocks[0].attn.qkv.out_features
    up = w8["sam_mask_decoder.output_upscaling.0:weight"]  # ConvTranspose2d: output channels are axis 1
    assert up.axis == 1 and up.channels == qmodel.sam_mask_decoder.output_upscaling[0].out_channels
    assert w8["image_encoder.trunk.blocks.0.attn:q"].axis is None  # per tensor

    mixed, floats = plan(qmodel, load_quant_config(EXAMPLES / "w4a8_mixed.yaml"))
    bits = {q: s.spec.bits for q, s in mixed.items()}
    assert bits["image_encoder.trunk.blocks.0.mlp.layers.0:weight"] == 4  # rules[1]
    assert bits["image_encoder.trunk.blocks.3.attn.qkv:weight"] == 4  # rules[2]
    assert bits["image_encoder.trunk.blocks.0.attn.qkv:weight"] == 8
    assert bits["image_encoder.trunk.patch_embed.proj:weight"] == 8  # rules[4]
    probs = [s for s in mixed.values() if s.role == "probs"]
    assert len(probs) == 6 and all(s.spec.kind == "log2" and s.spec.bits == 4 for s in probs)
    assert "sam_mask_decoder.iou_prediction_head.layers.0:weight" in floats

    passthrough, floats = plan(qmodel, load_quant_config(EXAMPLES / "passthrough.yaml"))
    assert passthrough == {} and sorted(floats) == sorted(_all_sites(qmodel))


def _all_sites(model):
    from sam2_layerwise.quant.apply import quantizable_modules

    return [f"{n}:{r}" for n, (_, roles) in quantizable_modules(model).items() for r in roles]


def test_later_rules_win_and_merge_fields(qmodel):
    cfg = parse_config({
        "defaults": {"weight": {"bits": 8, "granularity": "per_channel"}},
        "rules": [
            {"match": "image_encoder.*", "weight": {"bits": 6}},
            {"match": "image_encoder.trunk.blocks.1", "weight": {"bits": 3, "symmetric": False}},
            {"match": "image_encoder.trunk.blocks.1.mlp", "float": True},
            {"match": "sam_mask_decoder", "activation": {"bits": 6, "granularity": "per_channel"}},
        ]}, "q.yaml")
    sites, floats = plan(qmodel, cfg)
    a = sites["image_encoder.trunk.blocks.1.attn.qkv:weight"]
    assert (a.spec.bits, a.spec.symmetric, a.spec.granularity, a.origin) == (3, False, "per_channel", "rules[1]")
    assert sites["image_encoder.trunk.blocks.2.attn.qkv:weight"].spec.bits == 6
    assert "image_encoder.trunk.blocks.1.mlp.layers.0:weight" in floats
    assert sites["sam_mask_decoder.conv_s0:weight"].spec.bits == 8
    act = sites["sam_mask_decoder.transformer.layers.0.mlp.layers.0:input"]  # ancestors match: decoder -> mlp
    assert act.axis == -1 and act.channels == 32 and act.spec.bits == 6
    assert "image_encoder.trunk.blocks.0.attn.qkv:input" in floats  # activations only where a rule set them
    heads = plan(qmodel, parse_config({"defaults": {"attention": {"k": {"granularity": "per_channel"}}}}, "q.yaml"))[0]
    k = heads["image_encoder.trunk.blocks.5.attn:k"]
    assert (k.axis, k.channels) == (1, qmodel.image_encoder.trunk.blocks[5].attn.num_heads)  # one scale per head


@pytest.mark.parametrize("raw, expected", [
    ({"defualts": {}}, "defualts: unknown key (did you mean 'defaults'?)"),
    ({"defaults": {"weight": {"bitz": 8}}}, "defaults.weight.bitz: unknown key (did you mean 'bits'?)"),
    ({"rules": [{"match": "a", "weight": {"bits": 4}}, {"match": "b", "weight": {"bits": 1}}]},
     "rules[1].weight.bits: 1 is out of range for uniform (2..16)"),
    ({"defaults": {"weight": {"bits": 17}}}, "defaults.weight.bits: 17 is out of range"),
    ({"defaults": {"attention": {"probs": {"kind": "log2", "bits": 9}}}}, "defaults.attention.probs.bits: 9 is out of range for log2"),
    ({"defaults": {"weight": {"bits": "eight"}}}, "defaults.weight.bits: 'eight' is not a whole number"),
    ({"defaults": {"weight": {"kind": "log2"}}}, "defaults.weight.kind: log2 is for attention probabilities"),
    ({"defaults": {"attention": {"probs": {"kind": "lsq"}}}}, "defaults.attention.probs.kind: attention probabilities take log2 or uniform"),
    ({"defaults": {"attention": {"qq": {"bits": 8}}}}, "defaults.attention.qq: unknown key (did you mean 'q'?)"),
    ({"defaults": {"weight": {"granularity": "per_row"}}}, "defaults.weight.granularity: 'per_row' is not one of"),
    ({"defaults": {"activation": {"calibration": "kl"}}}, "defaults.activation.calibration: 'kl' is not one of"),
    ({"defaults": {"activation": {"percentile": 20}}}, "defaults.activation.percentile: 20 must be a number in (50, 100]"),
    ({"defaults": {"activation": {"axis": 1}}}, "defaults.activation.axis: only weights take an axis"),
    ({"rules": [{"weight": {"bits": 4}}]}, "rules[0].match: missing"),
    ({"rules": [{"match": "a"}]}, "rules[0]: sets nothing"),
    ({"rules": [{"match": "a", "float": "yes"}]}, "rules[0].float: expected true or false"),
    ({"rules": "everything"}, "rules: expected a list of rules"),
    ({"checkpoint": {"location": "elsewhere"}}, "checkpoint.location: 'elsewhere' is not 'quantization' or 'model'"),
    ({"checkpoint": {"key": "{module}.{nope}"}}, "checkpoint.key: expected a template"),
    ({"format": "other/format"}, "format: 'other/format' is not 'sam2-layerwise/quant-config'"),
    ({"version": 2}, "version: 2 is not supported"),
    (["a", "list"], "expected a YAML mapping at the top level"),
])
def test_bad_configs_name_the_key(raw, expected):
    assert expected in _error(raw)


def test_rule_matching_nothing_is_an_error(qmodel):
    msg = _error({**W8, "rules": [{"match": "image_encoder.trunk.blocks.*", "weight": {"bits": 4}},
                                  {"match": "image_encoder.trunk.blokcs.*", "weight": {"bits": 4}}]}, qmodel)
    assert "rules[1].match 'image_encoder.trunk.blokcs.*' matches no module" in msg
    # a rule whose modules have none of the quantizers it sets matches nothing either
    msg = _error({"rules": [{"match": "*.mlp.layers.0", "attention": {"q": {"bits": 8}}}]}, qmodel)
    assert "rules[0].match '*.mlp.layers.0' matches no module with the quantizers it sets" in msg


def test_weight_axis_out_of_range(qmodel):
    msg = _error({"defaults": {"weight": {"granularity": "per_channel", "axis": 2}}}, qmodel)
    assert "defaults.weight: weight axis 2 is out of range for image_encoder.trunk.blocks.0.attn.qkv" in msg


def test_files(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_quant_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("defaults: {weight: [unclosed\n")
    with pytest.raises(ModelError, match="not valid YAML"):
        load_quant_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ModelError, match="is empty"):
        load_quant_config(empty)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(W8))
    assert load_quant_config(ok).defaults["weight"].bits == 8


def test_checkpoint_key_needs_role_and_params_need_distinct_names():
    from sam2_layerwise.errors import ModelError

    with pytest.raises(ModelError, match=r"checkpoint.key: expected a template containing \{module\}, \{role\}"):
        parse_config({"checkpoint": {"key": "{module}.q.{param}"}}, "c.yaml")
    with pytest.raises(ModelError, match="checkpoint.params: scale and zero_point both map to 'step'"):
        parse_config({"checkpoint": {"params": {"scale": "step", "zero_point": "step"}}}, "c.yaml")
    with pytest.raises(ModelError, match="checkpoint.params: scale and bits both map to 'bits'"):
        parse_config({"checkpoint": {"params": {"scale": "bits"}}}, "c.yaml")
