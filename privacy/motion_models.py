"""Classifiers on joint sequences: the motion attackers and the action recognizer.

Input (N, 3, T, V) normalized COCO-23 joints (privacy.motion_data); output (N, classes).

- `TemporalConvNet`: the joints of a frame flattened to 3V channels, 1D convolutions over
  time with growing dilation, residual, BatchNorm, mean over time.
- `STGCN`: spatio-temporal graph convolutions (Yan et al. 2018 style) over the COCO-23
  skeleton: per block a graph convolution (a 1x1 convolution mixed along the normalized
  adjacency with self-loops, times a learned edge importance) then a temporal
  convolution, BatchNorm, ReLU, residual; mean over time and joints.
- `MotionMLP`: per-joint mean, std and range over time, then an MLP: a weak baseline that
  sees body size and posture but no ordering in time.

Attackers are trained fresh per experiment (privacy.motion_attack), so none is pretrained.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from stages.body import COCO23

# COCO-23 bones (names as in stages.body.COCO23).
_EDGES = (
    ("nose", "left_eye"), ("nose", "right_eye"), ("left_eye", "left_ear"),
    ("right_eye", "right_ear"), ("nose", "left_shoulder"), ("nose", "right_shoulder"),
    ("left_shoulder", "right_shoulder"), ("left_shoulder", "left_elbow"),
    ("right_shoulder", "right_elbow"), ("left_elbow", "left_wrist"),
    ("right_elbow", "right_wrist"), ("left_shoulder", "left_hip"),
    ("right_shoulder", "right_hip"), ("left_hip", "right_hip"), ("left_hip", "left_knee"),
    ("right_hip", "right_knee"), ("left_knee", "left_ankle"), ("right_knee", "right_ankle"),
    ("left_ankle", "left_big_toe"), ("right_ankle", "right_big_toe"),
    ("left_ankle", "left_small_toe"), ("right_ankle", "right_small_toe"),
    ("left_ankle", "left_heel"), ("right_ankle", "right_heel"),
)
SKELETON_EDGES = tuple((COCO23.index(a), COCO23.index(b)) for a, b in _EDGES)

Arch = Literal["tcn", "stgcn", "mlp"]
ARCHS: tuple[Arch, ...] = ("tcn", "stgcn", "mlp")


def normalized_adjacency(num_joints: int = len(COCO23)) -> np.ndarray:
    """D^-1/2 (A + I) D^-1/2 of the skeleton graph."""
    a = np.eye(num_joints)
    for i, j in SKELETON_EDGES:
        a[i, j] = a[j, i] = 1.0
    d = 1.0 / np.sqrt(a.sum(axis=1))
    return a * d[:, None] * d[None, :]


class _TemporalBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dilation: int, kernel: int = 3):
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        self.conv = nn.Sequential(
            nn.Conv1d(cin, cout, kernel, padding=pad, dilation=dilation),
            nn.BatchNorm1d(cout), nn.ReLU(),
            nn.Conv1d(cout, cout, kernel, padding=pad, dilation=dilation),
            nn.BatchNorm1d(cout),
        )
        self.skip = nn.Identity() if cin == cout else nn.Conv1d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x) + self.skip(x))


class TemporalConvNet(nn.Module):
    def __init__(self, classes: int, joints: int = len(COCO23), width: int = 64,
                 depth: int = 3, dropout: float = 0.1):
        super().__init__()
        blocks = [_TemporalBlock(3 * joints if i == 0 else width, width, 2 ** i)
                  for i in range(depth)]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, v = x.shape
        h = x.permute(0, 1, 3, 2).reshape(n, c * v, t)
        return self.head(self.blocks(h).mean(dim=-1))


class _GraphBlock(nn.Module):
    def __init__(self, cin: int, cout: int, adjacency: torch.Tensor, stride: int = 1,
                 kernel: int = 5):
        super().__init__()
        self.register_buffer("adjacency", adjacency)
        self.importance = nn.Parameter(torch.ones_like(adjacency))
        self.spatial = nn.Conv2d(cin, cout, 1)
        self.temporal = nn.Sequential(
            nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, (kernel, 1), (stride, 1), ((kernel - 1) // 2, 0)),
            nn.BatchNorm2d(cout),
        )
        self.skip: nn.Module
        if cin == cout and stride == 1:
            self.skip = nn.Identity()
        else:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, (stride, 1)), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("nctv,vw->nctw", self.spatial(x), self.adjacency * self.importance)
        return torch.relu(self.temporal(h) + self.skip(x))


class STGCN(nn.Module):
    def __init__(self, classes: int, joints: int = len(COCO23), width: int = 32,
                 depth: int = 3, dropout: float = 0.1):
        super().__init__()
        adj = torch.as_tensor(normalized_adjacency(joints), dtype=torch.float32)
        self.norm = nn.BatchNorm1d(3 * joints)
        widths = [3] + [width * (2 if i >= depth // 2 + 1 else 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            _GraphBlock(widths[i], widths[i + 1], adj, stride=2 if i == depth // 2 else 1)
            for i in range(depth)])
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(widths[-1], classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, t, v = x.shape
        # Per-coordinate, per-joint input normalization (as in ST-GCN's data_bn).
        x = self.norm(x.permute(0, 3, 1, 2).reshape(n, v * c, t))
        x = x.reshape(n, v, c, t).permute(0, 2, 3, 1)
        return self.head(self.blocks(x).mean(dim=(2, 3)))


class MotionMLP(nn.Module):
    def __init__(self, classes: int, joints: int = len(COCO23), width: int = 128,
                 dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(9 * joints), nn.Linear(9 * joints, width), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        stats = torch.cat([x.mean(2), x.std(2), x.amax(2) - x.amin(2)], dim=1)
        return self.net(stats.reshape(n, -1))


def build_classifier(arch: Arch, classes: int, width: int | None = None) -> nn.Module:
    if arch == "tcn":
        return TemporalConvNet(classes, width=width or 64)
    if arch == "stgcn":
        return STGCN(classes, width=width or 32)
    if arch == "mlp":
        return MotionMLP(classes, width=width or 128)
    raise ValueError(f"unknown motion classifier {arch!r}; choose from {', '.join(ARCHS)}")
