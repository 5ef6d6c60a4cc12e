"""The inpaint stage: a clean plate, the source frames with the real people removed.

Which pixels are removed: the detect mask above `mask_threshold`, dilated by `dilate_px`
(soft edges, hair, and part of the shadow), plus the padded box of any detected person
whose box the mask (almost) does not cover (segmentation missed them).

What a removed pixel becomes, in order of preference:
1. temporal background: among the frames of a window of `window_frames` frames centred
   on the current one (both directions), the samples where that pixel was not removed;
   their median by luminance, so the value is a colour really observed there;
2. long-term memory: the pixel's last robust estimate from before the window (the median
   of a window's samples, refreshed every half window), for a person who stood still
   longer than the window;
3. image inpainting (cv2.inpaint, Telea or Navier-Stokes) for pixels never seen uncovered.
   Only these are flagged in filled.mkv: they are synthesized, the rest is real background.

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
pixel and sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field

from pipeline.config import Section
from pipeline.stage import Resources, Stage, VideoFailed, VideoJob
from pipeline.video import VideoWriter
from stages.compositing import (
    check_size,
    dilate,
    fps_of,
    gather,
    iter_aligned,
    video_info,
)

log = logging.getLogger(__name__)

# Sort keys pack (luminance << 8 | sample index): at most 256 samples per window.
_MAX_SLOTS = 256
# Stored instead of a sample's luminance where the pixel is covered (removed).
INVALID_LUMA = 1023
# Ring pixels compared per sample when checking that it shows the same background.
_RING_SAMPLES = 4096
# Samples per pixel in the long-term memory's median (its cost is per pixel and sample).
_MEMORY_SLOTS = 15


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
    """The removal mask of frame i: thresholded, dilated mask plus the box fallback."""

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

    def __call__(self, i: int, mask: np.ndarray) -> tuple[np.ndarray, bool]:
        person = mask > self.threshold
        removed = dilate(person, self.dilate_px)
        used_box = False
        if self.boxes is None or i >= len(self.boxes):
            return removed, used_box
        height, width = mask.shape
        for p in np.flatnonzero(self.present[i]):
            box = self.boxes[i, p]
            if not np.all(np.isfinite(box)):
                continue
            x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
            x1, y1 = min(width, int(math.ceil(box[2]))), min(height, int(math.ceil(box[3])))
            if x1 <= x0 or y1 <= y0:
                continue
            if person[y0:y1, x0:x1].mean() >= self.min_cover:
                continue
            px, py = self.pad * (x1 - x0), self.pad * (y1 - y0)
            if removed is person:  # dilate() may return its input unchanged
                removed = removed.copy()
            removed[max(0, int(y0 - py)):min(height, int(math.ceil(y1 + py))),
                    max(0, int(x0 - px)):min(width, int(math.ceil(x1 + px)))] = True
            used_box = True
        return removed, used_box


class BackgroundWindow:
    """Ring buffer of background samples around the current frame, fed by a lead reader.

    Two guards keep samples that show another view out of the median: a sample is used
    only within the current shot (a scene cut is where consecutive frames differ by more
    than `cut_threshold`), and only when the background just around the removed region
    (a ring of uncovered pixels) matches the current frame within `max_sample_diff`
    (camera motion, lighting changes).

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
        self.memory = np.zeros((n_px, 3), np.uint8) if cfg.long_term_memory else None
        # Frame at which each pixel's estimate was made (-1: none yet).
        self.memory_at = np.full(n_px, -1, np.int32) if cfg.long_term_memory else None
        self.next_refresh = 0
        self.cuts: list[int] = []  # first frame of each new shot
        # A fixed spread of pixels to compare consecutive frames with (cut detection).
        full_px = self.width * self.height
        self.probe = np.linspace(0, full_px - 1, min(full_px, 4096)).astype(np.int64)
        self.prev_probe: tuple[np.ndarray, np.ndarray] | None = None
        self.next_lead = 0

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
            self._check_cut(i, frame, mask)
            if i % self.stride == 0:
                removed, _ = self.remover(i, mask)
                self._add(i, *self.to_buffer(frame, removed))
        if self.memory is not None and t >= self.next_refresh:
            self._refresh_memory(t)
            self.next_refresh = t + max(1, self.half)

    def _add(self, i: int, frame: np.ndarray, removed: np.ndarray) -> None:
        slot = (i // self.stride) % len(self.index)
        self.frames[slot] = frame.reshape(-1, 3)
        self.luma[slot] = np.where(removed, INVALID_LUMA, luminance(frame)).reshape(-1)
        self.index[slot] = i

    def _check_cut(self, i: int, frame: np.ndarray, mask: np.ndarray) -> None:
        """Compare frame i with frame i-1 at the probe pixels free of people in both."""
        vals = frame.reshape(-1, 3)[self.probe].astype(np.int16)
        free = mask.reshape(-1)[self.probe] <= self.remover.threshold
        if self.prev_probe is not None:
            prev_vals, prev_free = self.prev_probe
            both = free & prev_free
            # With people covering most of the view there is no evidence either way.
            if both.sum() >= 0.1 * len(self.probe):
                diff = float(np.abs(vals[both] - prev_vals[both]).mean())
                if diff > self.cut_threshold:
                    self.cuts.append(i)
        self.prev_probe = (vals, free)

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

    def _refresh_memory(self, t: int, block: int = 1 << 16) -> None:
        slots = self._window_slots(t)
        if len(slots) > _MEMORY_SLOTS:  # evenly thinned: the cost is per pixel and slot
            slots = slots[np.linspace(0, len(slots) - 1, _MEMORY_SLOTS).astype(int)]
        need = max(self.min_samples, 3)
        if len(slots) < need:
            return
        for start in range(0, len(self.memory), block):
            px = slice(start, start + block)
            row, count = median_pick(self.luma[slots, px])
            ok = count >= need
            colour = self.frames[slots[row], np.arange(px.start, px.start + len(row))]
            self.memory[px][ok] = colour[ok]
            self.memory_at[px][ok] = t

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
        self, t: int, idx: np.ndarray, ring: np.ndarray, around: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Background colour at frame t for flat buffer pixels `idx`; `around` holds the
        current frame's colours at the flat ring pixels `ring`.

        Returns colour [m, 3], from_window [m], from_memory [m] (neither: not seen)."""
        slots = self._window_slots(t)
        check = len(ring) > 0 and self.max_diff < 255
        if len(slots) and check:
            seen = gather(self.luma, slots, ring) != INVALID_LUMA
            slots = slots[self._consistent(gather(self.frames, slots, ring), seen, around)]
        m = len(idx)
        if len(slots):
            row, count = median_pick(gather(self.luma, slots, idx))
            colour = self.frames[slots[row], idx]
            in_window = count >= self.min_samples
        else:
            colour, in_window = np.zeros((m, 3), np.uint8), np.zeros(m, bool)
        from_memory = np.zeros(m, bool)
        if self.memory is not None:
            first, _ = self.shot(t)
            from_memory = ~in_window & (self.memory_at[idx] >= first)
            if from_memory.any() and check:
                seen = (self.memory_at[ring] >= first)[None]
                if not self._consistent(self.memory[ring][None], seen, around)[0]:
                    from_memory[:] = False
            colour[from_memory] = self.memory[idx[from_memory]]
        return colour, in_window, from_memory


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


class InpaintStage(Stage):
    name = "inpaint"
    version = "1"
    requires = ("detect",)
    config_model = InpaintConfig
    resources = Resources(cpus=1.0)
    config: InpaintConfig

    _METHODS: ClassVar[dict[str, int]] = {"telea": cv2.INPAINT_TELEA, "ns": cv2.INPAINT_NS}

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

        counts = {"removed": 0, "window": 0, "memory": 0, "inpainted": 0, "box_frames": 0}
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
                    plates[j], filled = self._plate(t, frame, removed, window, ring_px, counts)
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
            "box_fallback_frames": counts["box_frames"],
            "scene_cuts": len(window.cuts),
            "dilate_px": dilate_px,
            "sample_stride": stride,
            "buffer_size": [buf_w, buf_h],
        }

    def _plate(
        self,
        t: int,
        frame: np.ndarray,
        removed: np.ndarray,
        window: BackgroundWindow,
        ring_px: float,
        counts: dict[str, int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """The clean plate of frame t and its image-inpainted pixels."""
        if not removed.any():
            return frame, removed
        cfg = self.config
        flag = self._METHODS[cfg.method]
        small, small_removed = window.to_buffer(frame, removed)
        idx = np.flatnonzero(small_removed)
        ring = np.flatnonzero(dilate(small_removed, ring_px) & ~small_removed)
        ring = ring[:: max(1, len(ring) // _RING_SAMPLES)]
        colour, in_window, from_memory = window.lookup(
            t, idx, ring, small.reshape(-1, 3)[ring])
        known = in_window | from_memory
        plate = small.copy()
        plate.reshape(-1, 3)[idx[known]] = colour[known]
        need = np.zeros(small_removed.shape, bool)
        need.reshape(-1)[idx[~known]] = True
        if need.any():
            plate = image_inpaint(plate, need, flag, cfg.inpaint_radius, cfg.inpaint_max_side)
        if window.scaled:
            up = cv2.resize(plate, (window.width, window.height), interpolation=cv2.INTER_LINEAR)
            plate = np.where(removed[..., None], up, frame)
            need = removed & (
                cv2.resize(need.astype(np.uint8), (window.width, window.height),
                           interpolation=cv2.INTER_NEAREST) > 0
            )
            # Full-resolution counts: split the removed pixels by what their buffer pixel got.
            n_need = int(need.sum())
            n_known = int(removed.sum()) - n_need
            n_mem = round(n_known * from_memory.sum() / known.sum()) if known.any() else 0
            counts["memory"] += n_mem
            counts["window"] += n_known - n_mem
        else:
            n_need = int(need.sum())
            counts["window"] += int(in_window.sum())
            counts["memory"] += int(from_memory.sum())
        counts["inpainted"] += n_need
        return plate, need
