"""Per-query statistics of rows that are no distribution (a NaN or +inf score, every key at -inf) are NaN on every
path (compiled second pass, torch second pass, a tiled kernel's tile, its compiled softmax); a key at -inf is a
key of probability 0 and leaves its row's statistics exact. (A NaN checkpoint reported max_prob 0 and inf.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam2_layerwise.capture import native
from sam2_layerwise.capture.attention import query_statistics, tile_statistics

NAMES = ("entropy", "max_prob", "topk_mass")


def _rows(nk: int) -> torch.Tensor:
    s = torch.randn(6, nk, generator=torch.Generator().manual_seed(nk)) * 2
    s[1, 3] = float("nan")  # in a vector
    s[2, nk - 1] = float("nan")  # in the tail, past the vectors
    s[3, 2] = float("inf")
    s[4, 1] = float("-inf")  # a legitimate row: that key has probability 0
    s[5, :] = float("-inf")
    return s


def _check(stats: dict, s: torch.Tensor, what: str) -> None:
    probs = torch.softmax(s.double(), -1)
    undefined = probs.isnan().any(-1)
    assert undefined.tolist() == [False, True, True, True, False, True]
    p = probs.nan_to_num(0.0)
    exact = {"entropy": -torch.special.xlogy(p, p).sum(-1), "max_prob": p.amax(-1), "topk_mass": p.topk(5, -1).values.sum(-1)}
    for name in NAMES:
        got = stats[name].reshape(-1)
        assert torch.equal(got.isnan(), undefined), (what, name, got.tolist())
        np.testing.assert_allclose(got[~undefined].numpy(), exact[name][~undefined].numpy(), rtol=1e-5, atol=2e-6,
                                   err_msg=f"{what} {name}")


def _second_pass(s: torch.Tensor) -> dict:
    """query_statistics with scores s: one group per row, q = e0, k_j = (s_j, 0) (no 0 * inf in q k^T)."""
    rows, nk = s.shape
    q = torch.zeros(rows, 1, 1, 2)
    q[..., 0] = 1.0
    k = torch.zeros(rows, 1, nk, 2)
    k[:, 0, :, 0] = s
    return query_statistics(q, k, 1.0, None, 5)


@pytest.mark.parametrize("nk", [8, 17, 64, 71, 1100])
@pytest.mark.parametrize("path", ["auto", "torch"])
def test_second_pass(nk, path, monkeypatch):
    monkeypatch.setenv(native.MODE_ENV, path)
    s = _rows(nk)
    _check(_second_pass(s), s, f"query_statistics/{path}")


@pytest.mark.parametrize("nk", [8, 17, 64, 71, 1100])
@pytest.mark.parametrize("path", ["auto", "torch"])
def test_a_kernels_tile(nk, path, monkeypatch):
    monkeypatch.setenv(native.MODE_ENV, path)
    s = _rows(nk)
    _check(tile_statistics(s, torch.softmax(s, -1), False, 5), s, f"tile_statistics/{path}")
    module = native.softmax_kernel()
    if module is not None:
        _, ent, mx, top = module.softmax_stats(s.contiguous(), 5)
        _check(dict(zip(NAMES, (ent, mx, top))), s, "softmax_stats")


def test_a_row_quantized_to_zeros_has_no_entropy():
    """Quantized probabilities (a transform) that round a whole row to 0: no distribution, so no entropy (NaN, as
    generate's per-query entropy says); its mass statistics are what the kernel used: 0."""
    probs = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 0.25, 0.25, 0.0]])
    stats = tile_statistics(torch.zeros_like(probs), probs, True, 2)
    assert np.isnan(stats["entropy"][0].item()) and stats["max_prob"][0].item() == 0.0
    assert stats["topk_mass"][0].item() == 0.0
    assert stats["entropy"][1].item() == pytest.approx(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)), rel=1e-6)
    assert stats["topk_mass"][1].item() == pytest.approx(0.75)
