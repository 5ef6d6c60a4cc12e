"""The fit stage with SMPL-family bodies (body.model smpl | smplh | smplx).

The model files are synthetic (tests/smpl_synthetic.py: a T-posed tube figure 1.6 m tall
with the official keys and shapes). A known posed, turned and placed body is projected
with the stage's own camera into a BlazePose-layout people.npz (as tests/test_fit.py does
for Anny); the fit must reproject onto it within a few pixels and recover its joints up to
a similarity (PA-MPJPE). Run with -s to see the numbers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fit import make_job, pa_mpjpe, write_people

from pipeline.config import RunSection
from stages.body import axis_angle_to_matrix
from stages.body_config import BodySection, load_body_model
from stages.fit import FitConfig, FitStage, Fitter, camera_for, limb_pose_from_world
from stages.fit_smpl import SMPL_BONES, SMPL_LIMB_SEGMENTS, SmplKeypointModel
from stages.smpl_family import SmplFamilyBody

W, H = 320, 240
T = 6


def make_stage(kind: str, model_dir: Path, **config: object) -> FitStage:
    section = BodySection(model=kind, model_path=model_dir)
    return FitStage(FitConfig(device="cpu", **config), RunSection(), shared={"body": section})


def bone_pose(fitter: Fitter, rotations: dict[str, np.ndarray]) -> np.ndarray:
    """(B, 3) pose of the optimized joints from {joint name: axis-angle}."""
    names = list(SMPL_BONES)
    pose = np.zeros((len(names), 3))
    for name, rv in rotations.items():
        pose[names.index(name)] = rv
    return pose


def bent_pose(fitter: Fitter, phase: float) -> np.ndarray:
    """Arms lowered from the T-pose and bent, one leg lifted and bent, the spine a little
    bent forward; the left arm rises a little over the clip."""
    axes = {n: fitter.limits.axes[k].double().numpy() for k, n in enumerate(SMPL_BONES)}
    hinge = {list(SMPL_BONES)[pos]: axis.double().numpy() for pos, axis in fitter.hinges}
    flex = {n: a[0] for n, a in axes.items()}
    abd = {n: a[1] for n, a in axes.items()}
    return bone_pose(fitter, {
        "left_shoulder": abd["left_shoulder"] * (-0.9 + 0.3 * phase) + flex["left_shoulder"] * 0.3,
        "left_elbow": hinge["left_elbow"] * 0.8,
        "right_shoulder": abd["right_shoulder"] * -1.2 + flex["right_shoulder"] * 0.5,
        "right_elbow": hinge["right_elbow"] * 1.2,
        "left_hip": flex["left_hip"] * 0.6,
        "left_knee": hinge["left_knee"] * 0.9,
        "right_knee": hinge["right_knee"] * 0.3,
        "spine2": flex["spine2"] * 0.1,
    })


def ground_truth(stage: FitStage, frames: int, yaw: float = math.radians(30)) -> dict:
    body, fitter = stage.body, stage.fitter
    pose = np.zeros((frames, body.num_bones, 3))
    for t in range(frames):
        pose[t, fitter.bones] = bent_pose(fitter, t / max(frames - 1, 1))
    root = np.tile([0.0, yaw, 0.0], (frames, 1))
    transl = np.stack([np.linspace(-0.1, 0.05, frames), np.full(frames, 0.1),
                       np.full(frames, 3.0)], 1)
    betas = np.zeros((1, body.num_betas))
    betas[0, :3] = [1.0, -0.5, 0.8]
    with torch.no_grad():
        out = body(torch.as_tensor(pose, dtype=body.dtype),
                   torch.as_tensor(betas, dtype=body.dtype).expand(frames, -1),
                   torch.as_tensor(root, dtype=body.dtype),
                   torch.as_tensor(transl, dtype=body.dtype))
    return {"pose": pose, "root": root, "transl": transl, "betas": betas,
            "joints": out["keypoints"].double().numpy()}


@pytest.mark.parametrize("kind", ["smpl", "smplh", "smplx"])
def test_keypoint_model_matches_the_body(smpl_model_dir: Path, kind: str) -> None:
    """The fast path gives SmplFamilyBody.forward's keypoints for random poses of the
    optimized joints, shapes, orientations and placements: exactly without pose-corrective
    blend shapes, within millimetres with them (they only move the vertex keypoints)."""
    body = SmplFamilyBody(kind, smpl_model_dir, dtype=torch.float64)
    fitter = Fitter(body, FitConfig(device="cpu"))
    assert isinstance(fitter.km, SmplKeypointModel)
    gen = torch.Generator().manual_seed(1)
    b = 4
    pose = 0.6 * torch.randn(1, b, len(fitter.bones), 3, generator=gen, dtype=torch.float64)
    betas = torch.randn(1, body.num_betas, generator=gen, dtype=torch.float64)
    orient = torch.randn(b, 3, generator=gen, dtype=torch.float64)
    transl = torch.randn(b, 3, generator=gen, dtype=torch.float64) + torch.tensor([0, 0, 4.0])
    full = torch.zeros(b, body.num_bones, 3, dtype=torch.float64)
    full[:, fitter.bones] = pose[0]
    fast = fitter.km.keypoints(pose, fitter.km.rest(betas), axis_angle_to_matrix(orient)[None],
                               transl[None])[0]
    with torch.no_grad():
        with_posedirs = body(full, betas.expand(b, -1), orient, transl)["keypoints"]
        body.model.posedirs.zero_()  # this instance is the test's own
        without = body(full, betas.expand(b, -1), orient, transl)["keypoints"]
    np.testing.assert_allclose(fast.numpy(), without.numpy(), atol=1e-5)
    kinematic = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    np.testing.assert_allclose(fast[:, kinematic].numpy(), with_posedirs[:, kinematic].numpy(),
                               atol=1e-5)
    assert float((fast - with_posedirs).norm(dim=-1).max()) < 0.01


@pytest.mark.parametrize("kind", ["smpl", "smplx"])
def test_fit_recovers_a_synthetic_smpl_body(smpl_model_dir: Path, tmp_path: Path,
                                            kind: str) -> None:
    stage = make_stage(kind, smpl_model_dir)
    stage.setup()
    camera = camera_for(W, H, stage.config.fov_deg)
    gt = ground_truth(stage, T)
    job, steps = make_job(tmp_path, T)
    write_people(job.inputs["detect"] / "people.npz", [gt["joints"]], camera, pixel_noise=0.5)
    start = time.perf_counter()
    summary = stage.process(job)
    seconds = time.perf_counter() - start
    with np.load(job.out_dir / "bodies.npz") as npz:
        out = {key: npz[key] for key in npz.files}
    body = stage.body
    j = {"smpl": 24, "smplx": 55}[kind]
    assert out["pose"].shape == (T, 1, j, 3) and out["pose"].dtype == np.float32
    assert out["phenotype"].shape == (1, 10) and out["joints3d"].shape == (T, 1, 23, 3)
    assert out["root_orient"].shape == (T, 1, 3) and out["fit_error"].shape == (T, 1)
    assert summary["body_model"] == kind and summary["tracks"] == 1 and sum(steps) == T
    assert summary["phenotype_labels"] == [f"beta{i}" for i in range(10)]
    # Hands, jaw, eyes (and every joint not optimized) stay at zero.
    others = np.ones(j, bool)
    others[stage.fitter.bones] = False
    assert np.abs(out["pose"][:, :, others]).max() == 0.0
    assert np.abs(out["phenotype"]).max() <= 3.0
    # The joints written are the body the parameters describe (up to posedirs).
    with torch.no_grad():
        again = body(torch.as_tensor(out["pose"][:, 0]),
                     torch.as_tensor(out["phenotype"]).expand(T, -1),
                     torch.as_tensor(out["root_orient"][:, 0]),
                     torch.as_tensor(out["transl"][:, 0]))["keypoints"].numpy()
    np.testing.assert_allclose(again, out["joints3d"][:, 0], atol=5e-3)

    err2d = float(np.mean(out["fit_error"]))
    pa = pa_mpjpe(out["joints3d"][:, 0], gt["joints"])
    depth = float(np.abs(out["transl"][:, 0, 2] - gt["transl"][:, 2]).mean())
    print(f"\n{kind} fit: 2D error {err2d:.2f} px, PA-MPJPE {pa * 1000:.1f} mm, depth error "
          f"{depth * 100:.1f} cm, betas {np.round(out['phenotype'][0, :3], 2).tolist()} "
          f"(truth {gt['betas'][0, :3].tolist()}), {seconds / T:.3f} s/frame")
    assert err2d < 3.0
    assert pa < 0.03


def test_chunked_fit_with_a_shape_pass(smpl_model_dir: Path, tmp_path: Path) -> None:
    """A video longer than one window: the betas come from a separate shape pass and stay
    fixed; each window still lies on the keypoints."""
    stage = make_stage("smpl", smpl_model_dir, chunk_frames=4, shape_frames=3,
                       iterations_full=80)
    stage.setup()
    camera = camera_for(W, H, stage.config.fov_deg)
    gt = ground_truth(stage, T)
    job, steps = make_job(tmp_path, T)
    write_people(job.inputs["detect"] / "people.npz", [gt["joints"]], camera)
    summary = stage.process(job)
    with np.load(job.out_dir / "bodies.npz") as npz:
        err, betas = npz["fit_error"], npz["phenotype"]
    print(f"\nsmpl chunked: 2D error {np.mean(err):.2f} px")
    assert sum(steps) == T and summary["body_model"] == "smpl"
    assert betas.shape == (1, 10) and np.isfinite(betas).all()
    assert np.isfinite(err).all() and float(np.mean(err)) < 3.0


def test_limbs_initialized_from_world_landmarks(smpl_model_dir: Path) -> None:
    """From SMPL's T-pose, limb rotations from 3D landmarks point every arm and leg
    segment where the landmarks do, for a body turned about the vertical."""
    body = load_body_model(BodySection(model="smpl", model_path=smpl_model_dir))
    fitter = Fitter(body, FitConfig(device="cpu"))
    truth = torch.as_tensor(bent_pose(fitter, 0.5), dtype=body.dtype)[None, None]
    rest = fitter.km.rest(body.default_shape(1))
    root = axis_angle_to_matrix(torch.tensor([[[0.0, 0.6, 0.0]]], dtype=body.dtype))
    zero = torch.zeros(1, 1, 3, dtype=body.dtype)
    with torch.no_grad():
        world = fitter.km.keypoints(truth, rest, root, zero)[0]
    lim, spec = fitter.limits, fitter.spec
    limits = {n: (lim.axes[k].double().numpy(), lim.low[k].double().numpy(),
                  lim.high[k].double().numpy()) for k, n in enumerate(SMPL_BONES)}
    limbs = limb_pose_from_world(fitter.rest_keypoints(body.default_shape(1))[0],
                                 world.double().numpy(), np.ones((1, 23)),
                                 root[0].double().numpy(), fitter.km.to_camera.double().numpy(),
                                 limits, spec.limb_segments, spec.hinge_bones)
    est = bone_pose(fitter, {n: rv[0] for n, rv in limbs.items()})
    with torch.no_grad():
        got = fitter.km.keypoints(torch.as_tensor(est, dtype=body.dtype)[None, None], rest,
                                  root, zero)[0, 0]
    for _, _, (a, b) in SMPL_LIMB_SEGMENTS:
        want = (world[0, b] - world[0, a]) / (world[0, b] - world[0, a]).norm()
        have = (got[b] - got[a]) / (got[b] - got[a]).norm()
        assert float(want @ have) > math.cos(math.radians(8)), (a, b)


def test_relaxed_stance_hangs_the_arms(smpl_model_dir: Path) -> None:
    """The pose prior's mean turns SMPL's T-pose into arms at the sides, elbows a little
    bent forward, and lies within the joint limits."""
    body = load_body_model(BodySection(model="smpl", model_path=smpl_model_dir))
    fitter = Fitter(body, FitConfig(device="cpu"))
    assert float(fitter.limits.penalty(fitter.relaxed[None])) == 0.0
    rest = fitter.km.rest(body.default_shape(1))
    eye = torch.eye(3, dtype=body.dtype)[None, None]
    zero = torch.zeros(1, 1, 3, dtype=body.dtype)
    with torch.no_grad():
        kp = fitter.km.keypoints(fitter.relaxed[None, None], rest, eye, zero)[0, 0].numpy()
    for shoulder, elbow, wrist in ((5, 7, 9), (6, 8, 10)):
        upper = kp[elbow] - kp[shoulder]
        # Camera frame: y down, the body facing -z. The upper arm hangs within 15 degrees
        # of straight down; the forearm swings towards the camera.
        assert upper[1] / np.linalg.norm(upper) > math.cos(math.radians(15))
        assert kp[wrist, 2] < kp[elbow, 2] - 0.05


def test_missing_model_file_names_body_model_path(tmp_path: Path) -> None:
    stage = make_stage("smpl", tmp_path)
    with pytest.raises(FileNotFoundError, match="body.model_path"):
        stage.setup()
