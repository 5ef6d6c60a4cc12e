"""MaskDP's sanity properties (../shared/design/MASKDP.md) on a tiny video model."""

from __future__ import annotations

import opacus
import pytest
import torch
from torch import nn

from training.accounting import default_delta, epsilon_spent, noise_for_epsilon
from training.maskdp import (
    add_noise,
    maskdp_gradient_efficient,
    maskdp_gradient_naive,
    public_surrogate,
)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3))


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, y, reduction="none")


def batch(n: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 4, 8, 8, generator=g)
    mask = (torch.rand(n, 1, 4, 8, 8, generator=g) > 0.5).float()
    y = torch.randint(0, 3, (n,), generator=g)
    return x, mask, y


def efficient(model, x, xbar, y, clip, groups=None):
    """The production path: a plain module (forward hooks, our grouped-conv rule)."""
    grads, norms, _ = maskdp_gradient_efficient(model, loss_fn, x, xbar, y, clip, groups)
    return grads, norms


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads])


def plain_sum(model, x, y) -> torch.Tensor:
    model.zero_grad()
    loss_fn(model(x), y).sum().backward()
    out = flat([p.grad for p in model.parameters()])
    model.zero_grad()
    return out


@pytest.mark.parametrize("clip", [1e-3, 0.05, 100.0])
def test_efficient_equals_naive(clip):
    model = tiny_model()
    x, mask, y = batch()
    xbar = public_surrogate(x, mask, 0.5)
    g_naive, n_naive, _ = maskdp_gradient_naive(model, loss_fn, x, xbar, y, clip)
    g_eff, n_eff = efficient(model, x, xbar, y, clip)
    assert torch.allclose(n_eff, n_naive, rtol=1e-4, atol=1e-7)
    assert torch.allclose(flat(g_eff), flat(g_naive), rtol=1e-4, atol=1e-6)
    # ...and so does the same form on Opacus' GradSampleModule hooks.
    gsm = opacus.GradSampleModule(model, loss_reduction="sum")
    g_gsm, n_gsm, _ = maskdp_gradient_efficient(gsm, loss_fn, x, xbar, y, clip)
    gsm._close()
    assert torch.allclose(n_gsm, n_naive, rtol=1e-4, atol=1e-7)
    assert torch.allclose(flat(g_gsm), flat(g_naive), rtol=1e-4, atol=1e-6)
    if clip == 1e-3:
        assert (n_naive > clip).all()  # the clip really bites in this case


def test_clips_of_one_video_are_averaged_before_clipping():
    model = tiny_model()
    x, mask, y = batch(6)
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    xbar = public_surrogate(x, mask, 0.5)
    g_naive, n_naive, _ = maskdp_gradient_naive(model, loss_fn, x, xbar, y, 0.01, groups)
    g_eff, n_eff = efficient(model, x, xbar, y, 0.01, groups)
    assert n_eff.shape == (3,)
    assert torch.allclose(flat(g_eff), flat(g_naive), rtol=1e-4, atol=1e-6)
    # One video's contribution beyond its public part is at most C however many clips.
    erased = x.clone()
    erased[3:] = xbar[3:]
    g_erased, _ = efficient(model, erased, xbar, y, 0.01, groups)
    assert (flat(g_eff) - flat(g_erased)).norm() <= 0.01 * (1 + 1e-4)


def test_nothing_sensitive_is_non_private_training():
    model = tiny_model()
    x, _, y = batch()
    xbar = public_surrogate(x, torch.zeros_like(x[:, :1]), 0.5)
    grads, norms = efficient(model, x, xbar, y, clip=1e-6)
    assert torch.all(norms == 0)
    assert torch.allclose(flat(grads), plain_sum(model, x, y), rtol=1e-4, atol=1e-6)


def test_everything_sensitive_bounds_each_video_by_the_clip():
    model = tiny_model()
    x, _, y = batch()
    ones = torch.ones_like(x[:, :1])
    xbar = public_surrogate(x, ones, 0.5)
    assert torch.all(xbar == 0.5)  # the surrogate holds no data
    clip = 0.02
    grads, norms = efficient(model, x, xbar, y, clip)
    assert (norms > clip).all()
    for i in range(len(x)):  # erase video i entirely: G moves by at most C
        other = x.clone()
        other[i] = torch.rand_like(x[i])
        moved, _ = efficient(model, other, xbar, y, clip)
        assert (flat(grads) - flat(moved)).norm() <= clip * (1 + 1e-4)
    # ...and with all data erased only the public gradient remains.
    public, _ = efficient(model, xbar, xbar, y, clip)
    assert torch.allclose(flat(public), plain_sum(model, xbar, y), rtol=1e-4, atol=1e-6)


def test_noise_has_the_configured_scale():
    g = torch.Generator().manual_seed(0)
    grads = [torch.zeros(20000)]
    noisy = add_noise(grads, noise_multiplier=1.5, clip=0.2, generator=g)
    assert noisy[0].std().item() == pytest.approx(0.3, rel=0.03)
    assert add_noise(grads, 0.0, 0.2)[0].abs().max() == 0


def test_batchnorm_is_rejected_by_the_validator():
    from opacus.validators import ModuleValidator

    bad = nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4))
    assert ModuleValidator.validate(bad, strict=False)
    assert not ModuleValidator.validate(ModuleValidator.fix(bad), strict=False)
    assert not ModuleValidator.validate(tiny_model(), strict=False)


@pytest.mark.parametrize("sigma,q,steps", [(1.1, 0.01, 1000), (0.8, 0.05, 200),
                                           (3.0, 0.1, 50)])
def test_accountant_matches_dp_accounting(sigma, q, steps):
    import dp_accounting as dpa
    delta = 1e-5
    event = dpa.SelfComposedDpEvent(
        dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    rdp = dpa.rdp.RdpAccountant()
    rdp.compose(event)
    pld = dpa.pld.PLDAccountant(value_discretization_interval=1e-4)
    pld.compose(event)
    assert epsilon_spent(sigma, q, steps, delta, "rdp") == pytest.approx(
        rdp.get_epsilon(delta), rel=0.01)
    assert epsilon_spent(sigma, q, steps, delta, "prv") == pytest.approx(
        pld.get_epsilon(delta), rel=0.01)


def test_noise_for_target_epsilon_spends_at_most_it():
    sigma = noise_for_epsilon(1.0, 1e-5, 0.02, 500)
    eps = epsilon_spent(sigma, 0.02, 500, 1e-5)
    assert 0.98 <= eps <= 1.0
    assert epsilon_spent(sigma * 1.2, 0.02, 500, 1e-5) < eps
    assert default_delta(10**6) == pytest.approx(1e6 ** -1.1)
    assert default_delta(1000) == 1e-5


def test_dpsgd_hooks_and_ghost_equal_the_per_sample_reference():
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from training.maskdp import dpsgd_gradient_ghost, dpsgd_gradient_hooks

    model = tiny_model()
    x, _, y = batch()
    clip = 0.05
    params = list(model.parameters())
    ref = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        g = torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]).sum(), params)
        norm = torch.sqrt(sum((t * t).sum() for t in g))
        for acc, t in zip(ref, g, strict=True):
            acc += t * min(1.0, clip / float(norm))
    own, n_own, _ = dpsgd_gradient_hooks(model, loss_fn, x, y, clip)
    gsm = opacus.GradSampleModule(model, loss_reduction="sum")
    hooks, n_hooks, _ = dpsgd_gradient_hooks(gsm, loss_fn, x, y, clip)
    gsm._close()
    ghost_module = GradSampleModuleFastGradientClipping(model, loss_reduction="sum",
                                                        use_ghost_clipping=True)
    ghost, n_ghost, _ = dpsgd_gradient_ghost(ghost_module, loss_fn, x, y, clip)
    ghost_module._close()
    assert (n_hooks > clip).all()
    assert torch.allclose(n_ghost, n_hooks, rtol=1e-3)
    assert torch.allclose(flat(hooks), flat(ref), rtol=1e-4, atol=1e-6)
    assert torch.allclose(n_own, n_hooks, rtol=1e-4)
    assert torch.allclose(flat(own), flat(ref), rtol=1e-4, atol=1e-6)
    assert torch.allclose(flat(ghost), flat(ref), rtol=1e-3, atol=1e-6)


def _conv_model() -> nn.Module:
    torch.manual_seed(0)  # strides, dilation, channel groups and biases in the conv rule
    return nn.Sequential(
        nn.Conv3d(3, 4, 3, stride=(1, 2, 2), padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 2, 2), dilation=(1, 2, 2), groups=2),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3))


def _transformer() -> nn.Module:
    from training.models import ModelConfig, build_model

    torch.manual_seed(0)  # Conv3d with bias, Embedding, LayerNorm, Linear on tokens
    cfg = ModelConfig(arch="transformer", width=8, depth=1, heads=2, tubelet=(2, 4))
    return build_model(cfg, 3, 4, 8)


def _inplace_model() -> nn.Module:
    torch.manual_seed(0)  # a layer output changed in place: the Opacus fallback
    return nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3))


@pytest.mark.parametrize("build", [tiny_model, _conv_model, _transformer, _inplace_model])
def test_per_sample_gradients_equal_one_backward_per_sample(build):
    from training.maskdp import per_sample_gradients

    model = build()
    x, _, y = batch(4)
    params = [p for p in model.parameters() if p.requires_grad]
    grads, losses = per_sample_gradients(model, loss_fn, x, y)
    assert all(p.grad is None for p in params)  # no summed gradient left behind
    for i in range(len(x)):
        loss = loss_fn(model(x[i:i + 1]), y[i:i + 1]).sum()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        for gs, ref in zip(grads, torch.autograd.grad(loss, params), strict=True):
            assert torch.allclose(gs[i], ref, rtol=1e-4, atol=1e-6)


def test_gradient_functions_return_the_summed_loss_of_x():
    from training.maskdp import dpsgd_gradient_hooks

    model = tiny_model()
    x, mask, y = batch()
    xbar = public_surrogate(x, mask, 0.5)
    expected = loss_fn(model(x), y).sum().item()
    assert maskdp_gradient_efficient(model, loss_fn, x, xbar, y, 0.1).loss == pytest.approx(
        expected, rel=1e-5)
    assert maskdp_gradient_naive(model, loss_fn, x, xbar, y, 0.1).loss == pytest.approx(
        expected, rel=1e-5)
    assert dpsgd_gradient_hooks(model, loss_fn, x, y, 0.1).loss == pytest.approx(
        expected, rel=1e-5)
