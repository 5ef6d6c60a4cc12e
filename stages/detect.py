"""detect: find people in every frame with BlazePose and give each a track id.

BlazePose (mediapipe 0.10.21's legacy `solutions.pose`, the "full" model that ships in the
wheel) runs in video mode, so after the first detection it tracks the person from frame to
frame instead of searching again. It returns one person per image: the most prominent. With
`max_people` > 1 the stage paints out each person it found and asks a further tracker for the
next one, which finds people who do not overlap much (an approximation: a real multi-person
back-end would do better).

Artifacts (see stages/__init__.py): people.npz and mask.mkv. Where a person is absent,
keypoint and world coordinates are NaN and the keypoint visibility is 0, boxes are NaN and
scores 0. Landmarks outside the frame keep their (guessed) position with visibility 0.
The score is the mean visibility of the torso landmarks (shoulders and hips): the legacy
API does not expose BlazePose's own presence score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from pipeline.config import RunSection, Section
from pipeline.stage import Resources, Stage, VideoFailed, VideoJob
from pipeline.video import VideoDecodeError, VideoWriter, iter_chunks, probe

NUM_LANDMARKS = 33
TORSO = (11, 12, 23, 24)  # BlazePose: left/right shoulder, left/right hip
# A landmark at least this visible counts when deriving the person's box.
VISIBLE = 0.5
# The segmentation is kept only near the landmarks: BlazePose's mask covers every person in
# its crop, and a neighbour's body must not stretch this person's box.
BOX_MARGIN = 0.2  # of the landmark box's larger side, on each side
# Frame-to-frame association: within max_gap_frames a track continues when the new box
# overlaps its last box or its centre moved less than a body height; after a longer gap
# only a detection at the same place continues it (different people visiting one spot in
# turn would otherwise share an id, and merging people is worse than splitting one).
NEAR_IOU, NEAR_DIST = 0.1, 1.0
FAR_IOU = 0.5


class DetectConfig(Section):
    model_complexity: int = Field(
        1, ge=0, le=2,
        description="BlazePose landmark model: 1 (full) ships with mediapipe; "
        "0 (lite) and 2 (heavy) are downloaded by mediapipe on first use",
    )
    min_detection_confidence: float = Field(
        0.7, ge=0.0, le=1.0,
        description="person detector score needed to start tracking (0.5 tracks "
        "hallucinated poses on furniture in real footage)",
    )
    min_tracking_confidence: float = Field(
        0.5, ge=0.0, le=1.0, description="landmark presence needed to keep tracking"
    )
    min_person_height_px: int = Field(
        48, ge=1, description="smaller people are rejected (BlazePose hallucinates small poses)"
    )
    min_visibility: float = Field(
        0.5, ge=0.0, le=1.0,
        description="mean visibility of shoulders and hips needed to accept a detection",
    )
    segmentation_threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="mask probability counted as person for the box"
    )
    max_gap_frames: int = Field(
        15, ge=0, description="frames a person may be missing and still keep the track id"
    )
    smooth_landmarks: bool = Field(True, description="BlazePose's temporal landmark filter")
    max_people: int = Field(
        1, ge=1, le=8,
        description="people searched per frame; >1 paints out found people and searches "
        "again (costs one more tracker pass per person)",
    )


@dataclass
class Detection:
    keypoints: np.ndarray  # [33, 3] x px, y px, visibility
    world: np.ndarray  # [33, 3] metres, hip-centred
    box: np.ndarray  # [4] x0, y0, x1, y1 px
    score: float


@dataclass
class _Track:
    box: np.ndarray
    last_t: int


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def centre_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Distance between box centres in units of the taller box's height."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    scale = max(a[3] - a[1], b[3] - b[1], 1.0)
    return float(np.linalg.norm(ca - cb) / scale)


@dataclass
class Tracker:
    """Greedy IoU / centre-distance association of boxes from frame to frame."""

    max_gap_frames: int
    tracks: list[_Track] = field(default_factory=list)

    def _affinity(self, track: _Track, box: np.ndarray, t: int) -> tuple[bool, float] | None:
        """(recent, similarity), or None when the box cannot continue the track. Recent
        tracks come first: a person walking off must not be handed an old track that
        ended where they are now."""
        iou, dist = box_iou(track.box, box), centre_distance(track.box, box)
        recent = t - track.last_t <= self.max_gap_frames
        if recent and (iou >= NEAR_IOU or dist <= NEAR_DIST):
            return True, iou - dist
        if not recent and iou >= FAR_IOU:
            return False, iou - dist
        return None

    def assign(self, t: int, boxes: list[np.ndarray]) -> list[int]:
        """Track index for each box seen at frame t (new tracks are appended)."""
        pairs = []
        for d, box in enumerate(boxes):
            for k, track in enumerate(self.tracks):
                affinity = self._affinity(track, box, t)
                if affinity is not None:
                    pairs.append((affinity, d, k))
        result: list[int | None] = [None] * len(boxes)
        used: set[int] = set()
        for _, d, k in sorted(pairs, reverse=True):
            if result[d] is None and k not in used:
                result[d] = k
                used.add(k)
        for d, box in enumerate(boxes):
            if result[d] is None:
                self.tracks.append(_Track(box, t))
                result[d] = len(self.tracks) - 1
            self.tracks[result[d]] = _Track(box, t)
        return [int(k) for k in result]


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
    h, w = prob.shape
    binary = (prob >= threshold).astype(np.uint8)
    _, labels = cv2.connectedComponents(binary, connectivity=8)
    vis = keypoints[keypoints[:, 2] >= VISIBLE, :2]
    xs = np.clip(vis[:, 0].astype(int), 0, w - 1)
    ys = np.clip(vis[:, 1].astype(int), 0, h - 1)
    ids = np.unique(labels[ys, xs])
    ids = ids[ids > 0]
    region = np.isin(labels, ids) if len(ids) else np.zeros_like(binary, dtype=bool)
    margin = BOX_MARGIN * max(lm_box[2] - lm_box[0], lm_box[3] - lm_box[1])
    x0, y0 = int(max(0, lm_box[0] - margin)), int(max(0, lm_box[1] - margin))
    x1, y1 = int(min(w, lm_box[2] + margin + 1)), int(min(h, lm_box[3] + margin + 1))
    near = np.zeros_like(region)
    near[y0:y1, x0:x1] = True
    return region & near


def person_box(region: np.ndarray, lm_box: np.ndarray) -> np.ndarray:
    """Landmark box unioned with the region's bounding box (pixel edges, x1/y1 exclusive)."""
    box = np.array([lm_box[0], lm_box[1], lm_box[2] + 1, lm_box[3] + 1], dtype=np.float32)
    ys, xs = np.nonzero(region)
    if len(xs):
        box[0], box[1] = min(box[0], xs.min()), min(box[1], ys.min())
        box[2], box[3] = max(box[2], xs.max() + 1), max(box[3], ys.max() + 1)
    h, w = region.shape
    return np.clip(box, 0, [w, h, w, h]).astype(np.float32)


def _to_arrays(result: Any, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks in pixels (with BlazePose's visibility) and world landmarks."""
    kp = np.array(
        [(lm.x * width, lm.y * height, lm.visibility) for lm in result.pose_landmarks.landmark],
        dtype=np.float32,
    )
    world = np.array(
        [(lm.x, lm.y, lm.z) for lm in result.pose_world_landmarks.landmark], dtype=np.float32
    )
    return kp, world


def hide_outside(keypoints: np.ndarray, width: int, height: int) -> np.ndarray:
    """Visibility 0 for landmarks outside the frame: BlazePose reports up to ~0.7 for knees
    it guesses below the picture's edge."""
    kp = keypoints.copy()
    x, y = kp[:, 0], kp[:, 1]
    kp[(x < 0) | (x >= width) | (y < 0) | (y >= height), 2] = 0.0
    return kp


class _Rejections:
    def __init__(self) -> None:
        self.visibility = 0
        self.height = 0
        self.duplicate = 0


@dataclass
class _Record:
    t: int
    track: int
    det: Detection


class DetectStage(Stage):
    name = "detect"
    version = "1"
    requires = ()
    config_model = DetectConfig
    resources = Resources(cpus=1.0)

    def __init__(self, config: DetectConfig, run: RunSection):
        super().__init__(config, run)
        self.config: DetectConfig = config
        self._poses: list[Any] = []
        self._rejected = _Rejections()

    # -- lifecycle -----------------------------------------------------------------------

    def setup(self) -> None:
        if self._poses:
            return
        # Imported here so that listing stages does not pay for mediapipe's import.
        from mediapipe.python.solutions import pose as mp_pose

        cfg = self.config
        try:
            self._poses = [
                mp_pose.Pose(
                    static_image_mode=False,
                    model_complexity=cfg.model_complexity,
                    smooth_landmarks=cfg.smooth_landmarks,
                    enable_segmentation=True,
                    min_detection_confidence=cfg.min_detection_confidence,
                    min_tracking_confidence=cfg.min_tracking_confidence,
                )
                for _ in range(cfg.max_people)
            ]
        except Exception as exc:  # mediapipe raises bare exceptions when a model is missing
            self.teardown()
            raise RuntimeError(
                f"detect.model_complexity={cfg.model_complexity}: cannot load BlazePose "
                f"({exc}); only 1 ships with mediapipe, 0 and 2 need a download"
            ) from exc

    def teardown(self) -> None:
        for pose in self._poses:
            pose.close()
        self._poses = []

    # -- per frame -----------------------------------------------------------------------

    def _accept(self, score: float, box: np.ndarray, rejected: _Rejections) -> bool:
        if score < self.config.min_visibility:
            rejected.visibility += 1
            return False
        if box[3] - box[1] < self.config.min_person_height_px:
            rejected.height += 1
            return False
        return True

    def detect_frame(
        self, frame: np.ndarray, rejected: _Rejections
    ) -> tuple[list[Detection], np.ndarray]:
        """People in one RGB frame and the union of their segmentation probabilities."""
        h, w = frame.shape[:2]
        union = np.zeros((h, w), dtype=np.float32)
        found: list[Detection] = []
        image = frame
        painted = np.zeros((h, w), dtype=bool)  # where found people were painted out
        for i, pose in enumerate(self._poses):
            result = pose.process(image)
            if result.pose_landmarks is None:
                break
            raw, world = _to_arrays(result, w, h)
            # The torso's own visibility judges the detection, even where the hips are
            # below the frame: a person close to the camera is still a person.
            score = float(raw[list(TORSO), 2].mean())
            kp = hide_outside(raw, w, h)
            prob = result.segmentation_mask
            lm_box = landmark_box(kp)
            if lm_box is None:
                rejected.visibility += 1
                break
            region = person_region(prob, kp, lm_box, self.config.segmentation_threshold)
            box = person_box(region, lm_box)
            if not self._accept(score, box, rejected):
                break
            if found and _mostly_painted(kp, painted, found, box):
                # A further tracker found an already found person (or their blurred ghost).
                rejected.duplicate += 1
                break
            found.append(Detection(kp, world, box, score))
            np.maximum(union, prob, out=union)
            if i + 1 < len(self._poses):
                image, grown = _paint_out(image, region)
                painted |= grown
        return found, union

    # -- per video -----------------------------------------------------------------------

    def process(self, job: VideoJob) -> dict[str, Any]:
        self.setup()
        for pose in self._poses:
            pose.reset()  # no tracking state crosses videos (~0.25 s each)
        path = Path(job.video.path)
        try:
            info = probe(path)
            records, size, t = self._stream(job, path, Fraction(info.fps_num, info.fps_den))
        except VideoDecodeError as exc:
            raise VideoFailed(str(exc)) from exc
        return self._finish(job, records, size, t, info.fps_num, info.fps_den)

    def _stream(
        self, job: VideoJob, path: Path, fps: Fraction
    ) -> tuple[list[_Record], tuple[int, int], int]:
        tracker = Tracker(self.config.max_gap_frames)
        records: list[_Record] = []
        self._rejected = _Rejections()
        writer: VideoWriter | None = None
        size = (0, 0)
        t = 0
        try:
            for chunk in iter_chunks(path, job.run.chunk_frames):
                if writer is None:
                    size = (int(chunk.shape[2]), int(chunk.shape[1]))
                    writer = VideoWriter(job.out_dir / "mask.mkv", fps, *size, kind="gray")
                if (chunk.shape[2], chunk.shape[1]) != size:
                    raise VideoFailed(
                        f"{path}: frame size changes from {size[0]}x{size[1]} to "
                        f"{chunk.shape[2]}x{chunk.shape[1]} mid-stream"
                    )
                for frame in chunk:
                    dets, union = self.detect_frame(frame, self._rejected)
                    ids = tracker.assign(t, [d.box for d in dets])
                    records.extend(_Record(t, k, d) for k, d in zip(ids, dets, strict=True))
                    writer.write(np.rint(union * 255.0).astype(np.uint8))
                    t += 1
                job.advance(len(chunk))
        finally:
            if writer is not None:
                writer.close()
        return records, size, t

    def _finish(
        self,
        job: VideoJob,
        records: list[_Record],
        size: tuple[int, int],
        frames: int,
        fps_num: int,
        fps_den: int,
    ) -> dict[str, Any]:
        arrays = people_arrays(records, frames)
        np.savez_compressed(job.out_dir / "people.npz", **arrays)
        n_tracks = int(arrays["track_ids"].shape[0])
        with_person = int(arrays["present"].any(axis=1).sum())
        notes = []
        if n_tracks == 0:
            notes.append("no person detected")
        rej = self._rejected
        if rej.visibility or rej.height:
            notes.append(
                f"rejected {rej.visibility} low-visibility and {rej.height} "
                f"smaller than {self.config.min_person_height_px}px detections"
            )
        return {
            "video": {
                "width": size[0],
                "height": size[1],
                "fps_num": fps_num,
                "fps_den": fps_den,
                "frame_count": frames,
            },
            "tracks": n_tracks,
            "frames_with_person": with_person,
            "notes": notes,
        }


def _paint_out(image: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace a found person by a heavy blur of the frame, so the next search skips them;
    returns the new image and the painted pixels.

    A blur rather than a flat fill: a flat person-shaped silhouette can itself look like a
    person to the detector.
    """
    grown = cv2.dilate(region.astype(np.uint8), np.ones((15, 15), np.uint8)) > 0
    k = max(15, (min(image.shape[:2]) // 8) | 1)
    blurred = cv2.blur(image, (k, k))
    out = image.copy()
    out[grown] = blurred[grown]
    return out, grown


def _mostly_painted(
    kp: np.ndarray, painted: np.ndarray, found: list[Detection], box: np.ndarray
) -> bool:
    """Whether a further detection is a person already found: its box matches theirs or
    most of its visible landmarks lie on painted-out pixels."""
    if any(box_iou(box, d.box) > 0.5 for d in found):
        return True
    h, w = painted.shape
    vis = kp[kp[:, 2] >= VISIBLE, :2]
    xs = np.clip(vis[:, 0].astype(int), 0, w - 1)
    ys = np.clip(vis[:, 1].astype(int), 0, h - 1)
    return len(vis) == 0 or float(painted[ys, xs].mean()) > 0.5


def people_arrays(records: list[_Record], frames: int) -> dict[str, np.ndarray]:
    """The people.npz arrays from per-detection records ([T, P, ...], NaN where absent)."""
    n_tracks = max((r.track for r in records), default=-1) + 1
    keypoints = np.full((frames, n_tracks, NUM_LANDMARKS, 3), np.nan, dtype=np.float32)
    keypoints[..., 2] = 0.0
    world = np.full((frames, n_tracks, NUM_LANDMARKS, 3), np.nan, dtype=np.float32)
    boxes = np.full((frames, n_tracks, 4), np.nan, dtype=np.float32)
    scores = np.zeros((frames, n_tracks), dtype=np.float32)
    present = np.zeros((frames, n_tracks), dtype=bool)
    for r in records:
        keypoints[r.t, r.track] = r.det.keypoints
        world[r.t, r.track] = r.det.world
        boxes[r.t, r.track] = r.det.box
        scores[r.t, r.track] = r.det.score
        present[r.t, r.track] = True
    return {
        "keypoints": keypoints,
        "world": world,
        "boxes": boxes,
        "scores": scores,
        "present": present,
        "track_ids": np.arange(n_tracks, dtype=np.int32),
    }
