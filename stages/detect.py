"""detect: find every person in every frame and give each a stable track id.

The people come from a pose back-end (stages/pose_backends.py): by default BlazePose from
mediapipe 0.10.21, which ships in the wheel and finds one person per search; the back-end
paints out each person it found and searches again, up to `max_people`. BlazePose's
detector misses people cut by the frame's edge (close-ups) and people under about a
quarter of the frame's height, so further searches look at the frame padded (`pad`) and
at overlapping tiles (`tiles`), each with the people found so far painted out; measured on
the real test videos (README), they raise the people found per frame without new false
tracks on single-person videos. `backend: onnx` runs a user-provided multi-person model
instead (stages/pose_onnx.py).

Tracks: detections are matched to tracks frame by frame with the Hungarian algorithm on a
cost that mixes the overlap with the track's predicted box, the centre distance, and an
appearance descriptor (colour histograms of the person's upper and lower half), so ids
survive crossings and short occlusions; a person who leaves and comes back keeps their id
when their appearance matches, while a different person at the same spot gets a new one.

Artifacts (see stages/__init__.py): people.npz and mask.mkv. Where a person is absent,
keypoint and world coordinates are NaN and the keypoint visibility is 0, boxes are NaN and
scores 0. Landmarks outside the frame keep their (guessed) position with visibility 0.
The score is the mean visibility of the torso landmarks (shoulders and hips) for BlazePose
(the legacy API does not expose its presence score), the detector's score for ONNX.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field, model_validator
from scipy.optimize import linear_sum_assignment

from pipeline.config import RunSection, Section
from pipeline.stage import Resources, Stage, VideoFailed, VideoJob
from pipeline.video import VideoDecodeError, VideoWriter, iter_chunks, probe
from stages.pose_backends import (
    NUM_LANDMARKS,
    VISIBLE,
    MediapipePoseBackend,
    PoseBackend,
    box_iou,
    landmark_box,
    person_region,
)

# Frame-to-frame association: within max_gap_frames a track continues when the new box
# overlaps its predicted box or its centre moved less than a body height; after a longer
# gap only a detection that looks like the person (or, without appearance, stands at the
# same place) continues it. Merging two people is worse than splitting one.
NEAR_IOU, NEAR_DIST = 0.1, 1.0
FAR_IOU = 0.5
# Appearance distance (Bhattacharyya, 0 same .. 1 disjoint colours), see appearance().
# Measured on the real test videos (walking GIF, basketball, one-by-one): one person from
# frame to frame median 0.03-0.19, 95th percentile 0.10-0.34; one person's first against
# last frame 0.3-0.8 (turning round, light); two different people (medians) 0.15-0.76,
# dark clothes against dark clothes being the close cases. Colour alone is thus a weak
# identity: it re-identifies only near-identical views and vetoes only clear mismatches.
APP_SAME = 0.12  # a track that ended may be continued anywhere by a detection this close
APP_DIFFERENT = 0.8  # a detection this far from a recent track is someone else
APP_WEIGHT = 1.0  # cost weight of the appearance distance against 1 - IoU + distance
OLD_TRACK_COST = 1.0  # extra cost of continuing an ended track: recent tracks come first
APP_UPDATE = 0.2  # weight of a new descriptor in the track's running descriptor
INFEASIBLE = 1e6
HIST_BINS = (8, 4, 4)  # hue, saturation, value


class DetectConfig(Section):
    backend: Literal["mediapipe", "onnx"] = Field(
        "mediapipe",
        description="pose back-end: mediapipe (BlazePose, ships with the package) or onnx "
        "(a multi-person model file given by onnx_model, see stages/pose_onnx.py)",
    )
    onnx_model: Path | None = Field(
        None, description="the ONNX pose model for backend: onnx (a local file)"
    )
    onnx_input_size: int = Field(
        640, ge=32, le=4096, description="square input side of the ONNX model, px"
    )
    model_complexity: int = Field(
        1, ge=0, le=2,
        description="BlazePose landmark model: 1 (full) ships with mediapipe; "
        "0 (lite) and 2 (heavy) are downloaded by mediapipe on first use",
    )
    min_detection_confidence: float = Field(
        0.7, ge=0.0, le=1.0,
        description="person detector score needed to start tracking (0.5 tracks "
        "hallucinated poses on furniture in real footage); the ONNX score threshold",
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
        15, ge=0, description="frames a person may be missing and still keep the track id "
        "by position alone (later, only a matching appearance keeps it)",
    )
    smooth_landmarks: bool = Field(True, description="BlazePose's temporal landmark filter")
    max_people: int = Field(
        6, ge=1, le=16,
        description="BlazePose: people searched per frame (each found person is painted "
        "out and a further tracker searches again; costs one pass per person found)",
    )

    pad: float = Field(
        0.25, ge=0.0, le=1.0,
        description="BlazePose: after the whole-frame search, search the frame padded by "
        "this fraction of its size on each side (grey) for people cut by the frame's edge, "
        "close-ups (0: off; costs about one search per frame)",
    )
    tiles: int = Field(
        2, ge=1, le=4,
        description="BlazePose: after the whole-frame search, search each tile of a "
        "tiles x tiles grid for small people (1: off; each tile costs about one search)",
    )
    tile_overlap: float = Field(
        0.4, ge=0.0, le=0.8, description="overlap of neighbouring tiles, fraction of a tile"
    )
    tile_people: int = Field(
        1, ge=1, le=4, description="BlazePose: people searched per tile"
    )
    rescan_every: int = Field(
        1, ge=1, le=30,
        description="BlazePose: the further searches (padded, tiles, more people) that "
        "found nobody run again only every this many frames (those tracking someone run "
        "every frame); faster, but a person only they find is found up to this many frames "
        "minus one late (1: every search every frame)",
    )

    @model_validator(mode="after")
    def _onnx_needs_a_model(self) -> DetectConfig:
        if self.backend == "onnx" and self.onnx_model is None:
            raise ValueError("detect.backend 'onnx' needs detect.onnx_model (a .onnx file)")
        return self


@dataclass
class Detection:
    keypoints: np.ndarray  # [33, 3] x px, y px, visibility
    world: np.ndarray  # [33, 3] metres, hip-centred (NaN when the back-end has none)
    box: np.ndarray  # [4] x0, y0, x1, y1 px
    score: float
    descriptor: np.ndarray | None = None  # appearance(), for the tracker


# -- tracking --------------------------------------------------------------------------------


def centre_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Distance between box centres in units of the taller box's height."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    scale = max(a[3] - a[1], b[3] - b[1], 1.0)
    return float(np.linalg.norm(ca - cb) / scale)


def appearance_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Bhattacharyya distance of the per-part histograms of two descriptors."""
    bc = np.sqrt(a * b).sum(axis=1)  # Bhattacharyya coefficient per part (rows sum to 1)
    return float(np.sqrt(np.clip(1.0 - bc, 0.0, 1.0)).mean())


@dataclass
class _Track:
    box: np.ndarray
    last_t: int
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))
    descriptor: np.ndarray | None = None


@dataclass
class Tracker:
    """Hungarian association of boxes (and appearance descriptors) from frame to frame."""

    max_gap_frames: int
    tracks: list[_Track] = field(default_factory=list)

    def _predicted(self, track: _Track, t: int) -> np.ndarray:
        """The track's box moved on at its velocity (for at most max_gap_frames)."""
        steps = min(t - track.last_t, max(self.max_gap_frames, 1))
        return track.box + track.velocity * steps

    def _cost(self, track: _Track, box: np.ndarray, desc: np.ndarray | None, t: int) -> float:
        app = None
        if desc is not None and track.descriptor is not None:
            app = appearance_distance(track.descriptor, desc)
        if t - track.last_t <= self.max_gap_frames:
            pred = self._predicted(track, t)
            iou, dist = box_iou(pred, box), centre_distance(pred, box)
            if not (iou >= NEAR_IOU or dist <= NEAR_DIST):
                return INFEASIBLE
            if app is not None and app > APP_DIFFERENT:
                return INFEASIBLE
            return (1.0 - iou) + dist + APP_WEIGHT * (app or 0.0)
        # An ended track: the same person coming back, recognised by appearance where
        # there is one, else by standing where the track ended.
        iou, dist = box_iou(track.box, box), centre_distance(track.box, box)
        if app is None:
            return OLD_TRACK_COST + (1.0 - iou) + dist if iou >= FAR_IOU else INFEASIBLE
        if app > APP_SAME:
            return INFEASIBLE
        return OLD_TRACK_COST + APP_WEIGHT * app + min(dist, 1.0)

    def assign(
        self, t: int, boxes: list[np.ndarray], descriptors: list[np.ndarray | None] | None = None
    ) -> list[int]:
        """Track index for each box seen at frame t (new tracks are appended)."""
        descs = descriptors if descriptors is not None else [None] * len(boxes)
        result: list[int | None] = [None] * len(boxes)
        if boxes and self.tracks:
            pairs = zip(boxes, descs, strict=True)
            cost = np.array([[self._cost(tr, b, d, t) for tr in self.tracks] for b, d in pairs])
            for d, k in zip(*linear_sum_assignment(cost), strict=True):
                if cost[d, k] < INFEASIBLE:
                    result[d] = int(k)
        for d, box in enumerate(boxes):
            k = result[d]
            if k is None:
                self.tracks.append(_Track(box.copy(), t, descriptor=descs[d]))
                result[d] = len(self.tracks) - 1
            else:
                self._update(self.tracks[k], box, descs[d], t)
        return [int(k) for k in result]

    def _update(self, track: _Track, box: np.ndarray, desc: np.ndarray | None, t: int) -> None:
        gap = t - track.last_t
        if gap <= self.max_gap_frames:
            step = (box - track.box) / max(gap, 1)
            track.velocity = (0.5 * track.velocity + 0.5 * step).astype(np.float32)
        else:
            track.velocity = np.zeros(4, np.float32)
        track.box, track.last_t = box.copy(), t
        if desc is not None:
            if track.descriptor is None:
                track.descriptor = desc
            else:
                mixed = (1 - APP_UPDATE) * track.descriptor + APP_UPDATE * desc
                track.descriptor = mixed / mixed.sum(axis=1, keepdims=True)


# -- per person ------------------------------------------------------------------------------


def person_box(region: np.ndarray, lm_box: np.ndarray) -> np.ndarray:
    """Landmark box unioned with the region's bounding box (pixel edges, x1/y1 exclusive)."""
    box = np.array([lm_box[0], lm_box[1], lm_box[2] + 1, lm_box[3] + 1], dtype=np.float32)
    ys, xs = np.nonzero(region)
    if len(xs):
        box[0], box[1] = min(box[0], xs.min()), min(box[1], ys.min())
        box[2], box[3] = max(box[2], xs.max() + 1), max(box[3], ys.max() + 1)
    h, w = region.shape
    return np.clip(box, 0, [w, h, w, h]).astype(np.float32)


def landmark_hull(keypoints: np.ndarray, lm_box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A person region for back-ends without a mask: the visible landmarks' convex hull,
    grown by a tenth of the body's height (landmarks sit inside the body outline)."""
    h, w = shape
    region = np.zeros((h, w), np.uint8)
    vis = keypoints[keypoints[:, 2] >= VISIBLE, :2].astype(np.int32)
    cv2.fillConvexPoly(region, cv2.convexHull(vis), 1)
    r = max(1, int(0.1 * max(lm_box[2] - lm_box[0], lm_box[3] - lm_box[1])))
    region = cv2.dilate(region, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    return region > 0


def appearance(frame: np.ndarray, region: np.ndarray, box: np.ndarray) -> np.ndarray | None:
    """Colour histograms (HSV) of the person's upper and lower half, [2, bins], each row
    summing to 1; None when a half has no pixels. Halves, because shirt and trousers
    together tell people apart far better than the mixed colours of the whole body."""
    x0, y0, x1, y1 = (int(v) for v in np.round(box))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    hsv = cv2.cvtColor(np.ascontiguousarray(frame[y0:y1, x0:x1]), cv2.COLOR_RGB2HSV)
    mask = region[y0:y1, x0:x1].astype(np.uint8)
    mid = (y1 - y0) // 2
    parts = []
    for rows in (slice(0, mid), slice(mid, None)):
        m = mask[rows]
        if m.sum() < 16:
            return None
        hist = cv2.calcHist(
            [np.ascontiguousarray(hsv[rows])], [0, 1, 2], m, list(HIST_BINS),
            [0, 180, 0, 256, 0, 256],
        ).ravel()
        parts.append(hist / hist.sum())
    return np.stack(parts).astype(np.float32)


class _Rejections:
    def __init__(self) -> None:
        self.visibility = 0
        self.height = 0


@dataclass
class _Record:
    t: int
    track: int
    det: Detection


class DetectStage(Stage):
    name = "detect"
    version = "2"
    requires = ()
    config_model = DetectConfig
    resources = Resources(cpus=1.0)

    def __init__(self, config: DetectConfig, run: RunSection,
                 shared: dict[str, Section] | None = None):
        super().__init__(config, run, shared)
        self.config: DetectConfig = config
        self._backend: PoseBackend | None = None
        self._rejected = _Rejections()

    # -- lifecycle -----------------------------------------------------------------------

    def setup(self) -> None:
        if self._backend is not None:
            return
        cfg = self.config
        if cfg.backend == "onnx":
            # Imported here: onnxruntime is needed only by this back-end.
            from stages.pose_onnx import OnnxPoseBackend

            assert cfg.onnx_model is not None  # the config validator guarantees it
            self._backend = OnnxPoseBackend(
                cfg.onnx_model, cfg.onnx_input_size, cfg.min_detection_confidence
            )
            return
        try:
            self._backend = MediapipePoseBackend(
                model_complexity=cfg.model_complexity,
                smooth_landmarks=cfg.smooth_landmarks,
                min_detection_confidence=cfg.min_detection_confidence,
                min_tracking_confidence=cfg.min_tracking_confidence,
                max_people=cfg.max_people,
                min_visibility=cfg.min_visibility,
                segmentation_threshold=cfg.segmentation_threshold,
                pad=cfg.pad,
                tiles=cfg.tiles,
                tile_overlap=cfg.tile_overlap,
                tile_people=cfg.tile_people,
                rescan_every=cfg.rescan_every,
            )
        except RuntimeError as exc:
            raise RuntimeError(f"detect.{exc}") from exc

    def teardown(self) -> None:
        if self._backend is not None:
            self._backend.close()
        self._backend = None

    # -- per frame -----------------------------------------------------------------------

    def detect_frame(
        self, frame: np.ndarray, rejected: _Rejections
    ) -> tuple[list[Detection], np.ndarray]:
        """People in one RGB frame and the union of their segmentation probabilities."""
        assert self._backend is not None
        h, w = frame.shape[:2]
        union = np.zeros((h, w), dtype=np.float32)
        found: list[Detection] = []
        for pose in self._backend.detect(frame):
            lm_box = landmark_box(pose.keypoints)
            if lm_box is None or pose.score < self.config.min_visibility:
                rejected.visibility += 1
                continue
            if pose.mask is not None:
                prob = pose.mask
                threshold = self.config.segmentation_threshold
                region = person_region(prob, pose.keypoints, lm_box, threshold)
            else:
                region = landmark_hull(pose.keypoints, lm_box, (h, w))
                prob = region.astype(np.float32)
            box = person_box(region, lm_box)
            if box[3] - box[1] < self.config.min_person_height_px:
                rejected.height += 1
                continue
            world = pose.world if pose.world is not None else _nan_world()
            desc = appearance(frame, region, box)
            found.append(Detection(pose.keypoints, world, box, pose.score, desc))
            np.maximum(union, prob, out=union)
        return found, union

    # -- per video -----------------------------------------------------------------------

    def process(self, job: VideoJob) -> dict[str, Any]:
        self.setup()
        assert self._backend is not None
        self._backend.reset()  # no tracking state crosses videos
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
                    ids = tracker.assign(t, [d.box for d in dets], [d.descriptor for d in dets])
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


def _nan_world() -> np.ndarray:
    return np.full((NUM_LANDMARKS, 3), np.nan, dtype=np.float32)


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
