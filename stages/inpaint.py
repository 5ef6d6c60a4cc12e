"""The inpaint stage: a clean plate, the source frames with the real people removed.

Which pixels are removed: the detect mask above `mask_threshold`, dilated by `dilate_px`
(soft edges, hair), an ellipse centred on each detected person's feet (the box's bottom
edge; `shadow_height` x the box height by `shadow_width` x its width: contact and cast
shadow), plus the padded box of any detected person whose box the mask (almost) does not
cover (segmentation missed them).

What a removed pixel becomes, in order of preference:
1. temporal background: among the frames of a window of `window_frames` frames centred
   on the current one (both directions), the samples where that pixel was not removed;
   their median by luminance, so the value is a colour observed there;
2. long-term memory: the pixel's last robust estimate from before the window (the median
   of a window's samples, refreshed every half window), for a person who stood still
   longer than the window;
3. with a moving camera (`view_fill`), for background never seen: the same image position
   in nearby frames, not aligned, where their surroundings match the current frame (the
   surface a little further along the pan: texture of the right kind, not the true
   background there);
4. image inpainting (cv2.inpaint, Telea or Navier-Stokes) for what is left; with
   `fill: sd` a diffusers inpainting model (`fill_model`, loaded offline like harmonize's,
   stages/sd_inpaint.py) then repaints those pixels (and only those: every other pixel
   stays the classical plate's) from a neutral prompt at strength 1, in a crop around each
   hole, with the same seed in every frame; holes under `fill_min_px` keep cv2.inpaint's.
   With `fill_every: N` the frames after a model-filled one take its fill (same view only).
   3 and 4 are flagged in filled.mkv: they are synthesized, the rest is real background.
A sample (or the memory) that shows the detected person where they are now, because the
detector missed them in that frame (over half of the person's pixels within
`person_match` of their current colours), is not used: the median of such samples would
paste the person back.

Moving cameras (`align`): every frame's motion is tracked (stages/camera_motion.py: KLT or
ORB homography on background pixels, ECC fallback, checked against "no motion") as a
transform to the first frame of its shot. Each sample keeps its transform; at frame t, a
sample from another viewpoint is resampled (bilinear) into t's coordinates at the removed
and ring pixels only, and a sample pixel counts only where it lands inside that sample and
none of the four pixels read was covered. The long-term memory is resampled into the
current view when refreshed. A static camera yields exactly the same transform for every
frame, so samples are read in place as without alignment. Frames the tracker cannot place
keep their predecessor's transform and rely on the ring check (see BackgroundWindow) to
drop samples that do not line up. Cost per frame (2-core CPU): tracking at the 320 px
analysis size, about 5 ms (KLT against the keyframe; ORB and ECC only when that fails);
for a moving camera, resampling at about 14 ns per removed or ring pixel and sample
(cv2.perspectiveTransform and two cv2.remap), against about 4 ns to read in place, and a
full-frame resampling of the memory every half window. No extra frame memory: one reduced
grey keyframe and two 3x3 matrices per sample.

Memory is bounded and does not grow with video length. The source and the mask are decoded
twice in lockstep: a "lead" reader half a window ahead of the writer feeds a ring buffer of
background samples, so no output frame has to wait in memory. The buffer keeps every
`stride`-th frame (stride = ceil(window_frames / samples)), i.e. n = 2*(window_frames//2)
// stride + 2 slots of h*w*5 bytes (colour, and luminance as the median's sort key or a
"covered" marker), plus h*w*7 bytes of long-term memory (colour, frame stamp). (h, w) is
the frame size, scaled down only when that would exceed `buffer_mb`. With the defaults
(90-frame window, 30 samples: 32 slots): 640x480 takes 51 MB, 1920x1080 346 MB (full
resolution under the 384 MB default). On top of that: one chunk of `run.chunk_frames`
frames for the writer, one for the lead, and temporaries of about 12 bytes per removed
pixel and sample (16 with alignment: the resampled colours and luma).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from pipeline.config import Section
from pipeline.stage import Resources, Stage, VideoFailed, VideoJob
from pipeline.video import VideoWriter
from stages.camera_motion import (
    IDENTITY,
    CameraTracker,
    MotionEstimator,
    displacement_px,
    invert,
    rescale,
)
from stages.compositing import (
    check_size,
    dilate,
    fps_of,
    gather,
    iter_aligned,
    video_info,
)
from stages.sd_inpaint import HoleFiller, Repainter, SDOptions, load_pipeline

log = logging.getLogger(__name__)

# Sort keys pack (luminance << 8 | sample index): at most 256 samples per window.
_MAX_SLOTS = 256
# Stored instead of a sample's luminance where the pixel is covered (removed). The largest
# uint16: a resampled (bilinear) luma above 255 then means a covered or outside pixel
# weighs more than 255/65535 (0.4 %) in the mix, i.e. could shift its colour by a level.
INVALID_LUMA = 65535
# Ring pixels compared per sample when checking that it shows the same background.
_RING_SAMPLES = 4096
# Samples per pixel in the long-term memory's median (its cost is per pixel and sample).
_MEMORY_SLOTS = 15
# Views closer than this (px at any frame corner) are the same: samples are read in place.
_SAME_VIEW_PX = 0.25
FILL_PROMPT = "empty room, background, no people"
FILL_NEGATIVE = "person, people, human, body, face, hands, shadow, text, watermark"
FILL_NEEDS_MODEL = ("inpaint.fill=sd needs inpaint.fill_model (a local diffusers inpainting "
                    "folder or a .safetensors/.ckpt checkpoint)")


class InpaintConfig(Section):
    mask_threshold: int = Field(
        64, ge=0, le=254, description="detect mask values above this (0-255) count as person"
    )
    dilate_px: int | None = Field(
        None, ge=0, le=200,
        description="grow the person mask by this many px; null: 15 px per 480 px of the "
        "frame's short side",
    )
    window_frames: int = Field(
        90, ge=1, le=10000, description="temporal window (frames, centred) for background samples"
    )
    samples: int = Field(
        30, ge=1, le=_MAX_SLOTS - 2,
        description="at most this many evenly spaced frames of the window are kept as samples",
    )
    min_samples: int = Field(
        2, ge=1, le=100,
        description="uncovered samples a pixel needs for a temporal value (1 trusts a single "
        "frame where the mask may have flickered off)",
    )
    long_term_memory: bool = Field(
        True, description="also use the last robust background estimate from before the window"
    )
    max_sample_diff: float = Field(
        12.0, ge=0.0, le=255.0,
        description="a sample is used only if the background around the removed region "
        "differs from the current frame by at most this (mean abs, 0-255); 255: off",
    )
    cut_threshold: float = Field(
        40.0, ge=0.0, le=255.0,
        description="mean abs difference between consecutive frames that marks a scene cut; "
        "samples and memory never cross a cut; 255: off",
    )
    buffer_mb: int = Field(
        384, ge=8, le=65536,
        description="memory for background samples; frames are downscaled to fit",
    )
    method: Literal["telea", "ns"] = Field(
        "telea", description="cv2.inpaint method for pixels never seen uncovered"
    )
    inpaint_radius: int = Field(5, ge=1, le=50, description="cv2.inpaint radius (px)")
    inpaint_max_side: int = Field(
        640, ge=64, le=8192,
        description="image inpainting runs at most at this size (longest side), then upscales",
    )
    box_fallback: bool = Field(
        True, description="remove a person's padded box when the mask misses them"
    )
    box_min_cover: float = Field(
        0.05, ge=0.0, le=1.0, description="mask fraction of a box below which the box is removed"
    )
    box_pad: float = Field(0.1, ge=0.0, le=1.0, description="box padding, fraction of its size")
    person_match: float = Field(
        12.0, ge=0.0, le=255.0,
        description="a sample that matches the detected person's current colours (within "
        "this, mean abs 0-255) at over half of the person's pixels shows the person (the "
        "detector missed them in that frame) and is not used as background; 0: off",
    )
    shadow_height: float = Field(
        0.08, ge=0.0, le=1.0,
        description="also remove an ellipse centred on each person's feet (box bottom) for "
        "the cast shadow: its vertical half-axis, fraction of the box height; 0: off",
    )
    shadow_width: float = Field(
        1.2, ge=0.0, le=4.0, description="the shadow ellipse's width, fraction of the box width"
    )
    align: bool = Field(
        True,
        description="estimate the camera motion (homography on background features, ECC "
        "fallback) and warp background samples into the current frame; false: samples are "
        "used where they lie (static cameras)",
    )
    view_fill: bool = Field(
        True,
        description="with a moving camera, pixels whose background was never seen fall back "
        "on nearby frames read at the same image position (unaligned) where their "
        "surroundings match, before image inpainting; flagged as synthesized",
    )
    align_max_side: int = Field(
        320, ge=64, le=4096, description="camera motion is estimated at most at this size"
    )
    align_min_inliers: int = Field(
        20, ge=6, le=1000,
        description="feature matches consistent with one homography needed to accept it",
    )
    fill: Literal["classical", "sd"] = Field(
        "classical",
        description="what fills background never seen (after view_fill): classical "
        "(cv2.inpaint) or sd (a diffusers inpainting model, fill_model; cv2.inpaint's "
        "result is kept for holes under fill_min_px)",
    )
    fill_model: str | None = Field(
        None, description="fill=sd: local diffusers inpainting folder or .safetensors/.ckpt"
    )
    fill_checkpoint_config: str | None = Field(
        None, description="fill=sd with a single-file model: a local diffusers folder of the "
        "same architecture (configs and tokenizer)",
    )
    fill_prompt: str = Field(FILL_PROMPT, description="fill=sd: prompt")
    fill_negative_prompt: str = Field(FILL_NEGATIVE, description="fill=sd: negative prompt")
    fill_steps: int = Field(20, ge=1, le=200, description="fill=sd: denoising steps")
    fill_guidance: float = Field(
        5.0, ge=0.0, le=30.0, description="fill=sd: classifier-free guidance (<= 1: off)"
    )
    fill_seed: int = Field(
        0, ge=0, description="fill=sd: noise seed, the same for every frame of a video"
    )
    fill_resolution: int = Field(
        512, ge=16, le=2048, description="fill=sd: side of the square crop the model sees"
    )
    fill_min_px: int = Field(
        64, ge=1, le=10**7,
        description="fill=sd: holes (groups of nearby hole pixels) smaller than this keep "
        "the cv2.inpaint fill",
    )
    fill_every: int = Field(
        1, ge=1, le=1000,
        description="fill=sd: run the model at most every N-th frame; a frame between takes "
        "the last model fill at its hole pixels when the camera has not moved since and no "
        "hole of fill_min_px or more lies outside that fill (else the model runs again)",
    )
    fill_batch_size: int = Field(4, ge=1, le=256, description="fill=sd: crops per model call")
    fill_device: Literal["auto", "cuda", "cpu"] = Field("auto", description="fill=sd: device")
    fill_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="fill=sd: weights dtype (auto: float16 on CUDA, float32 on CPU)"
    )

    @model_validator(mode="after")
    def _fill_checks(self) -> InpaintConfig:
        if self.fill == "sd" and not self.fill_model:
            raise ValueError(FILL_NEEDS_MODEL)
        if self.fill_resolution % 8:
            raise ValueError(f"fill_resolution {self.fill_resolution} is not a multiple of 8")
        return self

    def fill_options(self) -> SDOptions:
        assert self.fill_model
        return SDOptions(
            model=self.fill_model, checkpoint_config=self.fill_checkpoint_config,
            device=self.fill_device, dtype=self.fill_dtype, resolution=self.fill_resolution,
            steps=self.fill_steps, strength=1.0, guidance=self.fill_guidance,
            seed=self.fill_seed, batch_size=self.fill_batch_size, prompt=self.fill_prompt,
            negative_prompt=self.fill_negative_prompt, section="inpaint",
        )


def auto_dilate_px(width: int, height: int) -> int:
    return max(1, round(15 * min(width, height) / 480))


def luminance(frame: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> uint16 luma [...] (0-255, BT.601 weights)."""
    v = frame.astype(np.uint16)
    return (v[..., 0] * 77 + v[..., 1] * 150 + v[..., 2] * 29) >> 8


def median_pick(luma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of luma [n, m] (uint16, INVALID_LUMA where the sample is covered), the row
    of the valid sample of median luminance, and the number of valid samples.

    The row is meaningless where the count is 0.
    """
    n, m = luma.shape
    # Packed keys (luma << 8 | row): invalid samples sort last, so the valid ones occupy
    # the first `count` places of each sorted column.
    key = (luma.astype(np.int32) << 8) | np.arange(n, dtype=np.int32)[:, None]
    key = np.sort(key.T, axis=1)
    count = (luma != INVALID_LUMA).sum(axis=0)
    row = key[np.arange(m), np.maximum(count - 1, 0) // 2] & 0xFF
    return row, count


def image_inpaint(
    img: np.ndarray, mask: np.ndarray, flag: int, radius: int, max_side: int
) -> np.ndarray:
    """cv2.inpaint the `mask` pixels of `img`, at a reduced size for large frames.

    The reduced mask is conservative (any masked source pixel masks the reduced pixel), so
    no removed colour leaks into the reduced image through averaging.
    """
    height, width = mask.shape
    out = img.copy()
    scale = min(1.0, max_side / max(height, width))
    if scale >= 1.0:
        return cv2.inpaint(img, mask.astype(np.uint8), radius, flag)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    small_mask = cv2.resize(mask.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA) > 0
    small = cv2.inpaint(small, small_mask.astype(np.uint8),
                        max(1, round(radius * scale)), flag)
    up = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    out[mask] = up[mask]
    return out


class Remover:
    """The removal mask of frame i: thresholded, dilated mask, plus a shadow ellipse under
    every detected person's feet, plus the box fallback."""

    def __init__(
        self,
        cfg: InpaintConfig,
        dilate_px: int,
        boxes: np.ndarray | None,
        present: np.ndarray | None,
    ):
        self.threshold = cfg.mask_threshold
        self.dilate_px = dilate_px
        self.boxes, self.present = boxes, present
        self.min_cover, self.pad = cfg.box_min_cover, cfg.box_pad
        self.shadow_h, self.shadow_w = cfg.shadow_height, cfg.shadow_width

    def __call__(self, i: int, mask: np.ndarray) -> tuple[np.ndarray, bool]:
        person = mask > self.threshold
        removed = dilate(person, self.dilate_px)
        used_box = False
        if self.boxes is None or i >= len(self.boxes):
            return removed, used_box
        height, width = mask.shape
        extra = np.zeros((height, width), np.uint8)
        for p in np.flatnonzero(self.present[i]):
            box = self.boxes[i, p]
            if not np.all(np.isfinite(box)):
                continue
            self._shadow(extra, box)
            x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
            x1, y1 = min(width, int(math.ceil(box[2]))), min(height, int(math.ceil(box[3])))
            if x1 <= x0 or y1 <= y0:
                continue
            if person[y0:y1, x0:x1].mean() >= self.min_cover:
                continue
            px, py = self.pad * (x1 - x0), self.pad * (y1 - y0)
            extra[max(0, int(y0 - py)):min(height, int(math.ceil(y1 + py))),
                  max(0, int(x0 - px)):min(width, int(math.ceil(x1 + px)))] = 1
            used_box = True
        if extra.any():
            removed = removed | extra.astype(bool)
        return removed, used_box

    def _shadow(self, canvas: np.ndarray, box: np.ndarray) -> None:
        """A person's contact and cast shadow lie on the floor around the feet, wider than
        the legs and partly below them: an ellipse centred on the box's bottom edge."""
        bw, bh = float(box[2] - box[0]), float(box[3] - box[1])
        axes = (round(self.shadow_w * bw / 2), round(self.shadow_h * bh))
        if self.shadow_h <= 0 or self.shadow_w <= 0 or min(axes) < 1:
            return
        centre = (round(float(box[0] + box[2]) / 2), round(float(box[3])))
        cv2.ellipse(canvas, centre, axes, 0.0, 0.0, 360.0, 1, thickness=-1)


class BackgroundWindow:
    """Ring buffer of background samples around the current frame, fed by a lead reader.

    With `align` on, every frame's camera motion is tracked (stages.camera_motion): each
    sample keeps its transform to the first frame of its shot, and samples (and the
    long-term memory) taken from another viewpoint are resampled into the current frame's
    coordinates, bilinearly, at the removed pixels only. A sample contributes where its
    warped position lies inside its image and none of the four source pixels was covered.
    Where the viewpoint did not change (a static camera: the tracker reports exactly the
    same transform) samples are read in place, as without alignment.

    Two guards keep samples that show another view out of the median: a sample is used
    only within the current shot (a scene cut is where consecutive frames differ by more
    than `cut_threshold` and the camera tracker could not match them), and only when the
    background just around the removed region (a ring of uncovered pixels) matches the
    current frame within `max_sample_diff` (failed alignment, lighting changes).

    The long-term memory is not the last value seen (that would keep a person who walked
    in undetected) but the last robust estimate: every half window, the masked median of
    the window's samples for every pixel with enough uncovered samples. It is used within
    the shot only, and only when it matches the current frame around the removed region.
    """

    def __init__(
        self,
        lead: Iterator[tuple[np.ndarray, np.ndarray]],
        remover: Remover,
        frame_size: tuple[int, int],
        buffer_size: tuple[int, int],
        cfg: InpaintConfig,
        stride: int,
    ):
        self.lead, self.remover = lead, remover
        self.width, self.height = frame_size
        self.w, self.h = buffer_size
        self.scaled = buffer_size != frame_size
        self.stride, self.half = stride, cfg.window_frames // 2
        self.max_diff, self.cut_threshold = cfg.max_sample_diff, cfg.cut_threshold
        self.min_samples = cfg.min_samples
        n, n_px = slots_for(self.half, stride), self.h * self.w
        self.frames = np.zeros((n, n_px, 3), np.uint8)
        # Luminance of each sample (INVALID_LUMA where covered): the median's sort key.
        self.luma = np.full((n, n_px), INVALID_LUMA, np.uint16)
        self.index = np.full(n, -1, np.int64)
        # Each sample's transform to its shot's first frame (full-resolution pixels), and
        # its inverse.
        self.slot_to_shot = np.repeat(IDENTITY[None], n, axis=0)
        self.slot_from_shot = np.repeat(IDENTITY[None], n, axis=0)
        self.memory = np.zeros((n_px, 3), np.uint8) if cfg.long_term_memory else None
        # Frame at which each pixel's estimate was made (-1: none yet).
        self.memory_at = np.full(n_px, -1, np.int32) if cfg.long_term_memory else None
        self.memory_to_shot = IDENTITY.copy()  # the memory lies in this view's coordinates
        self.next_refresh = 0
        self.cuts: list[int] = []  # first frame of each new shot
        # A fixed spread of pixels to compare consecutive frames with (cut detection).
        full_px = self.width * self.height
        self.probe = np.linspace(0, full_px - 1, min(full_px, 4096)).astype(np.int64)
        self.prev_probe: tuple[np.ndarray, np.ndarray] | None = None
        self.next_lead = 0
        self.tracker = (
            CameraTracker(MotionEstimator(max_side=cfg.align_max_side,
                                          min_inliers=cfg.align_min_inliers))
            if cfg.align else None
        )
        # Transform to the shot's first frame of the frames read but not yet written.
        self.to_shot: dict[int, np.ndarray] = {}
        self.warped_samples = 0  # sample lookups that needed resampling (stats)
        self.view_fill = cfg.view_fill and cfg.align
        self.person_match = cfg.person_match
        self.person_like = 0  # samples dropped for showing an undetected person (stats)

    def to_buffer(self, frame: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Frame and removal mask at buffer size; a reduced pixel counts as removed when any
        of its source pixels is."""
        if not self.scaled:
            return frame, removed
        size = (self.w, self.h)
        small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
        rem = cv2.resize(removed.astype(np.uint8) * 255, size, interpolation=cv2.INTER_AREA) > 0
        return small, rem

    def advance(self, t: int) -> None:
        """Read ahead until every sample of frame t's window is in the buffer; refresh the
        long-term memory every half window."""
        while self.next_lead <= t + self.half:
            try:
                frame, mask = next(self.lead)
            except StopIteration:
                self.next_lead = t + self.half + 1  # the video ended: nothing more ahead
                break
            i = self.next_lead
            self.next_lead += 1
            self._track(i, frame, mask)
            if i % self.stride == 0:
                removed, _ = self.remover(i, mask)
                self._add(i, *self.to_buffer(frame, removed))
        for old in [k for k in self.to_shot if k < t]:
            del self.to_shot[old]
        if self.memory is not None and t >= self.next_refresh:
            self._refresh_memory(t)
            self.next_refresh = t + max(1, self.half)

    def _track(self, i: int, frame: np.ndarray, mask: np.ndarray) -> None:
        """Camera motion and scene cuts for lead frame i."""
        aligned = False
        if self.tracker is not None:
            person = mask > self.remover.threshold
            self.to_shot[i], aligned = self.tracker.add(frame, person)
            # A frame the tracker matched to the shot's view by features is no cut, however
            # much a pan changed the pixels.
            aligned = aligned and i > 0 and self.tracker.last_method in ("klt", "features")
        if self._check_cut(i, frame, mask, aligned) and self.tracker is not None:
            self.tracker.reset()
            self.to_shot[i], _ = self.tracker.add(frame, mask > self.remover.threshold)
        self.to_shot.setdefault(i, IDENTITY)

    def _add(self, i: int, frame: np.ndarray, removed: np.ndarray) -> None:
        slot = (i // self.stride) % len(self.index)
        self.frames[slot] = frame.reshape(-1, 3)
        self.luma[slot] = np.where(removed, INVALID_LUMA, luminance(frame)).reshape(-1)
        self.index[slot] = i
        self.slot_to_shot[slot] = self.to_shot[i]
        self.slot_from_shot[slot] = invert(self.to_shot[i])

    def _check_cut(self, i: int, frame: np.ndarray, mask: np.ndarray, aligned: bool) -> bool:
        """Compare frame i with frame i-1 at the probe pixels free of people in both."""
        vals = frame.reshape(-1, 3)[self.probe].astype(np.int16)
        free = mask.reshape(-1)[self.probe] <= self.remover.threshold
        cut = False
        if self.prev_probe is not None:
            prev_vals, prev_free = self.prev_probe
            both = free & prev_free
            # With people covering most of the view there is no evidence either way.
            if both.sum() >= 0.1 * len(self.probe) and not aligned:
                diff = float(np.abs(vals[both] - prev_vals[both]).mean())
                if diff > self.cut_threshold:
                    self.cuts.append(i)
                    cut = True
        self.prev_probe = (vals, free)
        return cut

    def shot(self, t: int) -> tuple[int, int]:
        """[first, end) frame indices of the shot holding frame t, as far as read."""
        first, end = 0, 1 << 62
        for c in self.cuts:
            if c <= t:
                first = c
            else:
                end = c
                break
        return first, end

    def _window_slots(self, t: int) -> np.ndarray:
        first, end = self.shot(t)
        lo, hi = max(first, t - self.half), min(end - 1, t + self.half)
        return np.flatnonzero((self.index >= lo) & (self.index <= hi))

    def _warp_to(self, source_to_shot: np.ndarray, t: int,
                 source_from_shot: np.ndarray | None = None) -> np.ndarray | None:
        """Buffer-pixel homography from frame t to a view with transform `source_to_shot`
        (and its inverse, if known); None where the views coincide (read in place)."""
        if self.tracker is None:
            return None
        target = self.to_shot.get(t, IDENTITY)
        if source_to_shot is target or np.array_equal(source_to_shot, target):
            return None
        if source_from_shot is None:
            source_from_shot = invert(source_to_shot)
        h = source_from_shot @ target
        if displacement_px(h, (self.width, self.height)) <= _SAME_VIEW_PX:
            return None
        if self.scaled:
            h = rescale(h, self.w / self.width, self.h / self.height)
        return h

    def _samples(
        self, t: int, slots: np.ndarray, idx: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Colours [k, m, 3] and luma [k, m] (INVALID_LUMA: covered or outside) of the
        samples `slots` at frame t's flat buffer pixels `idx`."""
        warps = [self._warp_to(self.slot_to_shot[s], t, self.slot_from_shot[s]) for s in slots]
        if all(h is None for h in warps):
            return gather(self.frames, slots, idx), gather(self.luma, slots, idx)
        colours = np.empty((len(slots), len(idx), 3), np.uint8)
        luma = np.empty((len(slots), len(idx)), np.uint16)
        maps = grid_of(idx, self.w)
        for j, (s, h) in enumerate(zip(slots, warps, strict=True)):
            if h is None:
                colours[j] = np.take(self.frames[s], idx, axis=0)
                luma[j] = np.take(self.luma[s], idx)
                continue
            colours[j], luma[j] = self._warp_sample(s, h, maps)
            self.warped_samples += 1
        return colours, luma

    def _warp_sample(self, s: int, h: np.ndarray,
                     maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Sample s resampled at the pixels `maps` (see grid_of) move to under h: colour,
        and luma with INVALID_LUMA where a covered or outside pixel enters the mix."""
        at = cv2.perspectiveTransform(maps, h)
        colour = remap_points(self.frames[s].reshape(self.h, self.w, 3), at)
        luma = remap_points(self.luma[s].reshape(self.h, self.w, 1), at, INVALID_LUMA)[:, 0]
        return colour, np.where(luma > 255, INVALID_LUMA, luma).astype(np.uint16)

    def _memory_at(self, t: int, idx: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
        """Memory colour [m, 3] at frame t's buffer pixels and whether it is usable there."""
        h = self._warp_to(self.memory_to_shot, t)
        if h is None:
            return self.memory[idx], self.memory_at[idx] >= first
        colour, usable, _ = self._warp_memory(h, grid_of(idx, self.w), first)
        return colour, usable

    def _warp_memory(
        self, h: np.ndarray, maps: np.ndarray, first: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The memory resampled at `maps` moved by h: colour, usable (no pixel without an
        estimate in this shot enters the mix), and the nearest pixel's frame stamp."""
        at = cv2.perspectiveTransform(maps, h)
        size = (self.h, self.w)
        colour = remap_points(self.memory.reshape(*size, 3), at)
        unusable = np.where(self.memory_at < first, INVALID_LUMA, 0).astype(np.uint16)
        mixed = remap_points(unusable.reshape(*size, 1), at, INVALID_LUMA)[:, 0]
        stamp = remap_points(self.memory_at.astype(np.float32).reshape(*size, 1), at, -1.0,
                             cv2.INTER_NEAREST)[:, 0]
        return colour, mixed <= 255, stamp.astype(np.int32)

    def _refresh_memory(self, t: int, block: int = 1 << 16) -> None:
        slots = self._window_slots(t)
        if len(slots) > _MEMORY_SLOTS:  # evenly thinned: the cost is per pixel and slot
            slots = slots[np.linspace(0, len(slots) - 1, _MEMORY_SLOTS).astype(int)]
        need = max(self.min_samples, 3)
        if len(slots) < need:
            return
        self._move_memory(t)
        for start in range(0, len(self.memory), block):
            px = np.arange(start, min(start + block, len(self.memory)))
            colours, luma = self._samples(t, slots, px)
            row, count = median_pick(luma)
            ok = count >= need
            self.memory[px[ok]] = colours[row, np.arange(len(px))][ok]
            self.memory_at[px[ok]] = t

    def _move_memory(self, t: int) -> None:
        """Resample the memory into frame t's view when the camera moved since it was made
        (once per refresh); pixels that fall outside keep no estimate."""
        h = self._warp_to(self.memory_to_shot, t)
        first, _ = self.shot(t)
        if h is not None:
            every = grid_of(np.arange(len(self.memory)), self.w)
            colour, usable, stamp = self._warp_memory(h, every, first)
            self.memory[:] = colour
            self.memory_at[:] = np.where(usable, stamp, -1)
        self.memory_to_shot = self.to_shot.get(t, IDENTITY)

    def _ring_scores(
        self, vals: np.ndarray, seen: np.ndarray, around: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Mean abs difference to the current ring, per candidate, over what it saw."""
        diff = np.abs(vals.astype(np.int16) - around[None].astype(np.int16)).mean(axis=2)
        count = seen.sum(axis=1)
        return (diff * seen).sum(axis=1) / np.maximum(count, 1), count

    def _consistent(self, vals: np.ndarray, seen: np.ndarray, around: np.ndarray) -> np.ndarray:
        score, count = self._ring_scores(vals, seen, around)
        # Too little of the ring visible in a candidate to judge it: keep it.
        return (score <= self.max_diff) | (count < 16)

    def lookup(
        self, t: int, idx: np.ndarray, ring: np.ndarray, around: np.ndarray,
        core: np.ndarray | None = None, person: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Background colour at frame t for flat buffer pixels `idx`; `around` holds the
        current frame's colours at the flat ring pixels `ring`, `person` those at (some of)
        the detected person's pixels `core`.

        Returns colour [m, 3], from_window [m], from_memory [m] (the real background) and
        from_view [m] (a stand-in from another view, see _same_place); none: not seen."""
        slots = self._window_slots(t)
        check = len(ring) > 0 and self.max_diff < 255
        candidates = slots
        if len(slots) and check:
            ring_colours, ring_luma = self._samples(t, slots, ring)
            slots = slots[self._consistent(ring_colours, ring_luma != INVALID_LUMA, around)]
        if len(slots) and core is not None and len(core) and self.person_match > 0:
            shows = self._shows_person(t, slots, core, person)
            self.person_like += int(shows.sum())
            slots = slots[~shows]
        m = len(idx)
        if len(slots):
            colours, luma = self._samples(t, slots, idx)
            row, count = median_pick(luma)
            colour = colours[row, np.arange(m)]
            in_window = count >= self.min_samples
        else:
            colour, in_window = np.zeros((m, 3), np.uint8), np.zeros(m, bool)
        from_memory = np.zeros(m, bool)
        if self.memory is not None:
            first, _ = self.shot(t)
            mem_colour, usable = self._memory_at(t, idx, first)
            from_memory = ~in_window & usable
            if from_memory.any() and check:
                ring_mem, seen = self._memory_at(t, ring, first)
                if not self._consistent(ring_mem[None], seen[None], around)[0]:
                    from_memory[:] = False
            if from_memory.any() and core is not None and len(core) and self.person_match > 0:
                core_mem, seen = self._memory_at(t, core, first)
                if self._looks_like(core_mem[None], seen[None], person)[0]:
                    from_memory[:] = False  # the memory kept an undetected person
            colour[from_memory] = mem_colour[from_memory]
        from_view = np.zeros(m, bool)
        rest = np.flatnonzero(~(in_window | from_memory))
        if self.view_fill and len(rest):
            found = self._same_place(t, candidates, idx[rest], ring, around, check)
            if found is not None:
                from_view[rest] = found[1]
                colour[rest[found[1]]] = found[0][found[1]]
        return colour, in_window, from_memory, from_view

    def _shows_person(self, t: int, slots: np.ndarray, core: np.ndarray,
                      person: np.ndarray) -> np.ndarray:
        """Per sample: does it show the person now detected at `core`? Over half of those
        pixels (where the sample saw anything) within `person_match` of their colour now:
        the person was there, and the detector missed them in that frame. (A person who
        arrives or leaves is not at that place in the sample: the colours differ.)"""
        colours, luma = self._samples(t, slots, core)
        return self._looks_like(colours, luma != INVALID_LUMA, person)

    def _looks_like(self, colours: np.ndarray, seen: np.ndarray,
                    person: np.ndarray) -> np.ndarray:
        near = np.abs(colours.astype(np.int16) - person[None].astype(np.int16)).mean(axis=2)
        close = (near <= self.person_match) & seen
        count = seen.sum(axis=1)
        return (count >= 16) & (close.sum(axis=1) > 0.5 * np.maximum(count, 1))

    def _same_place(
        self, t: int, slots: np.ndarray, idx: np.ndarray, ring: np.ndarray,
        around: np.ndarray, check: bool,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """For background a moving camera never showed: the samples read at the same image
        position, not aligned, where their surroundings match the current frame (the ring
        check). Not the true background there, but texture of the same surface nearby
        (a wall, a floor a little further along the pan), better than image inpainting
        over a large hole. Colour [m, 3] and found [m]; None when no sample moved."""
        if all(self._warp_to(self.slot_to_shot[s], t, self.slot_from_shot[s]) is None
               for s in slots):
            return None  # every view is the current one: nothing the aligned read missed
        if check:
            seen = gather(self.luma, slots, ring) != INVALID_LUMA
            slots = slots[self._consistent(gather(self.frames, slots, ring), seen, around)]
        if not len(slots):
            return None
        row, count = median_pick(gather(self.luma, slots, idx))
        return self.frames[slots[row], idx], count >= self.min_samples


def grid_of(idx: np.ndarray, width: int) -> np.ndarray:
    """Pixel coordinates of flat indices `idx` in rows of `width`, as cv2 point maps:
    float32 [1, m, 2] (x, y)."""
    ys, xs = np.divmod(idx, width)
    return np.stack([xs, ys], axis=-1).astype(np.float32)[None]


def remap_points(image: np.ndarray, at: np.ndarray, border: float | None = None,
                 interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """image [h, w, C] sampled at the points `at` (float32 [1, m, 2]): [m, C]. Outside
    the image: the nearest edge pixel, or `border` if given. (cv2.remap maps are limited to
    32767 columns: longer point lists are folded into rows.)"""
    m, channels = at.shape[1], image.shape[2]
    if m == 0:
        return np.empty((0, channels), image.dtype)
    if m >= 32767:
        cols = 4096
        rows = -(-m // cols)
        at = np.pad(at[0], ((0, rows * cols - m), (0, 0))).reshape(rows, cols, 2)
    mode = cv2.BORDER_REPLICATE if border is None else cv2.BORDER_CONSTANT
    out = cv2.remap(image, at, None, interpolation, borderMode=mode,
                    borderValue=0 if border is None else border)
    return out.reshape(-1, channels)[:m]


def slots_for(half: int, stride: int) -> int:
    # Sample indices in [t - half, t + half] that are multiples of stride, plus a spare.
    return 2 * half // stride + 2


def buffer_size_for(
    width: int, height: int, slots: int, memory: bool, budget_mb: int
) -> tuple[int, int]:
    per_px = slots * 5 + (7 if memory else 0)  # + memory colour, int32 frame stamp
    scale = min(1.0, math.sqrt(budget_mb * 2**20 / (per_px * width * height)))
    if scale >= 1.0:
        return width, height
    return max(1, int(width * scale)), max(1, int(height * scale))


def _frames(chunks: Iterator[tuple[np.ndarray, ...]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for frames, masks in chunks:
        yield from zip(frames, masks, strict=True)


def _load_boxes(path: Path, frames: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not path.is_file():
        log.warning("%s missing: no box fallback", path)
        return None, None
    with np.load(path) as data:
        boxes = np.asarray(data["boxes"], np.float32)
        present = np.asarray(data["present"], bool)
    if boxes.ndim != 3 or boxes.shape[2] != 4 or present.shape != boxes.shape[:2]:
        raise VideoFailed(f"{path.name}: boxes {boxes.shape} / present {present.shape} malformed")
    if len(boxes) != frames:
        raise VideoFailed(f"{path.name}: {len(boxes)} frames of boxes, video has {frames}")
    return boxes, present


class KeyFill:
    """fill=sd with keyframes: the model fills a frame's holes, and the frames after it (up
    to `every` - 1 of them) take that fill at their own hole pixels, as long as they show
    the same view (same shot, camera not moved: the fill lies where it belongs) and none of
    their holes of `filler.min_px` or more lies outside it. Hole pixels outside the carried
    fill keep the classical fill; every other pixel stays the classical plate's."""

    def __init__(self, filler: HoleFiller, every: int):
        self.filler, self.every = filler, every
        self.key: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.carried_frames = 0

    @property
    def crops(self) -> int:
        return self.filler.crops

    def __call__(self, t: int, plate: np.ndarray, hole: np.ndarray,
                 window: BackgroundWindow) -> tuple[np.ndarray, np.ndarray]:
        """The plate with its hole filled by the model (or carried), and those pixels."""
        view = window.to_shot.get(t, IDENTITY)
        if self.key is not None and self._same_view(t, view, window):
            _, _, key_plate, key_done = self.key
            if not self.filler.groups(hole & ~key_done):
                share = hole & key_done
                out = plate.copy()
                out[share] = key_plate[share]
                self.carried_frames += 1
                return out, share
        out, done = self.filler(plate, hole)
        if done.any():
            self.key = (t, view.copy(), out, done)
        return out, done

    def _same_view(self, t: int, view: np.ndarray, window: BackgroundWindow) -> bool:
        assert self.key is not None
        key_t, key_view = self.key[:2]
        return (t - key_t < self.every and window.shot(t)[0] == window.shot(key_t)[0]
                and window._warp_to(key_view, t) is None)


def _fill_summary(counts: dict[str, int], filler: KeyFill, seconds: float,
                  pixels: int) -> dict[str, Any]:
    return {
        # Hole pixels the model repainted or that took a keyframe's model fill (the rest of
        # the hole: groups under fill_min_px, left to cv2.inpaint).
        "sd_filled_pixels": counts["sd_filled"],
        "sd_filled_fraction": round(counts["sd_filled"] / pixels, 6),
        "sd_fill_frames": counts["sd_frames"],
        "sd_fill_carried_frames": filler.carried_frames,
        "sd_fill_crops": filler.crops,
        "sd_fill_seconds": round(seconds, 3),
    }


def _camera_summary(window: BackgroundWindow) -> dict[str, Any]:
    tracker = window.tracker
    if tracker is None:
        return {"camera_aligned": False}
    return {
        "camera_aligned": True,
        # Frames whose view differs from their keyframe (a moving camera), and frames the
        # tracker could not place (their samples fall back on the ring check alone).
        "camera_moving_frames": tracker.moved,
        "camera_unaligned_frames": tracker.frames - tracker.aligned,
        "warped_sample_reads": window.warped_samples,
    }


class InpaintStage(Stage):
    name = "inpaint"
    version = "2"
    requires = ("detect",)
    config_model = InpaintConfig
    resources = Resources(cpus=1.0)
    config: InpaintConfig

    _METHODS: ClassVar[dict[str, int]] = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}
    fill_pipe: Any = None

    def setup(self) -> None:
        if self.config.fill == "sd" and self.fill_pipe is None:
            self.fill_pipe = load_pipeline(self.config.fill_options())

    def teardown(self) -> None:
        self.fill_pipe = None

    def _filler(self) -> KeyFill | None:
        if self.config.fill != "sd":
            return None
        self.setup()
        return KeyFill(HoleFiller(Repainter(self.fill_pipe, self.config.fill_options()),
                                  self.config.fill_min_px), self.config.fill_every)

    def process(self, job: VideoJob) -> dict[str, Any]:
        cfg = self.config
        src = Path(job.video.path)
        detect = Path(job.inputs["detect"])
        mask_path = detect / "mask.mkv"
        if not mask_path.is_file():
            raise VideoFailed(f"detect/{job.video.id}/mask.mkv missing")
        info = video_info(job, src)
        width, height, total = int(info["width"]), int(info["height"]), int(info["frame_count"])
        dilate_px = cfg.dilate_px if cfg.dilate_px is not None else auto_dilate_px(width, height)
        boxes, present = (
            _load_boxes(detect / "people.npz", total) if cfg.box_fallback else (None, None)
        )
        remover = Remover(cfg, dilate_px, boxes, present)

        half = cfg.window_frames // 2
        stride = max(1, math.ceil(cfg.window_frames / cfg.samples))
        slots = slots_for(half, stride)
        buf_w, buf_h = buffer_size_for(width, height, slots, cfg.long_term_memory, cfg.buffer_mb)
        sources = [(src, "rgb24"), (mask_path, "gray")]
        lead = _frames(iter_aligned(sources, job.run.chunk_frames))
        window = BackgroundWindow(lead, remover, (width, height), (buf_w, buf_h), cfg, stride)
        ring_px = max(2.0, dilate_px * buf_w / width)

        counts = {"removed": 0, "window": 0, "memory": 0, "view": 0, "inpainted": 0,
                  "box_frames": 0, "hole": 0, "sd_filled": 0, "sd_frames": 0}
        filler = self._filler()
        fill_seconds = 0.0
        t = 0
        out = job.out_dir
        fps = fps_of(info)
        with (
            VideoWriter(out / "plate.mkv", fps, width, height, "rgb") as plate_w,
            VideoWriter(out / "removed.mkv", fps, width, height, "gray") as removed_w,
            VideoWriter(out / "filled.mkv", fps, width, height, "gray") as filled_w,
        ):
            for frames, masks in iter_aligned(sources, job.run.chunk_frames):
                check_size(frames, width, height, "source video")
                check_size(masks, width, height, "detect mask.mkv")
                plates = np.empty_like(frames)
                removed_out = np.zeros(masks.shape, np.uint8)
                filled_out = np.zeros(masks.shape, np.uint8)
                for j, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
                    window.advance(t)
                    removed, boxed = remover(t, mask)
                    plates[j], filled, hole = self._plate(
                        t, frame, removed, mask > cfg.mask_threshold, window, ring_px, counts)
                    counts["hole"] += int(hole.sum())
                    if filler is not None and hole.any():
                        started = time.perf_counter()
                        plates[j], done = filler(t, plates[j], hole, window)
                        fill_seconds += time.perf_counter() - started
                        counts["sd_filled"] += int(done.sum())
                        counts["sd_frames"] += int(done.any())
                    removed_out[j][removed] = 255
                    filled_out[j][filled] = 255
                    counts["removed"] += int(removed.sum())
                    counts["box_frames"] += int(boxed)
                    t += 1
                plate_w.write_chunk(plates)
                removed_w.write_chunk(removed_out)
                filled_w.write_chunk(filled_out)
                job.advance(len(frames))
        lead.close()
        if t != total:
            raise VideoFailed(f"decoded {t} frames, detect reported {total}")

        pixels = max(1, total * width * height)
        return {
            "video": info,
            "frames": t,
            "removed_fraction": round(counts["removed"] / pixels, 6),
            "temporal_fraction": round((counts["window"] + counts["memory"]) / pixels, 6),
            "memory_fraction": round(counts["memory"] / pixels, 6),
            "inpainted_fraction": round(counts["inpainted"] / pixels, 6),
            # Part of inpainted_fraction taken from another view rather than cv2.inpaint.
            "view_fill_fraction": round(counts["view"] / pixels, 6),
            # Samples not used because they showed the person, undetected (per frame).
            "person_like_samples": round(window.person_like / max(1, t), 3),
            # Part of inpainted_fraction never seen from any view: what image inpainting
            # (cv2.inpaint, or the model with fill=sd) painted.
            "hole_fraction": round(counts["hole"] / pixels, 6),
            "fill": cfg.fill,
            **(_fill_summary(counts, filler, fill_seconds, pixels) if filler else {}),
            "box_fallback_frames": counts["box_frames"],
            "scene_cuts": len(window.cuts),
            "dilate_px": dilate_px,
            "sample_stride": stride,
            "buffer_size": [buf_w, buf_h],
            **_camera_summary(window),
        }

    def _plate(
        self,
        t: int,
        frame: np.ndarray,
        removed: np.ndarray,
        person: np.ndarray,
        window: BackgroundWindow,
        ring_px: float,
        counts: dict[str, int],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The clean plate of frame t, its synthesized pixels (image-inpainted, or
        stand-ins from another view) and its hole (the image-inpainted ones)."""
        if not removed.any():
            return frame, removed, removed
        cfg = self.config
        flag = self._METHODS[cfg.method]
        small, small_removed = window.to_buffer(frame, removed)
        idx = np.flatnonzero(small_removed)
        ring = np.flatnonzero(dilate(small_removed, ring_px) & ~small_removed)
        ring = ring[:: max(1, len(ring) // _RING_SAMPLES)]
        if window.scaled:  # the person's core at buffer size: pixels mostly person
            person = cv2.resize(person.astype(np.uint8) * 255, (window.w, window.h),
                                interpolation=cv2.INTER_AREA) > 127
        core = np.flatnonzero(person)
        core = core[:: max(1, len(core) // _RING_SAMPLES)]
        colour, in_window, from_memory, from_view = window.lookup(
            t, idx, ring, small.reshape(-1, 3)[ring], core, small.reshape(-1, 3)[core])
        real = in_window | from_memory
        known = real | from_view
        plate = small.copy()
        plate.reshape(-1, 3)[idx[known]] = colour[known]
        hole = np.zeros(small_removed.shape, bool)
        hole.reshape(-1)[idx[~known]] = True
        if hole.any():
            plate = image_inpaint(plate, hole, flag, cfg.inpaint_radius, cfg.inpaint_max_side)
        # Synthesized (flagged in filled.mkv): image-inpainted or taken from another view.
        need = np.zeros(small_removed.shape, bool)
        need.reshape(-1)[idx[~real]] = True
        n_view = int(from_view.sum())
        if window.scaled:
            up = cv2.resize(plate, (window.width, window.height), interpolation=cv2.INTER_LINEAR)
            plate = np.where(removed[..., None], up, frame)
            need = removed & (
                cv2.resize(need.astype(np.uint8), (window.width, window.height),
                           interpolation=cv2.INTER_NEAREST) > 0
            )
            hole = removed & (
                cv2.resize(hole.astype(np.uint8), (window.width, window.height),
                           interpolation=cv2.INTER_NEAREST) > 0
            )
            # Full-resolution counts: split the removed pixels by what their buffer pixel got.
            n_need = int(need.sum())
            n_known = int(removed.sum()) - n_need
            n_mem = round(n_known * from_memory.sum() / real.sum()) if real.any() else 0
            n_view = round(n_need * n_view / (~real).sum()) if (~real).any() else 0
            counts["memory"] += n_mem
            counts["window"] += n_known - n_mem
        else:
            n_need = int(need.sum())
            counts["window"] += int(in_window.sum())
            counts["memory"] += int(from_memory.sum())
        counts["view"] += n_view
        counts["inpainted"] += n_need
        return plate, need, hole
