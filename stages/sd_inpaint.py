"""Stable Diffusion harmonization: offline model loading and the repaint step.

The diffusion model only ever sees the composite (the avatar over the clean plate), never
the source frame. Per person (track slot of render/instances.mkv) it repaints the avatar
and a band of `band_px` around its silhouette at low strength, in a square crop resized to
the model's resolution; the result is pasted back only inside that band+avatar region with
a feathered weight that is exactly 0 outside it, so every other pixel stays the composite's
bit for bit.

Temporal consistency: each track's generator is re-seeded from (seed, track id) for every
repaint, so a track gets the same initial noise in every frame. With `keyframe_every: N`
only every N-th frame (and the last) is repainted; the frames between take the repainted
residual (repainted - composite) of the two keyframes around them, carried along the
avatar's own motion (`track`: the similarity transform between the track's instance masks)
or optical flow between composites (`flow`: DIS), blended by temporal distance.

Loading is offline: `HF_HUB_OFFLINE=1` is set in the process before diffusers is imported,
and every from_pretrained/from_single_file call passes local_files_only=True.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from pipeline.config import ConfigError

# Before anything imports huggingface_hub: no hub call may happen at run time.
os.environ["HF_HUB_OFFLINE"] = "1"

log = logging.getLogger(__name__)

# What a diffusers-layout SD inpainting folder must hold.
PIPELINE_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors")
# Extra context around a person's band in the crop, as a share of the band's bounding box.
CONTEXT_SHARE = 0.15
# OpenPose's 18 body joints (the layout OpenPose ControlNets were trained on) as COCO-23
# names; None is the neck, the shoulders' midpoint.
OPENPOSE_JOINTS = (
    "nose", None, "right_shoulder", "right_elbow", "right_wrist", "left_shoulder",
    "left_elbow", "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip",
    "left_knee", "left_ankle", "right_eye", "left_eye", "right_ear", "left_ear",
)
OPENPOSE_LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
                  (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17))
SKIN_WORDS = {1: "very fair", 2: "fair", 3: "medium", 4: "olive", 5: "brown", 6: "dark brown"}


@dataclass(frozen=True)
class SDOptions:
    """What loading and repainting need (built from the harmonize config section)."""

    model: str
    checkpoint_config: str | None = None
    controlnet: str | None = None
    controlnet_scale: float = 1.0
    control: str = "depth"  # what the ControlNet sees: "depth" or "keypoints"
    device: str = "auto"
    dtype: str = "auto"
    cpu_offload: bool = False
    compile: bool = False
    resolution: int = 512
    steps: int = 25
    strength: float = 0.4
    guidance: float = 5.0
    seed: int = 0
    batch_size: int = 4
    prompt: str = "{person}"
    negative_prompt: str = ""
    # The config section these options come from (harmonize, or inpaint for the fill),
    # named in error messages.
    section: str = "harmonize"


# ---------------------------------------------------------------------------- loading

def _missing_parts(folder: Path) -> list[str]:
    return [p for p in PIPELINE_PARTS if not (folder / p).exists()]


def check_model_path(model: str, checkpoint_config: str | None = None,
                     keys: tuple[str, str] = ("harmonize.model", "harmonize.checkpoint_config"),
                     ) -> Path:
    """The model path, or a ConfigError naming what is missing. `keys` are the config keys
    of the model and of its checkpoint config, for the messages."""
    key, config_key = keys
    path = Path(model).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist (a local diffusers "
                          "inpainting folder or a .safetensors/.ckpt file)")
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ConfigError(f"{key}: {path} is not a .safetensors/.ckpt checkpoint")
        if not checkpoint_config:
            raise ConfigError(
                f"{key}: {path.name} is a single checkpoint; offline it needs "
                f"{config_key}, a local diffusers folder of the same architecture "
                "(its model_index.json, component configs and tokenizer; weights not needed)")
        config = Path(checkpoint_config).expanduser()
        if not config.is_dir():
            raise ConfigError(f"{config_key}: {config} is not a folder")
        return path
    missing = _missing_parts(path)
    if missing:
        raise ConfigError(f"{key}: {path} is not a complete diffusers inpainting "
                          f"folder; missing: {', '.join(missing)}")
    return path


def model_keys(opts: SDOptions) -> tuple[str, str]:
    """Config keys of the model and checkpoint config in `opts`' section."""
    if opts.section == "harmonize":
        return "harmonize.model", "harmonize.checkpoint_config"
    return f"{opts.section}.fill_model", f"{opts.section}.fill_checkpoint_config"


def check_controlnet_path(controlnet: str) -> Path:
    path = Path(controlnet).expanduser()
    if not path.is_dir():
        raise ConfigError(f"harmonize.controlnet: {path} is not a folder (a local diffusers "
                          "ControlNetModel folder)")
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    if not any((path / name).is_file() for name in WEIGHT_NAMES):
        missing.append("diffusion_pytorch_model.safetensors")
    if missing:
        raise ConfigError(f"harmonize.controlnet: {path} is missing {', '.join(missing)}")
    return path


def resolve_device(device: str, key: str = "harmonize.device") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: cuda requested but no CUDA device is available")
    return device


def resolve_dtype(dtype: str, device: str, key: str = "harmonize.dtype") -> Any:
    """fp16 by default on CUDA; fp32 on CPU (half precision is slow or unsupported there)."""
    import torch

    if dtype == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    if device == "cpu" and dtype != "float32":
        log.warning("%s=%s on CPU: using float32", key, dtype)
        return torch.float32
    return getattr(torch, dtype)


def load_pipeline(opts: SDOptions) -> Any:
    """The inpainting pipeline (with ControlNet when configured), on its device."""
    model = check_model_path(opts.model, opts.checkpoint_config, model_keys(opts))
    controlnet_path = check_controlnet_path(opts.controlnet) if opts.controlnet else None
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import diffusers
    except ImportError as exc:
        raise ConfigError(f"{model_keys(opts)[0]} needs diffusers, transformers and "
                          f"accelerate ({exc}); install them with: pip install "
                          "'avatarize[sd]'") from exc
    try:
        return _load(diffusers, model, controlnet_path, opts)
    except ConfigError:
        raise
    except Exception as exc:  # diffusers raises many kinds; all mean "cannot load this"
        raise ConfigError(f"{model_keys(opts)[0]}: cannot load {model}"
                          + (f" with controlnet {controlnet_path}" if controlnet_path else "")
                          + f": {type(exc).__name__}: {exc}") from exc


def _load(diffusers: Any, model: Path, controlnet_path: Path | None, opts: SDOptions) -> Any:
    prefix = "harmonize." if opts.section == "harmonize" else f"{opts.section}.fill_"
    device = resolve_device(opts.device, prefix + "device")
    dtype = resolve_dtype(opts.dtype, device, prefix + "dtype")
    common: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if controlnet_path is not None:
        common["controlnet"] = diffusers.ControlNetModel.from_pretrained(
            controlnet_path, **common)
    if model.is_file():
        cls = (diffusers.StableDiffusionControlNetInpaintPipeline if controlnet_path
               else diffusers.StableDiffusionInpaintPipeline)
        pipe = cls.from_single_file(
            str(model), config=str(Path(opts.checkpoint_config).expanduser()),
            safety_checker=None, requires_safety_checker=False, **common)
    else:
        # AutoPipelineForInpainting picks the class from model_index.json (SD 1.x/2.x,
        # SDXL) and the ControlNet variant when a controlnet is given.
        extra = {"safety_checker": None, "requires_safety_checker": False} \
            if _has_safety_slot(model) else {}
        pipe = diffusers.AutoPipelineForInpainting.from_pretrained(model, **common, **extra)
    pipe.set_progress_bar_config(disable=True)
    if opts.cpu_offload and device == "cuda":
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    if opts.compile:
        import torch

        pipe.unet = torch.compile(pipe.unet)
    log.info("%s: loaded %s (%s) on %s, %s", opts.section, model, type(pipe).__name__, device,
             str(dtype).removeprefix("torch."))
    return pipe


def _has_safety_slot(model: Path) -> bool:
    import json

    index = json.loads((model / "model_index.json").read_text())
    return "safety_checker" in index


# ---------------------------------------------------------------------------- prompts

def describe(identity: dict[str, Any] | None) -> str:
    """A short English description of a sampled appearance (render/identities.json)."""
    if not identity:
        return "a person"
    gender = float(identity.get("phenotype", {}).get("gender", 0.5))
    noun = "woman" if gender > 0.65 else "man" if gender < 0.35 else "person"
    parts = [f"a {round(float(identity['age_years']))} year old {noun}"
             if "age_years" in identity else f"a {noun}"]
    looks = []
    skin = identity.get("skin", {})
    if skin.get("fitzpatrick") in SKIN_WORDS:
        looks.append(f"{SKIN_WORDS[skin['fitzpatrick']]} skin")
    hair, cover = identity.get("hair", {}), identity.get("head_cover", {"style": "none"})
    if cover.get("style", "none") != "none":
        looks.append(f"a {_words(cover.get('name', ''))} {cover['style']}")
    elif hair.get("name"):
        looks.append(f"{hair.get('style', '')} {_words(hair['name'])} hair".strip())
    if looks:
        parts.append("with " + " and ".join(looks))
    clothes = []
    top, bottom = identity.get("top", {}), identity.get("bottom", {})
    if top.get("name"):
        sleeves = f"{top['sleeves']}-sleeved " if top.get("sleeves") else ""
        pattern = top.get("pattern", "plain")
        article = "" if str(pattern).endswith("s") else "a "  # stripes, checks: no article
        tail = "" if pattern in ("plain", None) else f" with {article}{_words(pattern)}"
        clothes.append(f"a {sleeves}{_words(top['name'])} top{tail}")
    if bottom.get("name"):
        clothes.append(f"{_words(bottom['name'])} {_words(bottom.get('style', 'trousers'))}")
    if clothes:
        parts.append("wearing " + " and ".join(clothes))
    return ", ".join(parts)


def _words(name: str) -> str:
    return str(name).replace("-", " ").replace("_", " ")


def track_prompts(identities: dict[str, Any] | None, template: str) -> dict[int, tuple[int, str]]:
    """slot -> (track id, prompt) from identities.json's tracks."""
    out: dict[int, tuple[int, str]] = {}
    for k, entry in enumerate((identities or {}).get("tracks", [])):
        slot = int(entry.get("slot", k))
        out[slot] = (int(entry.get("track_id", slot)), template.format(person=describe(entry)))
    return out


# ---------------------------------------------------------------------------- geometry

@dataclass(frozen=True)
class Crop:
    """A square window in frame coordinates; it may reach outside the frame."""

    y0: int
    x0: int
    side: int

    @staticmethod
    def around(mask: np.ndarray, min_side: int = 0) -> Crop:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        side = max(min_side, int(np.ceil(max(h, w) * (1 + 2 * CONTEXT_SHARE))) + 2)
        cy, cx = (rows[0] + rows[-1]) // 2, (cols[0] + cols[-1]) // 2
        return Crop(int(cy - side // 2), int(cx - side // 2), side)

    def inside(self, height: int, width: int) -> tuple[slice, slice, slice, slice]:
        """Frame slices of the crop's in-frame part and the matching crop slices."""
        y0, x0 = max(0, self.y0), max(0, self.x0)
        y1, x1 = min(height, self.y0 + self.side), min(width, self.x0 + self.side)
        return (slice(y0, y1), slice(x0, x1),
                slice(y0 - self.y0, y1 - self.y0), slice(x0 - self.x0, x1 - self.x0))

    def cut(self, image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
        """The crop resized to size x size; outside the frame the edge pixels repeat."""
        height, width = image.shape[:2]
        fy, fx, _, _ = self.inside(height, width)
        top, left = fy.start - self.y0, fx.start - self.x0
        bottom = self.y0 + self.side - fy.stop
        right = self.x0 + self.side - fx.stop
        square = cv2.copyMakeBorder(image[fy, fx], top, bottom, left, right,
                                    cv2.BORDER_REPLICATE)
        interp = cv2.INTER_NEAREST if nearest else (
            cv2.INTER_AREA if self.side > size else cv2.INTER_CUBIC)
        return cv2.resize(square, (size, size), interpolation=interp)

    def uncut(self, square: np.ndarray) -> np.ndarray:
        """A size x size result back at the crop's own side (float32)."""
        interp = cv2.INTER_AREA if square.shape[0] > self.side else cv2.INTER_CUBIC
        return cv2.resize(square.astype(np.float32), (self.side, self.side), interpolation=interp)


def feathered(region: np.ndarray, feather_px: float) -> np.ndarray:
    """Weight in [0, 1]: 1 deep inside `region`, fading to 0 at its border, 0 outside."""
    w = region.astype(np.float32)
    if feather_px > 0:
        w = np.minimum(w, cv2.GaussianBlur(w, (0, 0), feather_px / 2.0))
    return w


def depth_control(depth_mm: np.ndarray) -> np.ndarray:
    """Inverse depth scaled to [0, 1] over the avatar pixels (near = bright, none = 0), as
    3-channel uint8: the usual input of depth ControlNets."""
    out = np.zeros(depth_mm.shape, np.float32)
    valid = depth_mm > 0
    if valid.any():
        inv = 1.0 / depth_mm[valid].astype(np.float32)
        lo, hi = inv.min(), inv.max()
        out[valid] = 0.2 + 0.8 * ((inv - lo) / (hi - lo) if hi > lo else 1.0)
    return np.repeat(np.rint(out * 255).astype(np.uint8)[..., None], 3, axis=-1)


def limb_colours(n: int) -> np.ndarray:
    """OpenPose's palette: fully saturated hues 20 degrees apart from red, uint8 [n, 3]."""
    hsv = np.zeros((1, n, 3), np.uint8)
    hsv[0, :, 0] = (np.arange(n) * 10) % 180  # OpenCV hue unit: 2 degrees
    hsv[0, :, 1:] = 255
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def openpose_points(coco: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """COCO keypoints [..., K, 3] (x px, y px, visible) named `names` -> OpenPose-18 [..., 18,
    3]; the neck is visible where both shoulders are."""
    out = np.zeros((*coco.shape[:-2], len(OPENPOSE_JOINTS), 3), np.float32)
    for j, name in enumerate(OPENPOSE_JOINTS):
        if name is not None:
            out[..., j, :] = coco[..., names.index(name), :]
    left, right = coco[..., names.index("left_shoulder"), :], \
        coco[..., names.index("right_shoulder"), :]
    out[..., 1, :2] = (left[..., :2] + right[..., :2]) / 2
    out[..., 1, 2] = np.minimum(left[..., 2], right[..., 2])
    return out


def project_points(points: np.ndarray, camera: np.ndarray) -> np.ndarray:
    """Camera-frame points [..., 3] (OpenCV axes, m) -> x px, y px, visible [..., 3];
    visible is 0 behind the camera or where a coordinate is not finite."""
    fx, fy, cx, cy = (float(v) for v in camera)
    z = points[..., 2]
    ok = np.isfinite(points).all(axis=-1) & (z > 1e-6)
    safe_z = np.where(ok, z, 1.0)
    out = np.zeros(points.shape, np.float32)
    out[..., 0] = np.where(ok, fx * points[..., 0] / safe_z + cx, 0.0)
    out[..., 1] = np.where(ok, fy * points[..., 1] / safe_z + cy, 0.0)
    out[..., 2] = ok
    return out


def keypoint_control(points: np.ndarray | None, crop: Crop, size: int) -> np.ndarray:
    """An OpenPose-style skeleton of one person (OpenPose-18 points [18, 3] in frame pixels)
    seen through `crop` at size x size: coloured limbs (at 60 %) and joints on black,
    uint8 [size, size, 3]. Drawn at the model's resolution, so strokes keep the width the
    ControlNets were trained on (4 px at 512) whatever the crop's size."""
    canvas = np.zeros((size, size, 3), np.uint8)
    if points is None:
        return canvas
    scale = size / crop.side
    # Frame pixel centres -> model pixel centres, in 1/16 px (cv2's fixed-point shift).
    xy = ((points[:, :2] - (crop.x0, crop.y0) + 0.5) * scale - 0.5) * 16
    xy = np.rint(xy).astype(np.int64)
    seen = points[:, 2] > 0
    width = max(1, round(size / 128))
    colours = limb_colours(len(OPENPOSE_JOINTS))
    for (a, b), colour in zip(OPENPOSE_LIMBS, colours, strict=False):
        if seen[a] and seen[b]:
            cv2.line(canvas, tuple(int(v) for v in xy[a]), tuple(int(v) for v in xy[b]),
                     tuple(int(round(0.6 * c)) for c in colour), 2 * width, cv2.LINE_AA, 4)
    for j in np.flatnonzero(seen):
        colour = colours[j]
        cv2.circle(canvas, tuple(int(v) for v in xy[j]), width * 16,
                   tuple(int(c) for c in colour), -1, cv2.LINE_AA, 4)
    return canvas


# ---------------------------------------------------------------------------- the step

class Repainter:
    """Batched repaint of square crops by an inpainting pipeline."""

    def __init__(self, pipe: Any, opts: SDOptions):
        self.pipe, self.opts = pipe, opts

    def generator(self, track_id: int) -> Any:
        """A CPU generator re-seeded from (seed, track id): the same noise in every frame."""
        import torch

        return torch.Generator("cpu").manual_seed(
            (self.opts.seed * 1_000_003 + track_id) % (2**63 - 1))

    def __call__(self, images: np.ndarray, masks: np.ndarray, prompts: list[str],
                 track_ids: list[int], controls: np.ndarray | None = None) -> np.ndarray:
        """uint8 [B, S, S, 3] crops, bool [B, S, S] masks -> float32 [B, S, S, 3] (0..255)."""
        out = []
        size = self.opts.resolution
        for start in range(0, len(images), self.opts.batch_size):
            part = slice(start, start + self.opts.batch_size)
            kwargs: dict[str, Any] = {
                "prompt": prompts[part],
                "negative_prompt": [self.opts.negative_prompt] * len(prompts[part])
                if self.opts.negative_prompt else None,
                "image": images[part].astype(np.float32) / 255.0,
                "mask_image": masks[part, ..., None].astype(np.float32),
                "strength": self.opts.strength,
                "num_inference_steps": self.opts.steps,
                "guidance_scale": self.opts.guidance,
                "generator": [self.generator(t) for t in track_ids[part]],
                "height": size, "width": size, "output_type": "np",
            }
            if controls is not None:
                kwargs["control_image"] = controls[part].astype(np.float32) / 255.0
                kwargs["controlnet_conditioning_scale"] = self.opts.controlnet_scale
            result = self.pipe(**kwargs).images
            out.append(np.clip(np.asarray(result, np.float32) * 255.0, 0.0, 255.0))
        return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.float32)


# ---------------------------------------------------------------------------- plate holes

class HoleFiller:
    """Learned inpainting of a clean plate's holes (background never seen uncovered).

    Each group of nearby hole pixels gets a square crop (at least `min_crop` px, so the
    model sees enough of the room); the model repaints the hole (its mask is the hole,
    grown conservatively by the resize) at strength 1 from the same seed in every frame,
    and only the hole pixels are written back: every other plate pixel stays as it was.
    Holes smaller than `min_px` keep their classical fill (not worth a model call).
    """

    def __init__(self, repaint: Repainter, min_px: int = 64, min_crop: int = 96,
                 group_px: int = 8):
        self.repaint, self.min_px = repaint, min_px
        self.min_crop, self.group_px = min_crop, group_px
        self.crops = 0

    def groups(self, hole: np.ndarray) -> list[np.ndarray]:
        """Hole pixels grouped by proximity (within 2 x group_px), large enough groups only."""
        near = cv2.dilate(hole.astype(np.uint8), cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (2 * self.group_px + 1,) * 2))
        n, labels = cv2.connectedComponents(near, connectivity=8)
        out = []
        for k in range(1, n):
            part = hole & (labels == k)
            if int(part.sum()) >= self.min_px:
                out.append(part)
        return out

    def __call__(self, plate: np.ndarray, hole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The plate with the (large enough) holes repainted, and the repainted pixels."""
        parts = self.groups(hole) if hole.any() else []
        done = np.zeros(hole.shape, bool)
        if not parts:
            return plate, done
        size = self.repaint.opts.resolution
        crops = [Crop.around(p, self.min_crop) for p in parts]
        images = np.stack([c.cut(plate, size) for c in crops])
        # INTER_AREA then > 0: any hole pixel under a model pixel masks it.
        masks = np.stack([c.cut(p.astype(np.uint8) * 255, size) > 0
                          for c, p in zip(crops, parts, strict=True)])
        prompt = self.repaint.opts.prompt
        result = self.repaint(images, masks, [prompt] * len(parts), [0] * len(parts))
        self.crops += len(parts)
        out = plate.copy()
        height, width = hole.shape
        for crop, part, rep in zip(crops, parts, result, strict=True):
            fy, fx, cy, cx = crop.inside(height, width)
            patch = crop.uncut(rep)[cy, cx]
            sel = part[fy, fx]
            out[fy, fx][sel] = np.clip(np.rint(patch[sel]), 0, 255).astype(np.uint8)
            done |= part
        return out, done


# ---------------------------------------------------------------------------- streaming

@dataclass
class FrameData:
    """One frame on its way through the harmonizer."""

    index: int
    composite: np.ndarray  # uint8 [H, W, 3], the classical composite
    regions: dict[int, np.ndarray]  # slot -> bool band+avatar region to repaint
    instances: np.ndarray  # uint8 [H, W], render/instances.mkv
    depth: np.ndarray | None = None  # uint16 [H, W] mm, for the ControlNet
    sensitivity: np.ndarray | None = None  # uint8 [H, W] of the composite (255 = real)
    # slot -> OpenPose-18 points [18, 3] (x px, y px, visible), for a keypoint ControlNet
    keypoints: dict[int, np.ndarray] | None = None
    key: bool = False
    residuals: dict[int, np.ndarray] = field(default_factory=dict)  # slot -> float32 [H,W,3]
    output: np.ndarray | None = None
    repainted: np.ndarray | None = None  # bool [H, W]: pixels with a repaint weight > 0


class Harmonizer:
    """Streams frames in order; repaints keyframes, carries residuals to the frames between.

    push() takes frames and returns those that are finished (in order); flush() finishes
    the rest. At most `keyframe_every` frames wait for their next keyframe.
    """

    def __init__(self, repaint: Repainter, prompts: dict[int, tuple[int, str]],
                 keyframe_every: int = 1, carry: str = "track", feather_px: float = 4.0):
        self.repaint, self.prompts = repaint, prompts
        self.every, self.carry, self.feather_px = keyframe_every, carry, feather_px
        self.pending: deque[FrameData] = deque()
        self.last_key: FrameData | None = None
        self.repainted_crops = 0
        self._dis: Any = None
        self._flows: dict[tuple[int, int], np.ndarray] = {}  # the last frame pair's flow

    def push(self, frames: Sequence[FrameData]) -> list[FrameData]:
        for f in frames:
            f.key = f.index % self.every == 0
        self._repaint_keys([f for f in frames if f.key])
        self.pending.extend(frames)
        return self._drain()

    def flush(self) -> list[FrameData]:
        if self.pending and not self.pending[-1].key:
            self.pending[-1].key = True
            self._repaint_keys([self.pending[-1]])
        return self._drain()

    def _drain(self) -> list[FrameData]:
        done = []
        while self.pending:
            f = self.pending[0]
            if not f.key:
                nxt = next((g for g in self.pending if g.key), None)
                if nxt is None:
                    break
                self._carry(f, self.last_key, nxt)
            self._apply(f)
            if f.key:
                self.last_key = f
            self.pending.popleft()
            done.append(f)
        return done

    def _repaint_keys(self, keys: list[FrameData], slots: dict[int, list[int]] | None = None,
                      ) -> None:
        """Repaint every (frame, slot) of `keys` (or the given slots) in batches."""
        jobs = [(f, s) for f in keys for s in (slots or {}).get(f.index, sorted(f.regions))]
        if not jobs:
            return
        size = self.repaint.opts.resolution
        crops = [Crop.around(f.regions[s]) for f, s in jobs]
        images = np.stack([c.cut(f.composite, size) for c, (f, _) in zip(crops, jobs,
                                                                           strict=True)])
        masks = np.stack([c.cut(f.regions[s].astype(np.uint8), size, nearest=True) > 0
                          for c, (f, s) in zip(crops, jobs, strict=True)])
        controls = None
        if self.repaint.opts.controlnet:
            controls = np.stack([self._control(f, s, c, size)
                                 for c, (f, s) in zip(crops, jobs, strict=True)])
        info = [self.prompts.get(s, (s, "a person")) for _, s in jobs]
        result = self.repaint(images, masks, [p for _, p in info], [t for t, _ in info],
                              controls)
        self.repainted_crops += len(jobs)
        for crop, (f, s), rep in zip(crops, jobs, result, strict=True):
            height, width = f.composite.shape[:2]
            fy, fx, cy, cx = crop.inside(height, width)
            residual = np.zeros(f.composite.shape, np.float32)
            residual[fy, fx] = crop.uncut(rep)[cy, cx] - f.composite[fy, fx]
            f.residuals[s] = residual

    def _control(self, f: FrameData, slot: int, crop: Crop, size: int) -> np.ndarray:
        """The ControlNet's image for one crop: the person's own depth or skeleton."""
        if self.repaint.opts.control == "keypoints":
            return keypoint_control((f.keypoints or {}).get(slot), crop, size)
        return crop.cut(depth_control(_own_depth(f, slot)), size)

    def _carry(self, f: FrameData, k0: FrameData | None, k1: FrameData) -> None:
        """Residuals of frame f from the keyframes around it, blended by distance."""
        direct = []
        for s in f.regions:
            sources = [(k, abs(f.index - k.index)) for k in (k0, k1)
                       if k is not None and s in k.residuals]
            if not sources:
                direct.append(s)
                continue
            span = sum(d for _, d in sources)
            total = np.zeros(f.composite.shape, np.float32)
            for k, d in sources:
                weight = 1.0 if len(sources) == 1 else 1.0 - d / span
                total += weight * self._warp(k, f, s)
            f.residuals[s] = total
        if direct:  # this track is in neither keyframe: repaint it here
            self._repaint_keys([f], {f.index: direct})

    def _warp(self, k: FrameData, f: FrameData, slot: int) -> np.ndarray:
        residual = k.residuals[slot]
        height, width = residual.shape[:2]
        if self.carry == "flow":
            if self._dis is None:
                self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
            gray_f = cv2.cvtColor(f.composite, cv2.COLOR_RGB2GRAY)
            gray_k = cv2.cvtColor(k.composite, cv2.COLOR_RGB2GRAY)
            pair = (f.index, k.index)
            if pair not in self._flows:
                self._flows = {pair: self._dis.calc(gray_f, gray_k, None)}
            flow = self._flows[pair]
            grid = np.mgrid[0:height, 0:width].astype(np.float32)
            return cv2.remap(residual, grid[1] + flow[..., 0], grid[0] + flow[..., 1],
                             cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        src, dst = _own_mask(k, slot), _own_mask(f, slot)
        if not src.any() or not dst.any():
            return residual
        (sy, sx), (dy, dx) = _centroid(src), _centroid(dst)
        scale = float(np.sqrt(dst.sum() / src.sum()))
        # Maps frame-f pixels to keyframe pixels (dst -> src), for WARP_INVERSE_MAP.
        m = np.array([[1 / scale, 0, sx - dx / scale], [0, 1 / scale, sy - dy / scale]],
                     np.float32)
        return cv2.warpAffine(residual, m, (width, height),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_CONSTANT)

    def _apply(self, f: FrameData) -> None:
        """output = composite + weight * residual, track by track; weight is 0 outside the
        repaint regions, so those pixels are the composite's exactly."""
        out = f.composite.astype(np.float32)
        touched = np.zeros(f.composite.shape[:2], bool)
        for s in sorted(f.regions):
            region = f.regions[s]
            w = feathered(region, self.feather_px)[..., None]
            target = f.composite.astype(np.float32) + f.residuals[s]
            out += w * (target - out)
            touched |= w[..., 0] > 0
        result = f.composite.copy()
        result[touched] = np.clip(np.rint(out[touched]), 0, 255).astype(np.uint8)
        f.output, f.repainted = result, touched
        f.residuals = f.residuals if f.key else {}


def _own_mask(f: FrameData, slot: int) -> np.ndarray:
    return f.instances == min(slot + 1, 255)


def _own_depth(f: FrameData, slot: int) -> np.ndarray:
    if f.depth is None:
        return np.zeros(f.composite.shape[:2], np.uint16)
    return np.where(_own_mask(f, slot), f.depth, 0).astype(np.uint16)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(ys.mean()), float(xs.mean())


# ---------------------------------------------------------------------------- flicker

class FlickerMeter:
    """Mean absolute frame-to-frame change (0..255, over RGB) inside a region that moves
    with the avatar: pixels in the band+avatar region of both frames."""

    def __init__(self) -> None:
        self.prev: tuple[np.ndarray, np.ndarray] | None = None
        self.total, self.count = 0.0, 0

    def update(self, frame: np.ndarray, region: np.ndarray) -> None:
        if self.prev is not None:
            both = region & self.prev[1]
            if both.any():
                diff = np.abs(frame[both].astype(np.float32) - self.prev[0][both])
                self.total += float(diff.sum())
                self.count += int(diff.size)
        self.prev = (frame, region)

    @property
    def value(self) -> float | None:
        return self.total / self.count if self.count else None


def band_flicker(frames: Sequence[np.ndarray], regions: Sequence[np.ndarray]) -> float | None:
    """FlickerMeter over a whole sequence (None when no two frames share region pixels)."""
    meter = FlickerMeter()
    for frame, region in zip(frames, regions, strict=True):
        meter.update(frame, region)
    return meter.value
