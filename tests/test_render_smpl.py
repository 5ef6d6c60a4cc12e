"""render with SMPL-family bodies (body.model smpl | smplx): the synthetic model files of
tests/smpl_synthetic.py (a T-posed tube figure about 1.6 m tall; the real files are
licensed and never ship) go through the same stage code users run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import RunSection
from pipeline.dataset import VideoItem
from pipeline.stage import VideoFailed, VideoJob
from pipeline.video import iter_frames
from stages.appearance import PARTS, REGIONS, sample_identity
from stages.body import COCO23
from stages.body_config import BodySection
from stages.render import RenderConfig, RenderStage

W, H, T = 160, 120, 4
CAMERA = np.array([170.0, 170.0, 80.0, 60.0], np.float32)
VIDEO_ID = "wave/clip_01"
# Keypoints inside the tube figure's limbs and trunk (not the vertex keypoints on its
# surface, such as the toes, which a thin silhouette may miss by a pixel).
INSIDE = ("left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_hip",
          "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle")


def _stage(model_dir: Path, kind: str, **config) -> RenderStage:
    body = BodySection(model=kind, model_path=model_dir)
    stage = RenderStage(RenderConfig(**{"lighting": "fixed", **config}),
                        RunSection(chunk_frames=3), shared={"body": body})
    stage.setup()
    return stage


def _write_fit(stage: RenderStage, fit_dir: Path, betas: np.ndarray,
               xs: tuple[float, ...]) -> np.ndarray:
    """bodies.npz in the contract for people at horizontal offsets `xs`, 3.2 m away, the
    left forearm bending more every frame; returns joints3d (T, P, 23, 3)."""
    p, j = len(xs), stage.body.num_bones
    pose = np.zeros((T, p, j, 3), np.float32)
    pose[:, :, 18, 2] = np.linspace(0.0, 1.0, T)[:, None]  # SMPL joint 18: left elbow
    orient = np.zeros((T, p, 3), np.float32)
    transl = np.zeros((T, p, 3), np.float32)
    transl[..., 0] = xs
    transl[..., 1] = -0.1
    transl[..., 2] = 3.2
    with torch.no_grad():
        out = stage.body.forward(
            torch.as_tensor(pose.reshape(T * p, j, 3)),
            torch.as_tensor(np.tile(betas, (T, 1))),
            torch.as_tensor(orient.reshape(-1, 3)), torch.as_tensor(transl.reshape(-1, 3)))
    joints = out["keypoints"].numpy().reshape(T, p, len(COCO23), 3)
    fit_dir.mkdir(parents=True, exist_ok=True)
    np.savez(fit_dir / "bodies.npz", track_ids=np.arange(1, p + 1, dtype=np.int32),
             present=np.ones((T, p), bool), pose=pose, root_orient=orient, transl=transl,
             phenotype=betas.astype(np.float32), joints3d=joints,
             fit_error=np.ones((T, p), np.float32), camera=CAMERA)
    return joints


def _job(tmp: Path, name: str, body_model: str | None = None) -> VideoJob:
    out = tmp / name
    out.mkdir(parents=True)
    video = {"width": W, "height": H, "fps_num": 25, "fps_den": 1, "frame_count": T}
    upstream = {"detect": {"video": video}}
    if body_model:
        upstream["fit"] = {"body_model": body_model}
    return VideoJob(video=VideoItem(id=VIDEO_ID, path=tmp / "clip_01.mp4",
                                    rel_path="wave/clip_01.mp4"),
                    inputs={"detect": tmp / "detect", "fit": tmp / "fit",
                            "motion": tmp / "fit"}, out_dir=out,
                    run=RunSection(chunk_frames=3), upstream=upstream)


def _project(points: np.ndarray) -> np.ndarray:
    fx, fy, cx, cy = CAMERA
    return np.stack([fx * points[..., 0] / points[..., 2] + cx,
                     fy * points[..., 1] / points[..., 2] + cy], -1)


@pytest.mark.parametrize("kind", ["smpl", "smplx"])
def test_smpl_family_avatars_cover_the_fitted_bodies(smpl_model_dir, tmp_path, kind):
    stage = _stage(smpl_model_dir, kind, identity="far")
    assert stage.body.kind == kind and stage.body.num_bones == {"smpl": 24, "smplx": 55}[kind]
    n = len(stage.body.shape_labels)
    estimated = np.zeros((2, n), np.float32)
    estimated[0, :2] = (1.5, -1.0)
    estimated[1, :2] = (-0.5, 0.7)
    joints = _write_fit(stage, tmp_path / "fit", estimated, (-0.45, 0.45))
    job = _job(tmp_path, "out", body_model=kind)
    summary = stage.process(job)
    stage.teardown()

    rgba = np.stack(list(iter_frames(job.out_dir / "avatar.mkv", "rgba")))
    depth = np.stack(list(iter_frames(job.out_dir / "depth.mkv", "gray16le")))
    inst = np.stack(list(iter_frames(job.out_dir / "instances.mkv", "gray")))
    assert rgba.shape == (T, H, W, 4) and summary["tracks"] == 2
    alpha = rgba[..., 3]
    for t in range(T):
        for p in range(2):
            uv = np.rint(_project(joints[t, p, [COCO23.index(k) for k in INSIDE]]))
            for (u, v), name in zip(uv.astype(int), INSIDE, strict=True):
                # The avatar covers the real body's joints (a pixel's slack: other betas).
                assert alpha[t, v - 1:v + 2, u - 1:u + 2].max() > 0, (t, p, name)
                assert set(np.unique(inst[t, v - 1:v + 2, u - 1:u + 2])) & {p + 1}, name
        # Depth and instances come from one pass: they agree on every pixel.
        assert np.array_equal(inst[t] > 0, depth[t] > 0)
        assert ((alpha[t] > 0) == (depth[t] > 0)).mean() > 0.98
        assert alpha[t, :, :3].max() == 0 and alpha[t, :, -3:].max() == 0  # feet/edges free
    # The bending forearm changes the silhouette.
    assert (alpha[0] > 0).sum() != (alpha[-1] > 0).sum()

    doc = json.loads((job.out_dir / "identities.json").read_text())
    labels = [f"beta{i}" for i in range(n)]
    for p, track in enumerate(doc["tracks"]):
        # The synthetic beta0 scales the figure by 1 + 0.05 beta0: a larger avatar than
        # the real person is moved back along the hip's ray to keep its image size, so
        # it stands 3.2 m x the size ratio away (a T-posed figure: nearly flat in depth).
        ratio = (1 + 0.05 * track["phenotype"]["beta0"]) / (1 + 0.05 * estimated[p, 0])
        for t in range(T):
            mine = depth[t][inst[t] == p + 1].astype(float)
            assert abs(np.median(mine) - 3200 * ratio) < 120, (t, p, ratio)
    assert doc["body_model"] == kind and doc["phenotype_labels"] == labels
    a, b = doc["tracks"]
    assert list(a["phenotype"]) == labels and list(a["estimated_phenotype"]) == labels
    assert a["estimated_phenotype"]["beta0"] == pytest.approx(1.5)
    assert a["phenotype"] != b["phenotype"] and a["seed"] != b["seed"]
    assert (a["skin"], a["top"], a["hair"]) != (b["skin"], b["top"], b["hair"])
    for track, est in zip((a, b), estimated, strict=True):
        betas = np.array([track["phenotype"][k] for k in labels])
        assert np.all(np.abs(betas) <= 2.5)
        # far: the leading betas (size, build) on the other side of 0, by a margin.
        assert np.all(betas[:2] * np.sign(est[:2]) <= -0.8), (betas[:2], est[:2])


def test_smpl_regions_come_from_the_skinning_weights(smpl_model_dir):
    stage = _stage(smpl_model_dir, "smpl")
    regions = stage.regions
    part = np.asarray(PARTS)[regions.face_part]
    centroid = regions.rest[regions.faces].mean(axis=1)
    # Camera frame at rest (y down): head faces above the neck's, feet lowest, arms out.
    assert centroid[part == "head", 1].mean() < centroid[part == "neck", 1].mean() \
        < centroid[part == "torso", 1].mean() < centroid[part == "leg", 1].mean() \
        < centroid[part == "foot", 1].mean()
    assert np.abs(centroid[part == "arm", 0]).min() > 0.15
    assert not np.isin(part, ["lips", "cavity", "eye_front"]).any()  # SMPL has none
    ident = sample_identity(3, stage.palettes)
    painted = regions.paint(ident)
    reg = np.asarray(REGIONS)[painted.face_region]
    fc = painted.vertices(regions.rest)[painted.faces].mean(axis=1)
    assert fc[reg == "top", 1].mean() < fc[reg == "bottom", 1].mean() \
        < fc[reg == "shoe", 1].mean()
    stage.teardown()


def test_a_missing_model_file_is_a_clear_error(smpl_model_dir, tmp_path):
    # The synthetic folder holds the neutral files only.
    with pytest.raises(FileNotFoundError, match=r"body.model_path.*SMPL_FEMALE"):
        body = BodySection(model="smpl", model_path=smpl_model_dir, gender="female")
        RenderStage(RenderConfig(), RunSection(), shared={"body": body}).setup()
    with pytest.raises(FileNotFoundError, match="body.model_path"):
        body = BodySection(model="smplx", model_path=tmp_path / "nowhere")
        RenderStage(RenderConfig(), RunSection(), shared={"body": body}).setup()


def test_bodies_from_another_model_fail_the_video(smpl_model_dir, tmp_path):
    stage = _stage(smpl_model_dir, "smplx", identity="random")
    _write_fit(stage, tmp_path / "fit", np.zeros((1, 10), np.float32), (0.0,))
    with pytest.raises(VideoFailed, match="body model anny"):
        stage.process(_job(tmp_path, "a", body_model="anny"))
    with np.load(tmp_path / "fit/bodies.npz") as z:
        data = {k: z[k] for k in z.files}
    np.savez(tmp_path / "fit/bodies.npz", **{**data, "phenotype": np.zeros((1, 6), np.float32)})
    with pytest.raises(VideoFailed, match="another body model"):
        stage.process(_job(tmp_path, "b"))
    stage.teardown()
