"""Row metrics of FP vs Q attention on hand-computed distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sam2_layerwise.metrics.distributions as dist
from sam2_layerwise.metrics import (PAIR_METRICS, entropy, entropy_norm, js_divergence, mass_on_topk, pair_metrics,
                                    relative_error, relative_error_from_parts, sq_err_parts, summarise, topk_mass,
                                    topk_overlap)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def js_reference(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """JS in bits by the textbook formula, in fp64, on renormalised rows."""
    p, q = p.double(), q.double()
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    m = (p + q) / 2
    kl = lambda a: torch.special.xlogy(a, a).sum(-1) - torch.special.xlogy(a, m).sum(-1)  # noqa: E731
    return (kl(p) + kl(q)) / 2 / math.log(2)


def quantized_rows(shape, seed=0, step=1 / 64):
    """Softmax rows rounded to multiples of `step`: exact zeros, ties, sums != 1 (a uniform-quantized softmax)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(shape, generator=g) * 3, -1)
    return p, torch.round(p / step) * step


# --- Jensen–Shannon ---------------------------------------------------------------------------------------------

def test_js_disjoint_is_exactly_one():
    assert js_divergence(t([1, 0]), t([0, 1])).item() == 1.0
    assert js_divergence(t([0, 0.5, 0, 0.5]), t([0.25, 0, 0.75, 0])).item() == 1.0


def test_js_hand_value():
    # p = [1/2, 1/2], q = [1, 0], m = [3/4, 1/4]
    kl_p = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_q = 1.0 * math.log2(1 / 0.75)
    expected = (kl_p + kl_q) / 2  # 0.311278...
    assert expected == pytest.approx(0.3112781244591328, abs=1e-15)
    assert js_divergence(t([0.5, 0.5]), t([1, 0])).item() == pytest.approx(expected, rel=1e-6)


def test_js_symmetric_and_bounded():
    p, q = quantized_rows((64, 4, 300))
    pq, qp = js_divergence(p, q), js_divergence(q, p)
    assert torch.equal(pq, qp)
    assert pq.shape == (64, 4) and pq.dtype == torch.float32
    assert (pq >= 0).all() and (pq <= 1).all()
    torch.testing.assert_close(pq.double(), js_reference(p, q), atol=1e-6, rtol=1e-5)


def test_js_identical_rows_exactly_zero():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 4096, generator=g)
    x[x < 0.6] = 0  # many exact zeros
    x = x / x.sum(-1, keepdim=True)
    assert torch.equal(js_divergence(x, x.clone()), torch.zeros(8))
    _, q = quantized_rows((16, 2, 4096))  # rows that do not sum to 1
    assert (js_divergence(q, q.clone()) == 0).all()
    assert (js_divergence(q, 2 * q) == 0).all()  # renormalised: a row and its double are the same distribution


def test_js_small_divergence_accurate():
    # Near-identical rows (the quantization regime): no cancellation floor.
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(32, 1024, generator=g) * 2, -1)
    q = torch.softmax(torch.log(p) + 1e-3 * torch.randn(32, 1024, generator=g), -1)
    ref = js_reference(p, q)
    assert ref.max() < 1e-6
    torch.testing.assert_close(js_divergence(p, q).double(), ref, rtol=1e-3, atol=1e-10)


def test_js_tiny_against_large_stays_finite():
    # p/q below float32's resolution around -1 (d rounds to -1): the key must not turn the row into -inf / 0.
    p, q = t([1e-9, 1 - 1e-9], [1e-30, 1.0]), t([0.5, 0.5], [1.0, 1e-30])
    got = js_divergence(p, q).double()
    torch.testing.assert_close(got, js_reference(p, q), atol=1e-6, rtol=0)


def test_zero_mass_row_is_nan():
    p = t([0.5, 0.5], [0.5, 0.5])
    q = t([0.0, 0.0], [0.25, 0.5])
    js = js_divergence(p, q)
    assert math.isnan(js[0].item()) and not math.isnan(js[1].item())
    assert math.isnan(entropy(q)[0].item()) and math.isnan(entropy_norm(q)[0].item())


# --- entropy ----------------------------------------------------------------------------------------------------

def test_entropy_hand_values():
    assert entropy(t([0.5, 0.25, 0.25])).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)
    assert entropy(t([1.0, 1.0])).item() == pytest.approx(math.log(2), rel=1e-6)  # renormalised first
    assert entropy_norm(t([0.5, 0.25, 0.25])).item() == pytest.approx(1.5 * math.log(2) / math.log(3), rel=1e-6)


def test_entropy_norm_uniform_one_hot_single_key():
    assert entropy_norm(torch.full((3, 4096), 1 / 4096)).tolist() == pytest.approx([1.0] * 3, abs=1e-6)
    assert entropy_norm(torch.full((64,), 1 / 64)).item() == pytest.approx(1.0, abs=1e-6)
    assert entropy_norm(t([0, 0, 1, 0], [0, 0.7, 0, 0])).tolist() == [0.0, 0.0]
    assert entropy_norm(t([1.0], [0.3])).tolist() == [0.0, 0.0]


# --- top-k ------------------------------------------------------------------------------------------------------

def test_topk_mass_hand_values():
    p = t([0.1, 0.4, 0.2, 0.3])
    assert topk_mass(p, 1).item() == pytest.approx(0.4)
    assert topk_mass(p, 2).item() == pytest.approx(0.7)
    assert topk_mass(p, 10).item() == pytest.approx(1.0)  # k > N: all keys
    assert topk_mass(t([0.25, 0.25, 0.25, 0.25]), 3).item() == pytest.approx(0.75)  # ties
    assert topk_mass(t([0.0, 0.9, 0.0, 0.0]), 2).item() == pytest.approx(0.9)  # raw rows, zeros
    with pytest.raises(ValueError, match="k >= 1"):
        topk_mass(p, 0)


def test_topk_overlap_hand_values():
    p = t([0.4, 0.3, 0.2, 0.1])
    assert topk_overlap(p, t([0.1, 0.2, 0.3, 0.4]), 2).item() == 0.0
    assert topk_overlap(p, t([0.4, 0.1, 0.3, 0.2]), 2).item() == 0.5  # {0,1} vs {0,2}
    assert topk_overlap(p, t([0.4, 0.1, 0.3, 0.2]), 3).item() == pytest.approx(2 / 3)  # {0,1,2} vs {0,2,3}
    assert topk_overlap(p, p.clone(), 4).item() == 1.0


def test_topk_overlap_resolves_q_ties_for_fp():
    p = t([0.4, 0.3, 0.2, 0.1, 0.0])
    # q ties at its 2nd place: {0,1} and {0,2} are both top-2 sets of q; the one FP agrees with counts.
    assert topk_overlap(p, t([0.5, 0.25, 0.25, 0.0, 0.0]), 2).item() == 1.0
    assert topk_overlap(p, t([0.25, 0.25, 0.25, 0.25, 0.0]), 3).item() == 1.0
    # only two non-zero keys in q, one of them outside FP's top 3: {2, 4} + one zero key (FP's 0 or 1) -> 2/3
    assert topk_overlap(p, t([0.0, 0.0, 0.5, 0.0, 0.5]), 3).item() == pytest.approx(2 / 3)
    # top-2 of q = {2} + any zero key; best is key 0 or 1 of FP's {0, 1}: 1/2
    assert topk_overlap(t([0.4, 0.3, 0.2, 0.1, 0.0]), t([0.0, 0.0, 1.0, 0.0, 0.0]), 2).item() == 0.5


def test_topk_overlap_identical_rows_with_ties_exactly_one():
    _, q = quantized_rows((32, 4, 4096), step=1 / 16)  # heavy ties and zeros, including at the k-th place
    assert (topk_overlap(q, q.clone(), 5) == 1).all()
    assert (topk_overlap(q, q.clone(), 50) == 1).all()


def test_mass_on_topk_hand_values():
    p = t([0.4, 0.3, 0.2, 0.1])
    assert mass_on_topk(p, t([0.1, 0.2, 0.3, 0.4]), 2).item() == pytest.approx(0.3)
    assert mass_on_topk(p, t([0.0, 0.5, 0.0, 0.25]), 3).item() == pytest.approx(0.5)  # raw q, not renormalised
    assert mass_on_topk(p, t([0.0, 0.0, 0.0, 0.0]), 2).item() == 0.0


def test_blocked_topk_matches_torch_topk():
    _, q = quantized_rows((40, 4096), step=1 / 32)  # ties at the k-th place
    for k in (1, 5, 20):
        values, keys = dist._top(q, k)
        assert torch.equal(values, torch.topk(q, k).values)
        assert torch.equal(torch.gather(q, 1, keys), values)
        assert (keys.sort(-1).values.diff(dim=-1) > 0).all()  # distinct keys


# --- pair_metrics -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [7, 1024, 4096])
def test_pair_metrics_equals_single_functions(n, monkeypatch):
    p, q = quantized_rows((12, 3, n), seed=n)
    got = pair_metrics(p, q, k=5)
    assert tuple(got) == PAIR_METRICS
    assert all(v.shape == (12, 3) and v.dtype == torch.float32 for v in got.values())
    single = {"js": js_divergence(p, q), "entropy_norm_fp": entropy_norm(p), "entropy_norm_q": entropy_norm(q),
              "topk_mass_fp": topk_mass(p, 5), "topk_mass_q": topk_mass(q, 5),
              "topk_overlap": topk_overlap(p, q, 5), "q_mass_on_fp_topk": mass_on_topk(p, q, 5)}
    for name, value in single.items():
        assert torch.equal(got[name], value), name
    assert torch.equal(got["entropy_norm_delta"], got["entropy_norm_q"] - got["entropy_norm_fp"])
    # Row chunks (CPU) change nothing: every row is computed on its own.
    monkeypatch.setattr(dist, "CHUNK_ELEMENTS", 2 * n)
    chunked = pair_metrics(p, q, k=5)
    for name in PAIR_METRICS:
        assert torch.equal(chunked[name], got[name]), name


def test_pair_metrics_identical_and_hand_row():
    p = torch.tensor([0.5, 0.5, 0.0, 0.0])
    q = torch.tensor([1.0, 0.0, 0.0, 0.0])
    m = pair_metrics(torch.stack([p, p]), torch.stack([p.clone(), q]), k=2)
    assert m["js"].tolist()[0] == 0.0
    assert m["js"][1].item() == pytest.approx(0.3112781244591328, rel=1e-6)
    assert m["entropy_norm_fp"].tolist() == pytest.approx([0.5, 0.5])  # ln 2 / ln 4
    assert m["entropy_norm_q"].tolist() == pytest.approx([0.5, 0.0])
    assert m["entropy_norm_delta"].tolist() == pytest.approx([0.0, -0.5])
    assert m["topk_mass_fp"].tolist() == [1.0, 1.0]
    assert m["topk_mass_q"].tolist() == [1.0, 1.0]
    assert m["topk_overlap"].tolist() == [1.0, 1.0]  # q's 2nd place is a tie of zeros: FP's key 1 fills it
    assert m["q_mass_on_fp_topk"].tolist() == [1.0, 1.0]


def test_pair_metrics_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        pair_metrics(torch.rand(2, 4), torch.rand(2, 5))
    with pytest.raises(ValueError, match="k >= 1"):
        pair_metrics(torch.rand(2, 4), torch.rand(2, 4), k=0)


def test_pair_metrics_bf16_inputs_computed_in_fp32():
    p, q = quantized_rows((4, 256))
    got = pair_metrics(p.bfloat16(), q.bfloat16())
    assert all(v.dtype == torch.float32 for v in got.values())
    torch.testing.assert_close(got["js"], js_divergence(p.bfloat16().float(), q.bfloat16().float()))


# --- relative error ---------------------------------------------------------------------------------------------

def test_relative_error_hand_values():
    assert relative_error(t(3, 4), t(3, 5), dim=0).item() == pytest.approx(0.2)  # |(0, 1)| / |(3, 4)|
    ref = torch.zeros(2, 2, 3, 4)  # [G, h, N, d]
    ref[:, 0] = 1.0  # head 0: norm sqrt(24)
    ref[:, 1] = 2.0  # head 1: norm sqrt(96)
    x = ref.clone()
    x[0, 1, 0, 0] += 3.0  # head 1: error 3
    err = relative_error(ref, x, dim=(0, 2, 3))
    assert err.shape == (2,) and err.dtype == torch.float32
    assert err.tolist() == pytest.approx([0.0, 3 / math.sqrt(96)])


def test_relative_error_zero_reference():
    z = torch.zeros(2, 3)
    assert relative_error(z, z.clone(), dim=1).tolist() == [0.0, 0.0]
    x = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1e-3, 0.0]])
    assert relative_error(z, x, dim=1).tolist() == [0.0, math.inf]


def test_sq_err_parts_accumulate_over_tiles():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(6, 4, 50, 8, generator=g)  # [G, h, N, d]
    x = ref + 0.01 * torch.randn(ref.shape, generator=g)
    err, norm = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    for g0 in range(0, 6, 2):
        e, n = sq_err_parts(ref[g0:g0 + 2], x[g0:g0 + 2], dim=(0, 2, 3))
        assert e.dtype == torch.float64 and e.shape == (4,)
        err += e
        norm += n
    torch.testing.assert_close(relative_error_from_parts(err, norm), relative_error(ref, x, (0, 2, 3)))
    with pytest.raises(ValueError, match="differ in shape"):
        sq_err_parts(ref, x[:1], dim=0)


# --- summarise --------------------------------------------------------------------------------------------------

def test_summarise_against_numpy():
    g = torch.Generator().manual_seed(4)
    values = torch.rand(101, 3, generator=g)  # [queries, heads]
    s = summarise(values)
    v = values.double().numpy()
    assert s["mean"] == pytest.approx(v.mean(0).tolist(), rel=1e-12)
    assert s["p95"] == pytest.approx(np.percentile(v, 95, axis=0).tolist(), rel=1e-12)  # linear interpolation
    assert s["max"] == pytest.approx(v.max(0).tolist(), rel=1e-12)
    assert s["undefined"] == [0, 0, 0]
    # the same along another dim: [heads, queries]
    assert summarise(values.T, dim=1)["p95"] == pytest.approx(s["p95"], rel=1e-12)


def test_summarise_leaves_out_nan():
    values = torch.tensor([[1.0, math.nan], [2.0, math.nan], [math.nan, math.nan], [4.0, math.nan]])
    s = summarise(values)
    assert s["mean"] == [pytest.approx(7 / 3), None]
    assert s["p95"] == [pytest.approx(np.percentile([1, 2, 4], 95)), None]
    assert s["max"] == [4.0, None]
    assert s["undefined"] == [1, 4]
    empty = summarise(torch.zeros(0, 2))
    assert empty == {"mean": [None, None], "p95": [None, None], "max": [None, None], "undefined": [0, 0]}
