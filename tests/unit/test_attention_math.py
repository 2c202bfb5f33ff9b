"""The recomputation's building blocks against plain torch."""

from __future__ import annotations

import math

import pytest
import torch

from sam2_layerwise.capture.attention import query_statistics, topk_sum


@pytest.mark.parametrize("shape", [(3, 4096), (2, 5, 1024), (7, 196), (4, 64)])
def test_topk_sum_equals_plain_topk(shape):
    g = torch.Generator().manual_seed(0)
    for x in (torch.rand(shape, generator=g),
              torch.randint(0, 3, shape, generator=g).float(),  # many ties
              torch.zeros(shape).index_fill_(-1, torch.tensor([1, shape[-1] - 1]), 1.0)):  # sparse rows
        assert torch.equal(topk_sum(x, 5), torch.topk(x, 5, dim=-1).values.sum(-1))


def test_statistics_of_a_global_sized_map_match_the_full_softmax():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 300, 16, generator=g), torch.randn(1, 2, 1024, 16, generator=g) * 2
    stats = query_statistics(q, k, 0.25, topk=5, chunk_elements=4096)
    p = torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1)
    ent = -(p * p.log()).sum(-1)
    torch.testing.assert_close(stats["entropy"], ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["entropy_norm"], ent / math.log(1024), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["max_prob"], p.amax(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats["topk_mass"], p.sort(-1, descending=True).values[..., :5].sum(-1), atol=1e-6, rtol=1e-5)
