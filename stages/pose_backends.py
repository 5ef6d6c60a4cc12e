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


@dataclass
class View:
    """A rectangle of the frame searched on its own, in frame pixels; it may reach past the
    frame (padding) and then the outside is filled with grey."""

    x0: int
    y0: int
    x1: int
    y1: int
    tile: bool  # landmarks outside a tile were not seen: visibility 0 there


def padded_view(width: int, height: int, pad: float) -> View:
    """The whole frame with `pad` of its size added on each side: BlazePose places a person
    cut by the frame's edge (a close-up) better when the missing part has room."""
    px, py = int(round(pad * width)), int(round(pad * height))
    return View(-px, -py, width + px, height + py, tile=False)


def tile_views(width: int, height: int, grid: int, overlap: float) -> list[View]:
    """A grid x grid cover of the frame by tiles overlapping by `overlap` of a tile, so that
    a small person lies whole in one tile; BlazePose's person detector sees a tile at its
    224 px input, a small person `grid` times larger than in the whole frame."""
    views = []
    for axis in (width, height):
        size = axis / (grid - (grid - 1) * overlap)
        step = size * (1 - overlap)
        views.append([(int(round(i * step)), min(axis, int(round(i * step + size))))
                      for i in range(grid)])
    return [View(x0, y0, x1, y1, tile=True) for y0, y1 in views[1] for x0, x1 in views[0]]


@dataclass
class _Search:
    """What one frame's searches share: the image with found people painted out."""

    image: np.ndarray
    painted: np.ndarray
    found: list[PersonPose]
    boxes: list[np.ndarray]


class MediapipePoseBackend:
    """BlazePose from mediapipe 0.10.21's legacy `solutions.pose` ("full" model in the wheel).

    One BlazePose finds one person, the most prominent, and in video mode tracks them from
    frame to frame. For more people, each found person is painted out and a further
    BlazePose instance (with its own tracking state) searches the rest of the image, up to
    `max_people`. The search stops at the first miss, at a detection whose torso is less
    visible than `min_visibility` (returned, so the caller can count it as rejected), and
    at a duplicate of a person already found.

    `pad` > 0 searches the whole frame padded on each side (people cut by the frame's edge);
    `tiles` > 1 then searches each tile of a tiles x tiles grid (small people) for up to
    `tile_people` further people, with everyone found so far painted out. Each view keeps
    its own BlazePose instances, so tracking works within a tile as in the whole frame.

    `rescan_every` k > 1: a further search (every one but the whole frame's first) that
    found nobody at its last run runs again only on every k-th frame; one that is tracking
    somebody runs every frame. A search that finds nobody costs BlazePose's person detector
    (no tracking shortcut), and on a one-person video six of the seven searches per frame
    are such misses (the profile in the README), so k = 4 cuts the searches per frame from
    7 to about 2.5. The price: a person who appears (enters, or is uncovered) and is found
    only by a further search is found up to k - 1 frames late, and left in those frames.
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
        pad: float = 0.0,
        tiles: int = 1,
        tile_overlap: float = 0.4,
        tile_people: int = 1,
        rescan_every: int = 1,
    ) -> None:
        # Imported here so that listing stages does not pay for mediapipe's import.
        from mediapipe.python.solutions import pose as mp_pose

        self.min_visibility = min_visibility
        self.segmentation_threshold = segmentation_threshold
        self.max_people = max_people
        self.pad, self.tiles, self.tile_overlap = pad, tiles, tile_overlap
        self.tile_people = tile_people
        self.rescan_every = max(1, int(rescan_every))
        self._frame = 0  # frames seen since reset: which frames rescan
        self._tracking: set[tuple[int, int]] = set()  # searches that found someone last run
        self._options = dict(
            static_image_mode=False,
            model_complexity=model_complexity,
            smooth_landmarks=smooth_landmarks,
            enable_segmentation=True,
            min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence,
        )
        self._new_pose = mp_pose.Pose
        self._poses: dict[tuple[int, int], object] = {}  # (view, search) -> BlazePose
        self._used: set[tuple[int, int]] = set()  # instances that saw a frame since reset
        try:
            self._pose(0, 0)  # fails now, not mid-video, when the model is missing
        except Exception as exc:  # mediapipe raises bare exceptions when a model is missing
            self.close()
            raise RuntimeError(
                f"model_complexity={model_complexity}: cannot load BlazePose ({exc}); "
                "only 1 ships with mediapipe, 0 and 2 need a download"
            ) from exc

    def _pose(self, view: int, i: int):
        """The i-th BlazePose of a view, created on first need: most videos show one or two
        people, and each instance costs memory and start-up time."""
        key = (view, i)
        if key not in self._poses:
            self._poses[key] = self._new_pose(**self._options)
        self._used.add(key)
        return self._poses[key]

    def reset(self) -> None:
        for key in self._used:
            self._poses[key].reset()  # ~0.25 s each, so only those that have tracked anything
        self._used = set()
        self._frame, self._tracking = 0, set()

    def close(self) -> None:
        for pose in self._poses.values():
            pose.close()
        self._poses = {}

    def detect(self, frame_rgb: np.ndarray) -> list[PersonPose]:
        h, w = frame_rgb.shape[:2]
        state = _Search(frame_rgb, np.zeros((h, w), dtype=bool), [], [])
        # The whole frame, then padded (close-ups), then tiles (small people): each view
        # searches what the ones before left, with everyone found so far painted out.
        views = [padded_view(w, h, 0.0)]
        if self.pad > 0:
            views.append(padded_view(w, h, self.pad))
        if self.tiles > 1:
            views += tile_views(w, h, self.tiles, self.tile_overlap)
        rescan = self._frame % self.rescan_every == 0
        self._frame += 1
        for k, view in enumerate(views):
            room = self.max_people - len(state.found)
            if room <= 0:
                break
            self._search(k, view, state, min(self.tile_people, room) if view.tile else room,
                         rescan)
        return state.found

    def _search(self, view_id: int, view: View, state: _Search, limit: int,
                rescan: bool = True) -> None:
        """Up to `limit` people in one view, each painted out of the shared image. Without
        `rescan`, only the searches that are tracking somebody run (and the first)."""
        h, w = state.painted.shape
        for i in range(limit):
            key = (view_id, i)
            if not (rescan or key == (0, 0) or key in self._tracking):
                return  # the searches after it never ran either: each needs a find before
            result = self._pose(view_id, i).process(_crop(state.image, view))
            self._tracking.discard(key)
            if result.pose_landmarks is None:
                return
            raw, world = _landmarks(result, view)
            # The torso's own visibility judges the detection, even where the hips are
            # below the frame: a person close to the camera is still a person.
            score = float(raw[list(TORSO), 2].mean())
            kp = hide_outside(raw, w, h)
            if view.tile:
                kp = _hide_outside_view(kp, view)
            prob = _frame_mask(result.segmentation_mask, view, w, h)
            lm_box = landmark_box(kp)
            if lm_box is None or score < self.min_visibility:
                state.found.append(PersonPose(kp, world, prob, score))
                self._tracking.add(key)
                return
            if _already_found(kp, lm_box, state.painted, state.boxes):
                return  # a further BlazePose found a found person (or their blurred ghost)
            state.found.append(PersonPose(kp, world, prob, score))
            self._tracking.add(key)
            state.boxes.append(lm_box)
            region = person_region(prob, kp, lm_box, self.segmentation_threshold)
            state.image, grown = _paint_out(state.image, region)
            state.painted |= grown


PAD_GREY = 114  # fill of a view's part outside the frame


def _crop(image: np.ndarray, view: View) -> np.ndarray:
    """The view's pixels, grey where the view reaches past the frame."""
    h, w = image.shape[:2]
    if view.x0 >= 0 and view.y0 >= 0 and view.x1 <= w and view.y1 <= h:
        return np.ascontiguousarray(image[view.y0 : view.y1, view.x0 : view.x1])
    import cv2

    top, left = max(0, -view.y0), max(0, -view.x0)
    padded = cv2.copyMakeBorder(
        image, top, max(0, view.y1 - h), left, max(0, view.x1 - w),
        cv2.BORDER_CONSTANT, value=(PAD_GREY,) * 3,
    )
    return padded[view.y0 + top : view.y1 + top, view.x0 + left : view.x1 + left]


def _frame_mask(mask: np.ndarray, view: View, width: int, height: int) -> np.ndarray:
    """A view's segmentation mask placed in a frame-sized array (0 elsewhere)."""
    m = np.asarray(mask, dtype=np.float32)
    if (view.x0, view.y0, view.x1, view.y1) == (0, 0, width, height):
        return m
    out = np.zeros((height, width), dtype=np.float32)
    x0, y0 = max(0, view.x0), max(0, view.y0)
    x1, y1 = min(width, view.x1), min(height, view.y1)
    out[y0:y1, x0:x1] = m[y0 - view.y0 : y1 - view.y0, x0 - view.x0 : x1 - view.x0]
    return out


def _hide_outside_view(keypoints: np.ndarray, view: View) -> np.ndarray:
    """Visibility 0 for landmarks outside a tile: guessed, not seen."""
    kp = keypoints.copy()
    x, y = kp[:, 0], kp[:, 1]
    kp[(x < view.x0) | (x >= view.x1) | (y < view.y0) | (y >= view.y1), 2] = 0.0
    return kp


def _landmarks(result, view: View) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks in frame pixels (with BlazePose's visibility) and world landmarks."""
    vw, vh = view.x1 - view.x0, view.y1 - view.y0
    kp = np.array(
        [(lm.x * vw + view.x0, lm.y * vh + view.y0, lm.visibility)
         for lm in result.pose_landmarks.landmark],
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
