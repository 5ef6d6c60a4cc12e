"""The fit stage on detections synthesized from Anny itself, where the truth is known.

A posed body (a moving arm, bent knee and elbow, turned a little, 3 m from the camera) is
projected with the stage's own camera into a BlazePose-layout people.npz; the fit must
reproject onto it within a few pixels and recover the 3D joints up to a similarity
(PA-MPJPE). Run with -s to see the numbers.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import RunSection
from pipeline.dataset import VideoItem
from pipeline.stage import VideoFailed, VideoJob
from stages.body import BLAZEPOSE_FOR_COCO23
from stages.fit import (
    BODY_BONES,
    LIMB_SEGMENTS,
    FitConfig,
    FitStage,
    camera_for,
    fill_rotations,
    kabsch,
    limb_pose_from_world,
)

W, H = 320, 240
T = 16


@pytest.fixture(scope="module")
def stage() -> FitStage:
    st = FitStage(FitConfig(device="cpu"), RunSection())
    st.setup()
    yield st
    st.teardown()


def _rotation(axis: tuple[float, float, float], angle: float) -> np.ndarray:
    a = np.asarray(axis, float)
    return a / np.linalg.norm(a) * angle


def ground_truth(stage: FitStage, frames: int, yaw: float = 0.35,
                 shift: tuple[float, float, float] = (0.0, 0.0, 0.0),
                 ) -> dict[str, np.ndarray]:
    """A body waving its left arm, right elbow and knee bent, 3 m in front of the camera,
    turned by `yaw` about the vertical (pi: seen from behind)."""
    body = stage.body
    j = body.num_bones
    pose = np.zeros((frames, j, 3))
    hinge = {body.bone_labels[stage.fitter.bones[pos]]: axis.numpy()
             for pos, axis in stage.fitter.hinges}
    for t in range(frames):
        phase = t / max(frames - 1, 1)
        # Left arm rises sideways from the rest pose to about horizontal and back a little.
        pose[t, body.bone_index("upperarm01.L")] = _rotation(
            (0, 1, 0), -1.0 * math.sin(math.pi * 0.8 * phase))
        pose[t, body.bone_index("lowerarm01.L")] = hinge["lowerarm01.L"] * 0.3 * phase
        pose[t, body.bone_index("lowerarm01.R")] = hinge["lowerarm01.R"] * 0.9
        pose[t, body.bone_index("upperarm01.R")] = _rotation((1, 0, 0), -0.4)
        pose[t, body.bone_index("upperleg01.R")] = _rotation((1, 0, 0), -0.35)
        pose[t, body.bone_index("lowerleg01.R")] = hinge["lowerleg01.R"] * 0.5
        pose[t, body.bone_index("spine03")] = _rotation((1, 0, 0), 0.08)
    root = np.tile(_rotation((0, 1, 0), yaw), (frames, 1))
    transl = np.stack([np.linspace(-0.15, 0.1, frames), np.full(frames, 0.05),
                       np.full(frames, 3.0)], 1) + np.asarray(shift)
    phen = np.array([[0.6, 0.5, 0.5, 0.45, 0.55, 0.5]])
    with torch.no_grad():
        out = body(torch.as_tensor(pose, dtype=torch.float32),
                   torch.as_tensor(phen, dtype=torch.float32).expand(frames, -1),
                   torch.as_tensor(root, dtype=torch.float32),
                   torch.as_tensor(transl, dtype=torch.float32))
    return {"pose": pose, "root": root, "transl": transl, "phenotype": phen,
            "joints": out["keypoints"].double().numpy()}


def write_people(path: Path, joints: list[np.ndarray], camera: np.ndarray,
                 present: list[np.ndarray] | None = None, world_noise: float = 0.02,
                 pixel_noise: float = 0.0, seed: int = 0) -> None:
    """Per track, COCO-23 camera-space joints (T, 23, 3) -> a BlazePose people.npz."""
    frames, tracks = joints[0].shape[0], len(joints)
    fx, fy, cx, cy = camera
    present = [np.ones(frames, bool)] * tracks if present is None else present
    keypoints = np.full((frames, tracks, 33, 3), np.nan, np.float32)
    keypoints[..., 2] = 0.0
    world = np.full((frames, tracks, 33, 3), np.nan, np.float32)
    rng = np.random.default_rng(seed)
    for p, (joint, seen) in enumerate(zip(joints, present, strict=True)):
        hips = joint[:, [11, 12]].mean(1, keepdims=True)
        centred = joint - hips + rng.normal(0.0, world_noise, joint.shape)
        for c, b in enumerate(BLAZEPOSE_FOR_COCO23):
            if b < 0:
                continue
            x, y, z = joint[seen, c].T
            noise = rng.normal(0.0, pixel_noise, (2, len(x)))
            keypoints[seen, p, b] = np.stack([fx * x / z + cx + noise[0],
                                              fy * y / z + cy + noise[1],
                                              np.full(len(x), 0.95)], 1)
            world[seen, p, b] = centred[seen, c]
    both = np.stack(present, 1)
    boxes = np.full((frames, tracks, 4), np.nan, np.float32)
    np.savez(path, keypoints=keypoints, world=world, boxes=boxes,
             scores=both.astype(np.float32), present=both,
             track_ids=np.arange(tracks, dtype=np.int32) + 3)


def make_job(tmp_path: Path, frames: int) -> tuple[VideoJob, list[int]]:
    detect = tmp_path / "detect"
    detect.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "fit"
    out.mkdir()
    steps: list[int] = []
    job = VideoJob(
        video=VideoItem("synthetic", tmp_path / "synthetic.mp4", "synthetic.mp4"),
        inputs={"detect": detect}, out_dir=out, run=RunSection(),
        upstream={"detect": {"video": {"width": W, "height": H, "fps_num": 25, "fps_den": 1,
                                       "frame_count": frames}}},
        advance=steps.append,
    )
    return job, steps


def pa_mpjpe(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean joint error (m) after the best similarity transform, per frame."""
    errs = []
    for p, g in zip(pred, gt, strict=True):
        pc, gc = p - p.mean(0), g - g.mean(0)
        rot = kabsch(pc, gc, np.ones(len(p)))
        aligned = pc @ rot.T
        scale = (aligned * gc).sum() / (aligned * aligned).sum()
        errs.append(np.linalg.norm(scale * aligned - gc, axis=1).mean())
    return float(np.mean(errs))


def test_fit_recovers_a_synthetic_body(stage: FitStage, tmp_path: Path) -> None:
    camera = camera_for(W, H, stage.config.fov_deg)
    gt = ground_truth(stage, T)
    job, steps = make_job(tmp_path, T)
    # Detections jitter by 1.5 px, as a detector's do.
    write_people(job.inputs["detect"] / "people.npz", [gt["joints"]], camera, pixel_noise=1.5)
    start = time.perf_counter()
    summary = stage.process(job)
    seconds = time.perf_counter() - start
    with np.load(job.out_dir / "bodies.npz") as npz:
        out = {key: npz[key] for key in npz.files}

    j = stage.body.num_bones
    assert out["pose"].shape == (T, 1, j, 3) and out["pose"].dtype == np.float32
    assert out["root_orient"].shape == (T, 1, 3) and out["transl"].shape == (T, 1, 3)
    assert out["joints3d"].shape == (T, 1, 23, 3) and out["phenotype"].shape == (1, 6)
    assert out["fit_error"].shape == (T, 1) and out["present"].all()
    np.testing.assert_allclose(out["camera"], camera, rtol=1e-6)
    assert out["track_ids"].tolist() == [3] and sum(steps) == T
    assert summary["body_model"] == "anny" and summary["tracks"] == 1
    assert len(summary["phenotype_labels"]) == 6
    # Only the major bones move.
    others = np.ones(j, bool)
    others[stage.fitter.bones] = False
    assert np.abs(out["pose"][:, :, others]).max() == 0.0

    # The joints written are the body the parameters describe.
    with torch.no_grad():
        again = stage.body(torch.as_tensor(out["pose"][:, 0]),
                           torch.as_tensor(out["phenotype"]).expand(T, -1),
                           torch.as_tensor(out["root_orient"][:, 0]),
                           torch.as_tensor(out["transl"][:, 0]))["keypoints"].numpy()
    np.testing.assert_allclose(again, out["joints3d"][:, 0], atol=2e-3)

    err2d = float(np.mean(out["fit_error"]))
    fx, fy, cx, cy = camera

    def project(x: np.ndarray) -> np.ndarray:
        return np.stack([fx * x[..., 0] / x[..., 2] + cx, fy * x[..., 1] / x[..., 2] + cy], -1)

    # Against the noise-free keypoints the fit is closer than the detections were.
    err_clean = float(np.linalg.norm(project(out["joints3d"][:, 0]) - project(gt["joints"]),
                                     axis=-1).mean())
    pa = pa_mpjpe(out["joints3d"][:, 0], gt["joints"])
    depth = float(np.abs(out["transl"][:, 0, 2] - gt["transl"][:, 2]).mean())
    # The waving wrist: the fit follows its motion rather than smoothing it away.
    wrist_gt = gt["joints"][:, 9] - gt["joints"][:, 5]
    wrist_fit = out["joints3d"][:, 0, 9] - out["joints3d"][:, 0, 5]
    travel_gt = np.linalg.norm(wrist_gt[-1] - wrist_gt[0]) + np.linalg.norm(
        wrist_gt[T // 2] - wrist_gt[0])
    travel_fit = np.linalg.norm(wrist_fit[-1] - wrist_fit[0]) + np.linalg.norm(
        wrist_fit[T // 2] - wrist_fit[0])
    print(f"\nfit: 2D error {err2d:.2f} px ({err_clean:.2f} px to the noise-free keypoints, "
          f"whose noise is {1.5 * math.sqrt(math.pi / 2):.2f} px), "
          f"PA-MPJPE {pa * 1000:.1f} mm, depth error "
          f"{depth * 100:.1f} cm, wrist travel {travel_fit:.3f} m (truth {travel_gt:.3f}), "
          f"phenotype {np.round(out['phenotype'][0], 2).tolist()}, "
          f"{seconds / T:.3f} s/frame")
    assert summary["mean_fit_error_px"] == pytest.approx(err2d, rel=1e-4)
    assert err2d < 5.0
    assert err_clean < 1.5 * math.sqrt(math.pi / 2)  # the mean length of the 2D noise
    assert pa < 0.05
    assert abs(travel_fit - travel_gt) < 0.25 * travel_gt


def angle_between(rotvec_a: np.ndarray, rotvec_b: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    rel = Rotation.from_rotvec(rotvec_a) * Rotation.from_rotvec(rotvec_b).inv()
    return rel.magnitude()


def test_two_tracks_in_chunks_with_gaps(stage: FitStage, tmp_path: Path) -> None:
    """Several windows, the shape pass, two tracks (one seen from behind) that come and go."""
    frames = 20
    stage.config.chunk_frames = 8
    stage.config.shape_frames = 6
    try:
        camera = camera_for(W, H, stage.config.fov_deg)
        front = ground_truth(stage, frames)
        back = ground_truth(stage, frames, yaw=math.pi + 0.3, shift=(0.9, 0.0, 1.5))
        seen_front = np.ones(frames, bool)
        seen_front[:3] = False
        seen_front[9:12] = False
        seen_back = np.zeros(frames, bool)
        seen_back[5:] = True
        job, steps = make_job(tmp_path, frames)
        write_people(job.inputs["detect"] / "people.npz", [front["joints"], back["joints"]],
                     camera, [seen_front, seen_back])
        stage.process(job)
    finally:
        stage.config.chunk_frames = FitConfig().chunk_frames
        stage.config.shape_frames = FitConfig().shape_frames
    with np.load(job.out_dir / "bodies.npz") as npz:
        out = {key: npz[key] for key in npz.files}
    assert sum(steps) == frames and len(steps) == 3
    assert out["track_ids"].tolist() == [3, 4]
    assert out["present"].tolist() == np.stack([seen_front, seen_back], 1).tolist()
    err = out["fit_error"]
    assert np.isnan(err[~out["present"]]).all() and np.isfinite(err[out["present"]]).all()
    assert np.nanmean(err) < 5.0
    # Absent frames are filled: held before the first sighting, interpolated in the gap.
    assert np.isfinite(out["joints3d"]).all()
    np.testing.assert_allclose(out["transl"][0, 0], out["transl"][3, 0], atol=1e-6)
    np.testing.assert_allclose(out["transl"][0, 1], out["transl"][5, 1], atol=1e-6)
    mid = out["transl"][10, 0]
    ends = out["transl"][[8, 12], 0]
    assert np.linalg.norm(mid - ends.mean(0)) < 0.05
    # The second person faces away from the camera, and the fit knows it.
    turn = angle_between(out["root_orient"][seen_back, 1], back["root"][seen_back])
    assert turn.max() < math.radians(15)
    pa = [pa_mpjpe(out["joints3d"][seen, p], gt["joints"][seen])
          for p, (gt, seen) in enumerate(((front, seen_front), (back, seen_back)))]
    print(f"\nchunked fit, two tracks: 2D error {np.nanmean(err):.2f} px, PA-MPJPE "
          f"{pa[0] * 1000:.1f} / {pa[1] * 1000:.1f} mm, back-view orientation error "
          f"{math.degrees(turn.mean()):.1f} deg")
    assert max(pa) < 0.06


def test_no_people_gives_empty_arrays(stage: FitStage, tmp_path: Path) -> None:
    frames = 5
    job, steps = make_job(tmp_path, frames)
    np.savez(job.inputs["detect"] / "people.npz",
             keypoints=np.zeros((frames, 0, 33, 3), np.float32),
             world=np.zeros((frames, 0, 33, 3), np.float32),
             boxes=np.zeros((frames, 0, 4), np.float32), scores=np.zeros((frames, 0), np.float32),
             present=np.zeros((frames, 0), bool), track_ids=np.zeros(0, np.int32))
    summary = stage.process(job)
    with np.load(job.out_dir / "bodies.npz") as npz:
        out = {key: npz[key] for key in npz.files}
    j = stage.body.num_bones
    shapes = {"track_ids": (0,), "present": (frames, 0), "pose": (frames, 0, j, 3),
              "root_orient": (frames, 0, 3), "transl": (frames, 0, 3), "phenotype": (0, 6),
              "joints3d": (frames, 0, 23, 3), "fit_error": (frames, 0), "camera": (4,)}
    assert {key: out[key].shape for key in shapes} == shapes
    assert summary["tracks"] == 0 and summary["mean_fit_error_px"] is None
    assert sum(steps) == frames


def test_frame_count_mismatch_fails_the_video(stage: FitStage, tmp_path: Path) -> None:
    job, _ = make_job(tmp_path, 7)
    camera = camera_for(W, H, stage.config.fov_deg)
    gt = ground_truth(stage, 4)
    write_people(job.inputs["detect"] / "people.npz", [gt["joints"]], camera)
    with pytest.raises(VideoFailed, match="frames"):
        stage.process(job)


def test_body_bones_are_anny_bones(stage: FitStage) -> None:
    assert set(BODY_BONES) <= set(stage.body.bone_labels)
    assert len(stage.fitter.bones) == len(BODY_BONES)


def test_fill_rotations_interpolates_the_short_way() -> None:
    from scipy.spatial.transform import Rotation

    rots = Rotation.from_rotvec([[0, 3.0, 0], [0, 0, 0], [0, -3.0, 0]]).as_matrix()
    out = fill_rotations(np.array([True, False, True]), rots)
    # 3 rad and -3 rad about y are 0.28 rad apart through pi, not 6 rad through 0.
    angle = Rotation.from_matrix(out[1]).magnitude()
    assert angle == pytest.approx(math.pi, abs=1e-6)


def test_keypoint_model_matches_the_body_model(stage: FitStage) -> None:
    """The optimizer's fast keypoints are AnnyBody's, for any shape and body pose."""
    from stages.body import axis_angle_to_matrix
    from stages.fit import KeypointModel

    body, bones = stage.body, stage.fitter.bones
    km = KeypointModel(body, bones)
    gen = torch.Generator().manual_seed(1)
    n = 4
    pose = torch.zeros(n, body.num_bones, 3)
    pose[:, bones] = torch.randn(n, len(bones), 3, generator=gen) * 0.5
    phen = torch.rand(n, 6, generator=gen)
    root = torch.randn(n, 3, generator=gen)
    transl = torch.randn(n, 3, generator=gen) + torch.tensor([0.0, 0.0, 4.0])
    with torch.no_grad():
        ref = body(pose, phen, root, transl)["keypoints"]
        # Tracks along the first axis, one frame each.
        fast = km.keypoints(pose[:, None][:, :, bones], km.rest(phen),
                            axis_angle_to_matrix(root)[:, None], transl[:, None])[:, 0]
    assert (fast - ref).abs().max() < 1e-4


def test_without_world_landmarks_a_back_view_is_found(stage: FitStage, tmp_path: Path) -> None:
    """No 3D landmarks (another detector): the 2D left/right order tells front from back."""
    frames = 8
    camera = camera_for(W, H, stage.config.fov_deg)
    gt = ground_truth(stage, frames, yaw=math.pi - 0.3)
    job, _ = make_job(tmp_path, frames)
    path = job.inputs["detect"] / "people.npz"
    write_people(path, [gt["joints"]], camera)
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["world"][:] = np.nan
    np.savez(path, **arrays)
    stage.process(job)
    with np.load(job.out_dir / "bodies.npz") as npz:
        out = {key: npz[key] for key in npz.files}
    turn = angle_between(out["root_orient"][:, 0], gt["root"])
    pa = pa_mpjpe(out["joints3d"][:, 0], gt["joints"])
    print(f"\nno world landmarks, back view: 2D error {np.mean(out['fit_error']):.2f} px, "
          f"orientation error {math.degrees(turn.mean()):.1f} deg, PA-MPJPE {pa * 1000:.1f} mm")
    assert np.mean(out["fit_error"]) < 5.0
    assert turn.max() < math.radians(25)


@pytest.mark.real
def test_real_detections(stage: FitStage, real_videos: Path, tmp_path: Path) -> None:
    """detect then fit on a real clip: every detected frame gets a body that lies on the
    person's keypoints, at a plausible distance."""
    detect = pytest.importorskip("stages.detect")
    path = real_videos / "intel__asl_help.mkv"  # 640x480, 58 frames, one person signing
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    job, steps = make_job(tmp_path, 0)
    det = detect.DetectStage(detect.DetectConfig(), RunSection())
    det.setup()
    try:
        item = VideoItem(path.stem, path, path.name)
        summary = det.process(VideoJob(item, {}, job.inputs["detect"], RunSection()))
    finally:
        det.teardown()
    job.upstream = {"detect": summary}
    start = time.perf_counter()
    fit = stage.process(job)
    seconds = time.perf_counter() - start
    frames = summary["video"]["frame_count"]
    with np.load(job.out_dir / "bodies.npz") as npz:
        out = {key: npz[key] for key in npz.files}
    present = out["present"]
    assert present.shape == (frames, summary["tracks"]) and present.any()
    err = out["fit_error"][present]
    z = out["transl"][present][:, 2]
    print(f"\nreal clip: {fit['mean_fit_error_px']:.2f} px mean reprojection error "
          f"(90th percentile {np.percentile(err, 90):.2f}), depth {np.median(z):.2f} m, "
          f"{seconds / frames:.3f} s/frame")
    assert sum(steps) == frames
    assert np.isfinite(err).all() and np.isfinite(out["joints3d"]).all()
    assert fit["mean_fit_error_px"] < 8.0 and np.percentile(err, 90) < 15.0
    assert ((z > 0.5) & (z < 10.0)).all()


def test_unreadable_detections_fail_the_video(stage: FitStage, tmp_path: Path) -> None:
    job, _ = make_job(tmp_path, 3)
    (job.inputs["detect"] / "people.npz").write_bytes(b"not an npz")
    with pytest.raises(VideoFailed, match="people.npz"):
        stage.process(job)


def _bone_pose(stage: FitStage, rotations: dict[str, np.ndarray]) -> torch.Tensor:
    """(1, B, 3) pose of the optimized bones from {bone name: axis-angle}."""
    pose = torch.zeros(1, len(BODY_BONES), 3, dtype=stage.body.dtype)
    names = list(BODY_BONES)
    for name, rv in rotations.items():
        pose[0, names.index(name)] = torch.as_tensor(rv, dtype=stage.body.dtype)
    return pose


def test_joint_limits_allow_anatomy_and_penalize_the_impossible(stage: FitStage) -> None:
    lim = stage.fitter.limits
    eye = torch.eye(3, dtype=lim.axes.dtype)
    # Each bone's axes are orthonormal, so each component is an angle of its own.
    assert torch.allclose(lim.axes @ lim.axes.transpose(-1, -2), eye.expand_as(lim.axes),
                          atol=1e-6)
    hinge = {stage.body.bone_labels[stage.fitter.bones[pos]]: axis.numpy()
             for pos, axis in stage.fitter.hinges}
    names = list(BODY_BONES)
    flex = {n: lim.axes[names.index(n), 0].numpy() for n in names}
    # Rest, the relaxed stance, a deep squat, an arm raised forward: all allowed.
    squat = {"upperleg01.L": flex["upperleg01.L"] * 1.9, "lowerleg01.L": hinge["lowerleg01.L"]
             * 2.0, "upperarm01.R": flex["upperarm01.R"] * 1.5}
    for ok in ({}, squat):
        assert float(lim.penalty(_bone_pose(stage, ok))) == 0.0
    assert float(lim.penalty(stage.fitter.relaxed[None])) == 0.0
    # The knee hinge axis is the knee's flexion axis: bending it backwards is free,
    # bending it forwards (hyperextension) and a thigh swung far backwards are not.
    assert np.allclose(flex["lowerleg01.L"], hinge["lowerleg01.L"], atol=1e-6)
    knee_fwd = _bone_pose(stage, {"lowerleg01.L": hinge["lowerleg01.L"] * -0.5})
    assert float(lim.penalty(knee_fwd)) == pytest.approx((0.5 - 0.05) ** 2, rel=1e-4)
    thigh_back = _bone_pose(stage, {"upperleg01.R": flex["upperleg01.R"] * -1.2})
    assert float(lim.penalty(thigh_back)) > 0.4
    twisted_neck = _bone_pose(stage, {"neck01": lim.axes[names.index("neck01"), 2] * 2.0})
    assert float(lim.penalty(twisted_neck)) > 1.0


def test_limbs_initialized_from_world_landmarks(stage: FitStage) -> None:
    """Limb rotations from 3D landmarks point every arm and leg segment where the
    landmarks do, for a body turned about the vertical."""
    from stages.body import axis_angle_to_matrix

    fitter = stage.fitter
    names = list(BODY_BONES)
    flex = {n: fitter.limits.axes[names.index(n), 0].numpy() for n in names}
    hinge = {stage.body.bone_labels[fitter.bones[pos]]: axis.numpy()
             for pos, axis in fitter.hinges}
    truth = _bone_pose(stage, {
        "upperleg01.L": flex["upperleg01.L"] * 1.2, "lowerleg01.L": hinge["lowerleg01.L"] * 1.4,
        "upperarm01.R": flex["upperarm01.R"] * 1.3, "lowerarm01.R": hinge["lowerarm01.R"] * 0.8,
        "upperarm01.L": flex["upperarm01.L"] * -0.5})
    phen = stage.body.default_phenotype(1).to(stage.body.dtype)
    rest = fitter.km.rest(phen)
    root = axis_angle_to_matrix(torch.tensor([[[0.0, 0.6, 0.0]]], dtype=stage.body.dtype))
    with torch.no_grad():
        world = fitter.km.keypoints(truth[:, None], rest, root,
                                    torch.zeros(1, 1, 3, dtype=stage.body.dtype))[0]
    rest_kp = fitter.rest_keypoints(phen)[0]
    lim = fitter.limits
    limits = {n: (lim.axes[k].double().numpy(), lim.low[k].double().numpy(),
                  lim.high[k].double().numpy()) for k, n in enumerate(names)}
    limbs = limb_pose_from_world(rest_kp, world.double().numpy(), np.ones((1, 23)),
                                 root[0].double().numpy(),
                                 fitter.km.to_camera.double().numpy(), limits)
    est = _bone_pose(stage, {n: rv[0] for n, rv in limbs.items()})
    with torch.no_grad():
        got = fitter.km.keypoints(est[:, None], rest, root,
                                  torch.zeros(1, 1, 3, dtype=stage.body.dtype))[0, 0]
    for _, _, (a, b) in LIMB_SEGMENTS:
        want = (world[0, b] - world[0, a]) / (world[0, b] - world[0, a]).norm()
        have = (got[b] - got[a]) / (got[b] - got[a]).norm()
        assert float(want @ have) > math.cos(math.radians(8)), (a, b)
    # Unseen segments get no estimate.
    blind = np.ones((1, 23))
    blind[0, 9] = 0.0
    limbs = limb_pose_from_world(rest_kp, world.double().numpy(), blind,
                                 root[0].double().numpy(),
                                 fitter.km.to_camera.double().numpy(), limits)
    assert np.isnan(limbs["lowerarm01.L"]).all() and np.isfinite(limbs["upperarm01.L"]).all()
