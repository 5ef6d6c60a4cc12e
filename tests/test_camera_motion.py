"""Camera motion estimation on synthetic views of a textured world with known motion."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stages.camera_motion import (
    IDENTITY,
    CameraTracker,
    MotionEstimator,
    apply,
    displacement_px,
    invert,
    rescale,
)


def world(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """Blurred noise plus shading: corners everywhere, like a cluttered room."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.normal(0, 70, (height, width, 3)).astype(np.float32),
                             (0, 0), 2.0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    shade = 40 * np.sin(xx / 37.0)[..., None] * np.cos(yy / 29.0)[..., None]
    return np.clip(120 + noise + shade, 0, 255).astype(np.uint8)


def view(scene: np.ndarray, frame_to_world: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What a camera sees whose pixel x shows world point frame_to_world @ x."""
    return cv2.warpPerspective(scene, frame_to_world, size,
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


def similarity(dx: float, dy: float, zoom: float = 1.0, angle_deg: float = 0.0,
               centre: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    a = np.radians(angle_deg)
    c, s = np.cos(a) / zoom, np.sin(a) / zoom
    cx, cy = centre
    return np.array([[c, -s, dx + cx - c * cx + s * cy], [s, c, dy + cy - s * cx - c * cy],
                     [0, 0, 1]])


def interior_error(found: np.ndarray, truth: np.ndarray, size: tuple[int, int]) -> float:
    w, h = size
    ys, xs = np.mgrid[h // 8:h - h // 8:8, w // 8:w - w // 8:8]
    pts = np.c_[xs.ravel(), ys.ravel()].astype(np.float64)
    return float(np.abs(apply(found, pts) - apply(truth, pts)).max())


SIZE = (320, 240)


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    return world()


def test_known_warp_is_recovered(scene):
    """Reference at the world's (100, 80); the moving view shifted, zoomed 3 %, rotated 1
    degree: the estimate maps moving pixels onto the reference ones to a fraction of a px."""
    ref_to_world = similarity(100, 80)
    mov_to_world = ref_to_world @ similarity(6.5, -3.25, 1.03, 1.0, (160, 120))
    est = MotionEstimator()
    ref = est.prepare(view(scene, ref_to_world, SIZE))
    mov = est.prepare(view(scene, mov_to_world, SIZE))
    found = est.estimate(ref, mov)
    assert found.aligned and found.method == "klt"
    truth = invert(ref_to_world) @ mov_to_world
    assert interior_error(found.matrix, truth, SIZE) < 0.25


def test_large_motion_falls_back_on_orb_features(scene):
    """A 120 px jump is beyond the KLT pyramid's reach; ORB matching plus ECC finds it."""
    est = MotionEstimator()
    ref = est.prepare(view(scene, similarity(100, 80), SIZE))
    mov = est.prepare(view(scene, similarity(220, 110), SIZE))
    found = est.estimate(ref, mov)
    assert found.aligned and found.method == "features"
    assert interior_error(found.matrix, similarity(120, 30), SIZE) < 0.5


def test_estimation_on_a_reduced_image_is_in_full_resolution_pixels(scene):
    big = cv2.resize(scene, (1280, 960))
    est = MotionEstimator(max_side=320)
    truth = similarity(-9.0, 4.5)
    ref = est.prepare(view(big, similarity(200, 150), (640, 480)))
    mov = est.prepare(view(big, similarity(200, 150) @ truth, (640, 480)))
    assert ref.scale == 0.5
    found = est.estimate(ref, mov)
    assert found.aligned
    assert interior_error(found.matrix, truth, (640, 480)) < 0.5


@pytest.mark.parametrize("kind", ["flat", "gradient"])
def test_featureless_frames_give_the_identity_not_aligned(kind):
    if kind == "flat":
        a = b = np.full((120, 160, 3), 128, np.uint8)
    else:
        ramp = np.linspace(60, 180, 160, dtype=np.float32)
        a = np.repeat(np.repeat(ramp[None, :, None], 120, 0), 3, 2).astype(np.uint8)
        b = np.roll(a, 3, axis=1)
    est = MotionEstimator()
    found = est.estimate(est.prepare(a), est.prepare(b))
    assert not found.aligned and found.method == "none"
    assert np.array_equal(found.matrix, IDENTITY)
    tracker = CameraTracker(est)
    for frame in (a, b, a):
        matrix, _ = tracker.add(frame)
        assert np.array_equal(matrix, IDENTITY)


def test_static_camera_is_exactly_the_identity_despite_noise_and_a_moving_person(scene):
    """Sensor noise and a large, masked, moving 'person' in a still view: every frame's
    transform is exactly the identity, so samples are read in place (no resampling)."""
    rng = np.random.default_rng(1)
    base = view(scene, similarity(50, 50), SIZE)
    tracker = CameraTracker(MotionEstimator())
    for i in range(12):
        frame = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
        person = np.zeros(frame.shape[:2], bool)
        person[40:220, 60 + 12 * i:140 + 12 * i] = True
        frame[person] = (rng.integers(0, 255, (person.sum(), 3))).astype(np.uint8)
        matrix, aligned = tracker.add(frame, person)
        assert aligned and np.array_equal(matrix, IDENTITY)
    assert tracker.moved == 0


def test_an_unmasked_moving_object_does_not_fake_camera_motion(scene):
    """A block the detector missed slides across a still view: whatever a fit locks onto,
    it does not explain the frames better than a still camera."""
    base = view(scene, similarity(50, 50), SIZE)
    blob = view(scene, similarity(400, 300), (120, 140))
    tracker = CameraTracker(MotionEstimator())
    for i in range(10):
        frame = base.copy()
        frame[50:190, 20 + 15 * i:140 + 15 * i] = blob
        matrix, _ = tracker.add(frame)
        assert displacement_px(matrix, SIZE) == 0.0
    assert tracker.moved == 0


def test_tracker_chains_a_pan_through_keyframes_without_drift(scene):
    """40 frames panning 3 px a frame and zooming in 5 %: frame 39's transform to frame 0
    (through renewed keyframes) matches the truth to about a pixel."""
    tracker = CameraTracker(MotionEstimator())
    to_world = []
    for i in range(40):
        m = similarity(100 + 3.0 * i, 80 + 0.5 * i, 1.0 + 0.05 * i / 39, 0.0, (160, 120))
        to_world.append(m)
        matrix, aligned = tracker.add(view(scene, m, SIZE))
        assert aligned
    truth = invert(to_world[0]) @ to_world[-1]
    assert interior_error(matrix, truth, SIZE) < 1.0
    assert tracker.moved == 39


def test_matrix_helpers():
    m = np.array([[1.02, 0.01, -7.0], [-0.005, 0.99, 4.0], [1e-5, -2e-5, 1.0]])
    assert np.allclose(invert(m) @ m, np.eye(3))
    # Rescaling to half size and back is the same motion; a pure shift halves.
    assert np.allclose(rescale(rescale(m, 0.5), 2.0), m)
    shift = similarity(8.0, -4.0)
    assert np.allclose(rescale(shift, 0.5)[:2, 2], [4.0, -2.0])
    assert displacement_px(shift, SIZE) == pytest.approx(8.0)
