"""The private-training models: shapes, Opacus validation, exact per-sample gradients."""

from __future__ import annotations

import opacus
import pytest
import torch
from torch import nn

from training.models import ModelConfig, build_model, check_private

CLIP = (8, 32)  # frames, pixels


def small(arch: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, width=8, depth=2, heads=2, tubelet=(2, 8), groups=4)
    return build_model(cfg, classes=5, frames=CLIP[0], size=CLIP[1])


@pytest.mark.parametrize("arch", ["r2plus1d", "transformer"])
def test_model_is_private_ready_and_per_sample_gradients_are_exact(arch):
    model = small(arch)
    check_private(model)
    x = torch.rand(3, 3, CLIP[0], CLIP[1], CLIP[1])
    y = torch.tensor([0, 3, 4])
    assert model(x).shape == (3, 5)
    params = [p for p in model.parameters() if p.requires_grad]
    refs = [torch.autograd.grad(nn.functional.cross_entropy(
        model(x[i:i + 1]), y[i:i + 1], reduction="sum"), params) for i in range(3)]
    gsm = opacus.GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    for i, ref in enumerate(refs):
        for p, r in zip(params, ref, strict=True):
            assert torch.allclose(p.grad_sample[i], r, rtol=1e-3, atol=1e-5)
    gsm._close()


def test_batchnorm_model_is_refused():
    with pytest.raises(ValueError, match="differential privacy"):
        check_private(nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4)))


def test_tubelet_must_divide_the_clip():
    cfg = ModelConfig(arch="transformer", width=8, depth=1, heads=2, tubelet=(3, 8))
    with pytest.raises(ValueError, match="tubelet"):
        build_model(cfg, 5, frames=8, size=32)
