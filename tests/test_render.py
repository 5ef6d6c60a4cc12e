"""render stage: avatars with new identities from a fitted body, plus the renderer and the
appearance sampler it is built from."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import RunSection
from pipeline.dataset import VideoItem
from pipeline.stage import VideoFailed, VideoJob
from pipeline.video import VideoWriter, iter_frames, probe
from stages.appearance import (
    PARTS,
    REGIONS,
    appearance_key,
    assign_identities,
    identity_seed,
    load_palettes,
    sample_identity,
)
from stages.body import COCO23
from stages.render import HIPS, RenderConfig, RenderStage
from stages.rendering import (
    LightEstimator,
    Lighting,
    MeshData,
    OffscreenRenderer,
    surround_light,
)

W, H, T = 160, 120, 8
CAMERA = np.array([150.0, 150.0, 80.0, 60.0], dtype=np.float32)
VIDEO_ID = "wave/clip_01"


def _config(**changes) -> RenderConfig:
    """Random identities and fixed light unless a test asks otherwise: the avatar's shape
    and colours are then known exactly (and no source video is needed)."""
    return RenderConfig(**{"identity": "random", "lighting": "fixed", **changes})


@pytest.fixture(scope="module")
def stage() -> RenderStage:
    s = RenderStage(_config(), RunSection(chunk_frames=3))
    s.setup()
    yield s
    s.teardown()


def _poses(stage: RenderStage, t: int) -> np.ndarray:
    """A waving left arm: the upper arm swings a little more every frame."""
    pose = np.zeros((t, stage.body.num_bones, 3), np.float32)
    arm = stage.body.bone_index("upperarm01.L")
    pose[:, arm, 1] = np.linspace(0.0, 0.8, t)
    return pose


def _real_joints(stage: RenderStage, pose, phen, orient, transl) -> np.ndarray:
    with torch.no_grad():
        out = stage.body.forward(torch.as_tensor(pose), torch.as_tensor(phen),
                                 torch.as_tensor(orient), torch.as_tensor(transl))
    return out["keypoints"].numpy()


def _write_fit(stage: RenderStage, fit_dir: Path, xs: list[float], phenotypes: np.ndarray,
               present: np.ndarray, track_ids: list[int],
               zs: list[float] | None = None) -> np.ndarray:
    """bodies.npz for people standing 3 m (or `zs`) in front of the camera at horizontal
    offsets `xs`; returns joints3d (T, P, 23, 3)."""
    p = len(xs)
    pose = np.repeat(_poses(stage, T)[:, None], p, axis=1)
    orient = np.zeros((T, p, 3), np.float32)
    transl = np.zeros((T, p, 3), np.float32)
    transl[..., 0] = np.asarray(xs, np.float32)
    transl[..., 1] = -0.02
    transl[..., 2] = np.asarray(zs if zs is not None else [3.0] * p, np.float32)
    joints = np.zeros((T, p, len(COCO23), 3), np.float32)
    for i in range(p):
        phen = np.repeat(phenotypes[i][None], T, axis=0)
        joints[:, i] = _real_joints(stage, pose[:, i], phen, orient[:, i], transl[:, i])
    fit_dir.mkdir(parents=True, exist_ok=True)
    np.savez(fit_dir / "bodies.npz", track_ids=np.asarray(track_ids, np.int32),
             present=present, pose=pose, root_orient=orient, transl=transl,
             phenotype=phenotypes.astype(np.float32), joints3d=joints,
             fit_error=np.where(present, 1.0, np.nan).astype(np.float32), camera=CAMERA)
    return joints


def _job(tmp: Path, name: str, frames: int = T) -> VideoJob:
    out = tmp / name
    out.mkdir(parents=True)
    video = {"width": W, "height": H, "fps_num": 25, "fps_den": 1, "frame_count": frames}
    return VideoJob(
        video=VideoItem(id=VIDEO_ID, path=tmp / "clip_01.mp4", rel_path="wave/clip_01.mp4"),
        # motion disabled: its bodies.npz is fit's, byte for byte
        inputs={"detect": tmp / "detect", "fit": tmp / "fit", "motion": tmp / "fit"},
        out_dir=out,
        run=RunSection(chunk_frames=3),
        upstream={"detect": {"video": video, "tracks": 1}},
    )


def _write_source(job: VideoJob, value: int | np.ndarray) -> None:
    """The source video the light is estimated from: T frames of one grey value (or one
    given frame)."""
    frame = np.broadcast_to(np.asarray(value, np.uint8), (H, W, 3))
    with VideoWriter(job.video.path, Fraction(25), W, H, kind="rgb") as src:
        src.write_chunk(np.repeat(frame[None], T, axis=0))


def _read(out: Path) -> tuple[np.ndarray, np.ndarray]:
    rgba = np.stack(list(iter_frames(out / "avatar.mkv", "rgba")))
    depth = np.stack(list(iter_frames(out / "depth.mkv", "gray16le")))
    return rgba, depth


def _project(points: np.ndarray) -> np.ndarray:
    fx, fy, cx, cy = CAMERA
    return np.stack([fx * points[..., 0] / points[..., 2] + cx,
                     fy * points[..., 1] / points[..., 2] + cy], -1)


def _own_phenotype(stage: RenderStage, seed: int, track_id: int) -> np.ndarray:
    """The phenotype the stage will draw for this track, so the 'real' body can be given
    the avatar's exact shape and keypoints can be checked pixel for pixel."""
    ident = sample_identity(identity_seed(seed, VIDEO_ID, track_id), stage.palettes)
    return ident.phenotype_vector(stage.body.phenotype_labels)


# ---------------------------------------------------------------------------- the stage


def test_avatar_covers_the_fitted_body_and_depth_is_metric(stage, tmp_path):
    present = np.ones((T, 1), bool)
    present[5] = False  # nobody in frame 5
    phen = _own_phenotype(stage, 0, 7)[None]
    joints = _write_fit(stage, tmp_path / "fit", [0.0], phen, present, [7])
    job = _job(tmp_path, "out")
    advanced: list[int] = []
    job.advance = advanced.append
    summary = stage.process(job)

    rgba, depth = _read(job.out_dir)
    assert rgba.shape == (T, H, W, 4) and depth.shape == (T, H, W)
    assert depth.dtype == np.uint16
    assert sum(advanced) == T
    info = probe(job.out_dir / "avatar.mkv")
    assert (info.fps_num, info.fps_den) == (25, 1)

    alpha = rgba[..., 3]
    names = ("left_shoulder", "right_shoulder", "left_hip", "right_hip", "left_knee",
             "right_knee", "nose", "left_elbow")
    for t in range(T):
        if t == 5:
            assert alpha[t].max() == 0 and depth[t].max() == 0
            continue
        uv = _project(joints[t, 0, [COCO23.index(n) for n in names]])
        for (u, v), n in zip(uv, names, strict=True):
            assert alpha[t, int(round(v)), int(round(u))] > 0, (t, n, u, v)
        hip_u, hip_v = np.rint(uv[2:4].mean(axis=0)).astype(int)
        # Hips are ~0.1 m behind the belly's surface.
        assert 2800 < int(depth[t, hip_v, hip_u]) < 3000
        for corner in ((0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1)):
            assert alpha[t][corner] == 0
        assert ((alpha[t] == 0) == (depth[t] == 0)).mean() > 0.99
        # The person is about 1.5-1.95 m tall at 3 m: 75-98 px of 120, feet in frame.
        rows = np.nonzero(alpha[t].max(axis=1))[0]
        assert 70 < rows.max() - rows.min() < 106 and rows.max() < H - 1

    # The waving arm moves the silhouette from frame to frame.
    assert (alpha[0] > 0).sum() != (alpha[7] > 0).sum()
    assert summary["tracks"] == 1
    assert 0.02 < summary["mean_coverage"] < 0.3
    assert summary["frames_with_avatar"] == T - 1
    with np.load(job.out_dir / "avatar_joints.npz") as z:
        drawn = z["joints3d"]
    assert np.isnan(drawn[5]).all() and np.isfinite(np.delete(drawn, 5, axis=0)).all()
    assert drawn.shape == joints.shape
    doc = json.loads((job.out_dir / "identities.json").read_text())
    track = doc["tracks"][0]
    assert track["track_id"] == 7 and track["seed"] == identity_seed(0, VIDEO_ID, 7)
    assert set(track["phenotype"]) == set(stage.body.phenotype_labels)


def test_clothes_and_skin_colours_show_up(stage, tmp_path):
    phen = _own_phenotype(stage, 0, 7)[None]
    _write_fit(stage, tmp_path / "fit", [0.0], phen, np.ones((T, 1), bool), [7])
    # Plain garments (textured patterns carry a fabric grain, tested below).
    pal = load_palettes()
    pal["clothing"]["top_patterns"] = [{"name": "solid"}]
    pal["clothing"]["bottom_patterns"] = [{"name": "solid"}]
    pal["clothing"]["bottoms"] = [{"name": "trousers", "length": 1.0}]
    palette = tmp_path / "plain.yaml"
    palette.write_text(yaml.safe_dump(pal))
    # Ambient light only: every pixel shows its region's colour unshaded.
    flat = RenderStage(_config(ambient=1.0, key_light=0.0, palette=palette),
                       RunSection(chunk_frames=3))
    flat.setup()
    job = _job(tmp_path, "out")
    flat.process(job)
    flat.teardown()
    rgba, _ = _read(job.out_dir)
    ident = json.loads((job.out_dir / "identities.json").read_text())["tracks"][0]
    opaque = rgba[0][rgba[0, ..., 3] == 255][:, :3].astype(int)
    for part in ("top", "bottom", "skin"):
        near = np.abs(opaque - np.asarray(ident[part]["rgb"])).max(axis=1) <= 4
        assert near.mean() > 0.04, part


@pytest.mark.parametrize("height", [0.0, 1.0])
def test_avatar_covers_the_real_person_at_its_image_size(stage, tmp_path, height):
    real = np.full((1, 6), 0.5, np.float32)
    real[0, 4] = height  # a very short or very tall real person; the avatar is drawn anew
    joints = _write_fit(stage, tmp_path / "fit", [0.0], real, np.ones((T, 1), bool), [3])
    job = _job(tmp_path, "out")
    stage.process(job)
    rgba, depth = _read(job.out_dir)
    kps = _project(joints[:, 0])
    hips = kps[:, [COCO23.index("left_hip"), COCO23.index("right_hip")]]
    ankles = kps[:, [COCO23.index("left_ankle"), COCO23.index("right_ankle")]]
    for t in range(T):
        u, v = np.rint(hips[t].mean(axis=0)).astype(int)
        assert rgba[t, v, u, 3] == 255  # the mid-hip stays on the real one's pixel
        assert depth[t, v, u] > 0
        rows = np.flatnonzero((rgba[t, ..., 3] > 0).any(axis=1))
        # Nose to ankles is ~85 % of a standing body's height in the image: the avatar,
        # whatever its own height, is drawn at the real person's size.
        real_px = ankles[t, :, 1].mean() - kps[t, COCO23.index("nose"), 1]
        assert 1.0 < (rows[-1] - rows[0] + 1) / real_px < 1.35

    # avatar_joints.npz: the avatar's keypoints as drawn (what the motion attackers read):
    # on the avatar's pixels, mid-hip on the real one's pixel, but the avatar's own bones.
    with np.load(job.out_dir / "avatar_joints.npz") as z:
        drawn, present = z["joints3d"], z["present"]
    assert drawn.shape == joints.shape and present.all() and np.isfinite(drawn).all()
    uv = _project(drawn[:, 0])
    np.testing.assert_allclose(uv[:, list(HIPS)].mean(1), hips.mean(1), atol=0.05)
    names = ("left_shoulder", "right_shoulder", "left_hip", "right_hip", "left_knee",
             "right_knee")
    for t in range(T):
        for n in names:
            u, v = np.rint(uv[t, COCO23.index(n)]).astype(int)
            assert rgba[t, v, u, 3] > 0, (t, n)
    hip, knee = COCO23.index("left_hip"), COCO23.index("left_knee")

    def thigh(j: np.ndarray) -> np.ndarray:
        return np.linalg.norm(j[:, 0, knee] - j[:, 0, hip], axis=-1)

    assert abs(thigh(drawn).mean() / thigh(joints).mean() - 1.0) > 0.03


def test_identities_are_seeded_and_differ_between_tracks(stage, tmp_path):
    phen = np.full((2, 6), 0.5, np.float32)
    present = np.ones((T, 2), bool)
    present[:2, 1] = False  # the second person walks in at frame 2
    joints = _write_fit(stage, tmp_path / "fit", [-0.6, 0.6], phen, present, [1, 2])

    def run(seed: int, name: str) -> tuple[dict, np.ndarray]:
        s = RenderStage(_config(seed=seed), RunSection(chunk_frames=3))
        s.setup()  # the body model is cached per process: cheap
        job = _job(tmp_path, name)
        s.process(job)
        rgba, _ = _read(job.out_dir)
        s.teardown()
        return json.loads((job.out_dir / "identities.json").read_text()), rgba

    a, rgba = run(0, "a")
    again, rgba_again = run(0, "again")
    other, _ = run(5, "other")
    assert a == again
    assert np.array_equal(rgba, rgba_again)
    assert a["tracks"] != other["tracks"]
    t1, t2 = a["tracks"]
    assert t1["seed"] != t2["seed"]
    assert t1["phenotype"] != t2["phenotype"]
    assert (t1["skin"], t1["top"], t1["bottom"]) != (t2["skin"], t2["top"], t2["bottom"])

    hips = _project(joints[..., [COCO23.index("left_hip"), COCO23.index("right_hip")], :]
                    .mean(axis=2))  # (T, 2, 2)
    for t in range(T):
        for p in range(2):
            u, v = np.rint(hips[t, p]).astype(int)
            assert (rgba[t, v, u, 3] > 0) == present[t, p], (t, p)


def test_no_people_gives_transparent_frames(stage, tmp_path):
    fit = tmp_path / "fit"
    fit.mkdir()
    j = stage.body.num_bones
    np.savez(fit / "bodies.npz", track_ids=np.zeros(0, np.int32),
             present=np.zeros((T, 0), bool), pose=np.zeros((T, 0, j, 3), np.float32),
             root_orient=np.zeros((T, 0, 3), np.float32),
             transl=np.zeros((T, 0, 3), np.float32), phenotype=np.zeros((0, 6), np.float32),
             joints3d=np.zeros((T, 0, 23, 3), np.float32),
             fit_error=np.zeros((T, 0), np.float32), camera=CAMERA)
    job = _job(tmp_path, "out")
    summary = stage.process(job)
    rgba, depth = _read(job.out_dir)
    assert rgba.shape == (T, H, W, 4)
    assert rgba.max() == 0 and depth.max() == 0
    assert summary["tracks"] == 0 and summary["mean_coverage"] == 0.0
    assert json.loads((job.out_dir / "identities.json").read_text())["tracks"] == []


def test_without_a_detect_summary_the_source_video_is_probed(stage, tmp_path):
    _write_fit(stage, tmp_path / "fit", [0.0], np.full((1, 6), 0.5, np.float32),
               np.ones((T, 1), bool), [0])
    job = _job(tmp_path, "out")
    job.upstream = {}
    with VideoWriter(job.video.path, Fraction(30000, 1001), W, H, kind="h264") as src:
        src.write_chunk(np.full((T, H, W, 3), 90, np.uint8))
    stage.process(job)
    rgba, _ = _read(job.out_dir)
    assert rgba.shape == (T, H, W, 4)
    info = probe(job.out_dir / "avatar.mkv")
    assert (info.fps_num, info.fps_den) == (30000, 1001)


def test_frame_count_mismatch_fails_the_video(stage, tmp_path):
    _write_fit(stage, tmp_path / "fit", [0.0], np.full((1, 6), 0.5, np.float32),
               np.ones((T, 1), bool), [0])
    with pytest.raises(VideoFailed, match="frames"):
        stage.process(_job(tmp_path, "out", frames=T + 2))


def test_missing_joints3d_falls_back_to_posing_the_real_body(stage, tmp_path):
    joints = _write_fit(stage, tmp_path / "fit", [0.0], np.full((1, 6), 0.5, np.float32),
                        np.ones((T, 1), bool), [0])
    with_joints = _job(tmp_path, "with")
    stage.process(with_joints)
    with np.load(tmp_path / "fit/bodies.npz") as z:
        data = {k: z[k] for k in z.files if k != "joints3d"}
    np.savez(tmp_path / "fit/bodies.npz", **data)
    job = _job(tmp_path, "out")
    stage.process(job)
    rgba, depth = _read(job.out_dir)
    expected, expected_depth = _read(with_joints.out_dir)
    u, v = np.rint(_project(joints[0, 0, [11, 12]]).mean(axis=0)).astype(int)
    assert rgba[0, v, u, 3] == 255
    # Re-posing the real body gives the keypoints fit would have stored: the same frames.
    assert np.abs(rgba.astype(int) - expected.astype(int)).mean() < 0.5
    assert np.abs(depth.astype(int) - expected_depth.astype(int)).max() <= 2


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        RenderConfig(key_direction=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        RenderConfig(identity="celebrity")
    with pytest.raises(ValueError):
        RenderConfig(unknown=1)
    with pytest.raises(ValueError):
        RenderConfig(light_gain=(1.5, 1.0))
    with pytest.raises(ValueError):
        RenderConfig(lighting="studio")
    with pytest.raises(ValueError):
        RenderConfig(far_gender_margin=0.6)
    assert RenderConfig().identity == "random" and RenderConfig().lighting == "estimated"


# ------------------------------------------------------------------------- the renderer


def _square(x: float, y: float, z: float, half: float, color=(200, 60, 30)) -> MeshData:
    v = np.array([[x - half, y - half, z], [x + half, y - half, z], [x + half, y + half, z],
                  [x - half, y + half, z]], np.float32)
    # Counter-clockwise as seen from the camera (OpenCV: y down, so the winding flips).
    faces = np.array([[0, 2, 1], [0, 3, 2]])
    return MeshData(v, faces, np.tile(np.array(color, np.uint8), (4, 1)))


def test_renderer_uses_the_opencv_camera_convention():
    with OffscreenRenderer(W, H) as r:
        fx, fy, cx, cy = 100.0, 90.0, 70.0, 50.0
        x, y, z = 0.3, -0.2, 2.0
        rgba, depth = r.render([_square(x, y, z, 0.05)], fx, fy, cx, cy)
        ys, xs = np.nonzero(rgba[..., 3] == 255)
        # Pixel centres at integers, as OpenCV projects.
        assert xs.mean() == pytest.approx(cx + fx * x / z, abs=0.3)
        assert ys.mean() == pytest.approx(cy + fy * y / z, abs=0.3)
        assert xs.max() - xs.min() + 1 == pytest.approx(fx * 0.1 / z, abs=1.0)
        assert np.allclose(depth[rgba[..., 3] == 255], z, atol=1e-3)
        assert depth[rgba[..., 3] == 0].max() == 0
        # Nearer meshes hide farther ones, whatever the order they come in.
        near = _square(0.3, -0.2, 1.5, 0.03, color=(20, 200, 20))
        rgba2, depth2 = r.render([near, _square(x, y, z, 0.05)], fx, fy, cx, cy)
        u, v = int(round(cx + fx * 0.3 / 1.5)), int(round(cy + fy * -0.2 / 1.5))
        assert rgba2[v, u, 1] > rgba2[v, u, 0] and depth2[v, u] == pytest.approx(1.5, abs=1e-3)
        empty_rgba, empty_depth = r.render([], fx, fy, cx, cy)
        assert empty_rgba.max() == 0 and empty_depth.max() == 0


def test_renderer_survives_another_pyrender_renderer_being_deleted():
    import pyrender

    with OffscreenRenderer(W, H) as r:
        first, _ = r.render([_square(0.0, 0.0, 2.0, 0.2)], 100, 100, 80, 60)
        # pyrender's EGL teardown terminates the display every context lives on.
        other = pyrender.OffscreenRenderer(32, 32)
        other.delete()
        again, _ = r.render([_square(0.0, 0.0, 2.0, 0.2)], 100, 100, 80, 60)
        assert np.array_equal(first, again)
        with OffscreenRenderer(2 * W, 2 * H) as big:  # another size, same context
            rgba, _ = big.render([_square(0.0, 0.0, 2.0, 0.2)], 200, 200, 160, 120)
            assert rgba.shape == (2 * H, 2 * W, 4) and rgba[120, 160, 3] == 255


def test_renderer_returns_straight_alpha_at_edges():
    with OffscreenRenderer(W, H) as r:
        flat = Lighting(ambient=1.0, key_intensity=0.0)
        # A square whose edges fall mid-pixel, so edge pixels are partly covered.
        rgba, _ = r.render([_square(0.013, 0.011, 2.0, 0.1037)], 100, 100, 80, 60, flat)
        a = rgba[..., 3]
        inner = rgba[a == 255][:, :3].astype(int)
        edge = rgba[(a > 40) & (a < 215)][:, :3].astype(int)
        assert len(edge) > 10
        # Premultiplied edges would be darker in proportion to their coverage.
        assert np.abs(edge - inner.mean(axis=0)).max() <= 12


# ---------------------------------------------------------------------- appearance


def test_identity_sampling_is_deterministic_and_in_range():
    pal = load_palettes()
    a = sample_identity(identity_seed(0, "v", 1), pal)
    assert a.to_dict() == sample_identity(identity_seed(0, "v", 1), pal).to_dict()
    assert identity_seed(0, "v", 1) != identity_seed(0, "v", 2) != identity_seed(1, "v", 1)
    ages, skins, genders = [], set(), []
    for i in range(200):
        ident = sample_identity(identity_seed(3, "v", i), pal)
        for key, value in ident.phenotype.items():
            assert 0.0 <= value <= 1.0, key
        ages.append(ident.age_years)
        genders.append(ident.phenotype["gender"])
        skins.add(ident.skin["fitzpatrick"])
        if ident.hair["name"] in ("grey", "white"):
            assert ident.age_years >= 40
    assert 18 <= min(ages) and max(ages) <= 70
    # Every skin type gets drawn, and both ends of the gender axis.
    assert skins == {1, 2, 3, 4, 5, 6}
    assert min(genders) < 0.2 and max(genders) > 0.8


def test_painting_follows_the_clothes(stage):
    regions = stage.regions
    ident = sample_identity(11, stage.palettes)
    long_ = _with(ident, top={"sleeve_length": 1.0, "sleeves": "long", "pattern": "solid"},
                  bottom={"length": 1.0, "style": "trousers"})
    short = _with(ident, top={"sleeve_length": 0.4, "sleeves": "short", "pattern": "solid"},
                  bottom={"length": 0.42, "style": "shorts"})

    def area(painted, region: str) -> float:
        v = painted.vertices(regions.rest)
        tri = v[painted.faces[painted.face_region == REGIONS.index(region)]]
        return float(np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]),
                                    axis=1).sum() / 2)

    pl, ps = regions.paint(long_), regions.paint(short)
    assert area(pl, "skin") < area(ps, "skin")
    assert area(pl, "top") > area(ps, "top") and area(pl, "bottom") > area(ps, "bottom")
    total = sum(area(pl, r) for r in REGIONS)
    # Cutting along hems adds vertices on edges but never changes the surface.
    faces = regions.faces
    tri = regions.rest[faces]
    rest_area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]),
                               axis=1).sum() / 2
    assert total == pytest.approx(rest_area, rel=1e-6)
    # Every painted vertex is a convex combination of model vertices.
    sums = np.asarray(pl.blend.sum(axis=1)).ravel()
    assert np.allclose(sums, 1.0) and pl.blend.min() >= 0
    # The face region is the identity's skin colour only where it should be: head, hands.
    colors = regions.colors(long_)
    assert tuple(colors[REGIONS.index("skin")]) == tuple(long_.skin["rgb"])
    assert (regions.face_part == PARTS.index("hand")).any()


def _with(ident, **changes):
    d = ident.to_dict()
    for key, upd in changes.items():
        d[key] = {**d[key], **upd}
    return type(ident)(**d)


# ------------------------------------------------------------------ identity policies


def test_far_identities_move_gender_and_build_away_from_the_real_person():
    pal = load_palettes()
    rng = np.random.default_rng(0)
    labels = ("gender", "age", "muscle", "weight", "height", "proportions")
    for i in range(60):
        est = dict(zip(labels, rng.uniform(0, 1, 6).round(3).tolist(), strict=True))
        if i == 0:
            est["gender"] = 0.5  # the fit's default: counted as the female side
        a, b = (assign_identities(4, "v", [i], pal, "far", [est], 0.2, 0.25)[0]
                for _ in range(2))
        assert a.to_dict() == b.to_dict()  # seedable
        g = a.phenotype["gender"]
        assert (g <= 0.3) if est["gender"] >= 0.5 else (g >= 0.7), (est, g)
        for label in ("weight", "muscle"):
            assert abs(a.phenotype[label] - est[label]) >= 0.25, (label, est, a.phenotype)
            assert 0.0 <= a.phenotype[label] <= 1.0
        if a.beard:
            assert g < 0.35
    # A random identity keeps its look when made far: only the body changes.
    plain = assign_identities(4, "v", [3], pal, "random")[0]
    far = assign_identities(4, "v", [3], pal, "far", [dict.fromkeys(labels, 0.5)])[0]
    assert appearance_key(plain) == appearance_key(far)
    assert plain.phenotype["age"] == far.phenotype["age"]
    assert plain.phenotype["gender"] != far.phenotype["gender"] or plain.phenotype[
        "gender"] < 0.3


def test_tracks_never_share_a_look():
    pal = load_palettes()
    many = assign_identities(1, "crowd", list(range(80)), pal, "far", [{}] * 80)
    assert len({appearance_key(i) for i in many}) == 80
    # A palette with exactly three looks: three tracks take all three, a fourth cannot.
    tiny = {**pal, "skin_tones": pal["skin_tones"][:1], "hair_colors": pal["hair_colors"][:1],
            "hair_styles": pal["hair_styles"][:1], "head_covers": [{"name": "none"}],
            "clothing": {**pal["clothing"], "top_colors": pal["clothing"]["top_colors"][:3],
                         "top_patterns": pal["clothing"]["top_patterns"][:1]}}
    three = assign_identities(0, "v", [5, 6, 7], tiny)
    assert sorted(i.top["name"] for i in three) == sorted(
        c["name"] for c in tiny["clothing"]["top_colors"])
    assert three[0].to_dict() == sample_identity(identity_seed(0, "v", 5), tiny).to_dict()
    with pytest.raises(ValueError, match="no new look"):
        assign_identities(0, "v", [5, 6, 7, 8], tiny, max_attempts=50)


def test_far_policy_in_the_stage(tmp_path):
    real = np.array([[0.9, 0.5, 0.7, 0.8, 0.4, 0.5], [0.1, 0.5, 0.2, 0.3, 0.4, 0.5]],
                    np.float32)
    far_stage = RenderStage(_config(identity="far"), RunSection(chunk_frames=3))
    far_stage.setup()
    _write_fit(far_stage, tmp_path / "fit", [-0.6, 0.6], real, np.ones((T, 2), bool),
               [1, 2])
    job = _job(tmp_path, "out")
    far_stage.process(job)
    far_stage.teardown()
    doc = json.loads((job.out_dir / "identities.json").read_text())
    labels = doc["phenotype_labels"]
    for track, est in zip(doc["tracks"], real, strict=True):
        e = dict(zip(labels, est.tolist(), strict=True))
        assert track["estimated_phenotype"]["gender"] == pytest.approx(e["gender"], abs=1e-4)
        g = track["phenotype"]["gender"]
        assert (g <= 0.3) if e["gender"] >= 0.5 else (g >= 0.7)
        assert abs(track["phenotype"]["weight"] - e["weight"]) >= 0.2


def test_random_policy_ignores_the_real_body(tmp_path):
    """The default draws each avatar independently of the real person: two real people of
    opposite gender and build get the same avatar bodies, so the output's bodies say
    nothing about theirs (a far body would say it by inversion)."""
    stage = RenderStage(RenderConfig(lighting="fixed"), RunSection(chunk_frames=3))  # default
    stage.setup()
    bodies = []
    for k, real in enumerate((np.array([[0.9, 0.5, 0.7, 0.8, 0.4, 0.5]] * 2, np.float32),
                              np.array([[0.1, 0.5, 0.2, 0.3, 0.4, 0.5]] * 2, np.float32))):
        case = tmp_path / f"case{k}"
        _write_fit(stage, case / "fit", [-0.6, 0.6], real, np.ones((T, 2), bool), [1, 2])
        job = _job(case, "out")
        stage.process(job)
        doc = json.loads((job.out_dir / "identities.json").read_text())
        assert [t["estimated_phenotype"]["gender"] for t in doc["tracks"]] == pytest.approx(
            [real[0, 0]] * 2, abs=1e-4)
        bodies.append([t["phenotype"] for t in doc["tracks"]])
    stage.teardown()
    assert bodies[0] == bodies[1]


# ------------------------------------------------------------------------- lighting


def test_surround_light_reads_level_and_direction():
    frame = np.zeros((H, W, 3), np.uint8)
    frame[:, W // 2:] = 220  # bright on the right
    lum, dx, dy = surround_light(frame, (60, 30, 100, 90))
    assert dx > 0.9 and abs(dy) < 0.05 and 0.1 < lum < 0.5
    est = LightEstimator(Lighting(), smoothing=0.5)
    light = est.update(frame, (60, 30, 100, 90))
    assert light.key_direction[0] < 0  # travels left: comes from the bright right
    # Smoothing: one dark frame only halves the way to darkness.
    dark = est.update(np.zeros_like(frame), (60, 30, 100, 90))
    assert 0 < dark.ambient < light.ambient
    assert dark.ambient >= Lighting().ambient * est.gain_range[0] - 1e-9
    top = np.zeros((H, W, 3), np.uint8)
    top[: H // 2] = 200
    down = LightEstimator(Lighting()).update(top, (60, 30, 100, 90))
    assert down.key_direction[1] > 0.5  # from above


def test_a_dark_video_gives_a_darker_avatar_never_black_nor_white(stage, tmp_path):
    _write_fit(stage, tmp_path / "fit", [0.0], np.full((1, 6), 0.5, np.float32),
               np.ones((T, 1), bool), [4])
    est = RenderStage(_config(lighting="estimated"), RunSection(chunk_frames=3))
    est.setup()
    lum = {}
    for name, grey in (("dark", 12), ("mid", 110), ("bright", 250)):
        job = _job(tmp_path, name)
        _write_source(job, grey)
        summary = est.process(job)
        rgba, _ = _read(job.out_dir)
        body = rgba[..., :3][rgba[..., 3] == 255].astype(float)
        luma = body @ [0.2126, 0.7152, 0.0722]
        lum[name] = float(luma.mean())
        assert summary["lighting"] == "estimated" and summary["mean_light_gain"] > 0
        assert np.median(luma) > 25, name  # never black
        assert (body.max(axis=1) >= 254).mean() < 0.1, name  # never washed out
    est.teardown()
    assert lum["dark"] < lum["mid"] < lum["bright"]
    assert lum["bright"] / lum["dark"] > 1.5


def test_estimated_lighting_needs_the_source(tmp_path):
    s = RenderStage(_config(lighting="estimated"), RunSection(chunk_frames=3))
    s.setup()
    _write_fit(s, tmp_path / "fit", [0.0], np.full((1, 6), 0.5, np.float32),
               np.ones((T, 1), bool), [0])
    with pytest.raises(VideoFailed, match="source"):
        s.process(_job(tmp_path, "out"))  # no source video written
    s.teardown()


# -------------------------------------------------------------- several people


def test_nearer_avatar_hides_the_farther_one_and_instances_say_who(stage, tmp_path):
    # Track 10 (slot 0) 4 m away, track 20 (slot 1) 3 m away and 5 cm to the side.
    phen = np.full((2, 6), 0.5, np.float32)
    present = np.ones((T, 2), bool)
    present[6:, 1] = False  # the near person leaves
    joints = _write_fit(stage, tmp_path / "fit", [0.0, 0.05], phen, present, [10, 20],
                        zs=[4.0, 3.0])
    job = _job(tmp_path, "out")
    stage.process(job)
    rgba, depth = _read(job.out_dir)
    inst = np.stack(list(iter_frames(job.out_dir / "instances.mkv", "gray")))
    assert inst.shape == (T, H, W) and set(np.unique(inst)) <= {0, 1, 2}
    # The far person's chest, straight behind the near one's body.
    chest = joints[:, 0, [COCO23.index("left_shoulder"), COCO23.index("right_shoulder"),
                          COCO23.index("left_hip"), COCO23.index("right_hip")]].mean(axis=1)
    for t in range(T):
        u, v = np.rint(_project(chest[t])).astype(int)
        if present[t, 1]:
            # Depths scale with each avatar's size relative to the real person (render
            # keeps the image size), so they are near, not at, 3 m and 4 m.
            assert inst[t, v, u] == 2 and 2400 < int(depth[t, v, u]) < 3500, t
        else:
            assert inst[t, v, u] == 1 and 3500 < int(depth[t, v, u]) < 4700, t
        both = (inst[t] > 0) & (rgba[t, ..., 3] == 255)
        # Instances cover what was drawn (up to antialiased edges), nothing else.
        assert ((inst[t] > 0) == (rgba[t, ..., 3] > 0)).mean() > 0.99
        near = depth[t][inst[t] == 2].astype(int)
        far = depth[t][inst[t] == 1].astype(int)
        assert both.any() and far.min() > 3300
        if present[t, 1]:
            assert near.max() < far.min()
    # Both people are seen in a frame where they overlap.
    assert (inst[0] == 1).sum() > 50 and (inst[0] == 2).sum() > 50


def test_renderer_instance_ids_follow_the_depth_test():
    with OffscreenRenderer(W, H) as r:
        far = _square(0.0, 0.0, 3.0, 0.3, color=(200, 0, 0))
        near = _square(0.1, 0.0, 2.0, 0.1, color=(0, 200, 0))
        rgba, depth, inst = r.render_instances([near, far], 100, 100, 80, 60)
        assert inst[60, 85] == 1 and inst[60, 73] == 2 and inst[5, 5] == 0
        assert depth[60, 85] == pytest.approx(2.0, abs=1e-3)
        plain, _ = r.render([near, far], 100, 100, 80, 60)
        assert np.array_equal(plain, rgba)


def _area(painted, regions, region: str) -> float:
    v = painted.vertices(regions.rest)
    tri = v[painted.faces[painted.face_region == REGIONS.index(region)]]
    return float(np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]),
                                axis=1).sum() / 2)


def test_head_covers_hide_hair_and_ears_not_the_face(stage):
    regions = stage.regions
    ident = _with(sample_identity(11, stage.palettes), hair={"style": "long"})
    red = {"name": "red", "rgb": [180, 30, 36]}
    bare, beanie, scarf = (regions.paint(_with(ident, head_cover={"style": s, **red}))
                           for s in ("none", "beanie", "headscarf"))
    assert _area(bare, regions, "head_cover") == 0
    assert 0 < _area(beanie, regions, "hair") < _area(bare, regions, "hair")
    assert _area(scarf, regions, "hair") < _area(beanie, regions, "hair")
    assert _area(scarf, regions, "head_cover") > _area(beanie, regions, "head_cover") > 0.01
    # The face stays free: eyes, lips and the skin around them.
    for name in ("iris", "lips", "brow"):
        assert _area(scarf, regions, name) == pytest.approx(_area(bare, regions, name))
    c = regions.rest[regions.faces].mean(axis=1)
    assert tuple(regions.colors(_with(ident, head_cover={"style": "beanie", **red}))[
        REGIONS.index("head_cover")]) == (180, 30, 36)
    # Ears (the widest part of the head) are under the scarf.
    v = scarf.vertices(regions.rest)
    fc = v[scarf.faces].mean(axis=1)
    head_x = np.abs(c[regions.face_part == PARTS.index("head"), 0]).max()
    ears = (np.abs(fc[:, 0]) > 0.95 * head_x) & (fc[:, 1] < regions.kp["left_shoulder"][1] - 0.1)
    assert ears.sum() > 5
    assert (scarf.face_region[ears] == REGIONS.index("head_cover")).mean() > 0.9
    covers = {sample_identity(identity_seed(2, "v", i), stage.palettes).head_cover["style"]
              for i in range(60)}
    assert covers == {"none", "beanie", "headscarf"}


# ------------------------------------------------------------------ garments, patterns


def _render_one(stage, ident, pose: np.ndarray, orient, size=(200, 300), focal=330.0):
    """One avatar at 3 m, fixed flat light: RGBA and the COCO-23 keypoints (camera)."""
    from stages.rendering import vertex_normals

    body = stage.body
    with torch.no_grad():
        out = body.forward(torch.as_tensor(pose)[None],
                           torch.as_tensor(ident.phenotype_vector(body.shape_labels))[None],
                           torch.tensor([orient], dtype=torch.float32),
                           torch.tensor([[0.0, 0.0, 3.0]]))
    v, kps = out["vertices"][0].numpy(), out["keypoints"][0].numpy()
    pm = stage.regions.paint(ident)
    pv = pm.vertices(v)
    mesh = MeshData(pv, pm.faces, pm.colors, uv=pm.uv, texture=pm.texture,
                    normals=pm.normals(pv, vertex_normals(v, body.faces)))
    w, h = size
    with OffscreenRenderer(w, h) as r:
        rgba, _ = r.render([mesh], focal, focal, w / 2, h / 2 - 20,
                           Lighting(ambient=1.0, key_intensity=0.0))
    return rgba, kps, focal, (w / 2, h / 2 - 20)


def test_a_skirt_spans_the_gap_between_the_legs_in_a_stride(stage):
    body = stage.body
    pose = np.zeros((body.num_bones, 3), np.float32)
    pose[body.bone_index("upperleg01.L"), 0] = -0.5  # a walking stride, seen from the side
    pose[body.bone_index("upperleg01.R"), 0] = 0.5
    base = sample_identity(11, stage.palettes)
    looks = {
        "trousers": _with(base, bottom={"style": "trousers", "length": 1.0}),
        "skirt": _with(base, bottom={"style": "midi-skirt", "garment": "skirt",
                                     "length": 0.75, "flare": 0.2}),
    }
    gap = {}
    for name, ident in looks.items():
        rgba, kps, f, (cx, cy) = _render_one(stage, ident, pose, [0.0, np.pi / 2, 0.0])
        k = {n: kps[COCO23.index(n)] for n in COCO23}
        line = np.linspace(k["left_knee"], k["right_knee"], 25)[4:-4]  # between the knees
        u = np.rint(f * line[:, 0] / line[:, 2] + cx).astype(int)
        v = np.rint(f * line[:, 1] / line[:, 2] + cy).astype(int)
        gap[name] = float((rgba[v, u, 3] == 0).mean())
        if name == "skirt":
            ident_rgb = np.asarray(ident.bottom["rgb"])
            assert np.abs(rgba[v, u, :3].astype(int) - ident_rgb).max() <= 4
    assert gap["trousers"] > 0.5  # trousers leave the gap between the legs open
    assert gap["skirt"] == 0.0  # the skirt's cloth covers it


def test_bottoms_include_skirts_and_dresses_in_the_tops_colour():
    pal = load_palettes()
    idents = [sample_identity(identity_seed(2, "v", i), pal) for i in range(300)]
    styles = {i.bottom["style"] for i in idents}
    assert {"trousers", "shorts", "skirt", "dress"} <= styles
    for ident in idents:
        if ident.bottom["style"] == "dress":
            assert ident.bottom["garment"] == "skirt" and ident.bottom["rgb"] == ident.top["rgb"]
        assert (ident.bottom.get("garment") == "skirt") == ("skirt" in ident.bottom["style"]
                                                           or ident.bottom["style"] == "dress")


def _chest_line(rgba, kps, focal, centre, n=80):
    """Pixels (n, 3) along a horizontal line across the chest, inside the shoulders."""
    k = {name: kps[COCO23.index(name)] for name in COCO23}
    shoulder = (k["left_shoulder"] + k["right_shoulder"]) / 2
    hip = (k["left_hip"] + k["right_hip"]) / 2
    y = shoulder + 0.35 * (hip - shoulder)
    half = 0.6 * (k["left_shoulder"] - k["right_shoulder"]) / 2
    pts = np.linspace(y - half, y + half, n)
    u = np.rint(focal * pts[:, 0] / pts[:, 2] + centre[0]).astype(int)
    v = np.rint(focal * pts[:, 1] / pts[:, 2] + centre[1]).astype(int)
    assert (rgba[v, u, 3] == 255).all()
    metres = float(np.linalg.norm(pts[-1] - pts[0]))
    return rgba[v, u, :3].astype(int), metres


def test_uv_patterns_show_at_their_period_and_differ(stage):
    pose = np.zeros((stage.body.num_bones, 3), np.float32)
    base = sample_identity(21, stage.palettes)
    black, white = [20, 20, 20], [235, 235, 235]
    runs, images = {}, {}
    for pattern, period in (("checks", 0.04), ("checks", 0.1), ("dots", 0.05),
                            ("plaid", 0.1)):
        ident = _with(base, top={"pattern": pattern, "stripe_period": period, "rgb": black,
                                 "rgb2": white, "sleeves": "long", "sleeve_length": 1.0},
                      head_cover={"style": "none"})
        assert "top" in stage.regions.textures(ident)
        rgba, kps, f, c = _render_one(stage, ident, pose, [0.0, 0.0, 0.0], size=(240, 400),
                                      focal=600.0)
        images[(pattern, period)] = rgba
        if pattern == "checks":
            line, metres = _chest_line(rgba, kps, f, c)
            # Pixels are mostly one of the two colours (grain, filtering at the edges).
            light = line.mean(axis=1) > 128
            assert (np.abs(line - np.where(light[:, None], white, black)) < 60).mean() > 0.75
            changes = int((light[1:] != light[:-1]).sum())
            runs[period] = changes
            # About one change per period/2 of chest width (the UV layout stretches a bit).
            expected = metres / (period)
            assert 0.4 * expected < changes < 2.0 * expected + 1, (period, changes, expected)
    assert runs[0.04] > 1.5 * runs[0.1]
    # Different patterns (same colours) look different on the torso.
    torso = (slice(100, 220), slice(80, 160))
    a, b = images[("dots", 0.05)][torso], images[("plaid", 0.1)][torso]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 20


def test_pattern_tiles_repeat_at_their_period():
    from stages.appearance import TEXTURE_PATTERNS, pattern_tile

    # 2 m of body across the tile: a 0.1 m check is 25.6 texels.
    tile = pattern_tile("checks", 0.1, [0, 0, 0], [255, 255, 255], 2.0, seed=1, size=512)
    row = tile[10, :, 0] > 128
    assert int((row[1:] != row[:-1]).sum()) == pytest.approx(2.0 / 0.1, abs=1)
    tiles = {p: pattern_tile(p, 0.08, [200, 40, 40], [40, 40, 200], 2.0, 3, 128)
             for p in TEXTURE_PATTERNS}
    for p, t in tiles.items():
        assert t.shape == (128, 128, 3) and t.dtype == np.uint8
        assert t.std() > 3, p  # never flat
    keys = list(tiles)
    for i, p in enumerate(keys):
        for q in keys[i + 1:]:
            assert np.abs(tiles[p].astype(int) - tiles[q].astype(int)).mean() > 5, (p, q)
    with pytest.raises(ValueError):
        pattern_tile("stripes", 0.1, [0, 0, 0], [1, 1, 1], 2.0, 0)


def test_smpl_bodies_have_no_uv_so_patterns_are_plain(smpl_model_dir):
    from stages.appearance import BodyRegions
    from stages.smpl_family import SmplFamilyBody

    regions = BodyRegions.from_body(SmplFamilyBody("smpl", smpl_model_dir))
    ident = _with(sample_identity(4, load_palettes()), top={"pattern": "plaid",
                                                              "stripe_period": 0.1})
    assert regions.textures(ident) == {}
    painted = regions.paint(ident)
    assert painted.texture is None and painted.uv is None
    top = painted.colors[painted.faces[painted.face_region == REGIONS.index("top")]]
    assert (top == np.asarray(ident.top["rgb"])).all()
