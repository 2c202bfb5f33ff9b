"""Counterfactual attribution: restarts bit-identical to full reruns for every unit, every unit restored at
once is the float model, a passthrough twin changes nothing, QAT checkpoints (float weights that differ), and
`compare --attribute` shown by `generate`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sam2_layerwise.analysis.attribute import (
    AttributionContext, ForwardCache, attribute, build_units, select_units,
)
from sam2_layerwise.cli.main import main
from sam2_layerwise.inputs import load_image, parse_prompts
from sam2_layerwise.model import build_model
from sam2_layerwise.model.predict import run_plain
from sam2_layerwise.quant import load_quant_config, load_quantized_model
from tests.analysis.conftest import compare_args
from tests.conftest import COFFEE, TINY_CONFIG


def same(a, b) -> bool:
    return np.array_equal(a.masks, b.masks) and np.array_equal(a.low_res_logits, b.low_res_logits) and \
        np.array_equal(a.iou_predictions, b.iou_predictions)


def context(ckpt, qcfg_path, fp_state, image, prompts):
    loaded, qm = load_quantized_model(TINY_CONFIG, str(ckpt), load_quant_config(qcfg_path), device="cpu")
    ctx = AttributionContext.for_models(loaded.model, qm, fp_state=fp_state, image=image, prompts=prompts)
    with ctx.float_model(), ForwardCache(loaded.model) as fc:
        fp = run_plain(loaded.model, image, prompts)
    with ForwardCache(loaded.model) as qc:
        q = run_plain(loaded.model, image, prompts)
    ctx.set_baselines(fp_prediction=fp, q_prediction=q, fp_cache=fc, q_cache=qc)
    return ctx


@pytest.fixture(scope="module")
def scene(tiny_checkpoint):
    image = load_image(COFFEE)[::2, ::2].copy()  # 300 x 200
    prompts = parse_prompts([150, 100, 1, 40, 30, 0], None, None, image.shape[1], image.shape[0])
    fp_model = build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu").model
    state = {k: v.clone() for k, v in fp_model.state_dict().items()}
    return image, prompts, state, run_plain(fp_model, image, prompts)


@pytest.fixture(scope="module")
def qat_checkpoint(tmp_path_factory, quant_checkpoints):
    """A W4A8 checkpoint whose float weights differ from the original's in two units, as after QAT."""
    cfg, ckpt = quant_checkpoints["w4a8_mixed"]
    data = torch.load(ckpt, weights_only=True)
    g = torch.Generator().manual_seed(1)
    for name in ("image_encoder.trunk.blocks.2.mlp.layers.0.weight",
                 "sam_mask_decoder.transformer.layers.1.cross_attn_token_to_image.v_proj.weight",
                 "image_encoder.trunk.blocks.4.norm1.weight"):
        w = data["model"][name]
        data["model"][name] = w + 0.05 * w.abs().mean() * torch.randn(w.shape, generator=g)
    path = tmp_path_factory.mktemp("qat") / "qat.pt"
    torch.save(data, path)
    return cfg, path


@pytest.mark.parametrize("which", ["w4a8_mixed", "qat"])
def test_restarts_equal_full_reruns_and_all_restored_is_float(which, scene, quant_checkpoints, qat_checkpoint):
    image, prompts, fp_state, fp_plain = scene
    cfg, ckpt = qat_checkpoint if which == "qat" else quant_checkpoints[which]
    ctx = context(ckpt, cfg, fp_state, image, prompts)
    assert same(ctx.fp_prediction, fp_plain)  # the float pass of the one model object is the float model
    if which == "qat":
        assert sorted(ctx.fp_values) == sorted(["image_encoder.trunk.blocks.2.mlp.layers.0.weight",
                                                "sam_mask_decoder.transformer.layers.1.cross_attn_token_to_image."
                                                "v_proj.weight", "image_encoder.trunk.blocks.4.norm1.weight"])
        owners = {u.key for u in ctx.units if u.params}
        assert owners == {"image_encoder_trunk_blocks_2", "image_encoder_trunk_blocks_4",
                          "sam_mask_decoder_transformer_layers_1_cross_attn_token_to_image"}
    kinds = {u.kind for u in ctx.units}
    assert kinds == {"hiera_block", "decoder_attention", "other"}
    starts = {u.start[0] for u in ctx.units if u.changes_anything}
    assert len(starts) >= 4  # full, Hiera block, neck, after the encoder, decoder only
    # every unit in restore mode (W4A8), else one unit per restart point and every unit with float parameters
    one_per_start = list({u.start[0]: u for u in ctx.units if u.changes_anything}.values())
    for mode in ("restore", "isolate"):
        units = ctx.units if which == "w4a8_mixed" and mode == "restore" else \
            one_per_start + [u for u in ctx.units if u.params]
        for unit in units:
            fast, naive = ctx.prediction_with([unit], mode), ctx.prediction_with([unit], mode, naive=True)
            assert same(fast, naive), (mode, unit.key)
    assert same(ctx.prediction_with(ctx.units, "restore"), fp_plain)  # every unit restored: the float model
    assert same(ctx.prediction_with(ctx.units, "isolate"), ctx.q_prediction)  # every unit quantized: Q
    # and the model object is left as it was: quantized again
    assert same(run_plain(ctx.model, image, prompts), ctx.q_prediction)
    rows = attribute(ctx, "image_encoder_trunk_blocks_*", "restore")
    assert [r["unit"] for r in rows] == [f"image_encoder_trunk_blocks_{i}" for i in range(6)]
    assert all(r["restart"].startswith("from Hiera block") for r in rows)
    assert all(r["delta_iou"] == pytest.approx(r["iou"] - r["baseline_iou"]) for r in rows)


def test_passthrough_attribution_is_exactly_zero(scene, quant_checkpoints, tmp_path, photos, sweep):
    image, prompts, fp_state, fp_plain = scene
    cfg, ckpt = quant_checkpoints["passthrough"]
    ctx = context(ckpt, cfg, fp_state, image, prompts)
    assert same(ctx.q_prediction, fp_plain)
    for mode in ("restore", "isolate"):
        rows = attribute(ctx, None, mode)
        assert len(rows) == 13 and {r["delta_iou"] for r in rows} == {0.0} and {r["iou"] for r in rows} == {1.0}
    # through the sweep (two of the photos)
    (tmp_path / "two.csv").write_text(f"image,points\n{photos / 'a_cat.png'},200 150 1\n"
                                      f"{photos / 'd_cup_crop.jpg'},100 100 1 300 200 0\n")
    out = tmp_path / "isolate"
    assert sweep("passthrough", tmp_path / "two.csv", out, "--attribute", "--attribute-mode", "isolate") == 0
    a = pd.read_parquet(out / "attribution.parquet")
    assert len(a) == 2 * 13 and (a["delta_iou"] == 0).all() and (a["iou"] == 1).all()
    assert (a["mode"] == "isolate").all()
    layers = pd.read_csv(out / "sweep" / "layers.csv")
    assert (layers["attribution_delta_iou_mean"] == 0).all()
    assert (pd.read_parquet(out / "items.parquet")["iou"] == 1).all()


def test_compare_attribute_shown_by_generate(tmp_path, tiny_checkpoint, quant_checkpoints):
    cfg, ckpt = quant_checkpoints["w4a8_mixed"]
    run = tmp_path / "run"
    assert main(compare_args(tiny_checkpoint, cfg, ckpt, run, "--save-raw", "--attribute", "--attribute-layers",
                             "image_encoder_trunk_blocks_0,image_encoder_neck,*final*")) == 0
    data = json.loads((run / "attribution.json").read_text())
    assert data["schema"] == "sam2-layerwise/attribution" and data["mode"] == "restore"
    units = [u["unit"] for u in data["units"]]
    assert units == ["image_encoder_trunk_blocks_0", "image_encoder_neck",
                     "sam_mask_decoder_transformer_final_attn_token_to_image"]
    assert json.loads((run / "manifest.json").read_text())["attribution"] == "attribution.json"
    assert main(["generate", "--run_dir", str(run), "-q"]) == 0
    table = pd.read_csv(run / "analysis" / "attribution.csv")
    assert list(table["unit"]) == units
    metrics = json.loads((run / "analysis" / "metrics.json").read_text())
    assert metrics["attribution"]["units"][0]["unit"] == units[0]
    assert "analysis/plots/attribution.png" in metrics["files"]["plots"]
    # a damaged attribution.json is named, not trusted
    (run / "attribution.json").write_text('{"schema": "sam2-layerwise/attribution", "mode": "restore", "units": [1]}')
    assert main(["generate", "--run_dir", str(run), "-q"]) == 2
    # compare's bad input: the flags need --attribute
    assert main(compare_args(tiny_checkpoint, cfg, ckpt, tmp_path / "x", "--save-raw", "--attribute-mode",
                             "isolate")) == 2
    assert not (tmp_path / "x").exists()


def test_units_partition_the_quantized_sites(scene, quant_checkpoints):
    image, prompts, fp_state, _ = scene
    cfg, ckpt = quant_checkpoints["w8a8"]
    loaded, qm = load_quantized_model(TINY_CONFIG, str(ckpt), load_quant_config(cfg), device="cpu")
    units = build_units(loaded.model, qm)
    sites = [s for u in units for s in u.sites]
    assert len(sites) == len(set(sites)) == len(qm.sites)  # every quantizer in exactly one unit
    assert [u.order for u in units] == list(range(len(units)))
    with pytest.raises(Exception, match="--attribute-layers"):
        select_units(units, "image_encoder_trunk_blocks_9")
