"""The exported dataset as training data: videos, their sensitivity masks and labels.

Reads OUTPUT/dataset.json (written by the export stage): every video with status ok and
a label. The mask video is white where the real background (still sensitive) is and
black where the pipeline synthesized pixels (the avatars, image-inpainted holes).

Splits: the manifest's split where the dataset has one; otherwise a deterministic split
by a hash of the person's identity where known (the video's metadata `person.name`), else
of the video id, so one person is never in both train and test.

Videos are decoded once, resized so the short side is `size * crop_margin`, and kept in
memory as uint8 (frames x side x side x 3 plus a 1-byte mask): about 3 MB per 48-frame
video at 112 px. Clips: `frames` frames every `stride` frames from a random start
(training) or spread evenly (evaluation); training augmentation (random crop and
horizontal flip) moves the mask with the pixels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from pydantic import Field

from pipeline.config import Section
from pipeline.video import VideoDecodeError, iter_frames


class DataConfig(Section):
    dataset: Path | None = Field(
        None, description="exported dataset folder (holds dataset.json); null: run.output")
    frames: int = Field(8, ge=1, le=256, description="frames per clip")
    stride: int = Field(2, ge=1, le=32, description="source frames between clip frames")
    size: int = Field(64, ge=16, le=512, description="clip side in pixels (square crop)")
    crop_margin: float = Field(1.15, ge=1.0, le=2.0,
                               description="decoded short side = size x this (crop room)")
    clips_per_video: int = Field(
        1, ge=1, le=16, description="clips drawn from a video per step (averaged before "
        "clipping: the privacy unit is the video)")
    eval_clips: int = Field(3, ge=1, le=32, description="clips averaged per video at test")
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0,
                                 description="share of identities held out where no split is given")
    augment: bool = Field(True, description="random crop (mask moves with the pixels)")
    flip: bool = Field(True, description="random horizontal flip in augmentation (off for "
                       "actions whose direction matters)")


@dataclass
class VideoRecord:
    id: str
    label: int
    split: Literal["train", "test"]
    group: str  # the person's identity where known, else the video id
    frames: np.ndarray  # (T, S, S, 3) uint8
    mask: np.ndarray  # (T, S, S) uint8, 255 = sensitive


def _hash_fraction(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _resize_square(frame: np.ndarray, side: int) -> np.ndarray:
    """Short side to `side`, centre crop to a square."""
    h, w = frame.shape[:2]
    scale = side / min(h, w)
    nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
    out = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA)
    y0, x0 = (nh - side) // 2, (nw - side) // 2
    return out[y0:y0 + side, x0:x0 + side]


def _decode(path: Path, fmt: str, side: int) -> np.ndarray:
    return np.stack([_resize_square(f, side) for f in iter_frames(path, fmt)])


def _identity(root: Path, entry: dict, input_root: Path | None) -> str | None:
    """The person's name from the exported metadata or the source's sidecar JSON (the
    generated sample writes one next to each video)."""
    candidates = []
    if entry.get("meta"):
        candidates.append(root / entry["meta"])
    if input_root is not None and entry.get("source"):
        candidates.append((input_root / entry["source"]).with_suffix(".json"))
    for path in candidates:
        if path.is_file():
            try:
                person = json.loads(path.read_text()).get("person")
            except (ValueError, AttributeError):
                continue
            if isinstance(person, dict) and person.get("name"):
                return str(person["name"])
    return None


def load_dataset(root: Path, cfg: DataConfig, labels: list[str] | None = None,
                 input_root: Path | None = None, originals: bool = False,
                 ) -> tuple[list[VideoRecord], list[str]]:
    """The labelled videos of an exported dataset and the label names. With `originals`,
    the source videos they came from (in `input_root`), masks all sensitive."""
    if originals and input_root is None:
        raise ValueError("the original videos need the input folder (run.input)")
    index_path = root / "dataset.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path}: no dataset.json (run `avatarize run` first, "
                                "or point train.data.dataset at an exported dataset)")
    index = json.loads(index_path.read_text())
    entries = [v for v in index.get("videos", []) if v.get("status") == "ok" and v.get("label")]
    if not entries:
        raise ValueError(f"{index_path}: no labelled video with status ok")
    names = labels or sorted({v["label"] for v in entries})
    side = round(cfg.size * cfg.crop_margin)
    records = []
    for v in entries:
        if v["label"] not in names:
            continue
        group = _identity(root, v, input_root) or v["id"]
        split = v.get("split") or ("test" if _hash_fraction(group) < cfg.test_fraction
                                   else "train")
        if split not in ("train", "test"):
            split = "test" if split in ("val", "valid", "validation") else "train"
        try:
            if not originals:
                frames = _decode(root / v["video"], "rgb24", side)
                mask = _decode(root / v["mask"], "gray", side)
            else:
                frames = _decode(input_root / v["source"], "rgb24", side)
                mask = np.full(frames.shape[:3], 255, np.uint8)
        except (VideoDecodeError, OSError, ValueError) as exc:
            raise ValueError(f"{v['id']}: cannot read its video or mask: {exc}") from exc
        n = min(len(frames), len(mask))
        records.append(VideoRecord(v["id"], names.index(v["label"]), split, group,
                                   frames[:n], mask[:n]))
    return records, names


def clip_starts(length: int, cfg: DataConfig, count: int,
                rng: np.random.Generator | None) -> list[int]:
    span = (cfg.frames - 1) * cfg.stride + 1
    last = max(0, length - span)
    if rng is not None:
        return [int(rng.integers(0, last + 1)) for _ in range(count)]
    return [round(last * (i + 0.5) / count) for i in range(count)]


def make_clip(rec: VideoRecord, start: int, cfg: DataConfig,
              rng: np.random.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, T, S, S) float in [0, 1] and its (1, T, S, S) mask (1 = sensitive). Frames past
    the end repeat the last one. With `rng`: random crop and flip, same for the mask."""
    idx = np.minimum(start + cfg.stride * np.arange(cfg.frames), len(rec.frames) - 1)
    frames, mask = rec.frames[idx], rec.mask[idx]
    side = frames.shape[1]
    if rng is not None and cfg.augment:
        y0, x0 = (int(rng.integers(0, side - cfg.size + 1)) for _ in range(2))
        flip = cfg.flip and bool(rng.integers(0, 2))
    else:
        y0 = x0 = (side - cfg.size) // 2
        flip = False
    frames = frames[:, y0:y0 + cfg.size, x0:x0 + cfg.size]
    mask = mask[:, y0:y0 + cfg.size, x0:x0 + cfg.size]
    if flip:
        frames, mask = frames[:, :, ::-1], mask[:, :, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 255.0
    m = torch.from_numpy(np.ascontiguousarray(mask) >= 128).float()[None]
    return x, m


def batch_of(records: list[VideoRecord], cfg: DataConfig, clips: int,
             rng: np.random.Generator | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clips of the given videos: x (N, 3, T, S, S), masks (N, 1, T, S, S), labels (N,),
    and groups (N,): the position in `records` of each clip's video."""
    xs, ms, ys, gs = [], [], [], []
    for i, rec in enumerate(records):
        for start in clip_starts(len(rec.frames), cfg, clips, rng):
            x, m = make_clip(rec, start, cfg, rng)
            xs.append(x)
            ms.append(m)
            ys.append(rec.label)
            gs.append(i)
    if not xs:
        s = cfg.size
        return (torch.zeros(0, 3, cfg.frames, s, s), torch.zeros(0, 1, cfg.frames, s, s),
                torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    return torch.stack(xs), torch.stack(ms), torch.tensor(ys), torch.tensor(gs)
