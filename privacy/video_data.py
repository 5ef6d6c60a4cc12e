"""A method's output videos as small clips, joined with the ORIGINAL people's labels.

A "method" is whatever an attacker is given: the generated dataset itself (the
`original` row of the leakage table), a baseline (privacy.baselines: blurred or
blacked-out people) or an anonymizer's export (avatarize run, the tubelet anonymizer).
Two layouts are read:
- an export folder: OUTPUT/dataset.json lists every video with its status; a video that
  failed in the pipeline is reported missing with the pipeline's reason;
- a plain dataset folder: manifest.csv (path,label,split) or a class-per-folder tree,
  as pipeline.dataset.discover reads it.
Videos are keyed by their dataset id, which every method keeps (the export mirrors the
input layout), and the labels and the split come from the ORIGINAL dataset
(privacy.labels.load_labels): the attacker predicts who was really filmed, and the split
is the original's, so every method is attacked on the same videos. A labelled video the
method lacks is listed in `missing` with the reason, never silently dropped: a method
that fails on hard videos must not look private because of it.

Each video is decoded once: every `stride`-th frame, resized (squashed, not cropped) to
`decode_side` = round(size x crop_margin) square so a person at the frame's edge stays in
view, kept in memory as uint8 (about 200 kB for 16 frames at 73 px). Clips are `frames`
consecutive kept frames: from a random start and with a random crop in training, evenly
spread starts and the centre crop at test.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from pydantic import Field

from pipeline.config import ConfigError, Section
from pipeline.dataset import discover
from pipeline.video import VideoDecodeError, iter_frames
from privacy.labels import LabelTable, VideoLabels, load_labels


class ClipConfig(Section):
    frames: int = Field(8, ge=1, le=128, description="frames per clip")
    stride: int = Field(2, ge=1, le=32, description="source frames between clip frames")
    size: int = Field(64, ge=16, le=512, description="clip side in pixels (square)")
    crop_margin: float = Field(1.125, ge=1.0, le=2.0, description="decoded side = size x this "
                               "(room for the random crop of training)")
    eval_clips: int = Field(3, ge=1, le=32, description="clips averaged per test video")

    @property
    def decode_side(self) -> int:
        return round(self.size * self.crop_margin)


@dataclass
class VideoClips:
    id: str
    labels: VideoLabels
    frames: np.ndarray  # (T', S, S, 3) uint8: every stride-th frame of the video


@dataclass
class MethodVideos:
    """The labelled videos a method delivered, and what it did not."""

    root: Path
    layout: str  # "export" (dataset.json) or "dataset" (manifest / folder)
    table: LabelTable
    videos: list[VideoClips]
    missing: dict[str, str] = field(default_factory=dict)  # id -> why
    unlabelled: list[str] = field(default_factory=list)  # method ids the original lacks

    def split(self, name: str) -> list[VideoClips]:
        return [v for v in self.videos if v.labels.split == name]

    def summary(self) -> dict:
        return {"layout": self.layout, "videos": len(self.videos),
                "train": len(self.split("train")), "test": len(self.split("test")),
                "missing": dict(sorted(self.missing.items())),
                "missing_count": len(self.missing), "unlabelled": sorted(self.unlabelled)}


def method_index(root: Path) -> tuple[str, dict[str, Path], dict[str, str]]:
    """(layout, {id: video path}, {id: why it is absent}) of a method folder."""
    root = Path(root)
    index_path = root / "dataset.json"
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{index_path}: unreadable: {exc}") from exc
        paths, absent = {}, {}
        for v in index.get("videos", []):
            if v.get("status") == "ok" and v.get("video"):
                paths[v["id"]] = root / v["video"]
            else:
                where = v.get("failed_stage") or v.get("status")
                absent[v["id"]] = f"{where}: {v.get('reason') or 'not exported'}"
        return "export", paths, absent
    if not root.is_dir():
        raise ConfigError(f"{root}: not a folder")
    return "dataset", {item.id: item.path for item in discover(root)}, {}


def _squash(frame: np.ndarray, side: int) -> np.ndarray:
    # The whole frame, aspect not kept: a centre crop would cut people at the sides,
    # and the attackers do not need true proportions, only the same ones for every video.
    return cv2.resize(frame, (side, side), interpolation=cv2.INTER_AREA)


def attack_frames(frames: Iterable[np.ndarray], cfg: ClipConfig) -> np.ndarray:
    """What the attackers keep of a video: every stride-th frame, squashed to the decode
    side (T', S, S, 3) uint8."""
    kept = [_squash(f, cfg.decode_side) for i, f in enumerate(frames) if i % cfg.stride == 0]
    if not kept:
        raise ValueError("no frames")
    return np.stack(kept)


def decode_video(path: Path, cfg: ClipConfig) -> np.ndarray:
    return attack_frames(iter_frames(path, "rgb24"), cfg)


def load_method(method_dir: Path, original: Path | LabelTable, cfg: ClipConfig
                ) -> MethodVideos:
    """Decode a method's videos that the original dataset labels; report the rest."""
    table = original if isinstance(original, LabelTable) else load_labels(Path(original))
    layout, paths, absent = method_index(Path(method_dir))
    labelled = table.by_id()
    videos, missing = [], {}
    for vid, labels in labelled.items():
        if vid not in paths:
            missing[vid] = absent.get(vid, "no such video in the method's output")
            continue
        try:
            frames = decode_video(paths[vid], cfg)
        except (VideoDecodeError, OSError, ValueError) as exc:
            missing[vid] = f"unreadable: {exc}"
            continue
        videos.append(VideoClips(vid, labels, frames))
    unlabelled = [vid for vid in paths if vid not in labelled]
    return MethodVideos(Path(method_dir), layout, table, videos, missing, unlabelled)


def clip_starts(length: int, cfg: ClipConfig, count: int,
                rng: np.random.Generator | None) -> list[int]:
    last = max(0, length - cfg.frames)
    if rng is not None:
        return [int(rng.integers(0, last + 1)) for _ in range(count)]
    return [round(last * (i + 0.5) / count) for i in range(count)]


def make_clip(frames: np.ndarray, start: int, cfg: ClipConfig,
              rng: np.random.Generator | None) -> torch.Tensor:
    """(3, frames, size, size) float in [0, 1]; past the end the last frame repeats."""
    idx = np.minimum(start + np.arange(cfg.frames), len(frames) - 1)
    side = frames.shape[1]
    if rng is not None:
        y0, x0 = (int(rng.integers(0, side - cfg.size + 1)) for _ in range(2))
    else:
        y0 = x0 = (side - cfg.size) // 2
    clip = frames[idx, y0:y0 + cfg.size, x0:x0 + cfg.size]
    return torch.from_numpy(np.ascontiguousarray(clip)).permute(3, 0, 1, 2).float() / 255.0


def clips_of(videos: list[VideoClips], cfg: ClipConfig, count: int,
             rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` clips per video: x (N * count, 3, T, S, S) and the video index of each."""
    xs, owner = [], []
    for i, v in enumerate(videos):
        for start in clip_starts(len(v.frames), cfg, count, rng):
            xs.append(make_clip(v.frames, start, cfg, rng))
            owner.append(i)
    return torch.stack(xs), torch.tensor(owner)
