"""Pose back-ends for the detect stage: whatever finds people and their BlazePose landmarks.

A back-end looks at one RGB frame at a time and returns every person it finds there; the
detect stage filters them (visibility, size), tracks them and writes the artifacts.
Back-ends may keep state between frames of one video (trackers); `reset()` clears it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

NUM_LANDMARKS = 33


@dataclass
class PersonPose:
    """One person in one frame, in the BlazePose 33-landmark layout."""

    keypoints: np.ndarray  # float32 [33, 3]: x px, y px, visibility 0..1
    world: np.ndarray | None  # float32 [33, 3]: metres, hip-centred; None if unknown
    mask: np.ndarray | None  # float32 [H, W] of the whole frame, person probability 0..1
    score: float  # detection confidence 0..1


class PoseBackend(Protocol):
    def reset(self) -> None:
        """Forget all state of the previous video."""

    def detect(self, frame_rgb: np.ndarray) -> list[PersonPose]:
        """Every person found in one uint8 RGB frame [H, W, 3]."""

    def close(self) -> None:
        """Release models; the back-end is not used afterwards."""


# A landmark at least this visible counts as seen (boxes, paint-out, duplicates).
VISIBLE = 0.5
TORSO = (11, 12, 23, 24)  # BlazePose: left/right shoulder, left/right hip
# BlazePose's mask covers every person in its crop; only the part near this person's
# landmarks is theirs (a neighbour must not be painted out or stretch this person's box).
REGION_MARGIN = 0.2  # of the landmark box's larger side, on each side
# A further search whose visible landmarks lie on painted-out pixels more than this found a
# person already found (a ghost straddling the blur). Measured on the basketball video:
# real second people 0.0-0.04, ghosts 0.14-0.48.
PAINTED_LANDMARKS = 0.1


def landmark_box(keypoints: np.ndarray) -> np.ndarray | None:
    """Box of the visible landmarks, or None when none is visible."""
    vis = keypoints[keypoints[:, 2] >= VISIBLE, :2]
    if len(vis) == 0:
        return None
    return np.array([*vis.min(axis=0), *vis.max(axis=0)], dtype=np.float32)


def person_region(
    prob: np.ndarray, keypoints: np.ndarray, lm_box: np.ndarray, threshold: float
) -> np.ndarray:
    """Pixels of the mask components that hold a visible landmark, kept near the landmarks."""
    import cv2

    h, w = prob.shape
    binary = (prob >= threshold).astype(np.uint8)
    _, labels = cv2.connectedComponents(binary, connectivity=8)
    vis = keypoints[keypoints[:, 2] >= VISIBLE, :2]
    xs = np.clip(vis[:, 0].astype(int), 0, w - 1)
    ys = np.clip(vis[:, 1].astype(int), 0, h - 1)
    ids = np.unique(labels[ys, xs])
    ids = ids[ids > 0]
    region = np.isin(labels, ids) if len(ids) else np.zeros_like(binary, dtype=bool)
    margin = REGION_MARGIN * max(lm_box[2] - lm_box[0], lm_box[3] - lm_box[1])
    x0, y0 = int(max(0, lm_box[0] - margin)), int(max(0, lm_box[1] - margin))
    x1, y1 = int(min(w, lm_box[2] + margin + 1)), int(min(h, lm_box[3] + margin + 1))
    near = np.zeros_like(region)
    near[y0:y1, x0:x1] = True
    return region & near


def hide_outside(keypoints: np.ndarray, width: int, height: int) -> np.ndarray:
    """Visibility 0 for landmarks outside the frame: BlazePose reports up to ~0.7 for knees
    it guesses below the picture's edge."""
    kp = keypoints.copy()
    x, y = kp[:, 0], kp[:, 1]
    kp[(x < 0) | (x >= width) | (y < 0) | (y >= height), 2] = 0.0
    return kp


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class MediapipePoseBackend:
    """BlazePose from mediapipe 0.10.21's legacy `solutions.pose` ("full" model in the wheel).

    One BlazePose finds one person, the most prominent, and in video mode tracks them from
    frame to frame. For more people, each found person is painted out and a further
    BlazePose instance (with its own tracking state) searches the rest of the image, up to
    `max_people`. The search stops at the first miss, at a detection whose torso is less
    visible than `min_visibility` (returned, so the caller can count it as rejected), and
    at a duplicate of a person already found.
    """

    def __init__(
        self,
        *,
        model_complexity: int = 1,
        smooth_landmarks: bool = True,
        min_detection_confidence: float = 0.7,
        min_tracking_confidence: float = 0.5,
        max_people: int = 1,
        min_visibility: float = 0.5,
        segmentation_threshold: float = 0.5,
    ) -> None:
        # Imported here so that listing stages does not pay for mediapipe's import.
        from mediapipe.python.solutions import pose as mp_pose

        self.min_visibility = min_visibility
        self.segmentation_threshold = segmentation_threshold
        self.max_people = max_people
        self._options = dict(
            static_image_mode=False,
            model_complexity=model_complexity,
            smooth_landmarks=smooth_landmarks,
            enable_segmentation=True,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )
        self._new_pose = mp_pose.Pose
        self._poses: list = []
        self._used = 0  # instances that saw a frame since the last reset
        try:
            self._pose(0)  # fails now, not mid-video, when the model is missing
        except Exception as exc:  # mediapipe raises bare exceptions when a model is missing
            self.close()
            raise RuntimeError(
                f"model_complexity={model_complexity}: cannot load BlazePose ({exc}); "
                "only 1 ships with mediapipe, 0 and 2 need a download"
            ) from exc

    def _pose(self, i: int):
        """The i-th BlazePose, created on first need: most videos show one or two people,
        and each instance costs memory and start-up time."""
        while len(self._poses) <= i:
            self._poses.append(self._new_pose(**self._options))
        self._used = max(self._used, i + 1)
        return self._poses[i]

    def reset(self) -> None:
        for pose in self._poses[: self._used]:
            pose.reset()  # ~0.25 s each, so only those that have tracked anything
        self._used = 0

    def close(self) -> None:
        for pose in self._poses:
            pose.close()
        self._poses = []

    def detect(self, frame_rgb: np.ndarray) -> list[PersonPose]:
        h, w = frame_rgb.shape[:2]
        found: list[PersonPose] = []
        boxes: list[np.ndarray] = []
        image = frame_rgb
        painted = np.zeros((h, w), dtype=bool)  # where found people were painted out
        for i in range(self.max_people):
            result = self._pose(i).process(image)
            if result.pose_landmarks is None:
                break
            raw, world = _landmarks(result, w, h)
            # The torso's own visibility judges the detection, even where the hips are
            # below the frame: a person close to the camera is still a person.
            score = float(raw[list(TORSO), 2].mean())
            kp = hide_outside(raw, w, h)
            prob = np.asarray(result.segmentation_mask, dtype=np.float32)
            lm_box = landmark_box(kp)
            if lm_box is None or score < self.min_visibility:
                found.append(PersonPose(kp, world, prob, score))
                break
            if found and _already_found(kp, lm_box, painted, boxes):
                break  # a further BlazePose found a found person (or their blurred ghost)
            found.append(PersonPose(kp, world, prob, score))
            boxes.append(lm_box)
            if i + 1 < self.max_people:
                region = person_region(prob, kp, lm_box, self.segmentation_threshold)
                image, grown = _paint_out(image, region)
                painted |= grown
        return found


def _landmarks(result, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks in pixels (with BlazePose's visibility) and world landmarks."""
    kp = np.array(
        [(lm.x * width, lm.y * height, lm.visibility) for lm in result.pose_landmarks.landmark],
        dtype=np.float32,
    )
    world = np.array(
        [(lm.x, lm.y, lm.z) for lm in result.pose_world_landmarks.landmark], dtype=np.float32
    )
    return kp, world


def _paint_out(image: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace a found person by a heavy blur of the frame, so the next search skips them;
    returns the new image and the painted pixels.

    A blur rather than a flat fill: a flat person-shaped silhouette can itself look like a
    person to the detector.
    """
    import cv2

    grown = cv2.dilate(region.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
    k = max(15, (min(image.shape[:2]) // 8) | 1)
    blurred = cv2.blur(image, (k, k))
    out = image.copy()
    out[grown] = blurred[grown]
    return out, grown


def _already_found(
    kp: np.ndarray, lm_box: np.ndarray, painted: np.ndarray, boxes: list[np.ndarray]
) -> bool:
    """Whether a further detection is a person already found: its landmark box matches
    theirs or some of its visible landmarks lie on painted-out pixels."""
    if any(box_iou(lm_box, b) > 0.5 for b in boxes):
        return True
    h, w = painted.shape
    vis = kp[kp[:, 2] >= VISIBLE, :2]
    xs = np.clip(vis[:, 0].astype(int), 0, w - 1)
    ys = np.clip(vis[:, 1].astype(int), 0, h - 1)
    return len(vis) == 0 or float(painted[ys, xs].mean()) > PAINTED_LANDMARKS
