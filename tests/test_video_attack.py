"""The appearance attackers on a tiny dataset whose labels are visible by construction.

A coloured square moves over a noisy grey background: its colour is the person (identity;
red-ish people are one gender, blue-ish the other), its direction of motion the action.
Attackers must find all three; once the square is blacked out (privacy.baselines over
detect artifacts that mark it), colour is gone but motion is not: the attributes fall to
chance while the action stays predictable.
"""

from __future__ import annotations

import csv
import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.video import VideoWriter
from privacy.baselines import write_baseline
from privacy.video_attack import VideoAttackConfig, add_cli, attack_videos
from privacy.video_data import ClipConfig, load_method

# person -> (colour, gender)
PEOPLE = {"p0": ((230, 40, 40), "female"), "p1": ((230, 170, 30), "female"),
          "p2": ((40, 60, 230), "male"), "p3": ((40, 200, 210), "male")}
ACTIONS = {"right": (1.6, 0.0), "down": (0.0, 1.6)}
SQUARE = 9


def square_track(rng: np.random.Generator, action: str, frames: int, side: int
                 ) -> np.ndarray:
    """Top-left corner of the square in each frame, (frames, 2) as (x, y)."""
    dx, dy = ACTIONS[action]
    room = side - SQUARE - 1
    x0 = rng.uniform(0, room - dx * (frames - 1))
    y0 = rng.uniform(0, room - dy * (frames - 1))
    t = np.arange(frames)
    return np.stack([x0 + dx * t, y0 + dy * t], 1).round().astype(int)


def make_square_dataset(root: Path, reps: int = 6, test_reps: int = 2, frames: int = 12,
                        side: int = 32, seed: int = 0, workdir: Path | None = None,
                        blank: tuple[str, int, int] | None = None, noise: float = 12.0
                        ) -> list[str]:
    """Write the dataset (MP4 + sidecar JSON with `person` + manifest.csv with split);
    with `workdir`, also detect artifacts marking the square (mask.mkv, people.npz).
    `blank` = (id, first, last): no detection in those frames of that video. Returns ids."""
    rng = np.random.default_rng(seed)
    rows, ids = [], []
    for person, (colour, gender) in PEOPLE.items():
        for action in ACTIONS:
            for rep in range(reps):
                vid = f"{action}/{person}_r{rep}"
                split = "test" if rep >= reps - test_reps else "train"
                track = square_track(rng, action, frames, side)
                path = root / f"{vid}.mp4"
                path.parent.mkdir(parents=True, exist_ok=True)
                mask = np.zeros((frames, side, side), np.uint8)
                with VideoWriter(path, Fraction(12), side, side, "h264", crf=12) as out:
                    for t, (x, y) in enumerate(track):
                        frame = rng.normal(128, noise, (side, side, 3)).clip(0, 255)
                        frame = frame.astype(np.uint8)
                        frame[y:y + SQUARE, x:x + SQUARE] = colour
                        mask[t, y:y + SQUARE, x:x + SQUARE] = 255
                        out.write(frame)
                (root / f"{vid}.json").write_text(json.dumps({
                    "action": action, "repetition": rep,
                    "person": {"id": person, "gender": gender, "age_group": "adult"}}))
                rows.append((f"{vid}.mp4", action, split))
                ids.append(vid)
                if workdir is not None:
                    present = np.ones(frames, bool)
                    if blank is not None and blank[0] == vid:
                        present[blank[1]:blank[2] + 1] = False
                    write_detect(workdir / "detect" / vid, mask * present[:, None, None],
                                 track, present)
    with (root / "manifest.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([("path", "label", "split"), *rows])
    return ids


def write_detect(folder: Path, mask: np.ndarray, track: np.ndarray, present: np.ndarray
                 ) -> None:
    """detect/<id>/ as the detect stage writes it (stages/__init__.py): one track."""
    folder.mkdir(parents=True, exist_ok=True)
    frames, h, w = mask.shape
    with VideoWriter(folder / "mask.mkv", Fraction(12), w, h, "gray") as out:
        out.write_chunk(mask)
    boxes = np.full((frames, 1, 4), np.nan, np.float32)
    boxes[present, 0] = np.concatenate([track, track + SQUARE], 1)[present]
    np.savez(folder / "people.npz", boxes=boxes, present=present[:, None],
             scores=present[:, None].astype(np.float32), track_ids=np.zeros(1, np.int32))


def tiny_config(**kw) -> VideoAttackConfig:
    clip = ClipConfig(frames=4, stride=2, size=32, crop_margin=1.0, eval_clips=2)
    base = dict(clip=clip, archs=("r2plus1d", "frame2d", "c3d"), width=8,
                epochs=1, min_steps=80, batch=16, lr=1e-2, device="cpu", threads=1)
    base.update(kw)
    return VideoAttackConfig(**base)


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("squares")
    make_square_dataset(root / "orig", workdir=root / "work")
    return root / "orig", root / "work"


def test_ensemble_finds_attributes_and_blackout_hides_them(squares, tmp_path):
    orig, work = squares
    cfg = tiny_config()
    clear = attack_videos(orig, orig, cfg)
    res = clear["results"]
    assert clear["data"]["train"] == 32 and clear["data"]["test"] == 16
    assert clear["data"]["missing_count"] == 0
    assert res["identity"]["chance"] == pytest.approx(0.25)
    assert res["identity"]["accuracy"] >= 0.8
    assert res["gender"]["accuracy"] >= 0.9
    assert res["action"]["accuracy"] >= 0.9
    assert set(res["identity"]["per_arch"]) == {"r2plus1d", "frame2d", "c3d"}
    assert "age_group" in clear["skipped"]  # one class only: nothing to attack
    assert clear["cmap_f1"]["attributes"] == ["gender"]
    assert clear["cmap_f1"]["best"]["cmap"] >= 0.9
    json.dumps(clear)  # JSON-ready

    dark = tmp_path / "blackout"
    write_baseline("blackout", orig, work, dark)
    hidden = attack_videos(dark, orig, cfg)["results"]
    # Colour is gone: no attacker does much better than chance (16 test videos) ...
    assert hidden["identity"]["accuracy"] <= 0.5
    assert hidden["gender"]["accuracy"] <= 0.75
    # ... but the black square still moves: the action survives.
    assert hidden["action"]["accuracy"] >= 0.85


def test_missing_videos_are_reported(squares, tmp_path):
    orig, work = squares
    partial = tmp_path / "partial"
    write_baseline("blackout", orig, work, partial)
    gone = ["right/p0_r5", "down/p2_r0"]
    for vid in gone:
        (partial / f"{vid}.mp4").unlink()
    lines = (partial / "manifest.csv").read_text().splitlines()
    (partial / "manifest.csv").write_text(
        "\n".join(x for x in lines if not any(x.startswith(g) for g in gone)) + "\n")
    data = load_method(partial, orig, tiny_config().clip)
    assert set(data.missing) == set(gone)
    assert len(data.videos) == 46
    assert data.summary()["missing_count"] == 2

    # An export folder: a video the pipeline failed on is missing with the pipeline's reason.
    export = tmp_path / "export"
    export.mkdir()
    entries = [{"id": "right/p0_r0", "status": "ok", "video": "a.mp4"},
               {"id": "right/p0_r1", "status": "failed", "failed_stage": "fit",
                "reason": "no person"}]
    (export / "a.mp4").write_bytes((orig / "right/p0_r0.mp4").read_bytes())
    (export / "dataset.json").write_text(json.dumps({"videos": entries}))
    data = load_method(export, orig, tiny_config().clip)
    assert [v.id for v in data.videos] == ["right/p0_r0"]
    assert data.missing["right/p0_r1"] == "fit: no person"
    assert len(data.missing) == 47


def test_cli_registers_attack(squares, tmp_path, capsys):
    import argparse

    orig, _ = squares
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "r.json"
    args = parser.parse_args(["attack", "--method-dir", str(orig), "--dataset", str(orig),
                              "--out", str(out), "--set", "archs=[transformer]", "--set", "width=4",
                              "--set", "min_steps=5", "--set", "epochs=1",
                              "--set", "clip.size=32", "--set", "clip.frames=4",
                              "--set", "action=false", "--set", "device=cpu", "--set", "threads=1"])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert list(report["results"]["identity"]["per_arch"]) == ["transformer"]
    assert "action" not in report["results"]
    assert "| identity | transformer |" in capsys.readouterr().out
