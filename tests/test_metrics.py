import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from pipeline.metrics import (
    body_extent,
    mpjpe,
    nanmean,
    pa_mpjpe,
    pck,
    procrustes_align,
    project,
    reprojection_error,
)


def _skeleton(seed: int = 0, joints: int = 23) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(joints, 3)) * 0.3


def test_mpjpe_hand_computed_in_mm():
    ref = np.zeros((2, 3))
    pred = np.array([[0.003, 0.004, 0.0], [0.0, 0.0, 0.01]])  # 5 mm and 10 mm off
    assert mpjpe(pred, ref) == pytest.approx(7.5)
    assert mpjpe(pred, ref, valid=np.array([True, False])) == pytest.approx(5.0)


def test_pa_mpjpe_invariant_to_rotation_scale_translation():
    ref = _skeleton()
    rot = Rotation.from_rotvec([0.3, -1.2, 0.7]).as_matrix()
    pred = 1.7 * ref @ rot.T + np.array([0.5, -2.0, 4.0])
    assert pa_mpjpe(pred, ref) == pytest.approx(0.0, abs=1e-6)
    assert mpjpe(pred, ref) > 100.0  # unaligned, the same body is far off


def test_pa_mpjpe_keeps_real_pose_error_and_rejects_mirrors():
    ref = _skeleton(1)
    pred = ref.copy()
    pred[0] += [0.023, 0.0, 0.0]  # one joint 23 mm off
    err = pa_mpjpe(pred, ref)
    # Alignment minimizes squares: the mean error is at most the unaligned RMS error
    # (23 / sqrt(23) mm) but the offset cannot be aligned away.
    assert 0.5 < err <= 23.0 / np.sqrt(23.0) + 1e-9
    mirrored = ref * np.array([-1.0, 1.0, 1.0])
    assert pa_mpjpe(mirrored, ref) > 50.0  # a reflection is not an allowed alignment


def test_pa_mpjpe_per_frame_and_masks():
    ref = np.stack([_skeleton(2), _skeleton(3)])
    pred = ref.copy()
    pred[1, 4] = [np.nan, np.nan, np.nan]  # a missing joint is skipped, not an error
    out = pa_mpjpe(pred, ref)
    assert out.shape == (2,)
    assert np.allclose(out, 0.0, atol=1e-6)
    few = np.zeros((2, 23), bool)
    few[:, :2] = True
    assert np.isnan(pa_mpjpe(pred, ref, valid=few)).all()  # < 3 joints: undefined


def test_procrustes_align_recovers_the_reference():
    ref = _skeleton(4)
    rot = Rotation.from_rotvec([0.0, 0.5, 0.0]).as_matrix()
    pred = 0.5 * ref @ rot.T - 1.0
    assert np.allclose(procrustes_align(pred, ref), ref, atol=1e-9)


def test_reprojection_error_and_projection():
    cam = np.array([100.0, 100.0, 50.0, 40.0])
    pts = np.array([[0.0, 0.0, 2.0], [1.0, -0.5, 2.0]])
    assert np.allclose(project(pts, cam), [[50.0, 40.0], [100.0, 15.0]])
    ref = np.array([[[0.0, 0.0], [10.0, 0.0]]])
    pred = np.array([[[3.0, 4.0], [10.0, 0.0]]])
    assert reprojection_error(pred, ref) == pytest.approx([2.5])


def test_body_extent_and_pck():
    ref = np.array([[0.0, 0.0], [0.0, 100.0], [20.0, 50.0], [np.nan, np.nan]])
    assert body_extent(ref) == pytest.approx(100.0)
    pred = ref + np.array([[9.0, 0.0], [0.0, 11.0], [0.0, 0.0], [0.0, 0.0]])
    # Threshold 0.1 x 100 px = 10 px: joints 0 and 2 within, joint 1 not, joint 3 missing.
    assert pck(pred, ref, threshold=0.1) == pytest.approx(2 / 3)
    assert pck(pred, ref, threshold=0.2) == pytest.approx(1.0)
    assert np.isnan(pck(pred, ref, valid=np.zeros(4, bool)))


def test_nanmean_ignores_missing():
    assert nanmean(np.array([1.0, np.nan, 3.0])) == 2.0
    assert np.isnan(nanmean(np.array([np.nan])))
