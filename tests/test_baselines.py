"""Blurred and blacked-out people (privacy.baselines) over detect artifacts that mark a
coloured square (the dataset of test_video_attack): same ids and layout, only the marked
pixels change, frames without a detection are left alone and counted."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_video_attack import make_square_dataset

from pipeline.config import ConfigError
from pipeline.video import VideoWriter, iter_frames, probe
from privacy.baselines import BaselineConfig, add_cli, person_region, write_baseline

BLANK = ("down/p1_r0", 3, 6)  # no detection in frames 3..6 of this video


@pytest.fixture(scope="module")
def squares(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    root = tmp_path_factory.mktemp("squares_bl")
    ids = make_square_dataset(root / "orig", reps=1, test_reps=0, frames=10, side=48,
                              workdir=root / "work", blank=BLANK, noise=3.0)
    return root / "orig", root / "work", ids


def _decode(path: Path) -> np.ndarray:
    return np.stack(list(iter_frames(path))).astype(np.int16)


def _regions(work: Path, vid: str, cfg: BaselineConfig) -> np.ndarray:
    boxes = np.load(work / "detect" / vid / "people.npz")["boxes"]
    masks = iter_frames(work / "detect" / vid / "mask.mkv", "gray")
    return np.stack([person_region(m, b, cfg)[0] for m, b in zip(masks, boxes, strict=True)])


def _shrink(region: np.ndarray, px: int) -> np.ndarray:
    # H.264 (4:2:0 chroma, 4x4 transforms) smears a sharp edge over a couple of pixels.
    k = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
    return np.stack([cv2.erode(r.astype(np.uint8), k) > 0 for r in region])


def _reencode(frames: np.ndarray, path: Path, fps) -> np.ndarray:
    with VideoWriter(path, fps, frames.shape[2], frames.shape[1], "h264",
                     crf=BaselineConfig().crf) as out:
        out.write_chunk(frames.astype(np.uint8))
    return _decode(path)


def _rows(folder: Path) -> list[list[str]]:
    with (folder / "manifest.csv").open(newline="") as fh:
        return sorted(csv.reader(fh))


@pytest.mark.parametrize("method", ["blur", "blackout"])
def test_baseline_hides_only_the_person(squares, tmp_path, method):
    orig, work, ids = squares
    out = tmp_path / method
    cfg = BaselineConfig()
    report = write_baseline(method, orig, work, out, cfg)
    assert _rows(out) == _rows(orig)  # same ids, paths, labels and splits
    assert report["videos_written"] == len(ids) and not report["skipped"]
    assert report["frames"] == 10 * len(ids)
    blank_frames = BLANK[2] - BLANK[1] + 1
    assert report["frames_without_detection"] == blank_frames
    assert report["videos"][BLANK[0]]["frames_without_detection"] == blank_frames
    for vid in ids:
        src, dst = orig / f"{vid}.mp4", out / f"{vid}.mp4"
        a, b = probe(src), probe(dst)
        assert (a.width, a.height, a.fps, b.codec) == (b.width, b.height, b.fps, "h264")
        x, y = _decode(src), _decode(dst)
        assert len(x) == len(y) == 10
        region = _regions(work, vid, cfg)
        far = _shrink(~region, 2)  # pixels well away from the region: unchanged
        diff = np.abs(x - y).max(-1)
        # ... up to what re-encoding the untouched frames costs
        codec = np.abs(x - _reencode(x, tmp_path / "ref.mp4", a.fps)).max(-1)
        assert diff[far].mean() < codec[far].mean() + 0.3
        assert np.percentile(diff[far], 99) <= np.percentile(codec[far], 99) + 2
        inside = _shrink(region, 2)
        if method == "blackout":
            assert y.max(-1)[inside].max() < 30
        else:  # the square's sharp colour is smeared into the background
            assert diff[inside].mean() > 15
    # The frames without a detection are left as they are (a leak the report counts).
    x, y = _decode(orig / f"{BLANK[0]}.mp4"), _decode(out / f"{BLANK[0]}.mp4")
    frames = slice(BLANK[1], BLANK[2] + 1)
    assert np.abs(x[frames] - y[frames]).mean() < 3.0


def test_dilation_and_blur_scale_with_the_box():
    cfg = BaselineConfig(dilate=0.1, min_dilate_px=1)
    mask = np.zeros((200, 200), np.uint8)
    mask[80:120, 90:110] = 255
    small, s_small = person_region(mask, np.array([[90, 80, 110, 120]]), cfg)
    large, s_large = person_region(mask, np.array([[50, 20, 150, 180], [np.nan] * 4]), cfg)
    assert (s_small, s_large) == (40.0, 160.0)
    assert small.sum() < large.sum()  # radius 4 px vs 16 px
    assert large[80:120, 90:110].all() and not large[:60].any()
    empty, scale = person_region(np.zeros_like(mask), np.array([[0, 0, 9, 9]]), cfg)
    assert not empty.any() and scale == 0.0


def test_missing_detections_are_skipped_and_reported(squares, tmp_path):
    orig, work, ids = squares
    partial = tmp_path / "work"
    (partial / "detect").mkdir(parents=True)
    kept = ids[1:]
    for vid in kept:
        (partial / "detect" / vid).parent.mkdir(parents=True, exist_ok=True)
        (partial / "detect" / vid).symlink_to(work / "detect" / vid)
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["baseline", "--method", "blackout", "--dataset", str(orig),
                              "--workdir", str(partial), "--out", str(out),
                              "--set", "dilate=0.2"])
    assert args.func(args) == 0
    assert [r[0] for r in _rows(out) if r[0] != "path"] == sorted(f"{v}.mp4" for v in kept)
    report = (out / "baseline.json").read_text()
    assert ids[0] in report and "no detect artifacts" in report
    assert '"dilate": 0.2' in report
    assert not (out / f"{ids[0]}.mp4").exists()
    with pytest.raises(ConfigError, match="overlaps"):
        write_baseline("blur", orig, work, orig / "blurred")
