"""The harmonize stage: the rendered avatars composited into the clean plate.

Methods:
- classical: alpha compositing with a feathered edge (the alpha fades to zero over
  `feather_px` inside the silhouette, never outside it), the avatar's brightness and colour
  moved toward a ring of plate pixels around its silhouette (LAB: luminance mean and
  contrast at `color_match_strength`, colour cast at half that, so clothing colours
  survive; statistics smoothed over time so the avatar does not flicker) and an optional
  soft contact shadow under the feet.
- sd-inpaint: the classical composite, then Stable Diffusion inpainting (diffusers, a local
  model folder or checkpoint, offline) repaints each avatar and a band of `band_px` around
  its silhouette at low `strength`, so edges, lighting and contact shadows match while the
  pose and identity stay (stages/sd_inpaint.py). An optional ControlNet sees the avatar's
  depth (`control: depth`) or an OpenPose-style skeleton of its keypoints (`control:
  keypoints`: fit's joints3d projected with fit's camera), so the repaint keeps its shape.
  Prompts describe each track's sampled appearance (render/identities.json). The model
  sees only the composite, never the source frame; pixels outside the repainted regions
  are exactly the classical composite's.
- auto: sd-inpaint when `model` is set and a CUDA device is present, classical otherwise
  (the log says which).

sensitivity.mkv: 0 where a pixel is synthesized (avatar alpha > 0 after feathering,
repainted by sd-inpaint, or image-inpainted by the inpaint stage), 255 where it is still
real background. The contact shadow only darkens real background, so those pixels stay
sensitive.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from pipeline.config import ConfigError, Section
from pipeline.stage import Resources, Stage, VideoFailed, VideoJob
from pipeline.video import VideoWriter
from stages.compositing import check_size, dilate, fps_of, iter_aligned, video_info
from stages.sd_inpaint import (
    FlickerMeter,
    FrameData,
    Harmonizer,
    Repainter,
    SDOptions,
    check_controlnet_path,
    check_model_path,
    load_pipeline,
    openpose_points,
    project_points,
    track_prompts,
)

log = logging.getLogger(__name__)

SD_NEEDS_MODEL = (
    "harmonize.method=sd-inpaint needs harmonize.model (a local diffusers inpainting folder "
    "or a .safetensors/.ckpt checkpoint)"
)
DEFAULT_PROMPT = (
    "a photo of {person}, natural light, realistic shadows and skin, film grain, sharp focus"
)
DEFAULT_NEGATIVE = (
    "cartoon, 3d render, cgi, plastic, doll, painting, blurry, deformed, extra limbs, "
    "text, watermark, halo, outline"
)
# Colour casts are matched at this fraction of color_match_strength (clothing keeps its hue).
CHROMA_SHARE = 0.5
# Limits of the luminance contrast gain, so a flat ring cannot wash the avatar out.
GAIN_RANGE = (0.5, 2.0)


class HarmonizeConfig(Section):
    method: Literal["classical", "sd-inpaint", "auto"] = Field(
        "classical", description="classical compositing, sd-inpaint (Stable Diffusion over the "
        "classical composite), or auto (sd-inpaint with a model and CUDA, else classical)"
    )
    model: str | None = Field(
        None, description="local diffusers inpainting folder or .safetensors/.ckpt checkpoint"
    )
    checkpoint_config: str | None = Field(
        None, description="for a single-file model: a local diffusers folder of the same "
        "architecture (configs and tokenizer) used instead of fetching them"
    )
    controlnet: str | None = Field(
        None, description="local diffusers ControlNetModel folder, conditioned on avatar depth"
    )
    controlnet_scale: float = Field(
        1.0, ge=0.0, le=2.0, description="strength of the ControlNet conditioning"
    )
    control: Literal["depth", "keypoints"] = Field(
        "depth", description="what the ControlNet sees: the avatar's depth (render/depth.mkv) "
        "or an OpenPose-style skeleton of its keypoints (fit's joints3d through fit's camera)"
    )
    feather_px: float = Field(
        3.0, ge=0.0, le=100.0, description="width of the soft avatar edge, inside the silhouette"
    )
    color_match_strength: float = Field(
        0.5, ge=0.0, le=1.0,
        description="0: avatar colours as rendered; 1: luminance fully matched to surroundings",
    )
    ring_px: int = Field(
        15, ge=1, le=500, description="width of the plate ring around the avatar used as reference"
    )
    contact_shadow: float = Field(
        0.25, ge=0.0, le=1.0, description="darkness of a soft shadow under the feet; 0: none"
    )
    temporal_smoothing: float = Field(
        0.8, ge=0.0, lt=1.0,
        description="weight of the previous frames in the colour statistics (0: per frame)",
    )
    band_px: int = Field(
        12, ge=1, le=200, description="sd-inpaint: width of the repainted band around each avatar"
    )
    band_feather_px: float = Field(
        6.0, ge=0.0, le=100.0,
        description="sd-inpaint: the repaint fades in over this width inside the band's edge",
    )
    strength: float = Field(
        0.4, gt=0.0, le=1.0, description="sd-inpaint: denoising strength (low keeps the avatar)"
    )
    steps: int = Field(
        25, ge=1, le=200, description="sd-inpaint: scheduler steps at strength 1 (runs "
        "steps x strength of them)"
    )
    guidance: float = Field(
        5.0, ge=0.0, le=30.0, description="sd-inpaint: classifier-free guidance scale (<= 1: off)"
    )
    seed: int = Field(0, ge=0, description="sd-inpaint: noise seed (with the track id)")
    resolution: int = Field(
        512, ge=16, le=2048, description="sd-inpaint: side of the square crop the model sees"
    )
    prompt: str = Field(
        DEFAULT_PROMPT, description="sd-inpaint: prompt; {person} is the track's appearance"
    )
    negative_prompt: str = Field(DEFAULT_NEGATIVE, description="sd-inpaint: negative prompt")
    keyframe_every: int = Field(
        1, ge=1, le=1000, description="sd-inpaint: repaint every N-th frame, carry between"
    )
    keyframe_carry: Literal["track", "flow"] = Field(
        "track", description="sd-inpaint keyframes: carry the repaint along the avatar's own "
        "motion (instance masks) or along optical flow"
    )
    batch_size: int = Field(4, ge=1, le=256, description="sd-inpaint: crops per model call")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="sd-inpaint: device")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="sd-inpaint: weights dtype (auto: float16 on CUDA, float32 on CPU)"
    )
    cpu_offload: bool = Field(
        False, description="sd-inpaint: keep idle model parts in CPU memory (CUDA only)"
    )
    compile: bool = Field(False, description="sd-inpaint: torch.compile the UNet")

    @model_validator(mode="after")
    def _sd_checks(self) -> HarmonizeConfig:
        if self.method == "sd-inpaint" and not self.model:
            raise ValueError(SD_NEEDS_MODEL)
        if self.method != "classical" and int(self.steps * self.strength) < 1:
            raise ValueError(f"steps x strength = {self.steps * self.strength:g} runs no "
                             "denoising step; raise steps or strength")
        if self.resolution % 8:
            raise ValueError(f"resolution {self.resolution} is not a multiple of 8")
        return self

    def sd_options(self) -> SDOptions:
        assert self.model
        return SDOptions(
            model=self.model, checkpoint_config=self.checkpoint_config, controlnet=self.controlnet,
            controlnet_scale=self.controlnet_scale, control=self.control, device=self.device,
            dtype=self.dtype,
            cpu_offload=self.cpu_offload, compile=self.compile, resolution=self.resolution,
            steps=self.steps, strength=self.strength, guidance=self.guidance, seed=self.seed,
            batch_size=self.batch_size, prompt=self.prompt, negative_prompt=self.negative_prompt,
        )


def resolve_method(cfg: HarmonizeConfig) -> str:
    """classical or sd-inpaint; for sd-inpaint the model paths are checked (ConfigError)."""
    method = cfg.method
    if method == "auto":
        import torch

        cuda = torch.cuda.is_available()
        method = "sd-inpaint" if cfg.model and cuda else "classical"
        why = ("a model is set and CUDA is present" if method == "sd-inpaint"
               else "no harmonize.model" if not cfg.model else "no CUDA device")
        log.info("harmonize.method=auto: using %s (%s)", method, why)
    if method == "sd-inpaint":
        if not cfg.model:
            raise ConfigError(SD_NEEDS_MODEL)
        check_model_path(cfg.model, cfg.checkpoint_config)
        if cfg.controlnet:
            check_controlnet_path(cfg.controlnet)
    return method


def _bbox(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    height, width = mask.shape
    return (
        slice(max(0, rows[0] - pad), min(height, rows[-1] + pad + 1)),
        slice(max(0, cols[0] - pad), min(width, cols[-1] + pad + 1)),
    )


def _lab(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB [N, 3] -> float32 LAB [N, 3] (L 0..100)."""
    rgb = pixels.reshape(-1, 1, 3).astype(np.float32) / 255.0
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).reshape(-1, 3)


def _rgb(lab: np.ndarray) -> np.ndarray:
    rgb = cv2.cvtColor(lab.reshape(-1, 1, 3).astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb.reshape(-1, 3) * 255.0, 0, 255)


class ColourMatcher:
    """Moves avatar LAB statistics toward the surroundings', smoothed over frames."""

    def __init__(self, strength: float, smoothing: float):
        self.strength, self.smoothing = strength, smoothing
        self.state: np.ndarray | None = None  # [2 (avatar, ring), 2 (mean, std), 3]

    def reset(self) -> None:
        self.state = None

    def update(self, avatar_lab: np.ndarray, ring_lab: np.ndarray) -> None:
        stats = np.stack([
            np.stack([avatar_lab.mean(0), avatar_lab.std(0)]),
            np.stack([ring_lab.mean(0), ring_lab.std(0)]),
        ])
        if self.state is None:
            self.state = stats
        else:
            self.state = self.smoothing * self.state + (1 - self.smoothing) * stats

    def apply(self, lab: np.ndarray) -> np.ndarray:
        if self.state is None or self.strength == 0:
            return lab
        (mu_a, sd_a), (mu_r, sd_r) = self.state
        s = self.strength
        out = lab.copy()
        gain = np.clip(sd_r[0] / max(sd_a[0], 1e-3), *GAIN_RANGE) ** s
        out[:, 0] = (lab[:, 0] - mu_a[0]) * gain + mu_a[0] + s * (mu_r[0] - mu_a[0])
        out[:, 1:] = lab[:, 1:] + s * CHROMA_SHARE * (mu_r[1:] - mu_a[1:])
        out[:, 0] = np.clip(out[:, 0], 0.0, 100.0)
        return out


class Compositor:
    """Classical compositing of one RGBA avatar frame over one plate frame."""

    def __init__(self, cfg: HarmonizeConfig):
        self.cfg = cfg
        self.sigma = cfg.feather_px / 2.0
        self.matcher = ColourMatcher(cfg.color_match_strength, cfg.temporal_smoothing)

    def __call__(self, plate: np.ndarray, rgba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns the composite and where it is synthesized (alpha > 0 after feathering)."""
        alpha = rgba[..., 3]
        covered = alpha > 0
        if not covered.any():
            self.matcher.reset()
            return plate, covered
        pad = self.cfg.ring_px + int(np.ceil(3 * self.sigma)) + 1
        ys, xs = _bbox(covered, pad)
        a = alpha[ys, xs].astype(np.float32) / 255.0
        if self.sigma > 0:
            a = np.minimum(a, cv2.GaussianBlur(a, (0, 0), self.sigma))
        region = a > 0
        colour = self._matched(plate[ys, xs], rgba[ys, xs], region)

        base = self._shadowed(plate, alpha) if self.cfg.contact_shadow > 0 else plate
        out = base.copy()
        crop_base = base[ys, xs][region].astype(np.float32)
        w = a[region][:, None]
        out[ys, xs][region] = np.rint(w * colour + (1 - w) * crop_base).astype(np.uint8)
        synth = np.zeros_like(covered)
        synth[ys, xs] = region
        return out, synth

    def _matched(self, plate: np.ndarray, rgba: np.ndarray, region: np.ndarray) -> np.ndarray:
        """Avatar colours of the `region` pixels (float32 [N, 3]) after colour matching."""
        avatar = rgba[..., :3]
        pixels = avatar[region]
        if self.cfg.color_match_strength == 0:
            return pixels.astype(np.float32)
        alpha = rgba[..., 3]
        core = alpha > 127
        if core.sum() < 10:
            core = alpha > 0
        ring = dilate(alpha > 0, self.cfg.ring_px) & (alpha == 0)
        # With no ring to look at (the avatar fills the frame), the last statistics stay.
        if ring.sum() >= 10:
            self.matcher.update(_lab(avatar[core]), _lab(plate[ring]))
        return _rgb(self.matcher.apply(_lab(pixels)))

    def _shadowed(self, plate: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        """The plate darkened by a soft ellipse under each avatar's lowest pixels."""
        height, width = alpha.shape
        solid = (alpha > 127).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(solid, connectivity=8)
        out = plate
        min_area = max(20, int(0.0005 * height * width))
        for k in range(1, n):
            x, y, w, h, area = (int(v) for v in stats[k])
            bottom = y + h - 1
            if area < min_area or bottom >= height - 2:
                continue  # too small, or the feet are outside the frame
            foot_rows = slice(max(y, bottom - max(1, h // 20)), bottom + 1)
            foot_cols = np.flatnonzero((labels[foot_rows] == k).any(axis=0))
            cx = 0.5 * (foot_cols[0] + foot_cols[-1])
            rx = max(3.0, 0.3 * w)
            ry = max(1.5, 0.04 * h)
            blur = max(1.0, ry)
            margin = int(np.ceil(3 * blur))
            x0, x1 = max(0, int(cx - rx) - margin), min(width, int(cx + rx) + margin + 1)
            y0, y1 = max(0, int(bottom - ry) - margin), min(height, int(bottom + ry) + margin + 1)
            patch = np.zeros((y1 - y0, x1 - x0), np.float32)
            cv2.ellipse(patch, (round(cx - x0), round(bottom - y0)), (round(rx), round(ry)),
                        0, 0, 360, 1.0, -1)
            patch = cv2.GaussianBlur(patch, (0, 0), blur)
            if out is plate:
                out = plate.copy()
            shade = 1.0 - self.cfg.contact_shadow * patch[..., None]
            out[y0:y1, x0:x1] = np.rint(out[y0:y1, x0:x1] * shade).astype(np.uint8)
        return out


class HarmonizeStage(Stage):
    name = "harmonize"
    version = "2"
    # motion: bodies.npz (fit's, or the anonymized motion the avatars were rendered with),
    # read only for control=keypoints (the avatars' projected keypoints).
    requires = ("motion", "render", "inpaint")
    config_model = HarmonizeConfig
    resources = Resources(cpus=1.0)
    config: HarmonizeConfig

    def setup(self) -> None:
        self.method = resolve_method(self.config)
        self.pipe = load_pipeline(self.config.sd_options()) if self.method == "sd-inpaint" \
            else None

    def teardown(self) -> None:
        self.pipe = None

    def process(self, job: VideoJob) -> dict[str, Any]:
        if getattr(self, "method", None) is None:
            self.setup()
        inpaint, render = Path(job.inputs["inpaint"]), Path(job.inputs["render"])
        sources = [(inpaint / "plate.mkv", "rgb24"), (inpaint / "filled.mkv", "gray"),
                   (render / "avatar.mkv", "rgba")]
        if self.method == "sd-inpaint":
            sources.append((render / "instances.mkv", "gray"))
            if self.config.controlnet and self.config.control == "depth":
                sources.append((render / "depth.mkv", "gray16le"))
        for path, _ in sources:
            if not path.is_file():
                raise VideoFailed(f"{path.parent.parent.name}/{job.video.id}/{path.name} missing")
        info = video_info(job, sources[0][0])
        width, height, total = int(info["width"]), int(info["height"]), int(info["frame_count"])
        compositor = Compositor(self.config)
        sd = self._harmonizer(render) if self.method == "sd-inpaint" else None
        keypoints = self._keypoints(job, total) if sd is not None and self.config.controlnet \
            and self.config.control == "keypoints" else None
        flicker = {"sd": FlickerMeter(), "classical": FlickerMeter()}

        t, coverage, sensitive, repainted = 0, 0.0, 0.0, 0.0
        fps = fps_of(info)
        out = job.out_dir
        with (
            VideoWriter(out / "composite.mkv", fps, width, height, "rgb") as comp_w,
            VideoWriter(out / "sensitivity.mkv", fps, width, height, "gray") as sens_w,
        ):
            def emit(composites: np.ndarray, sens: np.ndarray) -> None:
                comp_w.write_chunk(composites)
                sens_w.write_chunk(sens)

            for chunk in iter_aligned(sources, job.run.chunk_frames):
                plates, filled, avatars = chunk[:3]
                for frames, what in ((plates, "inpaint plate.mkv"), (avatars, "avatar.mkv")):
                    check_size(frames, width, height, what)
                composites = np.empty_like(plates)
                sens = np.empty(filled.shape, np.uint8)
                for j in range(len(plates)):
                    composites[j], synth = compositor(plates[j], avatars[j])
                    synth |= filled[j] > 127
                    sens[j] = np.where(synth, 0, 255)
                    coverage += float((avatars[j][..., 3] > 0).mean())
                if sd is None:
                    sensitive += float((sens == 255).mean(axis=(1, 2)).sum())
                    emit(composites, sens)
                else:
                    done = sd.push(self._frame_data(t, composites, chunk[3:], sens, keypoints))
                    repainted, sensitive = self._emit_sd(done, flicker, emit,
                                                         repainted, sensitive)
                t += len(plates)
                job.advance(len(plates))
            if sd is not None:
                repainted, sensitive = self._emit_sd(sd.flush(), flicker, emit,
                                                     repainted, sensitive)
        if t != total:
            raise VideoFailed(f"harmonize read {t} frames, expected {total}")
        summary = {
            "method": self.method,
            "frames": t,
            "mean_avatar_coverage": round(coverage / max(t, 1), 6),
            "mean_sensitive_fraction": round(sensitive / max(t, 1), 6),
        }
        if sd is not None:
            summary.update({
                "mean_repainted_fraction": round(repainted / max(t, 1), 6),
                "repainted_crops": sd.repainted_crops,
                "keyframe_every": self.config.keyframe_every,
                "flicker_band": {k: None if m.value is None else round(m.value, 4)
                                 for k, m in flicker.items()},
            })
        return summary

    # -- sd-inpaint ------------------------------------------------------------------

    def _harmonizer(self, render: Path) -> Harmonizer:
        if getattr(self, "pipe", None) is None:
            self.pipe = load_pipeline(self.config.sd_options())
        identities_path = render / "identities.json"
        identities = json.loads(identities_path.read_text()) if identities_path.is_file() \
            else None
        prompts = track_prompts(identities, self.config.prompt)
        repainter = Repainter(self.pipe, self.config.sd_options())
        return Harmonizer(repainter, prompts, self.config.keyframe_every,
                          self.config.keyframe_carry, self.config.band_feather_px)

    def _keypoints(self, job: VideoJob, frames: int) -> np.ndarray:
        """OpenPose-18 points of every track slot, float32 [T, P, 18, 3] (x px, y px,
        visible): the motion stage's COCO-23 joints3d (the pose the avatars were rendered
        with, never the real motion when motion is anonymized) through fit's camera. Render
        scales each avatar about the camera centre to the real person's hips, so these land
        on the rendered avatar up to its body proportions."""
        from stages.body import COCO23

        path = Path(job.inputs["motion"]) / "bodies.npz"
        if not path.is_file():
            raise VideoFailed(f"motion/{job.video.id}/bodies.npz missing")
        with np.load(path) as z:
            if not {"joints3d", "camera", "present"} <= set(z.files):
                raise VideoFailed(f"{path.name} lacks joints3d, camera or present "
                                  "(harmonize.control=keypoints needs them)")
            joints, camera = z["joints3d"], z["camera"].reshape(-1)
            present = z["present"].astype(bool)
        if joints.ndim != 4 or joints.shape[0] != frames or joints.shape[2:] != (len(COCO23), 3) \
                or present.shape != joints.shape[:2] or camera.shape != (4,):
            raise VideoFailed(f"{path.name}: joints3d {joints.shape}, present {present.shape}, "
                              f"camera {camera.shape} do not fit {frames} frames of COCO-23")
        points = project_points(joints.astype(np.float64), camera)
        points[..., 2] *= present[..., None]
        return openpose_points(points, COCO23)

    def _frame_data(self, t0: int, composites: np.ndarray, extra: tuple[np.ndarray, ...],
                    sens: np.ndarray, keypoints: np.ndarray | None = None) -> list[FrameData]:
        instances = extra[0]
        depth = extra[1] if len(extra) > 1 else None
        check_size(instances, composites.shape[2], composites.shape[1], "instances.mkv")
        frames = []
        for j in range(len(composites)):
            # Slot s is drawn as s + 1 in instances.mkv (0 = no avatar).
            regions = {int(v) - 1: dilate(instances[j] == v, self.config.band_px)
                       for v in np.unique(instances[j]) if v > 0}
            frames.append(FrameData(
                index=t0 + j, composite=composites[j], regions=regions,
                instances=instances[j], depth=None if depth is None else depth[j],
                sensitivity=sens[j],
                keypoints=None if keypoints is None else
                {s: keypoints[t0 + j, s] for s in regions if s < keypoints.shape[1]}))
        return frames

    @staticmethod
    def _emit_sd(done: list[FrameData], flicker: dict[str, FlickerMeter], emit: Any,
                 repainted: float, sensitive: float) -> tuple[float, float]:
        """Write finished frames; returns the running sums of repainted and sensitive
        fractions."""
        if not done:
            return repainted, sensitive
        composites, sens = [], []
        for f in done:
            assert f.output is not None and f.repainted is not None
            assert f.sensitivity is not None
            s = np.where(f.repainted, 0, f.sensitivity).astype(np.uint8)
            region = np.zeros_like(f.repainted)
            for r in f.regions.values():
                region |= r
            flicker["sd"].update(f.output, region)
            flicker["classical"].update(f.composite, region)
            composites.append(f.output)
            sens.append(s)
            repainted += float(f.repainted.mean())
            sensitive += float((s == 255).mean())
        emit(np.stack(composites), np.stack(sens))
        return repainted, sensitive
