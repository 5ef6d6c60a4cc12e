"""The classical baselines of the leakage table: blurred people and blacked-out people.

Both start from the original dataset and the detect stage's artifacts of a pipeline
WORKDIR (stages/__init__.py: detect/<id>/mask.mkv, every person's segmentation;
detect/<id>/people.npz, their boxes), so they hide exactly the pixels the pipeline
itself would replace, and attackers then compare like with like:
- `blur`: inside the dilated person mask, a strong Gaussian blur whose sigma is a
  fraction of the person's box height (a blur in pixels would hide a far person and
  barely touch a near one);
- `blackout`: black pixels there.
The dilation radius is a fraction of the box height as well. The union mask cannot be
split per person, so a frame's scale is its tallest person's box: smaller people get
relatively more dilation and blur, never less.

Frames where the detector found nobody (no mask pixel above the threshold) are left as
they are: that leak is part of what the baseline is, so it is counted and reported
(`frames_without_detection`), not patched over.

Output: a dataset folder mirroring the input layout, OUT/<id>.mp4 (H.264, the input's fps,
size and frame count), OUT/manifest.csv (path,label,split; written last, it marks
completion), OUT/baseline.json (method, config, per video: frames, frames without a
detection, mean masked fraction; videos skipped and why). privacy.video_data reads it as
a method's output.

CLI (registered by `add_cli`):
    avatarize baseline --method blur|blackout --dataset ORIG --workdir W --out D
"""

from __future__ import annotations

import argparse
import csv
import os
import uuid
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import yaml
from pydantic import Field

from pipeline.config import ConfigError, Section
from pipeline.dataset import VideoItem, discover
from pipeline.store import write_json_atomic
from pipeline.video import VideoDecodeError, VideoWriter, iter_frames, probe

Method = Literal["blur", "blackout"]
METHODS: tuple[str, ...] = ("blur", "blackout")


class BaselineConfig(Section):
    mask_threshold: float = Field(0.5, ge=0.0, le=1.0,
                                  description="segmentation probability counted as person")
    dilate: float = Field(0.05, ge=0.0, le=1.0,
                          description="dilation radius as a fraction of the box height")
    min_dilate_px: int = Field(2, ge=0, le=256, description="dilation radius at least (px)")
    blur_sigma: float = Field(0.15, gt=0.0, le=2.0,
                              description="blur: Gaussian sigma as a fraction of the box height")
    min_sigma: float = Field(3.0, gt=0.0, le=100.0, description="blur: sigma at least (px)")
    crf: int = Field(18, ge=0, le=51, description="H.264 quality of the written videos")


def frame_scale(boxes: np.ndarray, region: np.ndarray) -> float:
    """The tallest present box's height (px); without a box, the segmentation's own
    height (a mask pixel with no box is still a person)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    heights = boxes[:, 3] - boxes[:, 1]
    heights = heights[np.isfinite(heights) & (heights > 0)]
    if heights.size:
        return float(heights.max())
    rows = np.flatnonzero(region.any(1))
    return float(rows[-1] - rows[0] + 1) if rows.size else 0.0


def person_region(mask: np.ndarray, boxes: np.ndarray, cfg: BaselineConfig
                  ) -> tuple[np.ndarray, float]:
    """(bool (H, W) dilated person region, the frame's scale in px) of one frame."""
    seg = mask >= round(cfg.mask_threshold * 255)
    if not seg.any():
        return seg, 0.0
    scale = frame_scale(boxes, seg)
    r = max(cfg.min_dilate_px, round(cfg.dilate * scale))
    if r == 0:
        return seg, scale
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(seg.astype(np.uint8), kernel) > 0, scale


def strong_blur(frame: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of `sigma` px, computed at a lower resolution when sigma is large
    (a 30 px sigma is a 181-tap kernel; at 1/8 scale it costs 1/64 of it and looks the
    same, since the blur removes the detail the downscale loses)."""
    k = sigma / 4.0
    if k < 2.0:
        return cv2.GaussianBlur(frame, (0, 0), sigma)
    h, w = frame.shape[:2]
    small = cv2.resize(frame, (max(1, round(w / k)), max(1, round(h / k))),
                       interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 4.0)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def hide(frame: np.ndarray, region: np.ndarray, scale: float, method: str,
         cfg: BaselineConfig) -> np.ndarray:
    """The frame with `region` blurred or blacked out; pixels outside it unchanged."""
    if not region.any():
        return frame
    out = frame.copy()
    if method == "blackout":
        out[region] = 0
    elif method == "blur":
        sigma = max(cfg.min_sigma, cfg.blur_sigma * scale)
        out[region] = strong_blur(frame, sigma)[region]
    else:
        raise ValueError(f"unknown baseline {method!r}; choose from {METHODS}")
    return out


def _detect_inputs(workdir: Path, item: VideoItem) -> tuple[Path, np.ndarray] | str:
    """(mask.mkv, boxes [T, P, 4]) of a video, or why they cannot be used."""
    folder = workdir / "detect" / item.id
    mask, people = folder / "mask.mkv", folder / "people.npz"
    if not mask.is_file() or not people.is_file():
        return f"no detect artifacts in {folder} (run avatarize run up to detect)"
    with np.load(people) as data:
        boxes = np.asarray(data["boxes"], np.float32)
        if "present" in data:
            boxes = np.where(np.asarray(data["present"])[..., None], boxes, np.nan)
    return mask, boxes


def write_video(item: VideoItem, mask_path: Path, boxes: np.ndarray, dest: Path,
                method: str, cfg: BaselineConfig) -> dict[str, Any]:
    """One baseline video; its counts. Raises ValueError if source and mask disagree."""
    info = probe(item.path)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp.mp4")
    dest.parent.mkdir(parents=True, exist_ok=True)
    frames = undetected = 0
    masked = 0.0
    try:
        with VideoWriter(tmp, info.fps, info.width, info.height, "h264", crf=cfg.crf) as out:
            masks = iter_frames(mask_path, "gray")
            for frame in iter_frames(item.path, "rgb24"):
                mask = next(masks, None)
                if mask is None or mask.shape != frame.shape[:2]:
                    raise ValueError(f"{mask_path} does not match the video (frame {frames}): "
                                     "stale detect artifacts?")
                row = boxes[frames] if frames < len(boxes) else np.zeros((0, 4))
                region, scale = person_region(mask, row, cfg)
                out.write(hide(frame, region, scale, method, cfg))
                undetected += not region.any()
                masked += float(region.mean())
                frames += 1
            if next(masks, None) is not None:
                raise ValueError(f"{mask_path} has more frames than the video")
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"frames": frames, "frames_without_detection": undetected,
            "masked_fraction": round(masked / max(frames, 1), 5)}


def _check_output(original: Path, out_dir: Path) -> None:
    root = (original if original.is_dir() else original.parent).resolve()
    out = out_dir.resolve()
    if out == root or root in out.parents or out in root.parents:
        raise ConfigError(f"baseline output {out_dir} overlaps the original dataset {root}")


def write_baseline(method: str, original: Path, workdir: Path, out_dir: Path,
                   cfg: BaselineConfig | None = None) -> dict[str, Any]:
    """Write the `method` baseline of the original dataset into `out_dir`; returns (and
    writes to out_dir/baseline.json) its report."""
    if method not in METHODS:
        raise ConfigError(f"unknown baseline {method!r}; choose from {METHODS}")
    cfg = cfg or BaselineConfig()
    original, workdir, out_dir = Path(original), Path(workdir), Path(out_dir)
    _check_output(original, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    videos: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    rows = []
    for item in discover(original):
        inputs = _detect_inputs(workdir, item)
        if isinstance(inputs, str):
            skipped[item.id] = inputs
            continue
        rel = f"{item.id}.mp4"
        try:
            videos[item.id] = write_video(item, *inputs, out_dir / rel, method, cfg)
        except (VideoDecodeError, ValueError, OSError) as exc:
            skipped[item.id] = str(exc)
            continue
        rows.append((rel, item.label or "", item.split or ""))
    frames = sum(v["frames"] for v in videos.values())
    undetected = sum(v["frames_without_detection"] for v in videos.values())
    report = {
        "method": method, "original": str(original), "workdir": str(workdir),
        "config": cfg.model_dump(mode="json"),
        "videos_written": len(videos), "skipped": skipped,
        "frames": frames, "frames_without_detection": undetected,
        "frames_without_detection_fraction": round(undetected / frames, 5) if frames else None,
        "videos": videos,
    }
    write_json_atomic(out_dir / "baseline.json", report)
    tmp = out_dir / f".manifest.{uuid.uuid4().hex[:8]}.tmp"
    with tmp.open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "split"), *rows])
    os.replace(tmp, out_dir / "manifest.csv")
    return report


# ---- CLI ----------------------------------------------------------------------------

def cmd_baseline(args: argparse.Namespace) -> int:
    values = {}
    for text in args.set or []:
        key, sep, raw = text.partition("=")
        if not sep:
            raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. dilate=0.1")
        values[key.strip()] = yaml.safe_load(raw) if raw.strip() else raw
    cfg = BaselineConfig.model_validate(values)
    report = write_baseline(args.method, args.dataset, args.workdir, args.out, cfg)
    print(f"{args.method}: {report['videos_written']} videos written to {args.out}, "
          f"{len(report['skipped'])} skipped; {report['frames_without_detection']} of "
          f"{report['frames']} frames had no detection (left as they are)")
    return 0


def add_cli(subparsers: Any) -> None:
    """Register `avatarize baseline`."""
    p = subparsers.add_parser("baseline", help="write the blurred / blacked-out people "
                              "baseline of a dataset from a workdir's detect artifacts")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--dataset", type=Path, required=True, help="the original dataset")
    p.add_argument("--workdir", type=Path, required=True,
                   help="pipeline workdir holding detect/<id>/mask.mkv and people.npz")
    p.add_argument("--out", type=Path, required=True, help="the baseline dataset folder")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="baseline config, e.g. --set dilate=0.1 --set blur_sigma=0.3")
    p.set_defaults(func=cmd_baseline)
