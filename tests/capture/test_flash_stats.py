"""Float attention with the statistics on the way (`csrc/flash_stats.cpp`): torch's CPU flash attention output bit
for bit, in values and in layout, and the same statistics as the second-pass kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam2_layerwise.capture import dispatch, native
from sam2_layerwise.capture.attention import query_statistics


@pytest.fixture(scope="module")
def flash():
    if native.kernel() is None:
        pytest.skip("no compiled kernels on this machine (the torch path serves)")
    module = native.flash_kernel()
    assert module is not None, native._flash_state.get("reason")  # built and probed wherever the compiler works
    return module


def _qkv(G, h, nq, d, nk, layout, gen):
    if layout == "qkv":  # SAM 2's attention: strided views of one projection
        qkv = torch.randn(G, nq, 3, h, d, generator=gen) * 2
        return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))
    if layout == "bnhd":
        return tuple(torch.randn(G, n, h, d, generator=gen).transpose(1, 2) for n in (nq, nk, nk))
    return tuple(torch.randn(G, h, n, d, generator=gen) * 2 for n in (nq, nk, nk))


# (G, heads, Nq, d, Nk): Hiera windows and global blocks, the decoder's token/image attention, query splits of
# 32 / 64 / 256 rows and their tails, key blocks of 512 and tails off the vector width, a single key
SHAPES = [(64, 2, 64, 56, 64), (25, 8, 196, 56, 196), (1, 8, 1024, 56, 1024), (1, 8, 8, 16, 4096),
          (1, 8, 4096, 16, 8), (3, 2, 770, 33, 1025), (1, 2, 191, 64, 511), (2, 3, 192, 24, 513),
          (1, 1, 1, 7, 49), (1, 1, 300, 8, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["qkv", "dense", "bnhd"])
def test_output_is_torchs_to_the_bit(flash, shape, layout):
    G, h, nq, d, nk = shape
    if layout == "qkv" and nq != nk:
        layout = "dense"
    q, k, v = _qkv(*shape, layout, torch.Generator().manual_seed(sum(shape)))
    ref = dispatch.ORIGINAL_SDPA(q, k, v)
    out, view = dispatch.flash_stats_kernel(q, k, v, None, stats_topk=5)
    assert view.stats is not None  # it took the flash path
    assert torch.equal(out, ref) and out.stride() == ref.stride()
    scaled = dispatch.flash_stats_kernel(q, k, v, 0.3, stats_topk=5)[0]
    assert torch.equal(scaled, dispatch.ORIGINAL_SDPA(q, k, v, scale=0.3))


@pytest.mark.parametrize("topk", [0, 1, 5, 9, 40])
@pytest.mark.parametrize("shape", [(8, 2, 64, 16, 64), (1, 4, 300, 16, 1100), (2, 2, 16, 8, 7)],
                         ids=lambda s: "x".join(map(str, s)))
def test_statistics_equal_the_second_pass(flash, shape, topk):
    q, k, v = _qkv(*shape, "dense", torch.Generator().manual_seed(7))
    q = q * 3  # peaked rows: large maxima move between key blocks
    _, view = dispatch.flash_stats_kernel(q, k, v, None, stats_topk=topk)
    ref = query_statistics(q, k, q.shape[-1] ** -0.5, None, topk)
    for name in ("entropy", "entropy_norm", "max_prob", "topk_mass"):
        np.testing.assert_allclose(view.stats[name].numpy(), ref[name].numpy(), rtol=2e-5, atol=2e-6, err_msg=name)
    if topk >= shape[-1]:  # every key: all the mass
        np.testing.assert_allclose(view.stats["topk_mass"].numpy(), 1.0, rtol=1e-5)


def test_statistics_on_hand_made_rows(flash):
    """Two keys with scores 0 and log 3 (p = 1/4, 3/4): entropy, max and top-1 mass by hand."""
    d = 4
    q = torch.zeros(1, 1, 1, d)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 2, d)
    k[0, 0, 1, 0] = float(np.log(3.0)) * d ** 0.5  # scaled score log 3
    v = torch.randn(1, 1, 2, d)
    out, view = dispatch.flash_stats_kernel(q, k, v, None, stats_topk=1)
    p = np.array([0.25, 0.75])
    assert view.stats["entropy"].item() == pytest.approx(-(p * np.log(p)).sum(), rel=1e-5)
    assert view.stats["max_prob"].item() == pytest.approx(0.75, rel=1e-5)
    assert view.stats["topk_mass"].item() == pytest.approx(0.75, rel=1e-5)
    assert torch.equal(out, dispatch.ORIGINAL_SDPA(q, k, v))


def test_declines_what_torch_would_not_run_through_flash(flash, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(2, 2, 32, 16, 32, "dense", gen)
    assert native.flash_usable(q, k, v)
    assert not native.flash_usable(q.double(), k.double(), v.double())
    assert not native.flash_usable(q[..., ::2], k[..., ::2], v[..., ::2])  # strided last dimension
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not native.flash_usable(q, k, v)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # oneDNN may take reduced-precision products
        assert not native.flash_usable(q, k, v)
    finally:
        torch.set_float32_matmul_precision(previous)
    # declined calls still give torch's output, with the statistics left to the observers
    out, view = dispatch.flash_stats_kernel(q.double(), k.double(), v.double(), None, stats_topk=5)
    assert view.stats is None and torch.equal(out, dispatch.ORIGINAL_SDPA(q.double(), k.double(), v.double()))
    # a kernel that would not reproduce torch is never used: the probe turns it down
    monkeypatch.setattr(native, "FLASH_PROBES", ((1, 1, 3, 4, 5),))

    class Off:
        @staticmethod
        def flash_stats(q, k, v, scale, topk):
            out = dispatch.ORIGINAL_SDPA(q, k, v)
            return out + 1e-7 * out.abs().max(), None, None, None

    assert native._flash_probe(Off) is not None
    assert native._flash_probe(flash) is None


def test_capture_takes_the_flash_path_and_changes_nothing(flash, tiny_model, chelsea, monkeypatch):
    """A capture with all-query statistics runs float attention through the flash kernel: the masks and logits stay
    plain SAM 2's to the bit, and every layer's per-head statistics equal those of the second pass."""
    from sam2_layerwise import parse_prompts, run_plain
    from sam2_layerwise.api import capture_image
    from sam2_layerwise.capture import CaptureOptions

    prompts = parse_prompts([220, 150, 1], [40, 30, 300, 260], None, chelsea.shape[1], chelsea.shape[0])
    plain = run_plain(tiny_model, chelsea, prompts)
    calls = []
    real = native.flash_stats
    monkeypatch.setattr(native, "flash_stats", lambda *a: calls.append(1) or real(*a))
    cap = capture_image(tiny_model, chelsea, prompts, CaptureOptions(max_attn_queries=3))
    assert len(calls) == len(cap.attention)  # every attention call of the tiny model is a flash one
    for name in ("masks", "low_res_logits", "iou_predictions"):
        assert np.array_equal(getattr(cap.prediction, name), getattr(plain, name)), name
    monkeypatch.setattr(native, "flash_usable", lambda q, k, v: False)
    second = capture_image(tiny_model, chelsea, prompts, CaptureOptions(max_attn_queries=3))
    assert len(calls) == len(cap.attention)  # not called again
    for a, b in zip(cap.attention, second.attention):
        assert a.selected_stats == b.selected_stats and torch.equal(a.probs, b.probs)
        for stat, values in a.query_stats.items():
            np.testing.assert_allclose(values.numpy(), b.query_stats[stat].numpy(), rtol=2e-5, atol=2e-6,
                                       err_msg=f"{a.layer_key} {stat}")


EDITS = {  # [G, N, 3 (q/k/v), heads, d] -> a non-finite value where a broken checkpoint would put it
    "nan q channel": lambda t: t[..., 0, 0, 0].fill_(float("nan")),
    "nan k token": lambda t: t[0, 3, 1, 0, 2].fill_(float("nan")),
    "nan k last token": lambda t: t[0, -1, 1, 0, 2].fill_(float("nan")),
    "inf q": lambda t: t[0, 3, 0, 0, 2].fill_(float("inf")),
    "-inf k token": lambda t: t[0, 3, 1, 0, :].fill_(float("-inf")),
    "inf v": lambda t: t[0, 3, 2, 0, 2].fill_(float("inf")),
    "nan v": lambda t: t[0, -1, 2, 0, 2].fill_(float("nan")),
}


@pytest.mark.parametrize("nk", [64, 71, 1100])
@pytest.mark.parametrize("edit", list(EDITS))
def test_non_finite_values_come_out_where_torchs_do(flash, edit, nk):
    """NaN/inf in q, k or v give NaN/inf in the same output elements as torch's kernel (the capture's non-finite
    check reads the output first)."""
    qkv = torch.randn(4, nk, 3, 2, 16, generator=torch.Generator().manual_seed(0))
    EDITS[edit](qkv)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    ref = dispatch.ORIGINAL_SDPA(q, k, v)
    out, view = dispatch.flash_stats_kernel(q, k, v, None, stats_topk=5)
    assert view.stats is not None
    assert torch.equal(out.nan_to_num(7.0, 8.0, 9.0), ref.nan_to_num(7.0, 8.0, 9.0))
    # the statistics: NaN exactly on the rows whose probabilities are not a distribution (a NaN or +inf score:
    # torch's softmax of them is NaN), the exact values elsewhere (a key at -inf has probability 0)
    probs = torch.softmax(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
    undefined = probs.isnan().any(-1)
    for name, value in view.stats.items():
        assert torch.equal(value.isnan(), undefined), name
    p = probs.nan_to_num(0.0)
    exact = {"entropy": -torch.special.xlogy(p, p).sum(-1), "max_prob": p.amax(-1),
             "topk_mass": p.topk(5, -1).values.sum(-1)}
    for name, value in exact.items():
        np.testing.assert_allclose(view.stats[name][~undefined].numpy(), value[~undefined].numpy(), rtol=1e-5,
                                   atol=2e-6, err_msg=name)


# -- softmax with the statistics on the way (a tiled kernel's float probabilities) ---------------------------------

@pytest.fixture(scope="module")
def softmax(flash):
    module = native.softmax_kernel()
    assert module is not None, "softmax_stats differs from torch.softmax on its probes"
    return module


@pytest.mark.parametrize("nk", [1, 5, 8, 16, 17, 49, 64, 196, 511, 513, 4096, 4101])
def test_softmax_is_torchs_to_the_bit_with_exact_statistics(softmax, nk):
    """Probabilities bit for bit torch.softmax's (key counts below, at and off the vector widths), and the
    statistics within 2e-6 of float64 ones of the same scores for top-k of 0, 1, 5, 16, 17 and every key."""
    g = torch.Generator().manual_seed(nk)
    s = torch.randn(37, nk, generator=g) * 3
    s[0] *= 40  # one peaked row
    s[1] = s[1].round()  # repeated scores: ties at the k-th largest
    pd = torch.softmax(s.double(), -1)
    for topk in (0, 1, 5, 16, 17, nk):
        p, ent, mx, top = softmax.softmax_stats(s, topk)
        assert native.same_floats(p, torch.softmax(s, -1))
        kk = min(topk, nk)
        want = {"ent": -torch.special.xlogy(pd, pd).sum(-1), "mx": pd.amax(-1),
                "top": pd.topk(kk, -1).values.sum(-1) if kk else torch.zeros(37, dtype=torch.float64)}
        for name, got in (("ent", ent), ("mx", mx), ("top", top)):
            err = (got.double() - want[name]).abs().max().item()
            assert err <= 2e-6, (nk, topk, name, err)


def test_softmax_statistics_on_hand_made_rows(softmax):
    """A uniform row (entropy ln N, top-k mass k/N), a one-hot row (entropy 0, max 1), two keys at e:1."""
    s = torch.tensor([[0.0] * 40, [0.0] * 39 + [200.0], [1.0, 0.0] + [-1e30] * 38])
    p, ent, mx, top = softmax.softmax_stats(s, 3)
    torch.testing.assert_close(ent, torch.tensor([np.log(40), 0.0, np.log(1 + np.e) - np.e / (1 + np.e)],
                                                 dtype=torch.float32), atol=2e-6, rtol=0)
    torch.testing.assert_close(mx, torch.tensor([1 / 40, 1.0, np.e / (1 + np.e)], dtype=torch.float32))
    torch.testing.assert_close(top, torch.tensor([3 / 40, 1.0, 1.0]))


@pytest.mark.parametrize("nk", [7, 64, 1100])
def test_softmax_non_finite_scores_come_out_as_torchs(softmax, nk):
    """-inf, inf and NaN scores: the same probabilities as torch (NaN where torch's are NaN), statistics NaN on
    rows whose probabilities are."""
    s = torch.randn(6, nk, generator=torch.Generator().manual_seed(3))
    s[0, ::2] = -float("inf")
    s[1, 3] = float("inf")
    s[2, nk - 1] = float("nan")
    s[3] = -float("inf")
    p, ent, mx, top = softmax.softmax_stats(s, 5)
    assert native.same_floats(p, torch.softmax(s, -1))
    nan_rows = p.isnan().any(-1)
    assert nan_rows[1:4].all() and not nan_rows[0] and not nan_rows[4:].any()
    assert ent[nan_rows].isnan().all() and mx[nan_rows].isnan().all() and top[nan_rows].isnan().all()
    assert ent[~nan_rows].isfinite().all()


def test_tiled_kernel_takes_its_statistics_from_the_softmax(softmax, monkeypatch):
    """`attention_tile` with statistics: torch's probabilities and output to the bit, statistics equal to the
    second read of the tile (`tile_statistics`) within 1e-6; without the compiled softmax it takes that read."""
    from sam2_layerwise.capture import attention

    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) * 2 for n in (40, 70, 70))
    tile = (0, 2, 0, 40)
    p_ref, o_ref = attention.attention_tile(q, k, v, 0.3, None, tile)
    p, o, stats = attention.attention_tile(q, k, v, 0.3, None, tile, 5)
    assert torch.equal(p, p_ref) and torch.equal(o, o_ref)
    want = attention.tile_statistics(attention.attention_scores(q, k, 0.3), p_ref, False, 5)
    for name in attention.STAT_NAMES:
        torch.testing.assert_close(stats[name], want[name], atol=1e-6, rtol=0)
    monkeypatch.setitem(native._flash_state, "softmax", None)
    p2, o2, stats2 = attention.attention_tile(q, k, v, 0.3, None, tile, 5)
    assert torch.equal(p2, p_ref) and torch.equal(o2, o_ref)
    for name in attention.STAT_NAMES:
        torch.testing.assert_close(stats2[name], want[name], atol=0, rtol=0)


def test_softmax_kernel_refused_when_its_probe_differs_or_fails(softmax, monkeypatch):
    """A probe that finds a difference, or raises, leaves tiled kernels on the second read (None), once per process."""
    for probe in (lambda module: "differs from torch.softmax on [3, 1] scores",
                  lambda module: (_ for _ in ()).throw(RuntimeError("no such function"))):
        monkeypatch.delitem(native._flash_state, "softmax")
        monkeypatch.setattr(native, "_softmax_probe", probe)
        assert native.softmax_kernel() is None
        assert native._flash_state["softmax"] is None
    monkeypatch.undo()  # the module this process probed before
    assert native.softmax_kernel() is softmax
