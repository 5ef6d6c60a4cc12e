"""The generated sample dataset: files, ground truth, determinism, actions, detectability."""

from __future__ import annotations

import copy
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


# ----------------------------------------------------------------------------- benchmark

# 8 frames at 5 fps cover a cycle of both actions at the slowest tempo.
BENCH = dict(people=4, repetitions=2, actions=["wave", "walk_across"], width=64, height=48,
             frames=8, fps=5, seed=3, progress=False)


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    from stages.sample_data import generate_benchmark

    out = tmp_path_factory.mktemp("bench")
    return out, generate_benchmark(out, **BENCH)


def test_benchmark_layout_splits_and_labels(bench: tuple[Path, list[dict]]) -> None:
    from privacy.labels import load_labels

    root, items = bench
    assert len(items) == 4 * 2 * 2
    with (root / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [it["path"] for it in items]
    for row, it in zip(rows, items, strict=True):
        meta = json.loads((root / it["path"].replace(".mp4", ".json")).read_text())
        assert row["label"] == meta["action"] and row["split"] == meta["split"]
        # The last repetition of each (person, action) is the test split.
        assert meta["split"] == ("test" if meta["repetition"] == 1 else "train")
        assert Path(it["path"]).parent.name == meta["action"]
        assert (root / it["path"]).is_file() and (root / it["path"].replace(".mp4", ".gt.npz")
                                                  ).is_file()
    table = load_labels(root)
    assert table.classes["identity"] == [f"person_{i:02d}" for i in range(4)]
    assert table.actions == sorted(BENCH["actions"])
    for split in ("train", "test"):
        videos = table.split(split)
        # Closed set: every person, and every action of theirs, is in both splits.
        assert {(v.attributes["identity"], v.action) for v in videos} == \
            {(f"person_{i:02d}", a) for i in range(4) for a in BENCH["actions"]}
        assert {v.repetition for v in videos} == ({1} if split == "test" else {0})
    # Stratified: 4 people give both genders twice and at least two classes of the rest.
    genders = [table.by_id()[f"wave/wave_person_{i:02d}_r0"].attributes["gender"]
               for i in range(4)]
    assert sorted(genders) == ["female", "female", "male", "male"]
    for attr in ("age_group", "skin_tone", "build"):
        assert len(table.classes[attr]) >= 2, attr
    summary = json.loads((root / "benchmark.json").read_text())
    assert summary["settings"]["people"] == 4 and summary["splits"] == {"train": 8, "test": 8}
    assert set(summary["people"]) == set(table.classes["identity"])


def test_benchmark_people_keep_body_clothing_and_style(bench: tuple[Path, list[dict]]) -> None:
    root, items = bench
    summary = json.loads((root / "benchmark.json").read_text())
    seen: dict[str, list[dict]] = {}
    for it in items:
        seen.setdefault(it["person"]["id"], []).append(it)
    for pid, videos in seen.items():
        person = summary["people"][pid]
        assert {"slouch", "knee_bend", "arm_swing", "asymmetry"} <= set(person["style"])
        for it in videos:
            # Body, clothing, attributes and style are the person's in every video.
            assert {k: v for k, v in it["person"].items() if k != "id"} == person
            gt = _gt(root, it)
            assert np.allclose([person["phenotype"][k] for k in gt["phenotype_labels"]],
                               gt["phenotype"], atol=1e-3)
            # The repetition's style is the person's with small jitter.
            used = it["motion_style"]
            assert abs(used["tempo"] / person["style"]["tempo"] - 1) <= 0.031
            assert abs(used["knee_bend"] - person["style"]["knee_bend"]) <= 0.08 * 14 + 1e-3
        # Repetitions differ: other start, other camera set-up or room.
        a, b = (x for x in videos if x["action"] == "wave")
        assert not np.allclose(_gt(root, a)["joints3d"], _gt(root, b)["joints3d"], atol=1e-2)


def test_benchmark_resumes_finished_videos(bench: tuple[Path, list[dict]]) -> None:
    """A rerun with the same settings keeps the finished videos (an interrupted generation
    resumes) and writes the same manifest; other settings would make them anew."""
    from stages.sample_data import generate_benchmark

    root, items = bench
    manifest = (root / "manifest.csv").read_text()
    first = root / items[0]["path"]
    stamp = first.stat().st_mtime_ns
    first.with_suffix(".json").unlink()  # as if the run had stopped while writing it
    again = generate_benchmark(root, **BENCH)
    assert again[1:] == items[1:]
    assert again[0]["person"] == items[0]["person"]
    assert (root / "manifest.csv").read_text() == manifest
    assert first.stat().st_mtime_ns != stamp  # remade: its sidecar was missing
    assert all((root / it["path"]).stat().st_mtime_ns < first.stat().st_mtime_ns
               for it in items[1:])


def _body_frame_poses(gt: dict[str, np.ndarray]) -> np.ndarray:
    """(T, 17*3): the body joints as a motion attacker sees them, free of where the camera
    and the person stood: world frame, centred on the mid-hip, turned so the hips lie along
    x, scaled by the torso length."""
    w = np.einsum("tji,tnj->tni", gt["cam_rot"], gt["joints3d"].astype(np.float64))
    w = w - w[:, [L_HIP, R_HIP]].mean(1, keepdims=True)
    across = w[:, L_HIP] - w[:, R_HIP]
    yaw = np.arctan2(across[:, 2], across[:, 0])[:, None]
    x = np.cos(yaw) * w[..., 0] + np.sin(yaw) * w[..., 2]
    z = -np.sin(yaw) * w[..., 0] + np.cos(yaw) * w[..., 2]
    w = np.stack([x, w[..., 1], z], -1)
    w = w / np.linalg.norm(w[:, [L_SHOULDER, R_SHOULDER]].mean(1), axis=1).mean()
    return w[:, :17].reshape(len(w), -1)


def _motion_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric chamfer distance between two clips' pose sets: how far each pose of one is
    from the nearest pose of the other. Blind to the start phase (clips cover a cycle)."""
    d = np.linalg.norm(a[:, None] - b[None], axis=-1)
    return 0.5 * float(d.min(1).mean() + d.min(0).mean())


def test_benchmark_motion_identifies_people(bench: tuple[Path, list[dict]]) -> None:
    """Two repetitions of one person move more alike than two people doing the same action,
    so the motion alone re-identifies (as in real data; the motion attacker's premise)."""
    root, items = bench
    poses = {(it["action"], it["person"]["id"], it["repetition"]):
             _body_frame_poses(_gt(root, it)) for it in items}
    people = sorted({k[1] for k in poses})
    total = {(p, q): 0.0 for p in people for q in people}  # test p vs train q, all actions
    for action in BENCH["actions"]:
        d = {(p, q): _motion_distance(poses[(action, p, 1)], poses[(action, q, 0)])
             for p in people for q in people}
        intra = [d[(p, p)] for p in people]
        inter = [v for (p, q), v in d.items() if p != q]
        assert np.mean(intra) < 0.5 * np.mean(inter), (action, intra, inter)
        total = {k: v + d[k] for k, v in total.items()}
    # Every unseen (test) repetition is nearest to its own person's training repetitions.
    for p in people:
        assert min(people, key=lambda q: total[(p, q)]) == p, {q: total[(p, q)] for q in people}


def test_traits_change_the_joint_curves() -> None:
    """The style traits act on the motion itself: one person's curves with another's traits
    differ much more than across two repetitions' jitter of the same person."""
    from stages.sample_data import benchmark_people, jitter_person, load_recipes

    recipes = load_recipes()
    labels = ("gender", "age", "muscle", "weight", "height", "proportions")
    a, b = benchmark_people(recipes["people"], 2, seed=0, phenotype_labels=labels)
    jitter, ranges = recipes["benchmark"]["jitter"], recipes["people"]["traits"]
    action = recipes["actions"]["walk_across"]

    def curves(person: object, k: int) -> dict[str, np.ndarray]:
        from stages.sample_data import animate

        return animate(action, recipes["stance"], person, 24, 12,
                       np.random.default_rng(k)).joints

    def gap(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> float:
        return float(np.mean([np.abs(x.get(n, 0) - y.get(n, 0)).mean() for n in {*x, *y}]))

    from dataclasses import replace

    base = curves(a, 0)
    # Same phase draw (rng 0): only the traits or the jitter differ.
    other_traits = curves(replace(a, traits=b.traits), 0)
    rep = curves(jitter_person(a, jitter, ranges, np.random.default_rng(7)), 0)
    assert gap(base, other_traits) > 3 * gap(base, rep)
    assert gap(base, curves(replace(a, traits={}), 0)) > 1.0  # degrees on average


def test_benchmark_settings_from_recipes_and_checked() -> None:
    from stages.sample_data import benchmark_settings, load_recipes

    recipes = load_recipes()
    default = benchmark_settings(recipes)
    assert default["people"] >= 24 and default["repetitions"] >= 2
    assert len(default["actions"]) >= 6
    assert benchmark_settings(recipes, people=3)["people"] == 3
    # Other recipes, other digest: a resumed run does not keep videos of other recipes.
    changed = copy.deepcopy(recipes)
    changed["people"]["traits"]["slouch"] = [0, 1]
    assert benchmark_settings(changed)["recipes_digest"] != default["recipes_digest"]
    for bad in (dict(people=1), dict(repetitions=1), dict(actions=["moonwalk"]),
                dict(actions=["wave", "wave"]), dict(width=8)):
        with pytest.raises(ValueError):
            benchmark_settings(recipes, **bad)


def test_plain_people_draw_as_before() -> None:
    """Forcing no class and drawing no traits leaves a plain sample person as it was: the
    forced draws and the traits do not shift the other draws."""
    from stages.sample_data import load_recipes, sample_person

    spec = load_recipes()["people"]
    labels = ("gender", "age", "muscle", "weight", "height", "proportions")
    plain = sample_person(np.random.default_rng([0, 1, 0]), spec, 0, labels)
    forced = sample_person(np.random.default_rng([0, 1, 0]), spec, 0, labels,
                           fixed={"gender": "male" if plain.attributes["gender"] == "female"
                                  else "female"}, traits=True)
    assert plain.traits == {} and set(forced.traits) == set(spec["traits"])
    assert forced.attributes["gender"] != plain.attributes["gender"]
    assert forced.attributes["clothing"] == plain.attributes["clothing"]
    assert forced.style == plain.style


def test_cli_benchmark_and_its_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture
                                            ) -> None:
    from pipeline.cli import main

    out = tmp_path / "b"
    assert main(["sample-data", str(out), "--benchmark", "--people", "2", "--repetitions", "2",
                 "--actions", "bow", "--width", "32", "--height", "32", "--frames", "2",
                 "--no-progress"]) == 0
    with (out / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["path"], r["split"]) for r in rows] == [
        (f"bow/bow_person_{p:02d}_r{r}.mp4", "test" if r else "train")
        for p in range(2) for r in range(2)]
    summary = json.loads((out / "benchmark.json").read_text())
    assert summary["settings"]["frames"] == 2 and summary["settings"]["actions"] == ["bow"]
    capsys.readouterr()
    for bad, word in ((["--benchmark", "--people", "1"], "people"),
                      (["--benchmark", "--actions", "moonwalk"], "actions"),
                      (["--benchmark", "--videos", "3"], "--videos"),
                      (["--repetitions", "2"], "--repetitions")):
        assert main(["sample-data", str(tmp_path / "x"), *bad]) == 2, bad
        assert word in capsys.readouterr().err


def test_benchmark_people_stratified_and_gait_differs_by_gender() -> None:
    """24 people: both genders 12 each, every age group, skin tone and build present and
    as even as 24 allows; gender shifts the gait traits on average (as in real data)."""
    from collections import Counter

    from stages.sample_data import STRATIFIED, benchmark_people, load_recipes

    spec = load_recipes()["people"]
    labels = ("gender", "age", "muscle", "weight", "height", "proportions")
    people = benchmark_people(spec, 24, seed=1, phenotype_labels=labels)
    assert len({p.id for p in people}) == 24
    for attr, table in STRATIFIED.items():
        counts = Counter(p.attributes[attr] for p in people)
        assert set(counts) == set(spec[table]), attr
        assert max(counts.values()) - min(counts.values()) <= 1, (attr, counts)
    by_gender = {g: [p.traits for p in people if p.attributes["gender"] == g]
                 for g in ("female", "male")}
    mean = {g: {k: np.mean([t[k] for t in ts]) for k in ts[0]} for g, ts in by_gender.items()}
    assert mean["female"]["stance_width"] < mean["male"]["stance_width"]
    assert mean["female"]["arm_swing"] > mean["male"]["arm_swing"]
