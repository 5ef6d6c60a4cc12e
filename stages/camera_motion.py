"""Camera motion between frames: homographies on background pixels only.

Used by the inpaint stage to bring background samples of other frames into the current
frame's coordinates before their median. Everything here works on full-resolution pixel
coordinates (pixel centres at integers); the estimation itself runs on a reduced grey image
(`max_side`), which is fast and accurate enough for a background that is then resampled.

Estimation, in order (`MotionEstimator.estimate`), each on background pixels only (outside
the dilated person mask of both frames) and each ending in a RANSAC homography accepted
with enough inliers, a small inlier reprojection error and a plausible matrix (no flip, no
wild scale, tiny perspective terms):
1. KLT: the reference's corners (Shi-Tomasi) tracked into the other frame by pyramidal
   Lucas-Kanade, kept where tracking back lands where it started; sub-pixel accurate and
   cheap, for the small frame-to-keyframe motions of a panning or shaking camera;
2. ORB features with cross-checked Hamming matches, for larger motion, then refined to
   sub-pixel accuracy by ECC (OpenCV's enhanced correlation coefficient);
3. where features are too few: ECC alone for an affine motion, above a correlation
   threshold;
4. otherwise "not aligned": the identity with `aligned=False` (the caller decides).

`CameraTracker` chains these into one transform per frame, to the first frame of the shot:
each frame is matched against a keyframe rather than the previous frame, so a static camera
gives exactly the identity for every frame (no random-walk drift from per-pair noise) and a
moving one accumulates error only when the keyframe is renewed.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

IDENTITY = np.eye(3)
# Sobel |gx| + |gy| (3x3, on 0-255 grey) above which a pixel shows structure.
_EDGE_GRADIENT = 40


def _trimmed_mean(values: np.ndarray, keep: float = 0.8) -> float:
    """Mean of the smallest `keep` fraction of the values."""
    n = max(1, int(len(values) * keep))
    return float(np.partition(values, n - 1)[:n].mean())


@dataclass(frozen=True)
class Alignment:
    """A homography mapping points of the `moving` frame into the `reference` frame."""

    matrix: np.ndarray  # 3x3 float64, full-resolution pixel coordinates
    aligned: bool  # False: no reliable estimate (matrix is the identity)
    method: str  # "klt" | "features" | "ecc" | "none"
    inliers: int = 0  # point inliers (0 for ECC / none)
    error_px: float = float("nan")  # median inlier reprojection error, full-resolution px


@dataclass
class Prepared:
    """A frame reduced for estimation: grey image, background mask, and its corners and
    ORB features once something asked for them (most frames never need either)."""

    grey: np.ndarray  # uint8 [h, w] at analysis scale
    background: np.ndarray  # uint8 [h, w], 255 where features may be taken
    scale: float  # analysis px per full-resolution px
    size: tuple[int, int]  # full-resolution (width, height)
    corners: np.ndarray | None = None  # float32 [n, 1, 2] Shi-Tomasi corners, analysis px
    keypoints: np.ndarray | None = None  # float32 [n, 2] ORB keypoints, analysis px
    descriptors: np.ndarray | None = None


def displacement_px(matrix: np.ndarray, size: tuple[int, int]) -> float:
    """Largest distance (px) that the homography moves a frame corner or the centre."""
    w, h = size
    pts = np.array([[0, 0], [w - 1, 0], [0, h - 1], [w - 1, h - 1], [(w - 1) / 2, (h - 1) / 2]],
                   np.float64)
    return float(np.abs(apply(matrix, pts) - pts).max())


def invert(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a 3x3 matrix by its adjugate: np.linalg goes through LAPACK, whose call
    overhead (and thread start-up on a busy machine) dwarfs a 3x3 inverse."""
    r0, r1, r2 = np.asarray(matrix, np.float64)
    adj = np.stack([np.cross(r1, r2), np.cross(r2, r0), np.cross(r0, r1)], axis=1)
    return adj / float(r0 @ adj[:, 0])


def apply(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points [n, 2] through a homography (points at infinity come out as inf)."""
    p = np.c_[pts, np.ones(len(pts))] @ np.asarray(matrix, np.float64).T
    with np.errstate(divide="ignore", invalid="ignore"):
        return p[:, :2] / p[:, 2:3]


def rescale(matrix: np.ndarray, scale_x: float, scale_y: float | None = None) -> np.ndarray:
    """The same motion in coordinates resized by `scale` (pixel centres kept: a resize maps
    x to (x + 0.5) * s - 0.5, like cv2.resize)."""
    sy = scale_x if scale_y is None else scale_y
    s = np.array([[scale_x, 0, 0.5 * scale_x - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])
    return s @ matrix @ invert(s)


def is_plausible(matrix: np.ndarray, size: tuple[int, int], max_shift: float) -> bool:
    """Reject flips, strong zoom or shear, and perspective that bends the frame (frame to
    frame, a camera does none of these); `max_shift` bounds corner motion (fraction)."""
    if not np.all(np.isfinite(matrix)) or abs(matrix[2, 2]) < 1e-9:
        return False
    m = matrix / matrix[2, 2]
    det = float(m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0])
    if not 0.5 < det < 2.0:
        return False
    w, h = size
    if abs(m[2, 0]) * w > 0.2 or abs(m[2, 1]) * h > 0.2:
        return False
    return displacement_px(m, size) <= max_shift * max(w, h)


def has_2d_structure(grey: np.ndarray, mask: np.ndarray, min_ratio: float = 0.05) -> bool:
    """Whether the image has gradients in two directions (structure tensor eigenvalues):
    on a flat wall or a one-way ramp the motion along it is unobservable, and ECC would
    report a confident but arbitrary answer."""
    g = grey.astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)[mask > 0]
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)[mask > 0]
    if gx.size == 0:
        return False
    a, b, c = float((gx * gx).mean()), float((gx * gy).mean()), float((gy * gy).mean())
    root = np.sqrt(max(0.0, (a - c) ** 2 / 4 + b * b))
    big, small = (a + c) / 2 + root, (a + c) / 2 - root
    return big > 4.0 and small >= min_ratio * big


class MotionEstimator:
    """Frame-to-frame homography on background pixels (see the module docstring)."""

    def __init__(
        self,
        max_side: int = 320,
        features: int = 800,
        min_inliers: int = 20,
        max_error_px: float = 1.5,
        ecc_min_correlation: float = 0.9,
        max_shift: float = 0.5,
        exclude_px: float = 4.0,
    ):
        self.max_side, self.min_inliers = max_side, min_inliers
        self.max_error_px, self.ecc_min = max_error_px, ecc_min_correlation
        self.max_shift, self.exclude_px = max_shift, exclude_px
        self.features = features
        self.orb = cv2.ORB_create(nfeatures=features, scaleFactor=1.2, nlevels=4,
                                  edgeThreshold=15, patchSize=15, fastThreshold=10)
        self.matcher = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True)

    def prepare(self, frame: np.ndarray, person: np.ndarray | None = None) -> Prepared:
        """Reduce an RGB frame (and its person mask, bool, full size) for estimation."""
        height, width = frame.shape[:2]
        scale = min(1.0, self.max_side / max(width, height))
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        if scale < 1.0:
            grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
        background = np.full(grey.shape, 255, np.uint8)
        if person is not None and person.any():
            small = person.astype(np.uint8) * 255
            if scale < 1.0:
                small = cv2.resize(small, size, interpolation=cv2.INTER_AREA)
            r = max(1, round(self.exclude_px))
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            background[cv2.dilate((small > 0).astype(np.uint8), kernel) > 0] = 0
        return Prepared(grey, background, scale, (width, height))

    def estimate(self, reference: Prepared, moving: Prepared) -> Alignment:
        """The homography taking `moving`'s pixels to `reference`'s."""
        found = self._klt(reference, moving)
        if found is None:
            found = self._features(reference, moving)
            if found is not None:
                found = self.refine(reference, moving, found)
        if found is None:
            found = self._ecc(reference, moving)
        if found is None:
            return Alignment(IDENTITY.copy(), False, "none")
        return found

    def refine(self, reference: Prepared, moving: Prepared, found: Alignment) -> Alignment:
        """Sub-pixel refinement of an estimate by ECC on the analysis images (a homography,
        started from `found`): feature positions are only good to a few tenths of a pixel,
        which shows as blur and seams once samples are warped. Kept only when ECC converges
        close to the start."""
        if reference.grey.shape != moving.grey.shape:
            return found
        start = np.linalg.inv(self._to_analysis(found.matrix, moving))
        mask = cv2.bitwise_and(reference.background, moving.background)
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 1e-5)
        try:
            cc, warp = cv2.findTransformECC(reference.grey, moving.grey,
                                            start.astype(np.float32), cv2.MOTION_HOMOGRAPHY,
                                            criteria, mask, 1)
            matrix = np.linalg.inv(warp.astype(np.float64))
        except (cv2.error, np.linalg.LinAlgError):
            return found
        if not np.isfinite(cc) or cc < self.ecc_min:
            return found
        full = self._to_full(matrix / matrix[2, 2], moving)
        moved = displacement_px(invert(found.matrix) @ full, moving.size)
        if moved > 2.0 / moving.scale or not is_plausible(full, moving.size, self.max_shift):
            return found
        return Alignment(full, True, found.method, found.inliers, found.error_px)

    def explains(self, reference: Prepared, moving: Prepared, found: Alignment) -> bool:
        """Whether the motion matches the two frames clearly better than no motion: the
        grey difference over the shared background, warped vs as is. Guards against a fit
        locked onto something that moved in a still view (a person the mask missed, a
        screen). Measured where the reference has gradient (a flat wall looks the same
        moved or not) and trimmed (the largest fifth of the differences, which such a
        moving thing causes, is left out)."""
        if reference.grey.shape != moving.grey.shape:
            return True
        ana = self._to_analysis(found.matrix, moving)
        h, w = reference.grey.shape
        warped = cv2.warpPerspective(moving.grey, ana, (w, h), flags=cv2.INTER_LINEAR)
        inside = cv2.warpPerspective(moving.background, ana, (w, h), flags=cv2.INTER_NEAREST)
        ref = reference.grey.astype(np.int16)
        grad = (np.abs(cv2.Sobel(ref, cv2.CV_16S, 1, 0, ksize=3))
                + np.abs(cv2.Sobel(ref, cv2.CV_16S, 0, 1, ksize=3)))
        use = ((reference.background > 0) & (inside > 0) & (moving.background > 0)
               & (grad > _EDGE_GRADIENT))
        if use.sum() < max(50, 0.002 * use.size):
            return True  # too little structure left to compare: trust the estimate
        still = _trimmed_mean(np.abs(ref - moving.grey)[use])
        moved = _trimmed_mean(np.abs(ref - warped)[use])
        return moved < 0.8 * still

    def _to_analysis(self, matrix: np.ndarray, prep: Prepared) -> np.ndarray:
        sx = prep.grey.shape[1] / prep.size[0]
        sy = prep.grey.shape[0] / prep.size[1]
        return rescale(matrix, sx, sy) if prep.scale < 1.0 else matrix

    def _to_full(self, matrix: np.ndarray, prep: Prepared) -> np.ndarray:
        sx = prep.grey.shape[1] / prep.size[0]
        sy = prep.grey.shape[0] / prep.size[1]
        return rescale(matrix, 1.0 / sx, 1.0 / sy) if prep.scale < 1.0 else matrix

    def _orb(self, prep: Prepared) -> None:
        if prep.keypoints is None:
            kps, prep.descriptors = self.orb.detectAndCompute(prep.grey, prep.background)
            prep.keypoints = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)

    def _corners(self, prep: Prepared) -> np.ndarray:
        if prep.corners is None:
            found = cv2.goodFeaturesToTrack(prep.grey, self.features // 4, 0.01, 5,
                                            mask=prep.background, blockSize=5)
            prep.corners = (np.zeros((0, 1, 2), np.float32) if found is None
                            else found.astype(np.float32))
        return prep.corners

    def _klt(self, ref: Prepared, mov: Prepared) -> Alignment | None:
        """Reference corners tracked into `moving` and back (forward-backward check)."""
        pts = self._corners(ref)
        if len(pts) < self.min_inliers or ref.grey.shape != mov.grey.shape:
            return None
        lk = {"winSize": (15, 15), "maxLevel": 3,
              "criteria": (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03)}
        fwd, st1, _ = cv2.calcOpticalFlowPyrLK(ref.grey, mov.grey, pts, None, **lk)
        back, st2, _ = cv2.calcOpticalFlowPyrLK(mov.grey, ref.grey, fwd, None, **lk)
        h, w = mov.grey.shape
        p = fwd.reshape(-1, 2)
        good = ((st1.ravel() == 1) & (st2.ravel() == 1)
                & (np.abs(back - pts).reshape(-1, 2).max(axis=1) < 0.5)
                & (p[:, 0] >= 0) & (p[:, 0] <= w - 1) & (p[:, 1] >= 0) & (p[:, 1] <= h - 1))
        # A tracked point must land on the moving frame's background too.
        xi, yi = np.clip(p[:, 0].astype(int), 0, w - 1), np.clip(p[:, 1].astype(int), 0, h - 1)
        good &= mov.background[yi, xi] > 0
        return self._fit(p[good], pts.reshape(-1, 2)[good], mov, "klt")

    def _features(self, ref: Prepared, mov: Prepared) -> Alignment | None:
        self._orb(ref)
        self._orb(mov)
        if ref.descriptors is None or mov.descriptors is None:
            return None
        if min(len(ref.keypoints), len(mov.keypoints)) < self.min_inliers:
            return None
        matches = self.matcher.match(mov.descriptors, ref.descriptors)
        if len(matches) < self.min_inliers:
            return None
        src = mov.keypoints[[m.queryIdx for m in matches]]
        dst = ref.keypoints[[m.trainIdx for m in matches]]
        return self._fit(src, dst, mov, "features")

    def _fit(self, src: np.ndarray, dst: np.ndarray, mov: Prepared,
             method: str) -> Alignment | None:
        """RANSAC homography src -> dst (analysis px), checked and in full-resolution px."""
        if len(src) < self.min_inliers:
            return None
        thresh = max(0.5, self.max_error_px * mov.scale * 1.5)
        matrix, inl = cv2.findHomography(src, dst, cv2.RANSAC, thresh, maxIters=2000,
                                         confidence=0.995)
        if matrix is None or inl is None:
            return None
        inl = inl.ravel().astype(bool)
        if inl.sum() < self.min_inliers:
            return None
        err = np.linalg.norm(apply(matrix, src[inl]) - dst[inl], axis=1)
        error_px = float(np.median(err)) / mov.scale
        full = self._to_full(matrix, mov)
        if error_px > self.max_error_px or not is_plausible(full, mov.size, self.max_shift):
            return None
        return Alignment(full, True, method, int(inl.sum()), error_px)

    def _ecc(self, ref: Prepared, mov: Prepared) -> Alignment | None:
        """Affine ECC on the analysis images (intensity-based: works with few corners, e.g.
        smooth walls with some shading, as long as there is some structure)."""
        if ref.grey.shape != mov.grey.shape or not has_2d_structure(ref.grey, ref.background):
            return None
        warp = np.eye(2, 3, dtype=np.float32)
        mask = cv2.bitwise_and(ref.background, mov.background)
        criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
        try:
            # findTransformECC(template, input): input(W(x)) ~ template(x), i.e. the warp
            # maps reference pixels to moving ones; invert for moving -> reference.
            cc, warp = cv2.findTransformECC(ref.grey, mov.grey, warp, cv2.MOTION_AFFINE,
                                            criteria, mask, 5)
        except cv2.error:
            return None
        if not np.isfinite(cc) or cc < self.ecc_min:
            return None
        ref_to_mov = np.vstack([warp.astype(np.float64), [0, 0, 1]])
        try:
            matrix = np.linalg.inv(ref_to_mov)
        except np.linalg.LinAlgError:
            return None
        full = self._to_full(matrix, mov)
        if not is_plausible(full, mov.size, self.max_shift):
            return None
        return Alignment(full, True, "ecc")


class CameraTracker:
    """One transform per frame, from that frame to the first frame of its shot.

    Frames are matched against a keyframe; a motion under `static_px` (full-resolution px,
    at any corner) counts as none, so a static camera yields the identity exactly. The
    keyframe is renewed when the view has moved by more than `rekey_fraction` of the frame,
    when the match weakens, or when it fails (then the previous frame is tried). A frame
    that matches neither is "not aligned" and keeps its predecessor's transform.
    """

    def __init__(self, estimator: MotionEstimator, static_px: float = 0.5,
                 rekey_fraction: float = 0.1):
        self.estimator = estimator
        self.static_px, self.rekey_fraction = static_px, rekey_fraction
        self.key: Prepared | None = None
        self.key_to_shot = IDENTITY.copy()
        self.prev: Prepared | None = None
        self.prev_to_shot = IDENTITY.copy()
        self.frames = self.aligned = self.moved = 0
        self.last_method = "none"  # how the last frame was placed: klt | features | ecc | none

    def reset(self) -> None:
        """A new shot starts with the next frame."""
        self.key = self.prev = None

    def add(self, frame: np.ndarray, person: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
        """This frame's transform to its shot's first frame, and whether it was aligned."""
        prep = self.estimator.prepare(frame, person)
        self.frames += 1
        if self.key is None:
            self.key, self.key_to_shot = prep, IDENTITY.copy()
            self.last_method = "none"
            return self._keep(prep, IDENTITY.copy(), True)
        found = self.estimator.estimate(self.key, prep)
        self.last_method = found.method
        if found.aligned:
            shift = displacement_px(found.matrix, prep.size)
            if shift > self.static_px:
                if not self.estimator.explains(self.key, prep, found):
                    shift = 0.0  # no better than a still camera: it is one
            if shift <= self.static_px:
                return self._keep(prep, self.key_to_shot.copy(), True)
            to_shot = self.key_to_shot @ found.matrix
            weak = found.method == "ecc" or found.inliers < 3 * self.estimator.min_inliers
            if weak or shift > self.rekey_fraction * max(prep.size):
                self.key, self.key_to_shot = prep, to_shot
            return self._keep(prep, to_shot, True)
        # Lost the keyframe: try the previous frame, then start again from this one.
        found = self.estimator.estimate(self.prev, prep) if self.prev is not None else found
        self.last_method = found.method
        to_shot = self.prev_to_shot.copy()
        if (found.aligned and displacement_px(found.matrix, prep.size) > self.static_px
                and self.estimator.explains(self.prev, prep, found)):
            to_shot = self.prev_to_shot @ found.matrix
        self.key, self.key_to_shot = prep, to_shot
        return self._keep(prep, to_shot, found.aligned)

    def _keep(self, prep: Prepared, to_shot: np.ndarray, aligned: bool) -> tuple[np.ndarray, bool]:
        if self.prev is not None and not np.array_equal(to_shot, self.prev_to_shot):
            self.moved += 1  # the view changed since the previous frame
        self.prev, self.prev_to_shot = prep, to_shot
        self.aligned += int(aligned)
        return to_shot, aligned
