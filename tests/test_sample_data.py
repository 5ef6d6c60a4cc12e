"""The generated sample dataset: files, ground truth, determinism, actions, detectability."""

from __future__ import annotations

import csv
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.video import count_frames, iter_frames, probe
from stages.sample_data import generate_sample

# COCO-23 indices.
NOSE, L_SHOULDER, R_SHOULDER, L_WRIST, R_WRIST, L_HIP, R_HIP = 0, 5, 6, 9, 10, 11, 12
DEFAULT_ACTIONS = ("wave", "squat", "walk_across", "raise_both_arms")
SMALL = dict(videos=2, seed=5, width=160, height=120, frames=12, fps=12, progress=False)
# The four default actions at the default frame size; 16 frames at 6 fps cover more than
# one cycle of every action at any tempo, so each clip shows its whole movement.
FULL = dict(videos=4, seed=0, width=320, height=240, frames=16, fps=6, progress=False)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("sample_small")
    return out, generate_sample(out, **SMALL)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("sample_full")
    return out, generate_sample(out, **FULL)


def _gt(root: Path, item: dict) -> dict[str, np.ndarray]:
    with np.load(root / item["path"].replace(".mp4", ".gt.npz")) as z:
        return {k: z[k] for k in z.files}


def test_files_and_manifest(small: tuple[Path, list[dict]]) -> None:
    root, items = small
    assert [it["label"] for it in items] == ["wave", "squat"]
    for it in items:
        video = root / it["path"]
        assert video.parent.name == it["label"]  # class-per-folder
        for suffix in (".mp4", ".gt.npz", ".json"):
            assert (root / it["path"].replace(".mp4", suffix)).is_file()
    with (root / "manifest.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path", "label", "split"]
    assert [r[0] for r in rows[1:]] == [it["path"] for it in items]
    assert all(r[2] in ("train", "test") for r in rows[1:])
    assert not list(root.rglob(".*partial*")), "temporary files left behind"


def test_videos_keep_size_fps_and_frame_count(small: tuple[Path, list[dict]]) -> None:
    root, items = small
    for it in items:
        info = probe(root / it["path"])
        assert (info.width, info.height) == (SMALL["width"], SMALL["height"])
        assert info.fps == Fraction(SMALL["fps"])
        assert info.codec == "h264"
        assert count_frames(root / it["path"]) == SMALL["frames"]
        frame = next(iter_frames(root / it["path"]))
        assert frame.std() > 10, "frame is blank"


def test_ground_truth_shapes_and_projection(small: tuple[Path, list[dict]]) -> None:
    root, items = small
    t = SMALL["frames"]
    for it in items:
        gt = _gt(root, it)
        assert gt["joints2d"].shape == (t, 23, 2)
        assert gt["joints3d"].shape == (t, 23, 3)
        assert gt["phenotype"].shape == (6,)
        assert gt["intrinsics"].shape == (3, 3)
        assert gt["boxes"].shape == (t, 4)
        z = gt["joints3d"][..., 2]
        assert (z > 1.5).all() and (z < 8).all(), "person should stand a few metres away"
        # joints2d is the pinhole projection of joints3d with the stored intrinsics.
        k = gt["intrinsics"]
        proj = gt["joints3d"] @ k.T
        np.testing.assert_allclose(proj[..., :2] / proj[..., 2:], gt["joints2d"], atol=1e-2)
        fx, fy, cx, cy = gt["camera"]
        assert (fx, fy, cx, cy) == (k[0, 0], k[1, 1], k[0, 2], k[1, 2])
        # The whole body (every vertex) stays inside the frame.
        boxes = gt["boxes"]
        assert (boxes[:, :2] >= 0).all()
        assert (boxes[:, 2] < SMALL["width"]).all() and (boxes[:, 3] < SMALL["height"]).all()
        # A person fills a good part of the frame height.
        assert ((boxes[:, 3] - boxes[:, 1]) > 0.4 * SMALL["height"]).all()


def test_body_parameters_reproduce_joints(small: tuple[Path, list[dict]]) -> None:
    """pose, root_orient, transl and phenotype put through the body model give joints3d."""
    import torch

    from stages.body import load_body

    root, items = small
    body = load_body()
    gt = _gt(root, items[1])
    t = len(gt["pose"])
    with torch.no_grad():
        out = body(torch.from_numpy(gt["pose"]),
                   torch.from_numpy(np.repeat(gt["phenotype"][None], t, 0)),
                   root_orient=torch.from_numpy(gt["root_orient"]),
                   transl=torch.from_numpy(gt["transl"]))
    np.testing.assert_allclose(out["keypoints"].numpy(), gt["joints3d"], atol=2e-3)


def test_metadata_describes_person_room_and_camera(small: tuple[Path, list[dict]]) -> None:
    root, items = small
    for it in items:
        meta = json.loads((root / it["path"].replace(".mp4", ".json")).read_text())
        assert meta["action"] == meta["label"] == it["label"]
        person = meta["person"]
        assert person["id"].startswith("person_")
        assert person["gender"] in ("female", "male")
        for key in ("age_group", "skin_tone", "build", "hair"):
            assert isinstance(person[key], str) and person[key]
        assert set(person["clothing"]) >= {"top", "bottom", "shoes", "sleeves"}
        kinds = {item["kind"] for item in meta["room"]["sensitive_items"]}
        assert {"poster_face", "notice_text"} <= kinds
        assert meta["camera"]["name"] in ("static", "pan")
        assert meta["seed"] == SMALL["seed"]
        gt = _gt(root, it)
        assert np.allclose(
            [person["phenotype"][k] for k in gt["phenotype_labels"]], gt["phenotype"], atol=1e-3)
    # Two videos, two different identities, static and panning cameras.
    assert items[0]["person"]["id"] != items[1]["person"]["id"]
    assert {it["camera"]["name"] for it in items} == {"static", "pan"}


def test_same_seed_same_data_other_seed_other_data(
        small: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root, items = small
    again = generate_sample(tmp_path / "again", **SMALL)
    other = generate_sample(tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1})
    for a, b, c in zip(items, again, other, strict=True):
        ga, gb, gc = _gt(root, a), _gt(tmp_path / "again", b), _gt(tmp_path / "other", c)
        for key in ("joints2d", "joints3d", "pose", "phenotype"):
            np.testing.assert_array_equal(ga[key], gb[key])
        assert a["person"] == b["person"] and a["room"] == b["room"]
        assert not np.allclose(ga["joints3d"], gc["joints3d"], atol=1e-2)
    assert (root / "manifest.csv").read_text() == (tmp_path / "again/manifest.csv").read_text()


def _motion(gt: dict[str, np.ndarray]) -> np.ndarray:
    """Joints relative to the mid-hip and scaled by the torso length: the motion without
    position and body size."""
    j = gt["joints3d"]
    hips = j[:, [L_HIP, R_HIP]].mean(1, keepdims=True)
    torso = np.linalg.norm(j[:, [L_SHOULDER, R_SHOULDER]].mean(1) - hips[:, 0], axis=1)
    return (j - hips) / torso.mean()


def test_actions_move_as_scripted(full: tuple[Path, list[dict]]) -> None:
    root, items = full
    by_action = {it["label"]: _gt(root, it) for it in items}
    assert tuple(by_action) == DEFAULT_ACTIONS
    # Image y points down: "above" means a smaller y in camera coordinates.
    wave = by_action["wave"]["joints3d"]
    hand = R_WRIST if items[0]["person"]["handedness"] == "right" else L_WRIST
    other = L_WRIST if hand == R_WRIST else R_WRIST
    assert (wave[:, hand, 1] < wave[:, NOSE, 1]).all(), "the waving hand is above the head"
    assert (wave[:, other, 1] > wave[:, L_SHOULDER, 1]).all(), "the other arm hangs"
    assert np.ptp(wave[:, hand, 0]) > 0.1, "the waving hand swings sideways"
    squat = by_action["squat"]["joints3d"]
    hip_y = squat[:, [L_HIP, R_HIP], 1].mean(1)
    assert np.ptp(hip_y) > 0.25, "the hips go down and up"
    walk = by_action["walk_across"]["joints3d"]
    assert np.ptp(walk[:, [L_HIP, R_HIP], 0].mean(1)) > 1.0, "the walker crosses the room"
    arms = by_action["raise_both_arms"]["joints3d"]
    up = (arms[:, L_WRIST, 1] < arms[:, NOSE, 1]) & (arms[:, R_WRIST, 1] < arms[:, NOSE, 1])
    down = (arms[:, L_WRIST, 1] > arms[:, L_SHOULDER, 1]) & \
        (arms[:, R_WRIST, 1] > arms[:, R_SHOULDER, 1])
    assert up.any() and down.any(), "both arms go up over the head and come down"
    # Pairwise, the actions' normalized motions differ clearly.
    motions = {a: _motion(g) for a, g in by_action.items()}
    for i, a in enumerate(DEFAULT_ACTIONS):
        for b in DEFAULT_ACTIONS[i + 1:]:
            gap = np.linalg.norm(motions[a] - motions[b], axis=-1).mean()
            assert gap > 0.1, f"{a} and {b} move alike ({gap:.3f})"


def test_blazepose_detects_every_action(full: tuple[Path, list[dict]]) -> None:
    """The pipeline's detector must find the generated people: BlazePose on the middle
    frame of each default action, with its landmarks on the ground-truth joints."""
    mp = pytest.importorskip("mediapipe")
    from stages.body import BLAZEPOSE_FOR_COCO23

    root, items = full
    coco = [i for i, b in enumerate(BLAZEPOSE_FOR_COCO23) if 0 <= b and i <= 16]
    with mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1) as pose:
        for it in items:
            frames = list(iter_frames(root / it["path"]))
            mid = len(frames) // 2
            result = pose.process(frames[mid])
            assert result.pose_landmarks is not None, f"no person found in {it['path']}"
            h, w = frames[mid].shape[:2]
            lm = np.array([[p.x * w, p.y * h] for p in result.pose_landmarks.landmark])
            gt = _gt(root, it)
            err = np.linalg.norm(lm[[BLAZEPOSE_FOR_COCO23[i] for i in coco]]
                                 - gt["joints2d"][mid, coco], axis=1)
            height = gt["boxes"][mid, 3] - gt["boxes"][mid, 1]
            assert np.median(err) < 0.1 * height, f"{it['path']}: landmarks off the person"


def test_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="videos"):
        generate_sample(tmp_path, videos=0, progress=False)
    with pytest.raises(ValueError, match="frames"):
        generate_sample(tmp_path, videos=1, frames=0, progress=False)
