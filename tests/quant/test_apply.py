"""A quantized tiny SAM 2 through the real predictor and the capture: passthrough is exact, W8 changes a little,
W4 more, and the captured attention is what the quantized kernel used."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from sam2_layerwise import CaptureOptions, capture_image, run_plain
from sam2_layerwise.quant import calibrate_model, load_quant_config, quantize_model
from tests.quant.helpers import EXAMPLES, js_bits, mean_js, mean_mask_iou


@dataclass
class QuantRun:
    qm: object
    cap: object
    plain: object


def _run(model, cfg, calib, image, prompts) -> QuantRun:
    qm = calibrate_model(model, cfg, calib)
    try:
        plain = run_plain(model, image, prompts)  # the real SAM2ImagePredictor, no capture, no context manager
        with qm.monitoring():
            cap = capture_image(model, image, prompts, CaptureOptions(keep_qkv=True, max_attn_queries=3))
    finally:
        qm.remove()
    return QuantRun(qm, cap, plain)


@pytest.fixture(scope="module")
def w8(qmodel, w8a8_cfg, chelsea, coffee, prompts):
    return _run(qmodel, w8a8_cfg, [chelsea, coffee], chelsea, prompts)


@pytest.fixture(scope="module")
def w4(qmodel, w4a8_cfg, chelsea, coffee, prompts):
    return _run(qmodel, w4a8_cfg, [chelsea, coffee], chelsea, prompts)


@pytest.fixture(scope="module")
def mixed(qmodel, mixed_cfg, chelsea, coffee, prompts):
    return _run(qmodel, mixed_cfg, [chelsea, coffee], chelsea, prompts)


def test_passthrough_is_exactly_the_float_model(qmodel, float_capture, chelsea, prompts):
    qm = quantize_model(qmodel, load_quant_config(EXAMPLES / "passthrough.yaml"))
    try:
        assert qm.sites == {} and qm.floats
        cap = capture_image(qmodel, chelsea, prompts, CaptureOptions(keep_qkv=True, max_attn_queries=3))
    finally:
        qm.remove()
    assert np.array_equal(cap.prediction.masks, float_capture.prediction.masks)
    assert np.array_equal(cap.prediction.low_res_logits, float_capture.prediction.low_res_logits)
    assert np.array_equal(cap.prediction.iou_predictions, float_capture.prediction.iou_predictions)
    for a, b in zip(float_capture.attention, cap.attention):
        assert a.name == b.name and torch.equal(a.probs, b.probs) and torch.equal(a.qkv["q"], b.qkv["q"])


def test_w8_changes_a_little_w4_more(float_capture, w8, w4):
    js8, js4 = mean_js(float_capture.attention, w8.cap.attention), mean_js(float_capture.attention, w4.cap.attention)
    iou8 = mean_mask_iou(float_capture.prediction, w8.cap.prediction)
    iou4 = mean_mask_iou(float_capture.prediction, w4.cap.prediction)
    ref = float_capture.prediction.low_res_logits
    err8 = np.abs(w8.cap.prediction.low_res_logits - ref).mean()
    err4 = np.abs(w4.cap.prediction.low_res_logits - ref).mean()
    print(f"tiny: JS w8a8 {js8:.2e} w4a8 {js4:.2e}; mask IoU {iou8:.4f} {iou4:.4f}; logit err {err8:.2e} {err4:.2e}")
    assert 0 < js8 < 0.01 and iou8 > 0.9 and err8 > 0  # a little
    assert js4 > js8 and err4 > err8 and iou4 <= iou8  # W4 more


def test_quantized_model_runs_through_the_real_predictor_and_capture_changes_nothing(w8, w4):
    for r in (w8, w4):
        assert np.array_equal(r.plain.masks, r.cap.prediction.masks)
        assert np.array_equal(r.plain.low_res_logits, r.cap.prediction.low_res_logits)


def test_remove_gives_the_float_model_back(qmodel, w8, float_capture, chelsea, prompts, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)["model"]
    for k, v in qmodel.state_dict().items():
        assert torch.equal(v, state[k]), k
    again = run_plain(qmodel, chelsea, prompts)
    assert np.array_equal(again.low_res_logits, float_capture.prediction.low_res_logits)


def test_state_dict_is_float_while_installed(qmodel, w8a8_cfg, chelsea, coffee, prompts, tiny_checkpoint):
    qm = calibrate_model(qmodel, w8a8_cfg, [coffee])
    try:
        run_plain(qmodel, chelsea, prompts)
        state = torch.load(tiny_checkpoint, weights_only=True)["model"]
        assert all(torch.equal(v, state[k]) for k, v in qmodel.state_dict().items())
    finally:
        qm.remove()


@pytest.mark.parametrize("which", ["w8", "w4", "mixed"])
def test_capture_fidelity_holds_for_quantized_models(which, request):
    run = request.getfixturevalue(which)
    for r in run.cap.attention:
        assert r.kernel_max_abs_err <= 1e-4, (which, r.layer_key, r.kernel_max_abs_err)
        assert r.module_max_abs_err is not None and r.module_max_abs_err <= 1e-4, (which, r.layer_key, r.module_max_abs_err)


def _log2_reference(p: torch.Tensor, bits: int) -> torch.Tensor:
    """2^-round(-log2 p), zero for the last code: written out again, independently of the quantizer code."""
    top = 2 ** bits - 1
    code = np.rint(-np.log2(np.maximum(p, 1e-300)))
    out = np.where((code >= top) | (p <= 0), 0.0, np.exp2(-np.minimum(code, top)))
    return torch.from_numpy(out)


def test_recorded_rows_are_the_quantized_kernel_rows(mixed):
    """q/k recorded by capture lie on their quantizer's grid, and the recorded probabilities equal log2-quantized
    softmax of those q/k computed here in float64 (up to a code flip where float32 sits on a rounding boundary)."""
    checked = 0
    for r in mixed.cap.attention:
        qm = mixed.qm
        probs_site = f"{r.name}:probs"
        qscale = qm.quantizers[f"{r.name}:q"].scale.item()
        codes = r.qkv["q"].double() / qscale
        assert (codes - codes.round()).abs().max().item() < 1e-3, r.layer_key  # quantized q, not float q
        kscale = qm.quantizers[f"{r.name}:k"].scale.item()
        kcodes = r.qkv["k"].double() / kscale
        assert (kcodes - kcodes.round()).abs().max().item() < 1e-3, r.layer_key
        if probs_site not in qm.quantizers:
            continue
        bits = qm.quantizers[probs_site].bits
        for n, spec in enumerate(r.queries):
            g = r.qkv["groups"].index(spec.group)
            q = r.qkv["q"][g, :, spec.index].double()  # [h, d]
            k = r.qkv["k"][g].double()  # [h, Nk, d]
            soft = torch.softmax((k @ q.unsqueeze(-1)).squeeze(-1) * r.scale, dim=-1).numpy()  # [h, Nk]
            expected = _log2_reference(soft, bits)
            got = r.probs[n].double()
            same = got == expected
            assert same.double().mean().item() > 0.995, (r.layer_key, same.double().mean().item())
            # where they differ, float64 put the value within a hair of a code boundary
            dist = np.abs(np.abs(-np.log2(np.maximum(soft, 1e-300))) % 1 - 0.5)
            assert np.all(dist[~same.numpy()] < 1e-4), r.layer_key
            assert not torch.allclose(got, torch.from_numpy(soft))  # not the float softmax
            checked += 1
    assert checked >= 6 * 1  # every Hiera block has log2 probabilities in w4a8_mixed


def test_quantized_probabilities_are_what_out_was_computed_from(mixed):
    """The kernel output rows equal recorded probs @ recorded v exactly (kernel error 0: same tiles)."""
    hiera = [r for r in mixed.cap.attention if f"{r.name}:probs" in mixed.qm.quantizers]
    assert hiera and all(r.kernel_max_abs_err == 0.0 for r in hiera)


def test_per_module_report(mixed, w8, w4):
    for run in (mixed, w8):
        for r in run.cap.attention:
            assert r.quant is None  # capture does not fill it; the CLI does (annotate_capture)
    from sam2_layerwise.cli.quantize import annotate_capture

    section = annotate_capture(mixed.cap, mixed.qm)["quantization"]
    rec = mixed.cap.record("image_encoder_trunk_blocks_3")
    assert rec.quant["kernel"]["probs"]["kind"] == "log2" and rec.quant["kernel"]["probs"]["bits"] == 4
    assert rec.quant["layers"]["qkv"]["weight"]["bits"] == 4 and rec.quant["layers"]["qkv"]["input"]["bits"] == 8
    for entry in section["quantizers"]:
        err = entry["error"]
        assert 0.0 <= err["clip_rate"] <= 1.0 and err["rel_rmse"] >= 0.0
        if entry["role"] != "weight" and entry["module"].startswith(("image_encoder", "sam_mask_decoder.transformer")):
            assert err["elements"] > 0, entry["id"]  # ran on this input
        if "scale" in entry:
            assert entry["scale"]["min"] <= entry["scale"]["mean"] <= entry["scale"]["max"]
    probs = rec.quant["kernel"]["probs"]["error"]
    assert probs["elements"] == np.prod(rec.q_shape[:3]) * rec.k_shape[2]  # every probability the kernel used
    # the same layer's weight error is larger at 4 bits than at 8
    qid = "image_encoder.trunk.blocks.0.attn.qkv:weight"
    assert w4.qm.site_report(qid)["error"]["rel_rmse"] > 4 * w8.qm.site_report(qid)["error"]["rel_rmse"]
    assert section["bits_histogram"] == {"8": 185, "4": 26}


def test_js_helper_is_sane():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    assert js_bits(p, p).item() == pytest.approx(0.0, abs=1e-12)
    assert js_bits(p, torch.tensor([[0.0, 0.0, 1.0]])).item() == pytest.approx(1.0)


def test_calibration_covers_the_mask_path_and_names_what_saw_nothing(qmodel, chelsea):
    from sam2_layerwise.errors import ModelError
    from sam2_layerwise.quant import parse_config

    cfg = parse_config({"rules": [{"match": "sam_prompt_encoder.mask_downscaling", "activation": {"bits": 8}}]}, "m.yaml")
    qm = calibrate_model(qmodel, cfg, [chelsea])  # the second calibration prompt feeds a mask input
    qm.remove()
    assert all(fq.scale is not None for fq in qm.quantizers.values())
    with pytest.raises(ModelError, match=r"3 quantizers saw no calibration data: sam_prompt_encoder.mask_downscaling.0:input"):
        calibrate_model(qmodel, cfg, [])


def test_selected_rows_come_from_the_kernels_tiles(qmodel, mixed_cfg, chelsea, coffee, prompts, monkeypatch):
    """A tiled quantized kernel hands the capture the selected rows from the tiles it computed (no second
    computation), and they are the rows `attention_rows` computes again, bit for bit."""
    from sam2_layerwise.capture import session
    from sam2_layerwise.quant.apply import QuantKernel

    recomputed = []
    real = session.attention_rows
    monkeypatch.setattr(session, "attention_rows", lambda *a, **k: recomputed.append(1) or real(*a, **k))
    kept = _run(qmodel, mixed_cfg, [chelsea, coffee], chelsea, prompts)
    assert not recomputed  # every attention module of the mixed config is tiled
    monkeypatch.setattr(QuantKernel, "keeps_rows", property(lambda self: False))
    again = _run(qmodel, mixed_cfg, [chelsea, coffee], chelsea, prompts)
    assert len(recomputed) == len(again.cap.attention)
    for a, b in zip(kept.cap.attention, again.cap.attention):
        assert [(s.group, s.index) for s in a.queries] == [(s.group, s.index) for s in b.queries]
        assert torch.equal(a.probs, b.probs), a.layer_key
        assert a.kernel_max_abs_err == b.kernel_max_abs_err == 0.0 and a.module_max_abs_err == b.module_max_abs_err
    assert np.array_equal(kept.cap.prediction.masks, again.cap.prediction.masks)


def test_weight_errors_come_from_the_install_read(qmodel, w8a8_cfg, chelsea, coffee, monkeypatch):
    """The summary's per-weight error is taken while the fake-quantized weight is computed (one read), and equals
    `quantization_error` on the float weight."""
    from sam2_layerwise.quant import apply
    from sam2_layerwise.quant.quantizers import quantization_error

    qm = calibrate_model(qmodel, w8a8_cfg, [chelsea, coffee])
    try:
        calls = []
        real = apply.quantization_error
        monkeypatch.setattr(apply, "quantization_error", lambda *a: calls.append(1) or real(*a))
        weights = [qid for qid, site in qm.sites.items() if site.role == "weight"]
        assert weights
        for qid in weights:
            site, fq = qm.sites[qid], qm.quantizers[qid]
            got = qm.site_report(qid)["error"]
            expected = quantization_error(fq, qm._layers[site.module].float_weight.detach()).to_dict()
            assert {k: v for k, v in got.items() if k != "on"} == expected, qid
        from sam2_layerwise.capture import native

        if native.kernel() is not None:  # the compiled read gives the error with the copy; the torch path measures it
            assert not calls  # none computed again
    finally:
        qm.remove()
