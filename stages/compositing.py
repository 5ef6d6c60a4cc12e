"""Image and stream helpers shared by the inpaint and harmonize stages (and only them)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fractions import Fraction
from itertools import zip_longest
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.stage import VideoFailed, VideoJob
from pipeline.video import VideoDecodeError, count_frames, iter_chunks, probe


def video_info(job: VideoJob, fallback: Path) -> dict[str, Any]:
    """Width, height, fps and frame count of the source: from an upstream summary that
    carries them (detect's, or inpaint's pass-through), else probed from `fallback`."""
    for summary in job.upstream.values():
        info = summary.get("video") if isinstance(summary, dict) else None
        if isinstance(info, dict) and {"width", "height", "fps_num", "frame_count"} <= set(info):
            return dict(info)
    try:
        info = probe(fallback).to_dict()
        if info["frame_count"] <= 0:  # the container does not say: decode to know
            info["frame_count"] = count_frames(fallback)
    except VideoDecodeError as exc:
        raise VideoFailed(str(exc)) from exc
    return info


def fps_of(info: dict[str, Any]) -> Fraction:
    return Fraction(int(info["fps_num"]), int(info.get("fps_den", 1)))


def iter_aligned(
    sources: Sequence[tuple[Path, str]], chunk: int
) -> Iterator[tuple[np.ndarray, ...]]:
    """Chunks of several videos read in lockstep; a video that ends early (or late) is a
    failed video, since every artifact must have the source's frame count."""
    iters = [iter_chunks(path, chunk, fmt) for path, fmt in sources]
    try:
        for chunks in zip_longest(*iters):
            if any(c is None for c in chunks):
                raise VideoFailed(
                    "frame count mismatch between "
                    + ", ".join(f"{p.parent.name}/{p.name}" for p, _ in sources)
                )
            lengths = {len(c) for c in chunks}
            if len(lengths) != 1:
                raise VideoFailed(
                    f"frame count mismatch between {', '.join(p.name for p, _ in sources)}"
                )
            yield tuple(chunks)
    except VideoDecodeError as exc:
        raise VideoFailed(str(exc)) from exc


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Grow a bool mask by `radius` px (Euclidean disk); returns bool.

    A distance transform costs the same for any radius, unlike cv2.dilate with a disk.
    """
    if radius <= 0 or not mask.any():
        return mask
    if radius < 2:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
        return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)
    distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
    return distance <= radius


def gather(rows: np.ndarray, which: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """rows[which][:, cols] without copying whole rows (much faster than 2-D fancy indexing
    for a few long rows)."""
    if len(which) == 0:
        return np.empty((0, len(cols), *rows.shape[2:]), rows.dtype)
    return np.stack([np.take(rows[k], cols, axis=0) for k in which])


def check_size(frames: np.ndarray, width: int, height: int, what: str) -> None:
    if frames.shape[1] != height or frames.shape[2] != width:
        raise VideoFailed(
            f"{what} is {frames.shape[2]}x{frames.shape[1]}, expected {width}x{height}"
        )
