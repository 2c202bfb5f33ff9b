"""compare + generate end to end on the tiny model: exact zeros for a passthrough twin, bit-identical
recomputation from full mode, layer and head selection, the seed's commands, and the tables' contents."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from sam2_layerwise.analysis.generate import GenerateOptions, analyse, layer_pairs, probs_transform
from sam2_layerwise.capture.attention import attention_rows
from sam2_layerwise.cli.main import main
from sam2_layerwise.metrics import pair_metrics
from sam2_layerwise.store.atomic import safe_load
from sam2_layerwise.store.compare_run import open_compare_run
from tests.analysis.conftest import compare_args
from tests.conftest import REPO


def generate(run, *extra):
    assert main(["generate", "--run_dir", str(run), "-q", *extra]) == 0
    return json.loads((run / "analysis" / "metrics.json").read_text())


def test_run_layout_and_manifest(compare_runs):
    run = compare_runs["w8a8", "raw"]
    m = json.loads((run / "manifest.json").read_text())
    assert m["schema"] == "sam2-layerwise/compare" and m["mode"] == "light"
    assert set(m["models"]) == {"original", "quantized"} and len(m["models"]["quantized"]["checkpoint_sha256"]) == 64
    assert m["image"]["sha256"] and m["prompts"]["points"][0] == [300.0, 200.0, 1]
    assert "format: sam2-layerwise/quant-config" in m["quantization_config"]["text"]
    assert {"torch", "sam2", "sam2_layerwise"} <= set(m["versions"])
    for half in ("original", "quantized"):  # each half is a visualize run: render works on it
        assert (run / half / "layerwise_summary.json").is_file() and (run / half / "predictions.pt").is_file()
    assert main(["render", "--run-dir", str(run / "original"), "-q"]) == 0
    assert any((run / "original" / "attn_images" / "all").iterdir())


@pytest.mark.parametrize("name", ["w8a8", "w4a8_mixed"])
def test_quantized_half_equals_a_freshly_built_quantized_model(compare_runs, quant_checkpoints, tiny_checkpoint, name,
                                                               monkeypatch):
    """compare lends the float half's modules to the quantized half (one model built): its predictions are those
    of the quantized model built on its own, and of the float model, bit for bit."""
    import numpy as np

    import hydra.utils

    from sam2_layerwise import build_model, load_image, parse_prompts, run_plain
    from sam2_layerwise.quant import load_quant_config, load_quantized_model
    from tests.conftest import COFFEE, TINY_CONFIG

    run = compare_runs[name, "raw"]
    image = load_image(COFFEE)
    prompts = parse_prompts([300, 200, 1, 120, 80, 0], None, [500, 350], image.shape[1], image.shape[0])
    cfg, ckpt = quant_checkpoints[name]
    loaded, qm = load_quantized_model(TINY_CONFIG, str(ckpt), load_quant_config(cfg), device="cpu")
    fresh = {"quantized": run_plain(loaded.model, image, prompts)}
    qm.remove()
    fresh["original"] = run_plain(build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu").model, image, prompts)
    for half, want in fresh.items():
        got = safe_load(run / half / "predictions.pt")
        assert np.array_equal(got["masks"].numpy(), want.masks), half
        assert np.array_equal(got["low_res_logits"].numpy(), want.low_res_logits), half

    # and it was lent: one model built for the two halves
    built = []
    original = hydra.utils.instantiate
    monkeypatch.setattr(hydra.utils, "instantiate", lambda *a, **kw: built.append(1) or original(*a, **kw))
    out = run.parent / f"{name}-again"
    assert main(compare_args(tiny_checkpoint, cfg, ckpt, out)) == 0
    assert len(built) == 1
    again = safe_load(out / "quantized" / "predictions.pt")
    assert torch.equal(again["low_res_logits"], safe_load(run / "quantized" / "predictions.pt")["low_res_logits"])


def test_passthrough_twin_changes_nothing_exactly(compare_runs):
    for mode in ("raw", "full"):
        metrics = generate(compare_runs["passthrough", mode])
        heads = pd.read_csv(compare_runs["passthrough", mode] / "analysis" / "metrics_heads.csv")
        assert (heads["js_mean"] == 0).all() and (heads["js_max"] == 0).all()
        assert (heads["entropy_norm_delta"] == 0).all() and (heads["topk_overlap"] == 1).all()
        assert (heads[["q_rel_err", "k_rel_err", "v_rel_err", "out_rel_err"]] == 0).all().all()
        imp = metrics["output_impact"]
        assert all(m["iou"] == 1.0 for m in imp["masks"]) and not imp["chosen"]["changed"]
        assert imp["logits"]["max_abs_error"] == 0


def test_heads_whose_rows_all_lost_their_distribution_rank_first():
    """A head every row of which was quantized to zeros (no JS) is the most damaged: it ranks first, its
    undefined rows counted; a head with no row at all ranks last; the rest by mean JS."""
    from sam2_layerwise.analysis.generate import ranked

    def row(order, head, js, undefined, n=4):
        return {"order": order, "head": head, "layer_key": f"l{order}", "call_index": 0, "layer": f"L{order}",
                "kind": "k", "n_queries": n, "js_undefined": undefined, "js_mean": js}

    heads = [row(0, 0, 0.2, 0), row(0, 1, None, 4), row(1, 0, 0.5, 2), row(1, 1, float("nan"), 0, n=0),
             row(2, 0, 0.2, 0)]
    got = [(r["layer_key"], r["head"], r["js_undefined"]) for r in ranked(heads, 10)]
    assert got == [("l0", 1, 4), ("l1", 0, 2), ("l0", 0, 0), ("l2", 0, 0), ("l1", 1, 0)]


def test_w8a8_changes_attention_within_bounds(compare_runs):
    metrics = generate(compare_runs["w8a8", "raw"])
    heads = pd.read_csv(compare_runs["w8a8", "raw"] / "analysis" / "metrics_heads.csv")
    assert (heads["js_mean"] > 0).any() and (heads["js_max"] <= 1).all() and (heads["js_mean"] >= 0).all()
    assert (heads["q_rel_err"] > 0).all()  # q is 8-bit quantized in every captured layer
    assert (heads["js_undefined"] == 0).all()  # every row of a W8A8 twin is a distribution
    queries = pd.read_csv(compare_runs["w8a8", "raw"] / "analysis" / "metrics_queries.csv")
    assert set(queries["query"]) >= {"click0", "click1", "query0"}
    # the heads table's mean is the mean of the queries table
    first = heads.iloc[0]
    sel = queries[(queries.layer_key == first.layer_key) & (queries["head"] == first["head"])]
    assert sel["js"].mean() == pytest.approx(first["js_mean"], rel=1e-6)
    ranking = metrics["ranking"]
    assert ranking[0]["js_mean"] == pytest.approx(heads["js_mean"].max(), rel=1e-12)
    assert [r["rank"] for r in ranking] == list(range(1, len(ranking) + 1))
    assert (compare_runs["w8a8", "raw"] / "analysis" / "plots" / "heatmap_js_mean.png").stat().st_size > 1000


def test_layer_range_and_heads_select_exactly(compare_runs):
    run = compare_runs["w8a8", "raw"]
    generate(run, "--layers", "image_encoder_trunk_blocks_1:3,sam_mask_decoder_transformer_layers_0_self_attn",
             "--heads", "0:1")
    heads = pd.read_csv(run / "analysis" / "metrics_heads.csv")
    assert list(dict.fromkeys(heads["layer_key"])) == [
        "image_encoder_trunk_blocks_1", "image_encoder_trunk_blocks_2", "image_encoder_trunk_blocks_3",
        "sam_mask_decoder_transformer_layers_0_self_attn"]
    assert set(heads["head"]) == {0, 1}
    generate(run, "--heads", "0,3")
    heads = pd.read_csv(run / "analysis" / "metrics_heads.csv")
    assert set(heads["head"]) == {0, 3}


def test_full_mode_recomputes_light_rows_bit_for_bit(compare_runs):
    """Any row recomputed from full mode's q/k/v by the capture's attention_rows equals the saved row."""
    run = open_compare_run(compare_runs["w4a8_mixed", "full"])
    checked_transform = 0
    for pair in layer_pairs(run):
        for half, entry in (("original", pair.fp), ("quantized", pair.q)):
            full = safe_load(run.path(half, entry["files"]["full"]))
            attn = safe_load(run.path(half, entry["files"]["attn"]))
            picks = [(q["group"], q["index"]) for q in entry["queries"]]
            transform = probs_transform(full, run, pair) if half == "quantized" else None
            checked_transform += transform is not None
            rows, _ = attention_rows(full["q"], full["k"], full["v"], full["scale"], transform, picks, full["tiled"])
            assert torch.equal(rows, attn["probs"]), (half, pair.layer_key)
    assert checked_transform > 0  # the log2 probability quantizer was exercised


def test_light_and_full_agree_on_shared_rows(compare_runs):
    light = open_compare_run(compare_runs["w4a8_mixed", "raw"])
    full = open_compare_run(compare_runs["w4a8_mixed", "full"])
    res_light = analyse(light, GenerateOptions())
    res_full = analyse(full, GenerateOptions())
    by_key = {(r["layer_key"], r["head"]): r for r in res_full["heads"]}
    for r in res_light["heads"]:
        f = by_key[r["layer_key"], r["head"]]
        assert f["n_queries"] >= r["n_queries"]
        assert r["js_max"] <= f["js_max"] + 1e-6  # the selected rows are among every row
        for name in ("q_rel_err", "k_rel_err", "v_rel_err"):
            if r["kind"] == "hiera_global" or r["kind"].startswith("decoder"):  # the saved group is everything
                assert r[name] == pytest.approx(f[name], rel=1e-5)
    # per query: the light rows' metrics equal the same rows recomputed from full mode's q/k/v
    pair = layer_pairs(full)[0]
    ff = safe_load(full.path("original", pair.fp["files"]["full"]))
    qf = safe_load(full.path("quantized", pair.q["files"]["full"]))
    picks = [(q["group"], q["index"]) for q in pair.fp["queries"]]
    p, _ = attention_rows(ff["q"], ff["k"], ff["v"], ff["scale"], None, picks, ff["tiled"])
    q, _ = attention_rows(qf["q"], qf["k"], qf["v"], qf["scale"], probs_transform(qf, full, pair), picks, qf["tiled"])
    queries = pd.DataFrame(res_light["queries"])
    mine = pair_metrics(p, q, res_light["k"])["js"]  # [n, heads]
    sel = queries[queries.layer_key == pair.layer_key]
    for _, row in sel.iterrows():
        i = [qq["label"] for qq in pair.fp["queries"]].index(row["query"])
        assert row["js"] == pytest.approx(float(mine[i, row["head"]]), abs=1e-6)


def test_full_fp16_is_smaller(tmp_path, tiny_checkpoint, quant_checkpoints, compare_runs):
    from tests.analysis.conftest import compare_args

    cfg, ckpt = quant_checkpoints["w8a8"]
    out = tmp_path / "half"
    assert main(compare_args(tiny_checkpoint, cfg, ckpt, out, "--save-full-attn", "--full-dtype", "fp16")) == 0
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*__full.pt"))  # noqa: E731
    assert size(out) < 0.6 * size(compare_runs["w4a8_mixed", "full"])
    assert json.loads((out / "manifest.json").read_text())["full_dtype"] == "float16"
    generate(out)


def test_seed_commands_as_python_modules(tmp_path, tiny_checkpoint, quant_checkpoints):
    """The seed ran compare_quantization.py and `python -m visualization.interactive_viz.generate`."""
    cfg, ckpt = quant_checkpoints["w8a8"]
    out = tmp_path / "interactive_viz" / "run_latest"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    from tests.conftest import COFFEE, TINY_CONFIG

    subprocess.run([sys.executable, "-m", "sam2_layerwise.compare", "--config-quantized", str(cfg),
                    "--config-original", TINY_CONFIG, "--checkpoint-original", str(tiny_checkpoint),
                    "--checkpoint-quantized", str(ckpt), "--image", str(COFFEE), "--points", "320", "240", "1",
                    "--output-dir", str(out), "--save-raw"], check=True, env=env, cwd=tmp_path,
                   capture_output=True)
    done = subprocess.run([sys.executable, "-m", "sam2_layerwise.generate", "--run_dir", str(out), "--layers",
                           "image_encoder_trunk_blocks_0:5", "--heads", "all"], env=env, cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "most changed heads" in done.stderr
    heads = pd.read_csv(out / "analysis" / "metrics_heads.csv")
    assert list(dict.fromkeys(heads["layer_key"])) == [f"image_encoder_trunk_blocks_{i}" for i in range(6)]
