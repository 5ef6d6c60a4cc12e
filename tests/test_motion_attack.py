"""Motion data and attackers: normalization, joint sequences from the workdir and the
ground truth, and fresh classifiers that tell people apart from their motion alone."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from privacy.labels import load_labels
from privacy.motion_attack import TrainConfig, add_cli, attack_motion
from privacy.motion_data import (
    KINEMATIC_TREE,
    L_HIP,
    L_SHOULDER,
    R_HIP,
    R_SHOULDER,
    MotionDataError,
    bone_lengths,
    fixed_length,
    load_split,
    normalization_of,
    normalize,
    read_sequence,
    retarget,
    synthetic_dataset,
    synthetic_sets,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _sequence(seed: int = 0, frames: int = 20) -> np.ndarray:
    seqs, _ = synthetic_dataset(people=1, actions=("walk",), train_reps=1, test_reps=0,
                                frames=frames, seed=seed)
    return seqs[0]


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def test_normalization_is_upright_centred_and_invertible():
    seq = _sequence()
    norm = normalization_of(seq)
    x = norm.apply(seq)
    hips = 0.5 * (x[:, L_HIP] + x[:, R_HIP])
    np.testing.assert_allclose(hips, 0.0, atol=1e-9)
    torso = (0.5 * (x[:, L_SHOULDER] + x[:, R_SHOULDER]) - hips).mean(0)
    assert torso[1] > 0.4 and abs(torso[0]) < 1e-6 and abs(torso[2]) < 1e-6  # +y is up
    assert (x[:, L_SHOULDER, 0] - x[:, R_SHOULDER, 0]).mean() > 0.2  # +x to the left
    np.testing.assert_allclose(norm.invert(x), seq, atol=1e-9)
    # The camera's position and heading do not matter; size does unless scale=True.
    moved = seq @ _rotation(1.1).T + [0.5, -0.2, 2.0]
    np.testing.assert_allclose(normalize(moved), x, atol=1e-9)
    assert not np.allclose(normalize(1.2 * seq), x, atol=1e-3)
    np.testing.assert_allclose(normalize(1.2 * seq, scale=True), normalize(seq, scale=True),
                               atol=1e-9)


def test_fixed_length_resamples_and_crops():
    seq = np.arange(10, dtype=float)[:, None]
    np.testing.assert_allclose(fixed_length(seq, 19)[::2, 0], np.arange(10))
    np.testing.assert_allclose(fixed_length(seq, 4, "crop")[:, 0], [3, 4, 5, 6])
    np.testing.assert_allclose(fixed_length(seq, 12, "crop")[:, 0], [0, *range(10), 9])


def test_retarget_sets_bone_lengths_and_keeps_directions():
    joints = torch.as_tensor(_sequence())
    target = torch.linspace(0.05, 0.5, len(KINEMATIC_TREE), dtype=joints.dtype)
    target[1], target[4] = target[0], target[3]  # left/right bones from virtual joints
    out = retarget(joints, target)
    np.testing.assert_allclose(bone_lengths(out).numpy(), target.expand(len(out), -1).numpy(),
                               atol=1e-9)
    # Same directions: retargeting its own lengths gives the sequence back.
    back = retarget(out, bone_lengths(joints))
    np.testing.assert_allclose(back.numpy(), joints.numpy(), atol=1e-9)


def test_sequences_come_from_the_main_track_and_the_ground_truth(tmp_path):
    t = 12
    joints = np.full((t, 2, 23, 3), np.nan, np.float32)
    present = np.zeros((t, 2), bool)
    main = _sequence(frames=t)
    joints[:, 1], present[:, 1] = main, True
    joints[:3, 0], present[:3, 0] = main[:3] + 1.0, True  # a brief second person
    (tmp_path / "fit" / "a").mkdir(parents=True)
    np.savez(tmp_path / "fit" / "a" / "bodies.npz", joints3d=joints, present=present)
    np.testing.assert_allclose(read_sequence("fit", "a", workdir=tmp_path), main, atol=1e-6)
    np.savez(tmp_path / "b.gt.npz", joints3d=main)
    np.testing.assert_allclose(read_sequence("gt", "b", dataset=tmp_path), main, atol=1e-6)
    with pytest.raises(MotionDataError, match="missing"):
        read_sequence("motion", "a", workdir=tmp_path)
    (tmp_path / "render" / "a").mkdir(parents=True)
    np.savez(tmp_path / "render" / "a" / "avatar_joints.npz", joints3d=joints * 0.9,
             present=present)
    np.testing.assert_allclose(read_sequence("render", "a", workdir=tmp_path), main * 0.9,
                               atol=1e-6)


def test_fresh_attackers_identify_people_well_above_chance():
    train, test, table = synthetic_sets(frames=24, seed=3, actions=("walk", "wave", "squat"),
                                        train_reps=3, test_reps=2)
    result = attack_motion(train.x, train.labels, test.x, test.labels,
                           targets=("identity", "gender"), archs=("tcn", "stgcn"),
                           config=TrainConfig(steps=60, width=16, seed=1))
    assert result["identity"]["chance"] == pytest.approx(1 / 6)
    assert result["identity"]["accuracy"] >= 0.8
    assert result["gender"]["accuracy"] >= 0.8
    assert set(result["identity"]["per_arch"]) == {"tcn", "stgcn"}
    assert result["identity"]["accuracy"] == max(result["identity"]["per_arch"].values())


def write_gt_dataset(root: Path, seed: int = 0, frames: int = 24, **kwargs) -> Path:
    """A labelled dataset on disk as `sample-data --benchmark` lays it out, with only the
    ground-truth joints (no videos are decoded by the motion tools)."""
    seqs, videos = synthetic_dataset(seed=seed, frames=frames, **kwargs)
    rows = []
    for seq, v in zip(seqs, videos, strict=True):
        (root / v.id).parent.mkdir(parents=True, exist_ok=True)
        np.savez(root / f"{v.id}.gt.npz", joints3d=seq.astype(np.float32))
        (root / f"{v.id}.json").write_text(json.dumps({
            "action": v.action, "split": v.split, "repetition": v.repetition,
            "person": {"id": v.attributes["identity"], "gender": v.attributes["gender"]}}))
        rows.append((f"{v.id}.mp4", v.action, v.split))
    with (root / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("path", "label", "split"))
        w.writerows(rows)
    return root


def test_labels_and_splits_load_from_a_dataset(tmp_path):
    root = write_gt_dataset(tmp_path, people=3, actions=("walk", "wave"), train_reps=2,
                            test_reps=1)
    table = load_labels(root)
    train = load_split(table, "train", "gt", 16, dataset=root)
    test = load_split(table, "test", "gt", 16, dataset=root)
    assert train.x.shape == (12, 3, 16, 23) and test.x.shape == (6, 3, 16, 23)
    assert set(train.labels) >= {"action", "identity", "gender"}
    assert sorted(set(test.labels["identity"])) == [0, 1, 2]


def test_cli_attack_writes_a_report(tmp_path, capsys):
    root = write_gt_dataset(tmp_path / "data", people=3, actions=("walk", "wave"),
                            train_reps=2, test_reps=1)
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command"))
    out = tmp_path / "attack.json"
    args = parser.parse_args(["motion", "attack", "--dataset", str(root), "--stage", "gt",
                              "--frames", "16", "--steps", "5", "--arch", "mlp",
                              "--target", "identity", "--out", str(out)])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["stage"] == "gt" and set(report["results"]) == {"identity"}
    assert report["results"]["identity"]["chance"] == pytest.approx(1 / 3)
    assert "| identity | mlp |" in capsys.readouterr().out
