"""The inpaint stage on generated scenes where the true background is known."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import RunSection
from pipeline.dataset import VideoItem
from pipeline.stage import VideoFailed, VideoJob
from pipeline.video import VideoWriter, count_frames, iter_frames, probe
from stages.inpaint import (
    INVALID_LUMA,
    InpaintConfig,
    InpaintStage,
    buffer_size_for,
    median_pick,
    slots_for,
)

FPS = Fraction(12, 1)
MAGENTA = np.array([255, 0, 255], np.uint8)  # no background pixel has this colour
SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"


def textured_background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Static texture in [30, 200] per channel: far from the people's magenta."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        115 + 60 * np.sin(xx / 7.0) * np.cos(yy / 5.0),
        115 + 60 * np.sin((xx + yy) / 9.0),
        115 + 60 * np.cos(xx / 4.0 - yy / 11.0),
    ], axis=-1)
    return np.clip(base + rng.normal(0, 12, base.shape), 30, 200).astype(np.uint8)


def write_video(path: Path, frames: np.ndarray, kind: str) -> Path:
    with VideoWriter(path, FPS, frames.shape[2], frames.shape[1], kind) as w:
        w.write_chunk(frames)
    return path


def write_people(path: Path, boxes: np.ndarray) -> None:
    """A people.npz following the detect contract (only boxes/present matter here)."""
    t, p = boxes.shape[:2]
    present = np.isfinite(boxes).all(axis=2)
    np.savez(
        path,
        keypoints=np.zeros((t, p, 33, 3), np.float32),
        world=np.zeros((t, p, 33, 3), np.float32),
        boxes=boxes.astype(np.float32),
        scores=present.astype(np.float32),
        present=present,
        track_ids=np.arange(p, dtype=np.int32),
    )


def make_job(tmp: Path, frames: np.ndarray, masks: np.ndarray, boxes: np.ndarray,
             chunk: int = 16) -> VideoJob:
    t, height, width = frames.shape[:3]
    src = write_video(tmp / "scene.mkv", frames, "rgb")
    detect = tmp / "detect"
    detect.mkdir()
    write_video(detect / "mask.mkv", masks, "gray")
    write_people(detect / "people.npz", boxes)
    out = tmp / "out"
    out.mkdir()
    info = {"width": width, "height": height, "fps_num": FPS.numerator,
            "fps_den": FPS.denominator, "frame_count": t}
    return VideoJob(
        video=VideoItem(id="scene", path=src, rel_path="scene.mkv"),
        inputs={"detect": detect},
        out_dir=out,
        run=RunSection(chunk_frames=chunk, progress=False),
        upstream={"detect": {"video": info, "tracks": boxes.shape[1]}},
    )


def read(path: Path, fmt: str) -> np.ndarray:
    return np.stack(list(iter_frames(path, fmt)))


def draw(frames: np.ndarray, masks: np.ndarray | None, boxes: np.ndarray, t: int, p: int,
         x0: int, y0: int, w: int, h: int, colour: np.ndarray = MAGENTA) -> None:
    frames[t, y0:y0 + h, x0:x0 + w] = colour
    if masks is not None:
        masks[t, y0:y0 + h, x0:x0 + w] = 255
        # A soft (below-threshold) rim, like a segmentation probability falling off.
        masks[t, max(0, y0 - 1):y0 + h + 1, max(0, x0 - 1)] = np.maximum(
            masks[t, max(0, y0 - 1):y0 + h + 1, max(0, x0 - 1)], 40)
    boxes[t, p] = (x0, y0, x0 + w, y0 + h)


def is_magenta(img: np.ndarray) -> np.ndarray:
    return (img[..., 0] > 220) & (img[..., 1] < 40) & (img[..., 2] > 220)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """128x72, 48 frames: A walks left to right (masked), B stands still all the time
    (masked, never uncovered), C walks right to left and the segmentation misses C (box only).
    """
    tmp = tmp_path_factory.mktemp("scene")
    t, height, width = 48, 72, 128
    bg = textured_background(width, height)
    frames = np.repeat(bg[None], t, axis=0)
    masks = np.zeros((t, height, width), np.uint8)
    boxes = np.full((t, 3, 4), np.nan, np.float32)
    for i in range(t):
        draw(frames, masks, boxes, i, 0, 4 + 2 * i, 36, 12, 30)
        draw(frames, masks, boxes, i, 1, 112, 4, 10, 14)
        draw(frames, None, boxes, i, 2, 110 - 2 * i, 20, 8, 12)
    job = make_job(tmp, frames, masks, boxes)
    stage = InpaintStage(InpaintConfig(), job.run)
    stage.setup()
    summary = stage.process(job)
    return {"job": job, "bg": bg, "frames": frames, "masks": masks, "summary": summary}


def test_outputs_have_source_frame_count_size_and_fps(scene):
    out = scene["job"].out_dir
    for name in ("plate.mkv", "removed.mkv", "filled.mkv"):
        info = probe(out / name)
        assert (info.width, info.height) == (128, 72)
        assert info.fps == FPS
        assert count_frames(out / name) == 48


def test_person_colour_gone_and_background_recovered(scene):
    out = scene["job"].out_dir
    plate = read(out / "plate.mkv", "rgb24")
    removed = read(out / "removed.mkv", "gray") > 127
    filled = read(out / "filled.mkv", "gray") > 127
    assert not is_magenta(plate).any()
    bg = np.broadcast_to(scene["bg"], plate.shape).astype(int)
    temporal = removed & ~filled
    assert temporal.sum() > 1000
    # Seen-uncovered pixels take the true background (lossless codec: exact up to rounding).
    assert np.abs(plate[temporal].astype(int) - bg[temporal]).max() <= 2
    # Everything not removed is the source, bit-exact.
    src = scene["frames"]
    assert np.array_equal(plate[~removed], src[~removed])


def test_never_uncovered_pixels_are_inpainted_and_flagged(scene):
    out = scene["job"].out_dir
    filled = read(out / "filled.mkv", "gray") > 127
    removed = read(out / "removed.mkv", "gray") > 127
    assert not (filled & ~removed).any()
    # B's body never leaves its place: every frame flags it as image-inpainted.
    assert filled[:, 4:18, 112:122].all()
    # A moves two pixels a frame, so its trail is background seen before or after.
    assert not filled[:, 40:60, 4:100].any()
    s = scene["summary"]
    n = filled.size
    assert s["inpainted_fraction"] == pytest.approx(filled.sum() / n, abs=1e-5)
    assert s["removed_fraction"] == pytest.approx(removed.sum() / n, abs=1e-5)
    assert s["temporal_fraction"] + s["inpainted_fraction"] == pytest.approx(
        s["removed_fraction"], abs=1e-5)


def test_mask_is_dilated_and_missed_person_removed_by_box(scene):
    removed = read(scene["job"].out_dir / "removed.mkv", "gray") > 127
    person = scene["masks"] > 127
    assert removed[person].all()
    d = scene["summary"]["dilate_px"]
    assert d == 2  # 15 px per 480 px of the short side (72)
    # Soft rim (below threshold) and d pixels beyond it are removed too.
    assert removed[10, 36:66, 24 - d:24].all()  # A at frame 10 starts at x=24
    # C has no mask: its padded box is removed in every frame.
    assert scene["summary"]["box_fallback_frames"] == 48
    assert removed[5, 20:32, 100:108].all()


def test_empty_masks_pass_the_source_through_exactly(tmp_path):
    t, height, width = 20, 40, 56
    frames = np.repeat(textured_background(width, height, 1)[None], t, axis=0)
    frames[:, :, :] += np.arange(t, dtype=np.uint8)[:, None, None, None]  # not static
    job = make_job(tmp_path, frames, np.zeros((t, height, width), np.uint8),
                   np.zeros((t, 0, 4), np.float32), chunk=7)
    summary = InpaintStage(InpaintConfig(), job.run).process(job)
    assert np.array_equal(read(job.out_dir / "plate.mkv", "rgb24"), frames)
    assert not read(job.out_dir / "removed.mkv", "gray").any()
    assert not read(job.out_dir / "filled.mkv", "gray").any()
    assert summary["removed_fraction"] == 0 and summary["inpainted_fraction"] == 0


def _standing_person(tmp: Path, arrive: int, t: int = 40):
    """Background alone until `arrive`, then a person standing still to the end."""
    height, width = 48, 64
    bg = textured_background(width, height, 2)
    frames = np.repeat(bg[None], t, axis=0)
    masks = np.zeros((t, height, width), np.uint8)
    boxes = np.full((t, 1, 4), np.nan, np.float32)
    for i in range(arrive, t):
        draw(frames, masks, boxes, i, 0, 20, 10, 12, 30)
    return make_job(tmp, frames, masks, boxes, chunk=9), bg


def test_long_term_memory_fills_a_person_who_stood_still_longer_than_the_window(tmp_path):
    job, bg = _standing_person(tmp_path, arrive=10)
    cfg = InpaintConfig(window_frames=8, samples=8)
    summary = InpaintStage(cfg, job.run).process(job)
    plate = read(job.out_dir / "plate.mkv", "rgb24")
    assert not read(job.out_dir / "filled.mkv", "gray").any()
    assert np.abs(plate[-1].astype(int) - bg).max() <= 2
    assert summary["memory_fraction"] > 0


def test_without_memory_the_window_limits_what_is_seen(tmp_path):
    job, _ = _standing_person(tmp_path, arrive=10)
    cfg = InpaintConfig(window_frames=8, samples=8, long_term_memory=False)
    InpaintStage(cfg, job.run).process(job)
    filled = read(job.out_dir / "filled.mkv", "gray") > 127
    # The window reaches 4 frames back: frames 10..12 still see the empty scene in two
    # samples (min_samples), frame 13 in one only.
    assert not filled[:13].any()
    assert filled[13:, 12:38, 22:30].all()
    assert not is_magenta(read(job.out_dir / "plate.mkv", "rgb24")).any()


def test_window_looks_ahead_for_a_person_who_leaves(tmp_path):
    """Present from the start and gone at frame 30: early frames need future samples."""
    t, height, width = 40, 48, 64
    bg = textured_background(width, height, 3)
    frames = np.repeat(bg[None], t, axis=0)
    masks = np.zeros((t, height, width), np.uint8)
    boxes = np.full((t, 1, 4), np.nan, np.float32)
    for i in range(30):
        draw(frames, masks, boxes, i, 0, 20, 10, 12, 30)
    job = make_job(tmp_path, frames, masks, boxes, chunk=8)
    cfg = InpaintConfig(window_frames=40, samples=40, min_samples=1)
    InpaintStage(cfg, job.run).process(job)
    filled = read(job.out_dir / "filled.mkv", "gray") > 127
    plate = read(job.out_dir / "plate.mkv", "rgb24")
    assert not filled[10:].any()  # frame 10 sees frame 30 (half window = 20)
    assert np.abs(plate[10:].astype(int) - bg).max() <= 2
    assert filled[:10, 12:38, 22:30].all()


def test_downscaled_buffer_under_a_small_memory_budget(tmp_path):
    t, height, width = 24, 240, 320
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    bg = np.stack([60 + xx / 4, 60 + yy / 3, 150 - xx / 8], axis=-1).astype(np.uint8)
    frames = np.repeat(bg[None], t, axis=0)
    masks = np.zeros((t, height, width), np.uint8)
    boxes = np.full((t, 1, 4), np.nan, np.float32)
    for i in range(t):
        draw(frames, masks, boxes, i, 0, 20 + 10 * i, 60, 30, 120)
    job = make_job(tmp_path, frames, masks, boxes, chunk=10)
    cfg = InpaintConfig(buffer_mb=8, samples=60)
    summary = InpaintStage(cfg, job.run).process(job)
    bw, bh = summary["buffer_size"]
    assert bw < width and bh < height
    slots = slots_for(cfg.window_frames // 2, summary["sample_stride"])
    assert (slots * 5 + 7) * bw * bh <= 8 * 2**20
    plate = read(job.out_dir / "plate.mkv", "rgb24")
    filled = read(job.out_dir / "filled.mkv", "gray") > 127
    temporal = (read(job.out_dir / "removed.mkv", "gray") > 127) & ~filled
    assert temporal.sum() > 30 * 120 * t // 2
    assert not is_magenta(plate).any()
    bg_all = np.broadcast_to(bg, plate.shape).astype(int)
    assert np.abs(plate[temporal].astype(int) - bg_all[temporal]).mean() < 3
    assert np.abs(plate[temporal].astype(int) - bg_all[temporal]).max() <= 12


def test_buffer_size_fits_budget_and_is_full_size_when_it_can():
    assert buffer_size_for(1920, 1080, 32, True, 384) == (1920, 1080)
    w, h = buffer_size_for(3840, 2160, 32, True, 384)
    assert (32 * 5 + 7) * w * h <= 384 * 2**20 and w > 1000
    assert abs(w / h - 3840 / 2160) < 0.01


def test_median_pick_ignores_covered_samples():
    luma = np.array([[10, 7], [INVALID_LUMA, 9], [12, 8], [11, INVALID_LUMA]], np.uint16)
    row, count = median_pick(luma)
    assert count.tolist() == [3, 3]
    assert row.tolist() == [3, 2]  # luma 11 among (10, 11, 12); 8 among (7, 8, 9)
    _, count = median_pick(np.full((3, 2), INVALID_LUMA, np.uint16))
    assert count.tolist() == [0, 0]


def test_mask_with_fewer_frames_fails_the_video(tmp_path):
    t, height, width = 12, 32, 48
    frames = np.repeat(textured_background(width, height)[None], t, axis=0)
    job = make_job(tmp_path, frames, np.zeros((t - 3, height, width), np.uint8),
                   np.zeros((t, 0, 4), np.float32), chunk=5)
    with pytest.raises(VideoFailed, match="frame count mismatch"):
        InpaintStage(InpaintConfig(), job.run).process(job)


@pytest.mark.real
def test_real_video_with_a_synthetic_mask(tmp_path):
    """A decoded real video (MKV, 640x480) through the stage: counts, passthrough outside
    the removed region, and the box's colour gone."""
    video = SHARED / "videos/intel__asl_help.mkv"
    if not video.is_file():
        pytest.skip(f"real test videos not available ({video} absent)")
    frames = read(video, "rgb24")[:30]
    t, height, width = frames.shape[:3]
    src = write_video(tmp_path / "real.mkv", frames, "rgb")
    masks = np.zeros((t, height, width), np.uint8)
    for i in range(t):  # a moving square "person" over the real background
        masks[i, 200:300, 100 + 8 * i:200 + 8 * i] = 255
    detect = tmp_path / "detect"
    detect.mkdir()
    write_video(detect / "mask.mkv", masks, "gray")
    write_people(detect / "people.npz", np.zeros((t, 0, 4), np.float32))
    (tmp_path / "out").mkdir()
    job = VideoJob(video=VideoItem(id="real", path=src, rel_path="real.mkv"),
                   inputs={"detect": detect}, out_dir=tmp_path / "out",
                   run=RunSection(chunk_frames=16, progress=False))
    summary = InpaintStage(InpaintConfig(), job.run).process(job)
    plate = read(job.out_dir / "plate.mkv", "rgb24")
    removed = read(job.out_dir / "removed.mkv", "gray") > 127
    assert plate.shape == frames.shape
    assert np.array_equal(plate[~removed], frames[~removed])
    assert summary["frames"] == t and summary["removed_fraction"] > 0


def _two_views(tmp: Path, second: np.ndarray, first: np.ndarray):
    """40 frames: view `first` until frame 20, then `second`; a person stands still at the
    same place from frame 5 on, so only frames 0-4 show what is behind them."""
    t = 40
    frames = np.concatenate([np.repeat(first[None], 20, 0), np.repeat(second[None], 20, 0)])
    height, width = first.shape[:2]
    masks = np.zeros((t, height, width), np.uint8)
    boxes = np.full((t, 1, 4), np.nan, np.float32)
    for i in range(5, t):
        draw(frames, masks, boxes, i, 0, 20, 10, 12, 30)
    return make_job(tmp, frames, masks, boxes, chunk=16)


def test_samples_and_memory_never_cross_a_scene_cut(tmp_path):
    a, b = textured_background(64, 48, 4), textured_background(64, 48, 5)[::-1, ::-1]
    job = _two_views(tmp_path, b, a)
    summary = InpaintStage(InpaintConfig(max_sample_diff=255), job.run).process(job)
    filled = read(job.out_dir / "filled.mkv", "gray") > 127
    plate = read(job.out_dir / "plate.mkv", "rgb24")
    assert summary["scene_cuts"] == 1
    assert not filled[:20].any()  # the first view saw the background in frames 0-4
    assert np.abs(plate[:20].astype(int) - a).max() <= 2
    assert filled[20:, 12:38, 22:30].all()  # the second view never did


def test_samples_showing_a_shifted_view_are_not_used(tmp_path):
    """The camera moves by 5 px at frame 20 (no cut): background samples from before no
    longer line up, and are rejected by the ring check rather than pasted misaligned."""
    bg = textured_background(72, 48, 6)
    a, b = bg[:, :64], bg[:, 5:69]
    checked = InpaintConfig(cut_threshold=255)
    job = _two_views(tmp_path / "on", b, a) if (tmp_path / "on").mkdir() is None else None
    InpaintStage(checked, job.run).process(job)
    filled = read(job.out_dir / "filled.mkv", "gray") > 127
    assert not filled[:20].any() and filled[20:, 12:38, 22:30].all()

    job = _two_views(tmp_path / "off", b, a) if (tmp_path / "off").mkdir() is None else None
    InpaintStage(InpaintConfig(cut_threshold=255, max_sample_diff=255), job.run).process(job)
    plate = read(job.out_dir / "plate.mkv", "rgb24")
    assert not (read(job.out_dir / "filled.mkv", "gray") > 127)[20:].any()
    # Unchecked, the old view is pasted in: it matches the old view, not the current one.
    region = (slice(12, 38), slice(22, 30))
    assert np.array_equal(plate[30][region], a[region])
    assert not np.array_equal(plate[30][region], b[region])


def test_memory_keeps_the_background_not_a_person_who_walked_in_undetected(tmp_path):
    """Frames 25-31: a person walks in and the detector misses them; from frame 32 they
    stand still, detected, longer than the window. The memory must hold the background
    seen most of the time, not the last values seen (the undetected person)."""
    t, height, width = 60, 48, 64
    bg = textured_background(width, height, 7)
    frames = np.repeat(bg[None], t, axis=0)
    masks = np.zeros((t, height, width), np.uint8)
    boxes = np.full((t, 1, 4), np.nan, np.float32)
    for i in range(25, 32):  # undetected: drawn, but no mask and no box
        frames[i, 10:40, 20 + 3 * max(0, 30 - i):32 + 3 * max(0, 30 - i)] = MAGENTA
    for i in range(32, t):
        draw(frames, masks, boxes, i, 0, 20, 10, 12, 30)
    job = make_job(tmp_path, frames, masks, boxes, chunk=16)
    cfg = InpaintConfig(window_frames=30, samples=30)
    summary = InpaintStage(cfg, job.run).process(job)
    plate = read(job.out_dir / "plate.mkv", "rgb24")
    assert summary["memory_fraction"] > 0
    assert not (read(job.out_dir / "filled.mkv", "gray")[47:] > 127).any()
    assert np.abs(plate[47:].astype(int) - bg).max() <= 2
