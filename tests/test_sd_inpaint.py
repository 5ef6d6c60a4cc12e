"""sd-inpaint harmonization with a tiny random diffusers pipeline (CPU, 32 px, 2 steps).

The tiny pipeline (tests/sd_tiny.py) is built from config, saved in diffusers layout and
loaded back through stages.sd_inpaint.load_pipeline, the code path users take.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers", reason="sd-inpaint needs diffusers (pip install diffusers)")
pytest.importorskip("transformers", reason="sd-inpaint needs transformers")

from sd_tiny import TINY_SIZE, save_tiny_controlnet, save_tiny_inpaint  # noqa: E402
from test_harmonize import (  # noqa: E402
    H,
    T,
    W,
    dark_plate,
    ellipse_avatar,
    make_job,
    read,
    write_video,
)

from pipeline.config import ConfigError, RunSection  # noqa: E402
from pipeline.dataset import VideoItem  # noqa: E402
from pipeline.stage import VideoJob  # noqa: E402
from stages.harmonize import HarmonizeConfig, HarmonizeStage  # noqa: E402
from stages.sd_inpaint import (  # noqa: E402
    Repainter,
    SDOptions,
    band_flicker,
    check_controlnet_path,
    check_model_path,
    describe,
    load_pipeline,
)

MAGENTA, GREEN = (255, 0, 255), (0, 255, 0)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core CI machine OpenMP's
    spinning threads make each call 20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sd")
    return {"model": save_tiny_inpaint(root / "inpaint"),
            "controlnet": save_tiny_controlnet(root / "controlnet")}


def sd_config(model: Path, **kw) -> HarmonizeConfig:
    base = dict(method="sd-inpaint", model=str(model), resolution=TINY_SIZE, steps=4,
                strength=0.5, guidance=2.0, band_px=4, band_feather_px=2.0, batch_size=8,
                contact_shadow=0.0)
    return HarmonizeConfig(**{**base, **kw})


IDENTITY = {"track_id": 7, "slot": 0, "age_years": 31.0, "phenotype": {"gender": 0.9},
            "skin": {"name": "V-a", "fitzpatrick": 5},
            "hair": {"style": "long", "name": "dark-brown"}, "head_cover": {"style": "none"},
            "top": {"name": "royal-blue", "pattern": "stripes", "sleeves": "short"},
            "bottom": {"name": "denim", "style": "jeans"}}


def add_render_extras(job: VideoJob, avatar: np.ndarray) -> None:
    """instances.mkv, depth.mkv and identities.json for the ellipse avatar (slot 0)."""
    render = job.inputs["render"]
    inst = np.where(avatar[..., 3] > 127, 1, 0).astype(np.uint8)
    write_video(render / "instances.mkv", inst, "gray")
    rows = np.arange(H, dtype=np.uint16)[None, :, None]
    depth = np.where(inst > 0, 2500 + 10 * rows, 0).astype(np.uint16)
    write_video(render / "depth.mkv", depth, "gray16")
    (render / "identities.json").write_text(json.dumps({"tracks": [IDENTITY]}))


def run_sd(tmp: Path, cfg: HarmonizeConfig, plate=None, avatar=None, record=False):
    plate = dark_plate() if plate is None else plate
    avatar = ellipse_avatar() if avatar is None else avatar
    tmp.mkdir(parents=True, exist_ok=True)
    job = make_job(tmp, plate, np.zeros(plate.shape[:3], np.uint8), avatar)
    add_render_extras(job, avatar)
    stage = HarmonizeStage(cfg, job.run)
    stage.setup()
    stage_record(stage, record)
    summary = stage.process(job)
    out = {"summary": summary, "comp": read(job.out_dir / "composite.mkv", "rgb24"),
           "sens": read(job.out_dir / "sensitivity.mkv", "gray"), "stage": stage}
    return out


def stage_record(stage: HarmonizeStage, record: bool) -> None:
    """Wrap the pipeline so every image it is given is kept (the leak test looks at them)."""
    if not record:
        return
    pipe, seen = stage.pipe, []

    def spy(**kwargs):
        seen.append(np.asarray(kwargs["image"]))
        return type(pipe).__call__(pipe, **kwargs)

    stage.pipe = spy
    stage.seen = seen


def classical(tmp: Path, plate=None, avatar=None) -> np.ndarray:
    plate = dark_plate() if plate is None else plate
    avatar = ellipse_avatar() if avatar is None else avatar
    tmp.mkdir(parents=True, exist_ok=True)
    job = make_job(tmp, plate, np.zeros(plate.shape[:3], np.uint8), avatar)
    HarmonizeStage(HarmonizeConfig(contact_shadow=0.0), job.run).process(job)
    return read(job.out_dir / "composite.mkv", "rgb24")


def test_model_folder_errors_name_what_is_missing(tmp_path, tiny):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(ConfigError, match="does not exist"):
        check_model_path(str(tmp_path / "nowhere"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny["model"], broken)
    shutil.rmtree(broken / "unet")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(ConfigError, match=r"missing: unet, tokenizer$"):
        check_model_path(str(broken))
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    with pytest.raises(ConfigError, match="needs harmonize.checkpoint_config"):
        check_model_path(str(ckpt))
    no_config = tmp_path / "controlnet"
    shutil.copytree(tiny["controlnet"], no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(ConfigError, match="missing config.json"):
        check_controlnet_path(str(no_config))
    with pytest.raises(ConfigError, match="missing: unet, tokenizer"):
        HarmonizeStage(sd_config(broken), RunSection()).setup()
    # All parts there but a component's weights are not loadable: named, as a config error.
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny["model"], corrupt)
    for weights in (corrupt / "vae").glob("diffusion_pytorch_model*"):
        weights.write_bytes(b"not a tensor file")
    with pytest.raises(ConfigError, match=f"cannot load {corrupt}"):
        load_pipeline(SDOptions(model=str(corrupt)))
    # A single checkpoint takes its architecture from checkpoint_config (offline); this
    # one holds no text encoder weights, which the error says.
    import torch
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(16, 9, 3, 3)},
              str(ckpt))
    with pytest.raises(ConfigError, match="cannot load .*CLIPTextModel"):
        load_pipeline(SDOptions(model=str(ckpt), checkpoint_config=str(tiny["model"])))


def test_repaint_is_deterministic_per_track_and_seed(tiny):
    pipe = load_pipeline(SDOptions(model=str(tiny["model"]), resolution=TINY_SIZE, steps=4,
                                   strength=0.5, guidance=1.0))
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)
    images[1] = images[0]
    masks = np.zeros((2, TINY_SIZE, TINY_SIZE), bool)
    masks[:, 8:24, 8:24] = True

    def run(seed: int, tracks: list[int]) -> np.ndarray:
        opts = SDOptions(model="", resolution=TINY_SIZE, steps=4, strength=0.5, guidance=1.0,
                         seed=seed)
        return Repainter(pipe, opts)(images, masks, ["a person"] * 2, tracks)

    first = run(0, [3, 3])
    assert first.shape == (2, TINY_SIZE, TINY_SIZE, 3)
    assert np.array_equal(first, run(0, [3, 3]))
    assert np.array_equal(first[0], first[1])  # same track, same image: same noise
    other_track = run(0, [3, 4])
    assert not np.array_equal(other_track[0], other_track[1])
    assert not np.array_equal(first, run(1, [3, 3]))


def test_stage_repaints_only_the_band_and_avatar(tmp_path, tiny):
    res = run_sd(tmp_path / "sd", sd_config(tiny["model"]))
    base = classical(tmp_path / "classical")
    avatar = ellipse_avatar()
    inst = avatar[..., 3] > 127
    from stages.compositing import dilate

    region = np.stack([dilate(m, 4) for m in inst])
    comp, sens, summary = res["comp"], res["sens"], res["summary"]
    assert summary["method"] == "sd-inpaint" and summary["repainted_crops"] == T
    # Outside the band+avatar region the output is the classical composite, bit for bit.
    assert np.array_equal(comp[~region], base[~region])
    changed = np.any(comp != base, axis=-1)
    assert changed[region].mean() > 0.3
    # Repainted pixels are synthesized; far from the avatar the background stays sensitive.
    assert (sens[changed] == 0).all()
    assert (sens[~region & (avatar[..., 3] == 0)] == 255).all()
    assert set(summary["flicker_band"]) == {"sd", "classical"}
    assert summary["flicker_band"]["sd"] > 0


def test_the_source_person_never_reaches_the_model_or_the_output(tmp_path, tiny):
    """A person painted in a magenta/green checker is removed by inpaint; sd-inpaint sees
    only the composite, so the pattern is in no model input and no output pixel."""
    from stages.inpaint import InpaintConfig, InpaintStage

    frames = dark_plate(5)
    masks = np.zeros((T, H, W), np.uint8)
    yy, xx = np.mgrid[0:H, 0:W]
    checker = np.where(((yy // 3 + xx // 3) % 2 == 0)[..., None], MAGENTA, GREEN)
    for i in range(T):  # the real person walks left, the avatar stands where it was fitted
        x0 = 50 + i
        frames[i, 12:52, x0:x0 + 14] = checker[12:52, x0:x0 + 14]
        masks[i, 12:52, x0:x0 + 14] = 255
    src = write_video(tmp_path / "clip.mkv", frames, "rgb")
    detect, inpaint = tmp_path / "detect", tmp_path / "inpaint"
    detect.mkdir()
    inpaint.mkdir()
    write_video(detect / "mask.mkv", masks, "gray")
    info = {"width": W, "height": H, "fps_num": 25, "fps_den": 1, "frame_count": T}
    run = RunSection(chunk_frames=10, progress=False)
    video = VideoItem(id="clip", path=src, rel_path="clip.mkv")
    InpaintStage(InpaintConfig(), run).process(VideoJob(
        video=video, inputs={"detect": detect}, out_dir=inpaint, run=run,
        upstream={"detect": {"video": info}}))
    plate = read(inpaint / "plate.mkv", "rgb24")

    res = run_sd(tmp_path / "sd", sd_config(tiny["model"], band_px=8), plate=plate,
                 record=True)
    seen = np.concatenate(res["stage"].seen)
    assert len(seen) == T

    def pattern(images: np.ndarray) -> np.ndarray:
        rgb = images.astype(np.float32)
        if rgb.max() <= 1.0:
            rgb = rgb * 255.0
        near = [np.abs(rgb - np.array(c, np.float32)).max(axis=-1) < 60 for c in (MAGENTA,
                                                                                   GREEN)]
        return near[0] | near[1]

    assert pattern(frames).sum() > 1000  # the detector for the pattern works
    assert not pattern(seen).any()
    assert not pattern(res["comp"]).any()


def test_keyframes_match_per_frame_on_keyframes_only(tmp_path, tiny):
    every = sd_config(tiny["model"])
    per_frame = run_sd(tmp_path / "every", every)["comp"]
    for carry in ("track", "flow"):
        res = run_sd(tmp_path / carry, sd_config(tiny["model"], keyframe_every=5,
                                                 keyframe_carry=carry))
        comp = res["comp"]
        keys = [t for t in range(T) if t % 5 == 0] + [T - 1]
        between = [t for t in range(T) if t not in keys]
        assert res["summary"]["repainted_crops"] == len(keys)
        assert np.array_equal(comp[keys], per_frame[keys])
        assert all(not np.array_equal(comp[t], per_frame[t]) for t in between)
        # The frames between still differ from the composite only near the avatar.
        base = classical(tmp_path / f"c_{carry}")
        far = np.ones((T, H, W), bool)
        for t in range(T):
            far[t, :, max(0, 20 + 2 * t - 20):20 + 2 * t + 21] = False
        assert np.array_equal(comp[far], base[far])


def test_controlnet_conditions_on_avatar_depth(tmp_path, tiny):
    res = run_sd(tmp_path / "cn", sd_config(tiny["model"], controlnet=str(tiny["controlnet"]),
                                            controlnet_scale=2.0))
    assert "ControlNet" in type(res["stage"].pipe).__name__
    plain = run_sd(tmp_path / "plain", sd_config(tiny["model"]))
    assert not np.array_equal(res["comp"], plain["comp"])


def test_describe_and_flicker():
    text = describe(IDENTITY)
    assert text == ("a 31 year old woman, with brown skin and long dark brown hair, wearing a "
                    "short-sleeved royal blue top with stripes and denim jeans")
    assert describe(None) == "a person"
    still = [np.full((4, 4, 3), 10, np.uint8)] * 3
    moving = [np.full((4, 4, 3), v, np.uint8) for v in (10, 14, 10)]
    region = [np.ones((4, 4), bool)] * 3
    assert band_flicker(still, region) == 0
    assert band_flicker(moving, region) == pytest.approx(4.0)


def test_auto_picks_sd_inpaint_only_with_a_model_and_cuda(tiny, monkeypatch, caplog):
    import torch

    from stages.harmonize import resolve_method

    cfg = sd_config(tiny["model"], method="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("INFO", logger="stages.harmonize"):
        assert resolve_method(cfg) == "classical"
    assert "using classical (no CUDA device)" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_method(cfg) == "sd-inpaint"
    assert resolve_method(HarmonizeConfig(method="auto")) == "classical"


# ---------------------------------------------------------------- keypoint ControlNet

# A stick figure (COCO-23, frame pixels relative to the ellipse avatar's centre x, y=30).
FIGURE = {"nose": (0, -17), "left_eye": (1, -18), "right_eye": (-1, -18),
          "left_ear": (2, -17), "right_ear": (-2, -17), "left_shoulder": (5, -11),
          "right_shoulder": (-5, -11), "left_elbow": (7, -3), "right_elbow": (-7, -3),
          "left_wrist": (7, 4), "right_wrist": (-7, 4), "left_hip": (3, 4),
          "right_hip": (-3, 4), "left_knee": (3, 11), "right_knee": (-3, 11),
          "left_ankle": (3, 18), "right_ankle": (-3, 18), "left_big_toe": (4, 19),
          "right_big_toe": (-4, 19), "left_small_toe": (5, 19), "right_small_toe": (-5, 19),
          "left_heel": (3, 19), "right_heel": (-3, 19)}
CAMERA = np.array([100.0, 100.0, W / 2, H / 2], np.float32)


def figure_pixels(t: int) -> np.ndarray:
    """COCO-23 pixel positions [23, 2] of the figure in frame t (it walks with the avatar)."""
    from stages.body import COCO23

    return np.array([(20 + 2 * t + FIGURE[n][0], 30 + FIGURE[n][1]) for n in COCO23],
                    np.float32)


def write_bodies(folder: Path) -> None:
    """fit/bodies.npz whose joints3d project (through CAMERA) onto the figure at 2.5 m."""
    folder.mkdir(parents=True, exist_ok=True)
    z = 2.5
    px = np.stack([figure_pixels(t) for t in range(T)])[:, None]  # [T, 1, 23, 2]
    joints = np.concatenate([(px[..., :1] - CAMERA[2]) * z / CAMERA[0],
                             (px[..., 1:] - CAMERA[3]) * z / CAMERA[1],
                             np.full(px[..., :1].shape, z, np.float32)], axis=-1)
    np.savez(folder / "bodies.npz", track_ids=np.array([7], np.int32),
             present=np.ones((T, 1), bool), joints3d=joints.astype(np.float32), camera=CAMERA)


def test_keypoint_control_draws_an_openpose_skeleton_where_the_keypoints_are():
    from stages.body import COCO23
    from stages.sd_inpaint import (
        OPENPOSE_JOINTS,
        Crop,
        keypoint_control,
        limb_colours,
        openpose_points,
    )

    px = figure_pixels(0)
    coco = np.concatenate([px, np.ones((len(px), 1), np.float32)], axis=1)
    coco[COCO23.index("left_wrist"), 2] = 0  # not seen: no left forearm, no wrist dot
    points = openpose_points(coco, COCO23)
    crop = Crop(y0=0, x0=0, side=56)
    size = 112  # 2 model px per frame px
    image = keypoint_control(points, crop, size)

    def at(x: float, y: float) -> np.ndarray:
        return image[round((y - crop.y0 + 0.5) * 2 - 0.5), round((x - crop.x0 + 0.5) * 2 - 0.5)]

    colours = limb_colours(len(OPENPOSE_JOINTS)).astype(int)
    for j, name in enumerate(OPENPOSE_JOINTS):
        if name in (None, "left_wrist"):
            continue
        seen = at(*px[COCO23.index(name)]).astype(int)
        if 0 < j < 14:  # body joints: their own colour (the face dots overlap each other)
            # (antialiased 1-px dots: the nearest palette colour is the joint's own)
            assert np.abs(colours - seen).sum(axis=1).argmin() == j, name
        assert seen.max() > 100, name
    # The right upper arm (limb 2: shoulder 2 -> elbow 3) midway, at 60 % of its colour.
    shoulder, elbow = px[COCO23.index("right_shoulder")], px[COCO23.index("right_elbow")]
    assert np.abs(at(*(shoulder + elbow) / 2).astype(int) - 0.6 * colours[2]).max() <= 3
    wrist, left_elbow = px[COCO23.index("left_wrist")], px[COCO23.index("left_elbow")]
    assert not at(*wrist).any() and not at(*(wrist * 0.6 + left_elbow * 0.4)).any()
    assert not image[:10].any() and not image[:, -20:].any()  # black away from the figure
    assert 0.02 < (image.max(axis=2) > 0).mean() < 0.3
    assert not keypoint_control(None, crop, size).any()


def test_keypoint_controlnet_sees_the_avatars_skeleton(tmp_path, tiny):
    from stages.compositing import dilate
    from stages.sd_inpaint import Crop

    cfg = sd_config(tiny["model"], controlnet=str(tiny["controlnet"]), control="keypoints",
                    controlnet_scale=2.0, keyframe_every=6)
    avatar = ellipse_avatar()
    tmp = tmp_path / "kp"
    tmp.mkdir()
    job = make_job(tmp, dark_plate(), np.zeros((T, H, W), np.uint8), avatar)
    add_render_extras(job, avatar)
    (job.inputs["render"] / "depth.mkv").unlink()  # the keypoint control does not read it
    write_bodies(tmp / "motion")
    job.inputs["motion"] = tmp / "motion"
    stage = HarmonizeStage(cfg, job.run)
    stage.setup()
    pipe, controls = stage.pipe, []

    def spy(**kwargs):
        controls.extend(np.asarray(kwargs["control_image"]))
        return type(pipe).__call__(pipe, **kwargs)

    stage.pipe = spy
    summary = stage.process(job)
    assert summary["repainted_crops"] == len(controls) == 5  # frames 0, 6, 12, 18, 23
    inst = avatar[..., 3] > 127
    for t, control in zip((0, 6, 12, 18, 23), controls, strict=True):
        crop = Crop.around(dilate(inst[t], cfg.band_px))
        scale = TINY_SIZE / crop.side
        drawn = control.max(axis=2) > 0
        for x, y in figure_pixels(t)[[0, 5, 6, 13, 14]]:  # nose, shoulders, knees
            row, col = (round((v - o + 0.5) * scale - 0.5) for v, o in ((y, crop.y0),
                                                                     (x, crop.x0)))
            assert drawn[row, col], (t, x, y)
        assert drawn.mean() < 0.6
    comp = read(job.out_dir / "composite.mkv", "rgb24")
    depth = run_sd(tmp_path / "depth", sd_config(
        tiny["model"], controlnet=str(tiny["controlnet"]), controlnet_scale=2.0,
        keyframe_every=6))
    assert not np.array_equal(comp, depth["comp"])


def test_keypoint_control_without_the_fit_artifact_fails_the_video(tmp_path, tiny):
    from pipeline.stage import VideoFailed

    cfg = sd_config(tiny["model"], controlnet=str(tiny["controlnet"]), control="keypoints")
    job = make_job(tmp_path, dark_plate(), np.zeros((T, H, W), np.uint8), ellipse_avatar())
    add_render_extras(job, ellipse_avatar())
    job.inputs["motion"] = tmp_path / "motion"
    with pytest.raises(VideoFailed, match="bodies.npz missing"):
        HarmonizeStage(cfg, job.run).process(job)
