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
- `efficient`: one forward/backward of the stacked batch [x; x̄] gives the per-sample
  gradients of both halves at once (`per_sample_gradients`); the per-sample norms of Δ_i
  follow, and G = Σ_i [w_i grad l(x_i) + (1 - w_i) grad l(x̄_i)] with
  w_i = min(1, C / ||Δ_i||) is a weighted sum of those same per-sample gradients.
- `naive`: the reference: per sample, two separate autograd passes, Δ_i materialized
  and clipped, summed. Slow on purpose and obviously right.

Privacy unit: several clips of one video (`groups`: the video index of each clip) are
averaged before clipping (Multi-Clip DP-SGD): one video contributes at most C, whatever
its number of clips.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # per-sample losses (N,)


class PrivateGradient(NamedTuple):
    """What a gradient function returns for one physical batch."""

    grads: list[torch.Tensor]  # Σ over videos of their contributions, per trainable parameter
    norms: torch.Tensor  # per video: ||Δ|| (MaskDP) or ||gradient|| (DP-SGD), before clipping
    loss: float  # Σ of the per-clip losses on x (not x̄), from the same forward pass


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


# ---- per-sample gradients ----------------------------------------------------------

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv_grad_sample(layer: nn.Module, activation: torch.Tensor, backprop: torch.Tensor
                      ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a zero-padded convolution, as the weight gradient of one
    grouped convolution in which sample n's channels form group n. Opacus unfolds the
    input instead (kernel-size times its memory, then an einsum): on CPU that copy cost
    5-10x more than the convolution itself for the (2+1)D blocks."""
    n = activation.shape[0]
    weight = layer.weight
    a = activation.to(backprop.dtype).reshape(1, -1, *activation.shape[2:])
    b = backprop.reshape(1, -1, *backprop.shape[2:])
    out: dict[nn.Parameter, torch.Tensor] = {}
    if weight.requires_grad:
        stacked = weight.detach().repeat(n, *([1] * (weight.dim() - 1)))  # shape only
        _, grad_w, _ = torch.ops.aten.convolution_backward(
            b, a, stacked, None, layer.stride, layer.padding, layer.dilation, False,
            [0] * (weight.dim() - 2), layer.groups * n, [False, True, False])
        out[weight] = grad_w.view(n, *weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprop.flatten(2).sum(2)
    return out


def _own_sampler(layer: nn.Module) -> bool:
    return (type(layer) in _CONVS and not isinstance(layer.padding, str)
            and layer.padding_mode == "zeros")


def _hooked_grad_samples(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor,
                         clone_outputs: bool = False
                         ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """Per-sample gradients from forward hooks and one autograd pass to the layer outputs
    (not to the parameters, so autograd never computes the summed weight gradients that
    per-sample training throws away). None where this cannot be used: a trainable layer
    with neither our rule nor Opacus' (see `per_sample_gradients`), or, unless
    `clone_outputs`, a layer output that the model changed in place after the layer (then
    the gradient at the recorded output would be the one after that change)."""
    from opacus import GradSampleModule

    samplers = GradSampleModule.GRAD_SAMPLERS
    layers = [m for m in model.modules()
              if any(p.requires_grad for p in m.parameters(recurse=False))]
    if any(not _own_sampler(m) and type(m) not in samplers for m in layers):
        return None
    calls: list[tuple[nn.Module, list[torch.Tensor], torch.Tensor, int]] = []

    def record(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor
               ) -> torch.Tensor | None:
        # A clone hands the next layer a copy to modify; ours keeps its autograd node.
        calls.append((module, [t.detach() for t in inputs], output, output._version))
        return output.clone() if clone_outputs else None

    handles = [m.register_forward_hook(record) for m in layers]
    try:
        losses = loss_fn(model(x), y)
    finally:
        for h in handles:
            h.remove()
    if any(out._version != version for _, _, out, version in calls):
        return None  # e.g. ReLU(inplace=True) after a layer: its recorded output is stale
    backprops = torch.autograd.grad(losses.sum(), [c[2] for c in calls], allow_unused=True)
    per_param: dict[nn.Parameter, torch.Tensor] = {}
    for (module, inputs, out, _), back in zip(calls, backprops, strict=True):
        if back is None:  # output not used by the loss
            back = torch.zeros_like(out)
        found = (_conv_grad_sample(module, inputs[0], back) if _own_sampler(module)
                 else samplers[type(module)](module, inputs, back))
        for param, gs in found.items():
            per_param[param] = gs if param not in per_param else per_param[param] + gs
    n = x.shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [per_param.get(p, torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device))
             for p in params]
    return grads, losses.detach()


def _opacus_grad_samples(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The same from an Opacus GradSampleModule (loss_reduction "sum")."""
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    losses = loss_fn(model(x), y)
    losses.sum().backward()
    grads = [p.grad_sample for p in params]
    model.zero_grad(set_to_none=True)
    return grads, losses.detach()


_WAYS = ("hooks", "clone", "opacus")
_way_of: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()


def per_sample_gradients(model: nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
                         ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample gradients (N, *p.shape) of every trainable parameter of `model`, in
    `model.parameters()` order, and the per-sample losses (detached).

    A plain module: forward hooks and our own rule for zero-padded Conv1d/2d/3d, Opacus'
    per-layer rules for the other layers (Linear, GroupNorm, LayerNorm, Embedding, ...).
    A model that changes a layer's output in place is run again with copied outputs. A
    model with a trainable layer neither covers goes to a temporary Opacus
    GradSampleModule (which handles it, or says why not). Given a GradSampleModule, its
    own hooks are used."""
    from opacus import GradSampleModule

    if isinstance(model, GradSampleModule):
        return _opacus_grad_samples(model, loss_fn, x, y)
    # A model is tried from the way that last worked for it, so a model that needs copied
    # outputs or Opacus does not pay a failed forward pass on every step.
    first = _WAYS.index(_way_of.get(model, "hooks"))
    for way in _WAYS[first:]:
        if way == "opacus":
            _way_of[model] = way
            gsm = GradSampleModule(model, loss_reduction="sum")
            try:
                return _opacus_grad_samples(gsm, loss_fn, x, y)
            finally:
                gsm._close()
        found = _hooked_grad_samples(model, loss_fn, x, y, clone_outputs=way == "clone")
        if found is not None:
            _way_of[model] = way
            return found
    raise AssertionError("unreachable: the opacus way always returns")


# ---- MaskDP -------------------------------------------------------------------------

def maskdp_gradient_efficient(
    model: nn.Module,  # a plain module (or an opacus GradSampleModule, loss_reduction "sum")
    loss_fn: LossFn,
    x: torch.Tensor,
    x_public: torch.Tensor,
    y: torch.Tensor,
    clip: float,
    groups: torch.Tensor | None = None,
) -> PrivateGradient:
    """Σ over videos of [mean public gradient + clip_C(mean Δ)] for the model's trainable
    parameters (no noise), the per-video norms ||Δ|| and the summed loss on x."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = x.shape[0]
    per_sample, losses = per_sample_gradients(model, loss_fn, torch.cat([x, x_public]),
                                              torch.cat([y, y]))
    index, count = _group_index(groups, n, x.device)
    samples = []
    for gs in per_sample:
        gs = gs.reshape(2 * n, -1)  # per-sample gradients of the stacked batch
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
    return PrivateGradient(grads, norms, float(losses[:n].sum()))


def maskdp_gradient_naive(
    model: nn.Module,  # a plain nn.Module
    loss_fn: LossFn,
    x: torch.Tensor,
    x_public: torch.Tensor,
    y: torch.Tensor,
    clip: float,
    groups: torch.Tensor | None = None,
) -> PrivateGradient:
    """The reference: per clip two autograd passes, per video Δ averaged and clipped."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = x.shape[0]
    index, count = _group_index(groups, n, x.device)

    loss_sum = 0.0

    def grad(inp: torch.Tensor, target: torch.Tensor, on_x: bool) -> list[torch.Tensor]:
        nonlocal loss_sum
        loss = loss_fn(model(inp[None]), target[None]).sum()
        if on_x:
            loss_sum += float(loss.detach())
        return list(torch.autograd.grad(loss, params))

    full_sum = [[torch.zeros_like(p) for p in params] for _ in range(count)]
    public_sum = [[torch.zeros_like(p) for p in params] for _ in range(count)]
    for i in range(n):
        g = int(index[i])
        for acc, new in zip(full_sum[g], grad(x[i], y[i], True), strict=True):
            acc += new
        for acc, new in zip(public_sum[g], grad(x_public[i], y[i], False), strict=True):
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
    return PrivateGradient(total, torch.stack(norms), loss_sum)


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
    model: nn.Module,  # a plain module (or an opacus GradSampleModule, loss_reduction "sum")
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    clip: float,
    groups: torch.Tensor | None = None,
) -> PrivateGradient:
    """Σ over videos of clip_C(mean-over-clips gradient), from materialized per-sample
    gradients (`per_sample_gradients`); the per-video norms and the summed loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample, losses = per_sample_gradients(model, loss_fn, x, y)
    n = x.shape[0]
    index, count = _group_index(groups, n, x.device)
    per_video = []
    for gs in per_sample:
        gs = gs.reshape(n, -1)
        per_video.append(gs if groups is None else _group_mean(gs, index, count))
    norms = torch.sqrt(sum(torch.einsum("ni,ni->n", v, v) for v in per_video))
    w = clip_factors(norms, clip)
    grads = [(w @ v).view_as(p) for p, v in zip(params, per_video, strict=True)]
    return PrivateGradient(grads, norms, float(losses.sum()))


def dpsgd_gradient_ghost(
    model: nn.Module,  # an opacus GradSampleModuleFastGradientClipping, loss_reduction="sum"
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    clip: float,
) -> PrivateGradient:
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
    return PrivateGradient(grads, norms, float(losses.detach().sum()))
