"""finite.nonfinite: NaN/inf found wherever they are, including where a float32 sum would overflow."""

from __future__ import annotations

import torch

from sam2_layerwise.finite import nonfinite


def test_nonfinite_names_exactly_the_tensors_with_nan_or_inf():
    big = torch.full((4,), 3e38)  # finite, but its float32 sum overflows to inf
    nan = torch.zeros(5)
    nan[3] = float("nan")
    ninf = torch.ones(2, 3, dtype=torch.float16)
    ninf[1, 2] = -float("inf")
    both = torch.tensor([float("inf"), -float("inf")])  # inf + -inf: the sum is NaN
    tensors = {"ok": torch.randn(7), "big": big, "nan": nan, "ninf": ninf, "both": both,
               "ints": torch.arange(3), "empty": torch.empty(0), "bf16": torch.ones(3, dtype=torch.bfloat16),
               "not a tensor": 1.0}
    assert nonfinite(tensors) == ["nan", "ninf", "both"]
    assert nonfinite({}) == [] and nonfinite({"i": torch.arange(4)}) == []
