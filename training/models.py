"""Action recognizers that private training can use: every layer has an Opacus per-sample
gradient (Conv3d, GroupNorm, Linear, LayerNorm, Embedding), none mixes samples (no
BatchNorm), so `opacus.validators.ModuleValidator.validate` passes on both.

- `R2Plus1D`: a small (2+1)D CNN: each block a spatial (1 x k x k) then a temporal
  (k x 1 x 1) convolution, GroupNorm, ReLU, residual; widths and depth from config.
- `TubeletTransformer`: a small video transformer over tubelets (t x p x p patches,
  embedded by a strided Conv3d), learned positions (an Embedding), pre-norm encoder
  blocks with attention written from Linear layers (Opacus has per-sample gradients for
  those, not for nn.MultiheadAttention's fused weights), mean-pooled tokens.

Input: (N, 3, T, H, W) float in [0, 1]; output: (N, classes) logits.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from pipeline.config import Section

# Kinetics-style normalization of the input video.
MEAN = (0.43, 0.39, 0.36)
STD = (0.23, 0.22, 0.22)


class ModelConfig(Section):
    arch: Literal["r2plus1d", "transformer"] = Field(
        "r2plus1d", description="r2plus1d: small (2+1)D CNN; transformer: tubelet transformer")
    width: int = Field(32, ge=4, le=1024, description="channels of the first stage / token width")
    depth: int = Field(4, ge=1, le=48, description="residual blocks / transformer layers")
    heads: int = Field(4, ge=1, le=32, description="attention heads (transformer)")
    tubelet: tuple[int, int] = Field(
        (2, 16), description="tubelet size (frames, pixels) of the transformer's tokens")
    groups: int = Field(8, ge=1, le=64, description="GroupNorm groups (CNN)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout before the classifier")


class _Normalize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _groups(channels: int, wanted: int) -> int:
    g = min(wanted, channels)
    while channels % g:
        g -= 1
    return g


class _Conv2Plus1D(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: tuple[int, int], groups: int):
        mid = max(cin, cout)
        st, ss = stride
        super().__init__(
            nn.Conv3d(cin, mid, (1, 3, 3), (1, ss, ss), (0, 1, 1), bias=False),
            nn.GroupNorm(_groups(mid, groups), mid), nn.ReLU(inplace=False),
            nn.Conv3d(mid, cout, (3, 1, 1), (st, 1, 1), (1, 0, 0), bias=False))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: tuple[int, int], groups: int):
        super().__init__()
        self.conv = _Conv2Plus1D(cin, cout, stride, groups)
        self.norm = nn.GroupNorm(_groups(cout, groups), cout)
        self.skip = None
        if cin != cout or stride != (1, 1):
            self.skip = nn.Sequential(
                nn.Conv3d(cin, cout, 1, (stride[0], stride[1], stride[1]), bias=False),
                nn.GroupNorm(_groups(cout, groups), cout))
        self.act = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.skip is None else self.skip(x)
        return self.act(self.norm(self.conv(x)) + skip)


class R2Plus1D(nn.Module):
    def __init__(self, classes: int, cfg: ModelConfig):
        super().__init__()
        w, g = cfg.width, cfg.groups
        layers: list[nn.Module] = [
            _Normalize(),
            nn.Conv3d(3, w, (1, 5, 5), (1, 2, 2), (0, 2, 2), bias=False),
            nn.GroupNorm(_groups(w, g), w), nn.ReLU(inplace=False)]
        cin = w
        for i in range(cfg.depth):
            # Every other block halves space (and time from the second on) and widens.
            down = i % 2 == 1
            cout = cin * 2 if down else cin
            stride = ((2 if i > 1 else 1), 2) if down else (1, 1)
            layers.append(_Block(cin, cout, stride, g))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(cin, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.width {dim} must be divisible by model.heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(n, t, d))


class _EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TubeletTransformer(nn.Module):
    def __init__(self, classes: int, cfg: ModelConfig, frames: int, size: int):
        super().__init__()
        t, p = cfg.tubelet
        if frames % t or size % p:
            raise ValueError(f"model.tubelet {cfg.tubelet} must divide the clip "
                             f"({frames} frames, {size} px)")
        self.tokens = (frames // t) * (size // p) ** 2
        self.norm_in = _Normalize()
        self.embed = nn.Conv3d(3, cfg.width, (t, p, p), (t, p, p))
        self.position = nn.Embedding(self.tokens, cfg.width)
        self.register_buffer("index", torch.arange(self.tokens), persistent=False)
        self.blocks = nn.Sequential(*[_EncoderBlock(cfg.width, cfg.heads)
                                      for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(self.norm_in(x)).flatten(2).transpose(1, 2)  # (N, L, D)
        # repeat, not expand: per-sample gradient rules (Opacus ghost clipping) need one
        # real index row per sample.
        pos = self.position(self.index.repeat(x.shape[0], 1))
        feats = self.norm(self.blocks(tokens + pos))
        return self.head(feats.mean(1))


def build_model(cfg: ModelConfig, classes: int, frames: int, size: int) -> nn.Module:
    if cfg.arch == "r2plus1d":
        return R2Plus1D(classes, cfg)
    return TubeletTransformer(classes, cfg, frames, size)


def check_private(model: nn.Module) -> None:
    """Refuse a model Opacus cannot train privately (e.g. BatchNorm mixes the samples of
    a batch, so one sample's data reaches the others' gradients)."""
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError("model cannot be trained with differential privacy: "
                         + "; ".join(str(e) for e in errors))
