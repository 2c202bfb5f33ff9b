"""Building a model whose weights a checkpoint sets skips random initialisation, and the loaded model is the same
bit for bit: every parameter, buffer (non-persistent ones too) and plain tensor attribute."""

from __future__ import annotations

import pytest
import torch

from sam2_layerwise.model.loading import build_model, save_checkpoint, skip_init
from tests.conftest import TINY_CONFIG


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {f"param {n}": p for n, p in model.named_parameters()}
    out.update({f"buffer {n}": b for n, b in model.named_buffers()})  # non-persistent ones included
    for mname, module in model.named_modules():  # tensors kept as plain attributes (RoPE frequencies)
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor):
                out[f"attr {mname}.{name}"] = value
    return out


@pytest.mark.parametrize("config", [TINY_CONFIG, "configs/sam2.1/sam2.1_hiera_b+.yaml"])
def test_loaded_model_is_the_same_with_and_without_random_init(tmp_path, config):
    ref = build_model(config, random_init=True, seed=3, device="cpu").model  # initialised, then saved
    save_checkpoint(ref, tmp_path / "w.pt")
    real = torch.nn.init.kaiming_uniform_
    loaded = build_model(config, str(tmp_path / "w.pt"), device="cpu", seed=7).model  # another seed: no effect
    want, got = _tensors(ref), _tensors(loaded)
    assert want.keys() == got.keys() and len(want) > 100
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(-1).view(torch.uint8),
                                                          t.reshape(-1).view(torch.uint8)), name
    assert torch.nn.init.kaiming_uniform_ is real  # put back


def test_skip_init_leaves_tensors_untouched_and_restores_torch():
    real = {n: getattr(torch.nn.init, n) for n in ("uniform_", "normal_", "kaiming_uniform_", "trunc_normal_")}
    with skip_init():
        t = torch.full((3,), 5.0)
        assert torch.nn.init.normal_(t) is t and torch.equal(t, torch.full((3,), 5.0))
        torch.nn.init.kaiming_uniform_(t.view(3, 1), a=1.0)
        assert torch.equal(t, torch.full((3,), 5.0))
    assert {n: getattr(torch.nn.init, n) for n in real} == real
    with pytest.raises(RuntimeError):
        with skip_init():
            raise RuntimeError("constructor failed")
    assert {n: getattr(torch.nn.init, n) for n in real} == real
    assert not torch.equal(torch.nn.init.normal_(torch.zeros(8)), torch.zeros(8))


def test_the_loader_skips_initialisation_only_when_a_checkpoint_sets_the_weights(tmp_path, monkeypatch):
    """build_model with a checkpoint runs no torch.nn.init initialiser; with --random-init it does (seeded)."""
    calls = []
    real = torch.nn.init.kaiming_uniform_

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", counted)
    model = build_model(TINY_CONFIG, random_init=True, seed=0, device="cpu").model
    assert calls  # every Linear and Conv of the random model was initialised
    save_checkpoint(model, tmp_path / "w.pt")
    calls.clear()
    build_model(TINY_CONFIG, str(tmp_path / "w.pt"), device="cpu")
    assert not calls
    assert torch.nn.init.kaiming_uniform_ is counted  # put back as it was found
