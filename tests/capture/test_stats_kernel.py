"""All-query statistics: the compiled kernel and the torch fallback, against each other and a float64 reference."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from sam2_layerwise import CaptureOptions, capture_image, parse_prompts, run_plain
from sam2_layerwise.capture import native
from sam2_layerwise.capture.attention import query_statistics
from tests.conftest import CHELSEA, REPO, TINY_CONFIG

STATS = ("entropy", "entropy_norm", "max_prob", "topk_mass")
PATHS = ("compiled", "torch")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv(native.MODE_ENV, request.param)
    if request.param == "compiled":
        try:
            native.kernel()
        except native.KernelUnavailable as exc:
            pytest.skip(f"no compiler here: {exc}")  # the fallback path is still tested
    return request.param


def reference(q, k, scale, topk=5, segments=None):
    """float64 statistics from full maps (small shapes only)."""
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, -1)
    ent = -torch.special.xlogy(p, p).sum(-1)
    nk = p.shape[-1]
    kk = min(topk, nk)
    out = {"entropy": ent, "entropy_norm": ent / (math.log(nk) if nk > 1 else 1.0), "max_prob": p.amax(-1),
           "topk_mass": p.topk(kk, -1).values.sum(-1) if kk else torch.zeros_like(ent)}
    if segments:
        out["segment_mass"] = torch.stack([p[..., a:b].sum(-1) for a, b in segments], -1)
    return out


def assert_close(got, want, tol=1e-5):
    for name, value in want.items():
        err = (got[name].double() - value).abs().max().item()
        assert err <= tol, (name, err)


@pytest.fixture(scope="module")
def real_qk(tiny_model, chelsea):
    """q/k of every attention the tiny model ran on a real photograph (windowed, pooled, global, decoder)."""
    prompts = parse_prompts([220, 150, 1], None, None, chelsea.shape[1], chelsea.shape[0])
    cap = capture_image(tiny_model, chelsea, prompts,
                        CaptureOptions(keep_all_qkv=True, all_query_stats=False, max_attn_queries=1))
    return [(r.layer_key, r.full_qkv["q"], r.full_qkv["k"], r.full_qkv["scale"]) for r in cap.attention]


@pytest.mark.parametrize("sharpen", [1, 16, 64])
def test_real_attention_within_1e5_of_float64(path, real_qk, sharpen):
    """Every attention of a real capture, and the same attention sharpened (q x16, x64: near one-hot rows)."""
    for key, q, k, scale in real_qk:
        got = query_statistics(q * sharpen, k, scale)
        want = reference(q * sharpen, k, scale)
        for name in STATS:
            err = (got[name].double() - want[name]).abs().max().item()
            assert err <= 1e-5, (key, name, sharpen, err)


@pytest.mark.parametrize("nk", [1, 3, 16, 64, 196, 300, 1031])
@pytest.mark.parametrize("topk", [0, 1, 5, 40])
def test_key_counts_and_topk(path, nk, topk):
    """Key counts below, at and across the kernel's 16-key chunks and 256-key blocks; k above the key count."""
    gen = torch.Generator().manual_seed(nk * 100 + topk)
    q, k = torch.randn(2, 3, 20, 8, generator=gen), torch.randn(2, 3, nk, 8, generator=gen)
    assert_close(query_statistics(q, k, 0.7, topk=topk), {n: v for n, v in reference(q, k, 0.7, topk).items()})


@pytest.mark.parametrize("layout", ["qkv_view", "groups_apart", "broadcast_heads", "strided_last", "one_group"])
def test_strided_q_and_k_are_read_in_place(path, layout):
    """q/k as SAM 2 hands them over (views into one [B, N, 3, heads, d] projection), groups whose heads are not
    evenly spaced, keys shared by every head (stride 0), and a strided last dimension: the same statistics."""
    gen = torch.Generator().manual_seed(7)
    if layout in ("qkv_view", "one_group"):
        G = 1 if layout == "one_group" else 5
        qkv = torch.randn(G, 300, 3, 4, 16, generator=gen)  # [B, N, 3, heads, d]
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # [G, heads, N, d], row stride 3*4*16
    elif layout == "groups_apart":
        big = torch.randn(6, 5, 40, 16, generator=gen)
        q, k = big[::2, 1:4], big[1::2, 2:5, :33]
    elif layout == "broadcast_heads":
        q = torch.randn(3, 4, 50, 16, generator=gen)
        k = torch.randn(3, 1, 70, 16, generator=gen).expand(3, 4, 70, 16)
    else:
        q = torch.randn(2, 3, 40, 32, generator=gen)[..., ::2]
        k = torch.randn(2, 3, 90, 32, generator=gen)[..., 1::2]
    assert not (q.is_contiguous() and k.is_contiguous())
    assert_close(query_statistics(q, k, 0.3, topk=5), reference(q, k, 0.3))
    got = query_statistics(q, k, 0.3, topk=5)
    again = query_statistics(q.contiguous(), k.contiguous(), 0.3, topk=5)
    for name in STATS:  # where they lie or copied: one product, the same bits
        assert torch.equal(got[name], again[name]), name


def test_ties_and_uniform_rows(path):
    """Equal scores everywhere: entropy log N, max 1/N, top-k mass k/N exactly as a float64 reference."""
    q = torch.zeros(1, 2, 5, 4)
    k = torch.randn(1, 2, 77, 4)
    got = query_statistics(q, k, 1.0, topk=7)
    torch.testing.assert_close(got["entropy_norm"], torch.ones(1, 2, 5), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["max_prob"], torch.full((1, 2, 5), 1 / 77), atol=1e-7, rtol=0)
    torch.testing.assert_close(got["topk_mass"], torch.full((1, 2, 5), 7 / 77), atol=1e-6, rtol=0)
    # one key repeated: the top-k must count ties, not skip them
    k2 = torch.randn(1, 2, 64, 4)
    k2[..., 10:20, :] = k2[..., 3:4, :]
    q2 = torch.randn(1, 2, 6, 4)
    assert_close(query_statistics(q2, k2, 2.0, topk=12), reference(q2, k2, 2.0, 12))


@pytest.mark.parametrize("segments", [[(0, 40), (40, 100), (100, 103)], [(5, 40), (60, 100)], [(0, 103)]])
def test_segment_mass(path, segments):
    """Memory cross-attention's mass per key segment, covering the keys or with gaps, with and without the rest."""
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 2, 30, 16, generator=gen) * 3, torch.randn(2, 2, 103, 16, generator=gen)
    want = reference(q, k, 0.25, segments=segments)
    assert_close(query_statistics(q, k, 0.25, segments=segments), want)
    only = query_statistics(q, k, 0.25, segments=segments, stats=False)
    assert set(only) == {"segment_mass"}
    assert_close(only, {"segment_mass": want["segment_mass"]})


def test_paths_agree(monkeypatch, real_qk):
    monkeypatch.setenv(native.MODE_ENV, "compiled")
    try:
        native.kernel()
    except native.KernelUnavailable as exc:
        pytest.skip(f"no compiler here: {exc}")
    for key, q, k, scale in real_qk:
        monkeypatch.setenv(native.MODE_ENV, "compiled")
        a = query_statistics(q * 16, k, scale)
        monkeypatch.setenv(native.MODE_ENV, "torch")
        b = query_statistics(q * 16, k, scale)
        for name in STATS:
            assert (a[name] - b[name]).abs().max().item() <= 1e-5, (key, name)


def test_masks_bit_identical_on_either_path(path, tiny_model, chelsea):
    prompts = parse_prompts([220, 150, 1], None, None, chelsea.shape[1], chelsea.shape[0])
    plain = run_plain(tiny_model, chelsea, prompts)
    cap = capture_image(tiny_model, chelsea, prompts, CaptureOptions(max_attn_queries=2))
    assert cap.attention[0].query_stats is not None
    assert torch.equal(torch.as_tensor(cap.prediction.masks), torch.as_tensor(plain.masks))
    assert torch.equal(torch.as_tensor(cap.prediction.low_res_logits), torch.as_tensor(plain.low_res_logits))
    assert native.used() == path


def test_kernel_builds_where_a_compiler_exists(monkeypatch):
    """Where a C++ compiler is installed (CI installs one) the kernel must build: otherwise every `compiled` test
    here would skip and a broken source would go unnoticed."""
    import shutil

    if not shutil.which(os.environ.get("CXX", "c++")):
        pytest.skip("no C++ compiler on this machine: the torch path is tested")
    monkeypatch.setenv(native.MODE_ENV, "compiled")
    assert native.kernel() is not None and native.path_name() == "compiled"


def test_no_compiler_falls_back_and_says_so(tmp_path, tiny_checkpoint):
    """A machine without a compiler: the build fails, the log says the torch path is used, the run succeeds and
    its summary records the path. With SAM2_LAYERWISE_STATS_KERNEL=compiled the same machine gets an error."""
    env = {**os.environ, "SAM2_LAYERWISE_KERNEL_CACHE": str(tmp_path / "kernels"), "CXX": str(tmp_path / "no-c++"),
           native.MODE_ENV: "auto"}
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sam2_layerwise.cli.main", "visualize", "--config", TINY_CONFIG, "--checkpoint",
           str(tiny_checkpoint), "--image", str(CHELSEA), "--points", "220", "150", "1", "--output-dir", str(out),
           "--layers", "image_encoder_trunk_blocks_0"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "using the torch path" in done.stderr
    summary = json.loads((out / "layerwise_summary.json").read_text())
    assert summary["tool"]["statistics_kernel"] == "torch"
    assert summary["attention"]

    code = ("import torch; from sam2_layerwise.capture.attention import query_statistics as s; "
            "s(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 3, 4), 1.0)")
    done = subprocess.run([sys.executable, "-c", code], env={**env, native.MODE_ENV: "compiled"}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "compiled statistics kernel is unavailable" in done.stderr


@pytest.mark.parametrize("shape", [(3, 7), (2, 64, 64, 56), (1, 1_000_003)])
def test_block_output_summaries(path, shape):
    """tensor_stats (block outputs) in one read: mean/std/min/max against float64; NaN still shows as NaN."""
    from sam2_layerwise.capture.records import tensor_stats

    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 3 + 1
    got, ref = tensor_stats(x), x.double()
    assert got["min"] == ref.min().item() and got["max"] == ref.max().item()
    assert abs(got["mean"] - ref.mean().item()) <= 1e-6 and abs(got["std"] - ref.std().item()) <= 1e-5 * 3
    x.view(-1)[5] = float("nan")
    bad = tensor_stats(x)
    assert math.isnan(bad["mean"]) and math.isnan(bad["min"])


@pytest.mark.parametrize("view", ["permuted", "channels_last", "sliced", "expanded", "strided"])
def test_block_output_summaries_of_views(path, view):
    """Permuted layouts are read in memory order with no copy; views with gaps or repeats are summarised as the
    tensor they show (never the memory around or under them)."""
    from sam2_layerwise.capture.records import tensor_stats

    base = torch.randn(2, 6, 8, 5, generator=torch.Generator().manual_seed(4)) * 2 - 1
    x = {"permuted": base.permute(0, 2, 3, 1), "channels_last": base.contiguous(memory_format=torch.channels_last),
         "sliced": base[:, 1:4], "expanded": base[:1, :1].expand(3, 6, 8, 5), "strided": base[..., ::2]}[view]
    got, ref = tensor_stats(x), x.contiguous().double()
    assert got["shape"] == list(x.shape)
    assert got["min"] == ref.min().item() and got["max"] == ref.max().item()
    assert abs(got["mean"] - ref.mean().item()) <= 1e-6 and abs(got["std"] - ref.std().item()) <= 1e-5


def test_quantizer_monitoring(path):
    """QuantStats (compare's per-quantizer clip rate and error) in one read: equal to float64 sums."""
    from sam2_layerwise.quant.quantizers import QuantStats, uniform_codes

    x = torch.randn(3, 1000, 77, generator=torch.Generator().manual_seed(5)) * 2
    raw, codes = uniform_codes(x, torch.tensor(0.02), torch.tensor(0.0), -127, 127)
    xq = codes * 0.02
    stats = QuantStats()
    stats.add_codes(x, xq, raw, -127, 127)
    stats.add(x[0], xq[0], 7)
    err = (xq.double() - x.double())
    both = torch.cat([err.reshape(-1), err[0].reshape(-1)])
    assert stats.clipped == int(((raw < -127) | (raw > 127)).sum()) + 7 and stats.elements == x.numel() * 4 // 3
    assert stats.sq_err == pytest.approx(both.square().sum().item(), rel=1e-6)  # float lanes, then float64
    assert stats.max_abs_err == pytest.approx(err.abs().max().item(), rel=1e-6)


@pytest.mark.parametrize("scale,zero,qmin,qmax", [(0.0123, 0.0, -127, 127), (0.05, 37.0, 0, 255),
                                                  (1.0, 0.0, -7, 7), (0.5, 3.0, 0, 15)])
def test_fake_quantizer_bit_identical(path, scale, zero, qmin, qmax):
    """A uniform per-tensor quantizer (compiled: one fused read) gives the torch ops' exact bits and layout, on
    ties (x/s halfway between codes: round half to even), +-0, NaN, +-inf, huge and subnormal values, dense
    layouts and views with gaps (q of a fused qkv projection), an expanded view (torch ops); its monitoring sums
    equal float64 ones."""
    from sam2_layerwise.quant.config import QuantSpec
    from sam2_layerwise.quant.quantizers import FakeQuantizer, QuantStats, fake_quantize, uniform_codes

    spec = QuantSpec(kind="uniform", bits=8 if qmax > 100 else 4, symmetric=qmin < 0)
    fq = FakeQuantizer("t.input", spec, scale=torch.tensor(scale), zero_point=torch.tensor(zero))
    assert fq.qrange == (qmin, qmax)
    x = torch.randn(4099 * 61, generator=torch.Generator().manual_seed(2)) * 40 * scale
    x[:2000] = (torch.arange(2000) - 1000) * (scale / 2)  # exact halfway points and integers
    x[2000:2010] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e30, -1e30, 3e38, 1e-45,
                                 -1e-45])
    qkv = x[:4096 * 60].view(64, 16, 3, 4, 20)  # q of a fused projection: a view with gaps, transposed
    for view in (x, x[:4099 * 60].view(4099, 60).t(), x[:4096 * 60].view(16, 256, 60).permute(2, 0, 1),
                 x[:4096 * 60].view(4096, 60)[:, :50], qkv.unbind(2)[0].transpose(1, 2), x[:50].expand(7, 50)):
        want = fake_quantize(view, fq.scale, fq.zero_point, qmin, qmax)
        fq.stats, fq.monitor = QuantStats(), True
        got = fq(view)
        assert got.stride() == want.stride() and got.dtype == torch.float32
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num().view(torch.int32), want.nan_to_num().view(torch.int32))  # every bit
        raw, _ = uniform_codes(view, fq.scale, fq.zero_point, qmin, qmax)
        assert fq.stats.clipped == int(((raw < qmin) | (raw > qmax)).sum()) and fq.stats.elements == view.numel()
        if bool(torch.isfinite(view).all()):
            err = want.double() - view.double()  # float lanes per 4096 values, then float64: ~1e-6 relative
            assert fq.stats.sq_err == pytest.approx(err.square().sum().item(), rel=1e-5)
            assert fq.stats.max_abs_err == pytest.approx(err.abs().max().item(), rel=1e-6)


def _tile_reference(p: torch.Tensor, topk: int) -> dict:
    """float64 statistics of given probabilities: the entropy of each row renormalised to sum 1 (a quantized
    softmax sums to more or less than 1), the masses of the raw rows."""
    p = p.double()
    pn = p / p.sum(-1, keepdim=True)
    ent = -torch.special.xlogy(pn, pn).sum(-1)
    kk = min(topk, p.shape[-1])
    return {"entropy": ent, "max_prob": p.amax(-1),
            "topk_mass": p.topk(kk, -1).values.sum(-1) if kk else torch.zeros_like(ent)}


@pytest.mark.parametrize("nk", [1, 3, 16, 64, 196, 256, 257, 1031, 4096])
@pytest.mark.parametrize("sharpen", [1, 64])
def test_tile_statistics_of_a_kernels_own_tiles(path, nk, sharpen):
    """Statistics a tiled (quantized) kernel takes from the scores and probabilities it computed anyway: within
    1e-5 of float64 statistics of the same scores, for key counts across 16-key vectors and the short/long-row
    switch (256), top-k of 0, 1, 5 and 40, and sharpened attention."""
    from sam2_layerwise.capture.attention import tile_statistics

    g = torch.Generator().manual_seed(nk)
    q, k = torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, nk, 8, generator=g)
    scores = q @ k.transpose(-1, -2) * (8 ** -0.5 * sharpen)
    probs = torch.softmax(scores, -1)
    want_p = torch.softmax(scores.double(), -1)
    for topk in (0, 1, 5, 40):
        got = tile_statistics(scores, probs, False, topk)
        assert_close(got, _tile_reference(want_p, topk))
        assert got["entropy_norm"].shape == (2, 3, 9)


def test_tile_statistics_ties_and_transformed(path):
    """Uniform rows and repeated keys (top-k counts every copy), and quantized probabilities (no scores used)."""
    from sam2_layerwise.capture.attention import tile_statistics
    from sam2_layerwise.quant.quantizers import log2_quantize

    for nk in (77, 300):
        scores = torch.zeros(4, nk)
        got = tile_statistics(scores, torch.softmax(scores, -1), False, 7)
        torch.testing.assert_close(got["entropy_norm"], torch.ones(4), atol=1e-6, rtol=0)
        torch.testing.assert_close(got["topk_mass"], torch.full((4,), 7 / nk), atol=1e-6, rtol=0)
        scores = torch.randn(5, nk, generator=torch.Generator().manual_seed(1)) * 4
        scores[:, 10:20] = scores[:, 3:4]  # ten copies of one score
        scores[:, 3] = scores.amax(-1) + 1e-3  # beside the largest
        assert_close(tile_statistics(scores, torch.softmax(scores, -1), False, 12),
                     _tile_reference(torch.softmax(scores.double(), -1), 12))
        p = log2_quantize(torch.softmax(scores, -1), 4)
        assert (p.sum(-1) > 1.1).any()  # log2 rounds a probability above 2^-0.5 up to 1
        got = tile_statistics(scores, p, True, 5)
        assert_close(got, _tile_reference(p, 5))
        assert bool((got["entropy_norm"] <= 1 + 1e-6).all()), got["entropy_norm"]  # the raw row's passed 1


@pytest.mark.parametrize("cfg_name", ["w8a8", "w4a8_mixed"])
def test_quantized_capture_takes_statistics_from_its_tiles(path, monkeypatch, cfg_name, tiny_checkpoint, chelsea):
    """A quantized kernel that computes its probabilities explicitly hands the capture every query's statistics
    from its own tiles (no second q·kᵀ); they equal the statistics recomputed from the q/k it used (with its
    probability quantizer), within 1e-5, and masks stay those of the plain quantized model."""
    import numpy as np

    from sam2_layerwise.model import build_model
    from sam2_layerwise.quant import apply, calibrate_model, load_quant_config

    cfg = load_quant_config(REPO / "examples" / "quantization" / f"{cfg_name}.yaml")
    model = build_model(TINY_CONFIG, str(tiny_checkpoint), device="cpu").model
    prompts = parse_prompts([220, 150, 1], None, None, chelsea.shape[1], chelsea.shape[0])
    taken = []
    real = apply.attention_tile

    def attention_tile(q, k, v, scale, transform, tile, stats_topk=None):
        taken.append(stats_topk) if stats_topk is not None else None
        return real(q, k, v, scale, transform, tile, stats_topk)

    monkeypatch.setattr(apply, "attention_tile", attention_tile)
    qm = calibrate_model(model, cfg, [chelsea])
    try:
        plain = run_plain(model, chelsea, prompts)
        assert not taken  # nobody asked: plain runs compute no statistics
        cap = capture_image(model, chelsea, prompts, CaptureOptions(keep_all_qkv=True, max_attn_queries=1))
    finally:
        qm.remove()
    assert taken and np.array_equal(plain.masks, cap.prediction.masks)
    tiled = 0
    for r in cap.attention:
        fq = qm.quantizers.get(apply.site_id(r.name, "probs"))
        want = query_statistics(r.full_qkv["q"], r.full_qkv["k"], r.full_qkv["scale"], fq.quiet if fq else None, 5)
        tiled += bool(r.full_qkv["tiled"])
        for name in STATS:
            err = (r.query_stats[name].double() - want[name].double()).abs().max().item()
            assert err <= 1e-5, (r.layer_key, name, err)
    assert tiled == len(cap.attention)


@pytest.mark.parametrize("shape, axis", [(shape, axis) for shape in [(48, 37, 3), (6, 23, 20), (700, 33)]
                                          for axis in ([0, 1, -1] if len(shape) == 3 else [0, -1])])
def test_per_channel_fake_quantizer_bit_identical(path, axis, shape):
    """Per-channel weights or inputs (one scale and zero point per channel along `axis`, as `quantize` calibrates
    them; a Linear's input has its channels last): the compiled read gives the torch ops' exact bits, and
    `quantization_error` (the weight report) their error."""
    from sam2_layerwise.quant.config import QuantSpec
    from sam2_layerwise.quant.quantizers import FakeQuantizer, fake_quantize, quantization_error, uniform_codes

    g = torch.Generator().manual_seed(4)
    w = torch.randn(*shape, generator=g) * 0.05
    channels = w.shape[axis]
    scale = (torch.rand(channels, generator=g) * 0.002 + 1e-4)
    zero = torch.round(torch.rand(channels, generator=g) * 20)
    w.view(-1)[:500] = (torch.arange(500) - 250) * 0.5e-4  # ties for the smaller scales
    spec = QuantSpec(kind="uniform", bits=8, symmetric=False, granularity="per_channel")
    fq = FakeQuantizer("t.weight", spec, scale=scale, zero_point=zero, axis=axis % w.dim())
    want = fake_quantize(w, scale, zero, 0, 255, axis=axis % w.dim())
    got = fq.quiet(w)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    stats = quantization_error(fq, w)
    raw, _ = uniform_codes(w, scale, zero, 0, 255, axis % w.dim())
    err = want.double() - w.double()
    assert stats.clipped == int(((raw < 0) | (raw > 255)).sum()) and stats.elements == w.numel()
    assert stats.sq_err == pytest.approx(err.square().sum().item(), rel=1e-6)
    assert stats.max_abs_err == pytest.approx(err.abs().max().item(), rel=1e-6)
