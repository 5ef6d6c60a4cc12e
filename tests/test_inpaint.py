"""The inpaint stage on generated scenes where the true background is known."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import cv2
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
    Remover,
    buffer_size_for,
    grid_of,
    median_pick,
    remap_points,
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


def test_static_camera_reads_samples_in_place_exactly_as_without_alignment(scene, tmp_path):
    """A still camera: the tracker reports no motion, nothing is resampled, and the plate
    is bit for bit the one the stage makes with alignment off."""
    s = scene["summary"]
    assert s["camera_aligned"] and s["camera_moving_frames"] == 0
    assert s["camera_unaligned_frames"] == 0 and s["warped_sample_reads"] == 0
    job = scene["job"]
    off = VideoJob(video=job.video, inputs=job.inputs, out_dir=tmp_path, run=job.run,
                   upstream=job.upstream)
    InpaintStage(InpaintConfig(align=False), off.run).process(off)
    for name, fmt in (("plate.mkv", "rgb24"), ("removed.mkv", "gray"), ("filled.mkv", "gray")):
        assert np.array_equal(read(tmp_path / name, fmt), read(job.out_dir / name, fmt))


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


def test_a_shifted_view_is_aligned_or_else_rejected(tmp_path):
    """The camera moves by 5 px at frame 20 (no cut). Aligned, the samples from before are
    moved into the new view and fill it; without alignment they no longer line up and the
    ring check rejects them rather than pasting them misaligned; with neither, the old
    view is pasted in."""
    bg = textured_background(72, 48, 6)
    a, b = bg[:, :64], bg[:, 5:69]
    region = (slice(12, 38), slice(22, 30))
    (tmp_path / "aligned").mkdir()
    job = _two_views(tmp_path / "aligned", b, a)
    summary = InpaintStage(InpaintConfig(cut_threshold=255), job.run).process(job)
    plate = read(job.out_dir / "plate.mkv", "rgb24")
    assert not (read(job.out_dir / "filled.mkv", "gray") > 127).any()
    assert summary["scene_cuts"] == 0 and summary["camera_moving_frames"] == 1
    # Sub-pixel registration, bilinear resampling of a noisy texture: close, not exact.
    assert np.abs(plate[30][region].astype(int) - b[region]).mean() < 1.5

    (tmp_path / "on").mkdir()
    job = _two_views(tmp_path / "on", b, a)
    InpaintStage(InpaintConfig(cut_threshold=255, align=False), job.run).process(job)
    filled = read(job.out_dir / "filled.mkv", "gray") > 127
    assert not filled[:20].any() and filled[20:, 12:38, 22:30].all()

    (tmp_path / "off").mkdir()
    job = _two_views(tmp_path / "off", b, a)
    cfg = InpaintConfig(cut_threshold=255, max_sample_diff=255, align=False)
    InpaintStage(cfg, job.run).process(job)
    plate = read(job.out_dir / "plate.mkv", "rgb24")
    assert not (read(job.out_dir / "filled.mkv", "gray") > 127)[20:].any()
    # Unchecked, the old view is pasted in: it matches the old view, not the current one.
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


def smooth_world(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A wide textured 'room' for a camera to pan over: structure at several scales (so
    features and bilinear resampling both behave as on camera footage), no magenta."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        115 + 50 * np.sin(xx / 13.0) * np.cos(yy / 9.0),
        115 + 50 * np.sin((xx + 2 * yy) / 17.0),
        115 + 50 * np.cos(xx / 7.0 - yy / 19.0),
    ], axis=-1)
    blobs = cv2.GaussianBlur(rng.normal(0, 60, (height, width, 3)).astype(np.float32), (0, 0), 1.5)
    return np.clip(base + blobs, 30, 200).astype(np.uint8)


def panning_scene(t: int = 36, width: int = 128, height: int = 96, seed: int = 0):
    """A camera panning right (2 px a frame) and zooming in (4 % over the clip) over a
    static world, and a 'person' (magenta, masked) walking with the camera so that they
    stay near the frame's centre: what is behind them is only ever seen from another
    viewpoint. Returns frames, masks, boxes and the true background of every frame."""
    world = smooth_world(width * 3, height * 2, seed)
    frames = np.empty((t, height, width, 3), np.uint8)
    truth = np.empty_like(frames)
    masks = np.zeros((t, height, width), np.uint8)
    boxes = np.full((t, 1, 4), np.nan, np.float32)
    for i in range(t):
        zoom = 1.0 + 0.04 * i / max(1, t - 1)
        # Frame pixel x -> world (x - cx) / zoom + cx + origin.
        cx, cy = width / 2, height / 2
        m = np.array([[1 / zoom, 0, cx - cx / zoom + 20 + 2.0 * i],
                      [0, 1 / zoom, cy - cy / zoom + height / 2]], np.float32)
        truth[i] = cv2.warpAffine(world, m, (width, height),
                                  flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)
        frames[i] = truth[i]
        draw(frames, masks, boxes, i, 0, width // 2 - 12 + i // 3, height // 4, 20, height // 2)
    return frames, masks, boxes, truth


def plate_error(job: VideoJob, truth: np.ndarray) -> tuple[float, float]:
    """Mean abs error (0-255) of the plate against the true background over the removed
    pixels, and the fraction of those that were image-inpainted."""
    plate = read(job.out_dir / "plate.mkv", "rgb24").astype(int)
    removed = read(job.out_dir / "removed.mkv", "gray") > 127
    filled = read(job.out_dir / "filled.mkv", "gray") > 127
    return float(np.abs(plate - truth)[removed].mean()), float(filled[removed].mean())


@pytest.fixture(scope="module")
def panning(tmp_path_factory):
    frames, masks, boxes, truth = panning_scene()
    out = {}
    for name, cfg in (("aligned", InpaintConfig()), ("unaligned", InpaintConfig(align=False))):
        tmp = tmp_path_factory.mktemp(name)
        job = make_job(tmp, frames, masks, boxes)
        summary = InpaintStage(cfg, job.run).process(job)
        out[name] = (job, summary)
    return out, truth


def test_panning_camera_plate_matches_the_true_background_when_aligned(panning):
    runs, truth = panning
    job, summary = runs["aligned"]
    error, inpainted = plate_error(job, truth)
    assert summary["camera_moving_frames"] >= 30 and summary["camera_unaligned_frames"] == 0
    assert summary["scene_cuts"] == 0
    assert error < 6.0 and inpainted < 0.05
    plate = read(job.out_dir / "plate.mkv", "rgb24")
    assert not is_magenta(plate).any()


def test_panning_camera_plate_is_wrong_without_alignment(panning):
    runs, truth = panning
    aligned, _ = plate_error(runs["aligned"][0], truth)
    error, inpainted = plate_error(runs["unaligned"][0], truth)
    # Unaligned samples do not line up: the ring check drops them and most of the region is
    # image-inpainted, far from the true texture.
    assert inpainted > 0.5
    assert error > 3 * aligned


def test_long_term_memory_follows_a_panning_camera(tmp_path):
    """A window too short to see behind the person: what it misses comes from the memory,
    which is resampled into each new view, instead of being image-inpainted."""
    frames, masks, boxes, truth = panning_scene()
    results = {}
    for memory in (True, False):
        (tmp_path / str(memory)).mkdir()
        job = make_job(tmp_path / str(memory), frames, masks, boxes)
        cfg = InpaintConfig(window_frames=8, samples=8, long_term_memory=memory)
        summary = InpaintStage(cfg, job.run).process(job)
        results[memory] = (*plate_error(job, truth), summary["memory_fraction"])
    (error, inpainted, memory), (error_off, inpainted_off, _) = results[True], results[False]
    assert memory > 0.02
    assert inpainted < 0.5 * inpainted_off
    assert error < 0.5 * error_off


def test_shadow_ellipse_under_the_feet_of_each_detected_person():
    mask = np.zeros((100, 100), np.uint8)
    mask[20:70, 40:60] = 255  # a 20x50 person standing on y=70
    boxes = np.array([[[40, 20, 60, 70]]], np.float32)
    present = np.ones((1, 1), bool)
    removed, boxed = Remover(InpaintConfig(), 0, boxes, present)(0, mask)
    assert not boxed
    # Half-axes 1.2 x 20 / 2 = 12 px across, 0.08 x 50 = 4 px down, centred on (50, 70).
    assert removed[73, 50] and removed[70, 39] and removed[70, 61]
    assert not removed[75, 50] and not removed[70, 36] and not removed[10, 50]
    off, _ = Remover(InpaintConfig(shadow_height=0), 0, boxes, present)(0, mask)
    assert np.array_equal(off, mask > 64)


def test_remap_points_folds_long_point_lists_and_marks_outside_points():
    img = textured_background(400, 300, 8)
    idx = np.arange(0, 120000)
    h = np.array([[1.01, 0.002, 3.3], [0.001, 1.01, -2.2], [0, 0, 1.0]])
    at = cv2.perspectiveTransform(grid_of(idx, 400), h)
    whole = remap_points(img, at)  # over cv2's 32767-column limit: folded into rows
    parts = np.concatenate([remap_points(img, at[:, i:i + 30000]) for i in range(0, 120000, 30000)])
    assert whole.shape == (120000, 3) and np.array_equal(whole, parts)
    shift = np.array([[1.0, 0, 3], [0, 1.0, -2], [0, 0, 1]])  # whole pixels: exact reads
    moved = remap_points(img, cv2.perspectiveTransform(grid_of(idx, 400), shift))
    assert np.array_equal(moved.reshape(300, 400, 3)[2:, :397], img[:298, 3:])
    luma = np.zeros((300, 400, 1), np.uint16)
    outside = np.array([[[-5.0, 10.0], [10.0, 10.0], [399.5, 10.0]]], np.float32)
    got = remap_points(luma, outside, INVALID_LUMA)[:, 0]
    assert got[0] == INVALID_LUMA and got[1] == 0 and got[2] > 255


def test_background_a_pan_never_showed_is_filled_from_nearby_views_and_flagged(tmp_path):
    """A person standing still in the world while the camera pans over a plain wall: what
    they hide is never seen. Nearby frames read at the same image position show the wall
    a little further along; that stand-in fills most of the hole, flagged as synthesized."""
    t, width, height = 30, 128, 96
    yy, xx = np.mgrid[0:height, 0:width * 2].astype(np.float32)
    wall = np.stack([120 + 20 * np.sin(xx / 40), 140 + 0 * xx, 100 + yy / 4], -1)
    wall = (wall + np.random.default_rng(3).normal(0, 2, wall.shape)).astype(np.uint8)
    frames = np.stack([wall[:, 2 * i:2 * i + width] for i in range(t)]).copy()
    masks = np.zeros((t, height, width), np.uint8)
    boxes = np.full((t, 1, 4), np.nan, np.float32)
    for i in range(t):
        draw(frames, masks, boxes, i, 0, 80 - 2 * i, 20, 16, 50)
    out = {}
    for fill in (True, False):
        (tmp_path / str(fill)).mkdir()
        job = make_job(tmp_path / str(fill), frames, masks, boxes)
        summary = InpaintStage(InpaintConfig(view_fill=fill), job.run).process(job)
        out[fill] = (summary, read(job.out_dir / "filled.mkv", "gray") > 127,
                     read(job.out_dir / "plate.mkv", "rgb24"))
    (on, filled_on, plate), (off, filled_off, _) = out[True], out[False]
    assert on["camera_moving_frames"] == t - 1
    assert off["view_fill_fraction"] == 0 and on["view_fill_fraction"] > 0.5 * on[
        "inpainted_fraction"]
    # Same pixels flagged either way: a stand-in is synthesized, not the real background.
    assert np.array_equal(filled_on, filled_off) and filled_on[:, 25:65, 40:60].any()
    assert on["temporal_fraction"] + on["inpainted_fraction"] == pytest.approx(
        on["removed_fraction"], abs=1e-5)
    assert not is_magenta(plate).any()


def test_samples_showing_a_person_the_detector_missed_are_not_background(tmp_path):
    """A person stands still for the whole clip; the detector finds them only from frame
    20 on. Frames 0-19 show the person where nothing was removed: taken as background, they
    would paste the person back into the plate."""
    t, height, width = 40, 48, 64
    frames = np.repeat(textured_background(width, height, 9)[None], t, axis=0)
    masks = np.zeros((t, height, width), np.uint8)
    boxes = np.full((t, 1, 4), np.nan, np.float32)
    for i in range(t):
        draw(frames, masks if i >= 20 else None, boxes, i, 0, 20, 10, 12, 30)
    boxes[:20] = np.nan  # undetected: no mask, no box
    plates, dropped = {}, {}
    for match in (12.0, 0.0):
        (tmp_path / str(match)).mkdir()
        job = make_job(tmp_path / str(match), frames, masks, boxes)
        summary = InpaintStage(InpaintConfig(person_match=match), job.run).process(job)
        plates[match] = read(job.out_dir / "plate.mkv", "rgb24")[20:]
        dropped[match] = summary["person_like_samples"]
    assert dropped[12.0] > 0 and dropped[0.0] == 0
    assert is_magenta(plates[0.0]).sum() > 1000  # unchecked: the person comes back
    assert not is_magenta(plates[12.0]).any()


# ---------------------------------------------------------------- learned fill (fill: sd)

def _still_person(tmp: Path, t: int = 6):
    """64x48: one person who never moves (all of them is hole), on a static background."""
    tmp.mkdir(parents=True, exist_ok=True)
    height, width = 48, 64
    bg = textured_background(width, height, 4)
    frames = np.repeat(bg[None], t, axis=0)
    masks = np.zeros((t, height, width), np.uint8)
    boxes = np.full((t, 1, 4), np.nan, np.float32)
    for i in range(t):
        draw(frames, masks, boxes, i, 0, 24, 10, 10, 26)
    return make_job(tmp, frames, masks, boxes, chunk=4), frames


@pytest.fixture(scope="module")
def tiny_fill_model(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers", reason="fill=sd needs diffusers")
    pytest.importorskip("transformers", reason="fill=sd needs transformers")
    from sd_tiny import save_tiny_inpaint

    return save_tiny_inpaint(tmp_path_factory.mktemp("fill") / "inpaint")


def test_fill_sd_without_a_model_is_a_config_error(tmp_path):
    from pydantic import ValidationError

    from pipeline.config import ConfigError

    with pytest.raises(ValidationError, match="inpaint.fill_model"):
        InpaintConfig(fill="sd")
    stage = InpaintStage(InpaintConfig(fill="sd", fill_model=str(tmp_path / "nowhere")),
                         RunSection(progress=False))
    with pytest.raises(ConfigError, match=r"inpaint\.fill_model: .*nowhere does not exist"):
        stage.setup()


def test_fill_sd_repaints_only_the_hole_with_the_same_noise_every_frame(tmp_path,
                                                                          tiny_fill_model):
    import torch

    job, _ = _still_person(tmp_path / "classical")
    base = InpaintStage(InpaintConfig(), job.run).process(job)
    classical = read(job.out_dir / "plate.mkv", "rgb24")
    hole = read(job.out_dir / "filled.mkv", "gray") > 127  # static camera: no view fill
    assert hole[:, 10:36, 24:34].all()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads on a busy CI box
    try:
        job, _ = _still_person(tmp_path / "sd")
        cfg = dict(fill="sd", fill_model=str(tiny_fill_model), fill_resolution=32,
                   fill_steps=2, fill_guidance=1.0, fill_min_px=16)
        stage = InpaintStage(InpaintConfig(**cfg), job.run)
        summary = stage.process(job)
        # Keyframes: the model runs on frames 0 and 4; 1-3 and 5 take their fill.
        key_job, _ = _still_person(tmp_path / "keys")
        keyed = InpaintStage(InpaintConfig(**cfg, fill_every=4), key_job.run)
        keyed.fill_pipe = stage.fill_pipe
        key_summary = keyed.process(key_job)
    finally:
        torch.set_num_threads(threads)
    plate = read(job.out_dir / "plate.mkv", "rgb24")
    assert key_summary["sd_fill_crops"] == 2 and key_summary["sd_fill_carried_frames"] == 4
    assert np.array_equal(read(key_job.out_dir / "plate.mkv", "rgb24"), plate)
    assert key_summary["sd_filled_pixels"] == summary["sd_filled_pixels"]
    # Every other pixel is the classical plate's, bit for bit; the hole is repainted.
    assert np.array_equal(plate[~hole], classical[~hole])
    assert np.abs(plate[hole].astype(int) - classical[hole]).mean() > 5
    assert not is_magenta(plate).any()
    assert np.array_equal(read(job.out_dir / "filled.mkv", "gray") > 127, hole)
    # The same seed and the same surroundings in every frame: the same fill.
    assert all(np.array_equal(plate[0], p) for p in plate[1:])
    assert summary["fill"] == "sd" and base["fill"] == "classical"
    assert summary["sd_filled_pixels"] == hole.sum()
    assert summary["sd_fill_frames"] == len(plate) == summary["sd_fill_crops"]
    assert summary["hole_fraction"] == pytest.approx(hole.mean(), abs=1e-6)
