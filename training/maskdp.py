"""Masked differential privacy (MaskDP): the gradient of one step, as ../shared/design/MASKDP.md
specifies it.

Per sample i (a video; see "privacy unit" below) with sensitivity mask m_i (1 = sensitive):

    x̄_i = (1 - m_i) * x_i + m_i * c          the public surrogate (c depends on no data)
    g_i = grad l(x̄_i)                       public part, not clipped
    Δ_i = grad l(x_i) - g_i                 what the sensitive region adds
    G   = Σ_i [g_i + clip_C(Δ_i)] + N(0, σ²C² I)

clip_C scales the flattened Δ_i (all parameters together) to norm at most C. Erasing one
sample's sensitive region changes G by clip_C(Δ_i), so its L2 sensitivity is C and the
step is the Poisson-subsampled Gaussian mechanism of DP-SGD: Opacus' accountants apply.

Two implementations, which must agree (a test checks it):
- `efficient`: one forward/backward of the stacked batch [x; x̄] through Opacus'
  GradSampleModule gives the per-sample gradients of both halves at once; the per-sample
  norms of Δ_i follow, and G = Σ_i [w_i grad l(x_i) + (1 - w_i) grad l(x̄_i)] with
  w_i = min(1, C / ||Δ_i||) is a weighted sum of those same per-sample gradients.
- `naive`: the reference: per sample, two separate autograd passes, Δ_i materialized
  and clipped, summed. Slow on purpose and obviously right.

Privacy unit: several clips of one video (`groups`: the video index of each clip) are
averaged before clipping (Multi-Clip DP-SGD): one video contributes at most C, whatever
its number of clips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # per-sample losses (N,)


def public_surrogate(x: torch.Tensor, mask: torch.Tensor, filler: float | torch.Tensor = 0.0
                     ) -> torch.Tensor:
    """x̄ = (1 - m) x + m c. `mask` broadcasts against x (e.g. (N, 1, T, H, W) against
    (N, 3, T, H, W)); `filler` is a constant or a fixed tensor that depends on no data."""
    mask = mask.to(x.dtype)
    return (1.0 - mask) * x + mask * filler


def _group_index(groups: torch.Tensor | None, n: int, device: torch.device
                 ) -> tuple[torch.Tensor, int]:
    if groups is None:
        return torch.arange(n, device=device), n
    uniq, index = torch.unique(groups.to(device), return_inverse=True)
    return index, len(uniq)


def _group_mean(per_clip: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """(N, ...) per-clip values -> (G, ...) means per group."""
    out = torch.zeros((count, *per_clip.shape[1:]), dtype=per_clip.dtype,
                      device=per_clip.device)
    out.index_add_(0, index, per_clip)
    sizes = torch.bincount(index, minlength=count).to(per_clip.dtype)
    return out / sizes.view(-1, *([1] * (per_clip.dim() - 1)))


def clip_factors(norms: torch.Tensor, clip: float) -> torch.Tensor:
    """w = min(1, C / ||v||) (1 where the norm is 0)."""
    return torch.clamp(clip / (norms + 1e-12), max=1.0)


def maskdp_gradient_efficient(
    model: nn.Module,  # an opacus GradSampleModule with loss_reduction="sum"
    loss_fn: LossFn,
    x: torch.Tensor,
    x_public: torch.Tensor,
    y: torch.Tensor,
    clip: float,
    groups: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Σ over videos of [mean public gradient + clip_C(mean Δ)] for the model's trainable
    parameters (no noise), and the per-video norms ||Δ||."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = x.shape[0]
    model.zero_grad(set_to_none=True)
    stacked = torch.cat([x, x_public])
    loss_fn(model(stacked), torch.cat([y, y])).sum().backward()
    index, count = _group_index(groups, n, x.device)
    samples = []
    for p in params:
        gs = p.grad_sample.reshape(2 * n, -1)  # per-sample gradients of the stacked batch
        if groups is None:  # one clip per video: views, no copies
            samples.append((gs[:n], gs[n:]))
        else:
            samples.append((_group_mean(gs[:n], index, count),
                            _group_mean(gs[n:], index, count)))
    # ||f - p||^2 = f.f + p.p - 2 f.p, row by row, without materializing f - p.
    sq = torch.zeros(count, dtype=x.dtype, device=x.device)
    for full, public in samples:
        sq += (torch.einsum("ni,ni->n", full, full) + torch.einsum("ni,ni->n", public, public)
               - 2 * torch.einsum("ni,ni->n", full, public))
    norms = sq.clamp(min=0).sqrt()
    w = clip_factors(norms, clip)
    grads = [(w @ full + (1.0 - w) @ public).view_as(p)
             for p, (full, public) in zip(params, samples, strict=True)]
    model.zero_grad(set_to_none=True)
    return grads, norms


def maskdp_gradient_naive(
    model: nn.Module,  # a plain nn.Module
    loss_fn: LossFn,
    x: torch.Tensor,
    x_public: torch.Tensor,
    y: torch.Tensor,
    clip: float,
    groups: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The reference: per clip two autograd passes, per video Δ averaged and clipped."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = x.shape[0]
    index, count = _group_index(groups, n, x.device)

    def grad(inp: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
        loss = loss_fn(model(inp[None]), target[None]).sum()
        return list(torch.autograd.grad(loss, params))

    full_sum = [[torch.zeros_like(p) for p in params] for _ in range(count)]
    public_sum = [[torch.zeros_like(p) for p in params] for _ in range(count)]
    for i in range(n):
        g = int(index[i])
        for acc, new in zip(full_sum[g], grad(x[i], y[i]), strict=True):
            acc += new
        for acc, new in zip(public_sum[g], grad(x_public[i], y[i]), strict=True):
            acc += new
    sizes = torch.bincount(index, minlength=count)
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for g in range(count):
        full = [t / sizes[g] for t in full_sum[g]]
        public = [t / sizes[g] for t in public_sum[g]]
        delta = [f - p for f, p in zip(full, public, strict=True)]
        norm = torch.sqrt(sum((d * d).sum() for d in delta))
        norms.append(norm)
        w = clip_factors(norm, clip)
        for acc, pub, d in zip(total, public, delta, strict=True):
            acc += pub + w * d
    return total, torch.stack(norms)


def add_noise(grads: Sequence[torch.Tensor], noise_multiplier: float, clip: float,
              generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """G + N(0, σ²C² I), independently per coordinate."""
    std = noise_multiplier * clip
    if std == 0:
        return [g.clone() for g in grads]
    return [g + std * torch.randn(g.shape, generator=generator, dtype=g.dtype,
                                  device="cpu" if generator is not None else g.device
                                  ).to(g.device) for g in grads]


# ---- full-input DP-SGD, the baseline --------------------------------------------------

def dpsgd_gradient_hooks(
    model: nn.Module,  # an opacus GradSampleModule with loss_reduction="sum"
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    clip: float,
    groups: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Σ over videos of clip_C(mean-over-clips gradient), from materialized per-sample
    gradients; and the per-video norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).sum().backward()
    n = x.shape[0]
    index, count = _group_index(groups, n, x.device)
    per_video = []
    for p in params:
        gs = p.grad_sample.reshape(n, -1)
        per_video.append(gs if groups is None else _group_mean(gs, index, count))
    norms = torch.sqrt(sum(torch.einsum("ni,ni->n", v, v) for v in per_video))
    w = clip_factors(norms, clip)
    grads = [(w @ v).view_as(p) for p, v in zip(params, per_video, strict=True)]
    model.zero_grad(set_to_none=True)
    return grads, norms


def dpsgd_gradient_ghost(
    model: nn.Module,  # an opacus GradSampleModuleFastGradientClipping, loss_reduction="sum"
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    clip: float,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same sum by ghost clipping (one clip per video): a first backward in which
    Opacus' hooks compute the per-sample norms without materializing gradients, then one
    backward of the loss reweighted by min(1, C / norm)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.max_grad_norm = clip
    model.zero_grad(set_to_none=True)
    losses = loss_fn(model(x), y)
    losses.sum().backward(retain_graph=True)
    norms = model.get_norm_sample().detach()
    coeff = clip_factors(norms, clip).to(losses.device)
    model.zero_grad(set_to_none=True)
    model.disable_hooks()
    try:
        (coeff * losses).sum().backward()
    finally:
        model.enable_hooks()
    grads = [p.grad.detach().clone() for p in params]
    model.zero_grad(set_to_none=True)
    return grads, norms
