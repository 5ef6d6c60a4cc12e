"""The harmonize stage on generated plates and avatars."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.config import ConfigError, RunSection, load_config
from pipeline.dataset import VideoItem
from pipeline.stage import VideoFailed, VideoJob
from pipeline.video import VideoWriter, count_frames, iter_frames, probe
from stages.harmonize import HarmonizeConfig, HarmonizeStage

FPS = Fraction(25, 1)
T, H, W = 24, 64, 96
AVATAR_RGB = (235, 210, 70)  # bright yellow clothing on a dark scene


def write_video(path: Path, frames: np.ndarray, kind: str) -> Path:
    with VideoWriter(path, FPS, frames.shape[2], frames.shape[1], kind) as w:
        w.write_chunk(frames)
    return path


def read(path: Path, fmt: str) -> np.ndarray:
    return np.stack(list(iter_frames(path, fmt)))


def dark_plate(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    base = np.stack([40 + xx / 6, 45 + yy / 4, 60 + 0 * xx], axis=-1)
    frame = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    return np.repeat(frame[None], T, axis=0)


def ellipse_avatar(frames: int = T, visible: bool = True) -> np.ndarray:
    """A standing ellipse walking right, antialiased edge, straight alpha."""
    rgba = np.zeros((frames, H, W, 4), np.uint8)
    if not visible:
        return rgba
    for i in range(frames):
        alpha = np.zeros((H * 4, W * 4), np.uint8)
        cv2.ellipse(alpha, ((20 + 2 * i) * 4, 30 * 4), (8 * 4, 20 * 4), 0, 0, 360, 255, -1)
        rgba[i, ..., 3] = cv2.resize(alpha, (W, H), interpolation=cv2.INTER_AREA)
        rgba[i, ..., :3] = np.where(rgba[i, ..., 3:] > 0, np.array(AVATAR_RGB, np.uint8), 0)
    return rgba


def make_job(tmp: Path, plate: np.ndarray, filled: np.ndarray, avatar: np.ndarray) -> VideoJob:
    render, inpaint, out = tmp / "render", tmp / "inpaint", tmp / "out"
    for d in (render, inpaint, out):
        d.mkdir()
    write_video(inpaint / "plate.mkv", plate, "rgb")
    write_video(inpaint / "filled.mkv", filled, "gray")
    write_video(inpaint / "removed.mkv", filled, "gray")
    write_video(render / "avatar.mkv", avatar, "rgba")
    n, h, w = plate.shape[:3]
    info = {"width": w, "height": h, "fps_num": FPS.numerator, "fps_den": FPS.denominator,
            "frame_count": n}
    return VideoJob(
        video=VideoItem(id="clip", path=tmp / "clip.mp4", rel_path="clip.mp4"),
        inputs={"render": render, "inpaint": inpaint},
        out_dir=out,
        run=RunSection(chunk_frames=10, progress=False),
        upstream={"render": {}, "inpaint": {"video": info}},
    )


def run_stage(tmp: Path, cfg: HarmonizeConfig, plate=None, filled=None, avatar=None):
    plate = dark_plate() if plate is None else plate
    filled = np.zeros(plate.shape[:3], np.uint8) if filled is None else filled
    avatar = ellipse_avatar() if avatar is None else avatar
    job = make_job(tmp, plate, filled, avatar)
    stage = HarmonizeStage(cfg, job.run)
    stage.setup()
    summary = stage.process(job)
    comp = read(job.out_dir / "composite.mkv", "rgb24")
    sens = read(job.out_dir / "sensitivity.mkv", "gray")
    return summary, comp, sens, plate, avatar


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def deep_inside(avatar: np.ndarray) -> np.ndarray:
    """Avatar pixels beyond the feather band (5 px inside the silhouette)."""
    kernel = np.ones((11, 11), np.uint8)
    return np.stack([cv2.erode((a == 255).astype(np.uint8), kernel) > 0
                     for a in avatar[..., 3]])


def test_composite_is_plate_off_avatar_and_sensitivity_marks_synthesized(tmp_path):
    filled = np.zeros((T, H, W), np.uint8)
    filled[:, 50:60, 70:90] = 255  # pixels the inpaint stage made up
    summary, comp, sens, plate, avatar = run_stage(
        tmp_path, HarmonizeConfig(contact_shadow=0.0), filled=filled)
    for name in ("composite.mkv", "sensitivity.mkv"):
        info = probe(tmp_path / "out" / name)
        assert (info.width, info.height, info.fps) == (W, H, FPS)
        assert count_frames(tmp_path / "out" / name) == T
    alpha = avatar[..., 3]
    assert np.array_equal(comp[alpha == 0], plate[alpha == 0])
    expected = np.where((alpha > 0) | (filled > 0), 0, 255)
    assert np.array_equal(sens, expected)
    assert summary["method"] == "classical"
    assert summary["mean_avatar_coverage"] == pytest.approx((alpha > 0).mean(), abs=1e-5)
    assert summary["mean_sensitive_fraction"] == pytest.approx((sens == 255).mean(), abs=1e-5)


def test_edge_is_feathered_inside_the_silhouette(tmp_path):
    _, comp, _, plate, avatar = run_stage(
        tmp_path, HarmonizeConfig(contact_shadow=0.0, color_match_strength=0.0, feather_px=4))
    alpha = avatar[..., 3]
    inner = cv2.erode((alpha == 255).astype(np.uint8)[0], np.ones((3, 3), np.uint8)) > 0
    edge = (alpha[0] == 255) & ~inner
    avatar_l, plate_l, comp_l = luminance(avatar[0]), luminance(plate[0]), luminance(comp[0])
    # At the silhouette's edge the composite lies between plate and avatar ...
    mix = (comp_l[edge] - plate_l[edge]) / (avatar_l[edge] - plate_l[edge])
    assert 0.2 < mix.mean() < 0.8
    # ... and well inside it, with no colour matching, it is the avatar as rendered.
    core = cv2.erode(inner.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    assert np.abs(comp[0][core].astype(int) - np.array(AVATAR_RGB)).max() <= 1


def test_colour_matching_moves_avatar_luminance_toward_surroundings(tmp_path):
    results = {}
    for strength in (0.0, 0.5, 1.0):
        sub = tmp_path / f"s{strength}"
        sub.mkdir()
        _, comp, _, plate, avatar = run_stage(
            sub, HarmonizeConfig(contact_shadow=0.0, color_match_strength=strength))
        core = deep_inside(avatar)
        results[strength] = luminance(comp)[core].mean()
    avatar_l = luminance(np.array(AVATAR_RGB, np.float64))
    ring_l = luminance(dark_plate()).mean()
    assert results[0.0] == pytest.approx(avatar_l, abs=3)
    assert results[1.0] < results[0.5] < results[0.0]
    # Full strength brings it to the surroundings' brightness.
    assert abs(results[1.0] - ring_l) < 0.15 * (avatar_l - ring_l)
    # Half strength keeps the avatar clearly brighter than the scene (clothing survives).
    assert results[0.5] > ring_l + 0.4 * (avatar_l - ring_l)


def test_colour_matching_keeps_clothing_hue(tmp_path):
    _, comp, _, _, avatar = run_stage(tmp_path, HarmonizeConfig(contact_shadow=0.0))
    core = deep_inside(avatar)
    r, g, b = (comp[core][:, c].astype(float).mean() for c in range(3))
    assert r > b + 60 and g > b + 40  # still yellow


def test_contact_shadow_darkens_below_the_feet_only(tmp_path):
    _, comp, _, plate, avatar = run_stage(tmp_path, HarmonizeConfig(contact_shadow=0.6))
    alpha = avatar[..., 3]
    # Frame 0: ellipse centred at x=20, bottom at y=50.
    below = comp[0, 51:53, 16:25].astype(int) - plate[0, 51:53, 16:25].astype(int)
    assert below.mean() < -5
    far = (alpha[0] == 0)
    far[:, :50] = False
    assert np.array_equal(comp[0][far], plate[0][far])  # x >= 50: no shadow there
    assert np.array_equal(comp[0, :20][alpha[0, :20] == 0], plate[0, :20][alpha[0, :20] == 0])


def test_no_avatar_passes_plate_through(tmp_path):
    plate = dark_plate(3)
    plate[:] += np.arange(T, dtype=np.uint8)[:, None, None, None]
    summary, comp, sens, plate, _ = run_stage(
        tmp_path, HarmonizeConfig(), plate=plate, avatar=ellipse_avatar(visible=False))
    assert np.array_equal(comp, plate)
    assert (sens == 255).all()
    assert summary["mean_avatar_coverage"] == 0 and summary["mean_sensitive_fraction"] == 1


def test_avatar_with_fewer_frames_fails_the_video(tmp_path):
    job = make_job(tmp_path, dark_plate(), np.zeros((T, H, W), np.uint8), ellipse_avatar(T - 5))
    with pytest.raises(VideoFailed, match="frame count mismatch"):
        HarmonizeStage(HarmonizeConfig(), job.run).process(job)


def test_sd_inpaint_without_model_is_a_config_error(tmp_path):
    with pytest.raises(ValidationError, match="needs harmonize.model"):
        HarmonizeConfig(method="sd-inpaint")
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text("harmonize:\n  method: sd-inpaint\n")
    with pytest.raises(ConfigError, match="needs harmonize.model"):
        load_config(cfg_file, {"harmonize": HarmonizeConfig})


def test_sd_inpaint_with_an_empty_model_folder_names_what_is_missing(tmp_path):
    stage = HarmonizeStage(HarmonizeConfig(method="sd-inpaint", model=str(tmp_path)),
                           RunSection())
    with pytest.raises(ConfigError, match="missing: model_index.json, unet, vae"):
        stage.setup()


def test_auto_without_model_is_classical(tmp_path, caplog):
    with caplog.at_level("INFO", logger="stages.harmonize"):
        summary, *_ = run_stage(tmp_path, HarmonizeConfig(method="auto"))
    assert summary["method"] == "classical"
    assert "using classical (no harmonize.model)" in caplog.text


def test_after_inpaint_synthesized_plate_pixels_are_not_sensitive(tmp_path):
    """inpaint -> harmonize: a person who never moves is image-inpainted; those pixels and
    the avatar's are marked synthesized, the rest of the frame stays sensitive."""
    from stages.inpaint import InpaintConfig, InpaintStage

    frames = dark_plate(5)
    masks = np.zeros((T, H, W), np.uint8)
    frames[:, 10:40, 60:70] = (255, 0, 255)
    masks[:, 10:40, 60:70] = 255
    src = write_video(tmp_path / "clip.mkv", frames, "rgb")
    detect, inpaint = tmp_path / "detect", tmp_path / "inpaint"
    detect.mkdir()
    inpaint.mkdir()
    write_video(detect / "mask.mkv", masks, "gray")
    info = {"width": W, "height": H, "fps_num": 25, "fps_den": 1, "frame_count": T}
    run = RunSection(chunk_frames=10, progress=False)
    video = VideoItem(id="clip", path=src, rel_path="clip.mkv")
    inpaint_summary = InpaintStage(InpaintConfig(box_fallback=False), run).process(VideoJob(
        video=video, inputs={"detect": detect}, out_dir=inpaint, run=run,
        upstream={"detect": {"video": info}}))
    assert inpaint_summary["inpainted_fraction"] > 0

    render, out = tmp_path / "render", tmp_path / "out"
    render.mkdir()
    out.mkdir()
    avatar = ellipse_avatar()
    write_video(render / "avatar.mkv", avatar, "rgba")
    job = VideoJob(video=video, inputs={"render": render, "inpaint": inpaint}, out_dir=out,
                   run=run, upstream={"render": {}, "inpaint": inpaint_summary})
    HarmonizeStage(HarmonizeConfig(), run).process(job)
    filled = read(inpaint / "filled.mkv", "gray") > 127
    sens = read(out / "sensitivity.mkv", "gray")
    assert filled[:, 10:40, 60:70].all()
    assert np.array_equal(sens == 0, filled | (avatar[..., 3] > 0))
    comp = read(out / "composite.mkv", "rgb24")
    assert not ((comp[..., 0] > 220) & (comp[..., 1] < 40) & (comp[..., 2] > 220)).any()
