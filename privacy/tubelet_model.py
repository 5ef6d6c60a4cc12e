"""The spatio-temporal tubelet transformer anonymizer (STPrivacy, PRIVACY_EVAL.md section 2).

A video clip (N, 3, T, H, W) in [0, 1] is cut into tubelets of t x p x p pixels, each
embedded by a strided Conv3d (no class token) plus a learned position. Transformer blocks
run over the tokens; after some of them (`prune_after`) a scorer rates every token from
its own features, the mean of its frame's kept tokens and the mean of the clip's kept
tokens, and drops the lowest ones:
- training: a Gumbel-softmax hard keep/drop per token with a straight-through gradient;
  dropped tokens are masked out of every later attention (they can neither be read nor
  pooled), so what is dropped cannot reach the output;
- inference: exactly the top k tokens of each frame (each temporal tubelet slot) survive,
  k set by the keep ratio, which may differ from the trained one (the deployment knob).
The blocks after the last pruning and a linear head decode the kept tokens back to pixel
tubelets; dropped tubelets are zero in the output.

Keep ratio: `keep_ratio` is the share of each frame's tubelets that reaches the output.
With S pruning stages, stage s keeps keep_ratio ** (s / S) of the frame's tubelets, so the
stages shrink the kept set by the same factor each (0.7 per stage for 3 stages at 0.343,
the paper's setting).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from pipeline.config import Section
from training.models import MEAN, STD


class TubeletModelConfig(Section):
    frames: int = Field(16, ge=1, le=256, description="frames per clip (paper: 16)")
    size: int = Field(112, ge=8, le=1024,
                      description="short side in pixels the videos are resized to (paper: 112)")
    tubelet: tuple[int, int] = Field(
        (2, 16), description="tubelet size (frames, pixels); must divide frames and size")
    width: int = Field(384, ge=8, le=2048, description="token width (ViT-S: 384)")
    depth: int = Field(12, ge=2, le=48, description="transformer blocks (ViT-S: 12)")
    heads: int = Field(6, ge=1, le=32, description="attention heads (ViT-S: 6)")
    prune_after: tuple[int, ...] = Field(
        (3, 6, 9), description="blocks after which tokens are scored and pruned (1-based, "
        "increasing, < depth: the blocks after the last one decode)")
    scorer_width: int = Field(192, ge=4, le=2048, description="hidden width of the token scorers")
    keep_ratio: float = Field(0.343, gt=0.0, le=1.0,
                              description="share of each frame's tubelets kept in training "
                              "(default at inference; 0.7 per stage over 3 stages)")
    tau: float = Field(1.0, gt=0.0, le=10.0, description="Gumbel-softmax temperature")

    @model_validator(mode="after")
    def _check(self) -> TubeletModelConfig:
        t, p = self.tubelet
        if t < 1 or p < 1 or self.frames % t or self.size % p:
            raise ValueError(f"tubelet {self.tubelet} must divide frames {self.frames} "
                             f"and size {self.size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")
        stages = self.prune_after
        if not stages or list(stages) != sorted(set(stages)) or stages[0] < 1 \
                or stages[-1] >= self.depth:
            raise ValueError(f"prune_after {stages} must be increasing block numbers in "
                             f"[1, depth - 1] (depth {self.depth})")
        return self


def stage_ratios(keep_ratio: float, stages: int) -> list[float]:
    """Cumulative share of a frame's tubelets kept after each pruning stage."""
    return [keep_ratio ** ((s + 1) / stages) for s in range(stages)]


def keep_counts(keep_ratio: float, stages: int, per_frame: int) -> list[int]:
    """Tokens of each frame kept after each stage at inference (at least one)."""
    counts, last = [], per_frame
    for r in stage_ratios(keep_ratio, stages):
        last = min(last, max(1, round(r * per_frame)))
        counts.append(last)
    return counts


class MaskedAttention(nn.Module):
    """Self-attention in which a token can only read kept tokens (and itself).

    `keep` (N, L) is 1 for kept and 0 for dropped tokens; it may carry a straight-through
    gradient. Dropped keys get weight exactly 0 in the forward pass (their exponent is
    multiplied by the 0 of the mask, and the softmax maximum is taken over allowed keys
    only), so changing a dropped token changes no kept token's output, while the gradient
    through the mask still tells the scorer what dropping a token cost."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # (N, h, L, L)
        eye = torch.eye(length, device=x.device, dtype=x.dtype)
        policy = keep[:, None, None, :] * (1 - eye) + eye  # always see yourself: no 0/0
        allowed = policy.detach() > 0.5
        top = logits.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True).detach()
        # Clamp only guards exp against overflow on dropped keys before the mask zeroes them.
        weights = torch.exp((logits - top).clamp(max=30.0)) * policy
        att = weights / weights.sum(-1, keepdim=True)
        return self.out((att @ v).transpose(1, 2).reshape(n, length, d))


class MaskedBlock(nn.Module):
    """Pre-norm transformer block over tokens with a keep mask (per-token norm and MLP:
    nothing but the attention mixes tokens)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MaskedAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


def _masked_mean(h: torch.Tensor, w: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return (h * w).sum(dims, keepdim=True) / w.sum(dims, keepdim=True).clamp_min(1e-6)


class TokenScorer(nn.Module):
    """Keep/drop log-probabilities of each token from its own features and the pooled
    features of its frame's and its clip's kept tokens (local, frame, clip context)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.local = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU())
        self.head = nn.Sequential(nn.Linear(3 * hidden, hidden), nn.GELU(),
                                  nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (N, Tg, S, D), keep (N, Tg, S) -> (N, Tg, S, 2) log-probs (keep, drop)."""
        h = self.local(x)
        w = keep[..., None]
        frame = _masked_mean(h, w, (2,)).expand_as(h)
        clip = _masked_mean(h, w, (1, 2)).expand_as(h)
        return F.log_softmax(self.head(torch.cat([h, frame, clip], -1)), -1)


class TubeletAnonymizer(nn.Module):
    def __init__(self, cfg: TubeletModelConfig):
        super().__init__()
        self.cfg = cfg
        t, p = cfg.tubelet
        self.t, self.p = t, p
        self.grid = (cfg.frames // t, cfg.size // p, cfg.size // p)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1, 1))
        self.embed = nn.Conv3d(3, cfg.width, (t, p, p), (t, p, p))
        self.position = nn.Parameter(torch.zeros(1, cfg.width, *self.grid))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(MaskedBlock(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.scorers = nn.ModuleList(TokenScorer(cfg.width, cfg.scorer_width)
                                     for _ in cfg.prune_after)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, 3 * t * p * p)

    def _positions(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """Learned positions on the training grid, interpolated to another frame shape
        (videos keep their aspect ratio at inference, as ViTs do at a new resolution)."""
        if grid == self.grid:
            return self.position
        if grid[0] != self.grid[0]:
            raise ValueError(f"clips must have {self.cfg.frames} frames")
        return F.interpolate(self.position, size=grid, mode="trilinear", align_corners=False)

    def embed_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(N, 3, T, H, W) in [0, 1] -> tokens (N, Tg, S, D) and the grid (Tg, Hg, Wg)."""
        n, _, frames, h, w = x.shape
        if frames % self.t or h % self.p or w % self.p:
            raise ValueError(f"clip {tuple(x.shape[2:])} is not a multiple of the tubelet "
                             f"{(self.t, self.p, self.p)}")
        tokens = self.embed((x - self.mean) / self.std)
        grid = tuple(tokens.shape[2:])
        tokens = tokens + self._positions(grid)  # type: ignore[arg-type]
        return tokens.flatten(3).permute(0, 2, 3, 1), grid  # type: ignore[return-value]

    def _select(self, logp: torch.Tensor, keep: torch.Tensor, count: int | None,
                ) -> torch.Tensor:
        if count is None:  # training: hard Gumbel sample, straight-through gradient
            sample = F.gumbel_softmax(logp, tau=self.cfg.tau, hard=True)[..., 0]
            return keep * sample
        # Inference: the `count` best of each frame among those still kept.
        score = (logp[..., 0] - logp[..., 1]).masked_fill(keep <= 0.5, float("-inf"))
        top = score.topk(count, dim=-1).indices
        return torch.zeros_like(keep).scatter(-1, top, 1.0)

    def forward(self, x: torch.Tensor, keep_ratio: float | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Anonymized clip (N, 3, T, H, W) in [0, 1] (dropped tubelets zero) and the keep
        mask after each pruning stage, each (N, Tg, S) with S = Hg x Wg.

        In training mode the masks are Gumbel samples (`keep_ratio` is unused: the ratio
        loss steers them); in eval mode exactly round(keep_ratio x S) tokens per frame
        survive (default: the trained ratio)."""
        tokens, grid = self.embed_tokens(x)
        n, tg, s, d = tokens.shape
        keep = tokens.new_ones(n, tg, s)
        counts: list[int | None] = [None] * len(self.scorers)
        if not self.training:
            ratio = self.cfg.keep_ratio if keep_ratio is None else keep_ratio
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"keep ratio {ratio} must be in (0, 1]")
            counts = keep_counts(ratio, len(self.scorers), s)  # type: ignore[assignment]
        masks = []
        h = tokens.reshape(n, tg * s, d)
        stage = 0
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, keep.reshape(n, tg * s))
            if stage < len(self.scorers) and i == self.cfg.prune_after[stage]:
                logp = self.scorers[stage](h.view(n, tg, s, d), keep)
                keep = self._select(logp, keep, counts[stage])
                masks.append(keep)
                stage += 1
        pixels = torch.sigmoid(self.head(self.norm(h)))  # (N, L, 3 t p p)
        pixels = pixels * keep.reshape(n, tg * s, 1)  # dropped tubelets are exactly zero
        return self.unpatchify(pixels, grid), masks

    def unpatchify(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(N, L, 3 t p p) -> (N, 3, T, H, W), inverse of the tubelet embedding's layout."""
        tg, hg, wg = grid
        n, t, p = pixels.shape[0], self.t, self.p
        x = pixels.view(n, tg, hg, wg, 3, t, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(n, 3, tg * t, hg * p, wg * p)

    def pixel_mask(self, keep: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Final token mask (N, Tg, S) -> (N, T, H, W): 1 on the pixels of kept tubelets."""
        tg, hg, wg = grid
        m = keep.reshape(-1, tg, hg, wg)
        m = m.repeat_interleave(self.t, 1).repeat_interleave(self.p, 2)
        return m.repeat_interleave(self.p, 3)


def ratio_loss(masks: list[torch.Tensor], keep_ratio: float) -> torch.Tensor:
    """Mean squared gap between each frame's kept share after each stage and its target."""
    targets = stage_ratios(keep_ratio, len(masks))
    losses = [((m.mean(-1) - r) ** 2).mean() for m, r in zip(masks, targets, strict=True)]
    return torch.stack(losses).mean()
