"""What of the real people is left in an anonymized video, measured by models the
pipeline does not use for removal where possible.

Three signals, each on the output outside the (dilated) avatar, and the same on the
source for scale:
- person fraction: pixels that mediapipe's general selfie segmenter calls person. It
  over-segments cluttered scenes (tables, chairs), so the source's fraction is reported
  next to it: a residual close to the source's means little was removed.
- people: BlazePose (single-person, static-image mode) run on every `stride`-th frame;
  a detection counts when its torso centre is not on an avatar.
- faces: mediapipe's full-range face detector (not used by the pipeline) on the same
  frames; a face counts when its box centre is not on an avatar.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SEGMENT_THRESHOLD = 0.5
TORSO = (11, 12, 23, 24)  # BlazePose shoulders and hips


def _on_avatar(covered: np.ndarray, x: float, y: float) -> bool:
    h, w = covered.shape
    xi, yi = int(np.clip(round(x), 0, w - 1)), int(np.clip(round(y), 0, h - 1))
    return bool(covered[yi, xi])


def _count_people(pose: Any, frame: np.ndarray, covered: np.ndarray) -> int:
    result = pose.process(frame)
    if result.pose_landmarks is None:
        return 0
    h, w = covered.shape
    lm = result.pose_landmarks.landmark
    x = float(np.mean([lm[i].x for i in TORSO])) * w
    y = float(np.mean([lm[i].y for i in TORSO])) * h
    return 0 if _on_avatar(covered, x, y) else 1


def _count_faces(faces: Any, frame: np.ndarray, covered: np.ndarray) -> int:
    result = faces.process(frame)
    h, w = covered.shape
    n = 0
    for det in result.detections or []:
        box = det.location_data.relative_bounding_box
        cx, cy = (box.xmin + box.width / 2) * w, (box.ymin + box.height / 2) * h
        n += 0 if _on_avatar(covered, cx, cy) else 1
    return n


def residual_report(source: Path, output: Path, avatar_rgba: Path | None,
                    dilate_px: int = 5, stride: int = 5) -> dict[str, float]:
    """Per-video residual measures (means over frames; people and faces per sampled
    frame). `avatar_rgba` None: no avatar (e.g. the source measured against itself)."""
    import cv2
    import mediapipe as mp

    from pipeline.video import iter_frames

    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1,) * 2)
    avatars = iter_frames(avatar_rgba, "rgba") if avatar_rgba is not None else None
    sums = {"residual_person_fraction": 0.0, "source_person_fraction": 0.0,
            "residual_people": 0.0, "source_people": 0.0,
            "residual_faces": 0.0, "source_faces": 0.0}
    frames = sampled = 0
    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg, \
            mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1) as pose, \
            mp.solutions.face_detection.FaceDetection(model_selection=1) as faces:
        for i, (src, out) in enumerate(zip(iter_frames(source), iter_frames(output),
                                           strict=False)):
            if avatars is not None:
                alpha = next(avatars)[..., 3] > 0
                covered = cv2.dilate(alpha.astype(np.uint8), kernel) > 0
            else:
                covered = np.zeros(out.shape[:2], bool)
            nothing = np.zeros_like(covered)
            person = seg.process(out).segmentation_mask > SEGMENT_THRESHOLD
            sums["residual_person_fraction"] += float((person & ~covered).mean())
            source_person = seg.process(src).segmentation_mask > SEGMENT_THRESHOLD
            sums["source_person_fraction"] += float(source_person.mean())
            frames += 1
            if i % stride == 0:
                sampled += 1
                sums["residual_people"] += _count_people(pose, out, covered)
                sums["source_people"] += _count_people(pose, src, nothing)
                sums["residual_faces"] += _count_faces(faces, out, covered)
                sums["source_faces"] += _count_faces(faces, src, nothing)
    out_stats: dict[str, float] = {}
    for key, value in sums.items():
        n = frames if key.endswith("fraction") else sampled
        out_stats[key] = round(value / n, 5) if n else float("nan")
    out_stats["frames"] = frames
    out_stats["sampled_frames"] = sampled
    return out_stats
