"""A tiny exported dataset for training tests, in the export stage's layout.

Two classes: a bright "avatar" square or a wide bar moving across a random smooth
background (shape and colour tell them apart: a tiny model learns it in seconds).
The mask marks the moving shape as synthesized (black) and the background as sensitive
(white), as the pipeline's sensitivity mask does.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np

from pipeline.video import VideoWriter

LABELS = ("square", "bar")


def write_exported_dataset(root: Path, per_class: int = 6, frames: int = 16, size: int = 48,
                           seed: int = 0, test_every: int = 3) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    videos = []
    for label in LABELS:
        for k in range(per_class):
            vid = f"{label}/{label}_{k:02d}"
            (root / label).mkdir(exist_ok=True)
            # A smooth random background (a colour ramp): the shape, not the background,
            # has to tell the classes apart.
            ramp = np.linspace(0.0, 1.0, size)[None, :, None]
            a, b = rng.integers(0, 160, size=(2, 3))
            background = np.broadcast_to(a + (b - a) * ramp, (size, size, 3)).astype(np.uint8)
            bh, bw = (size // 4, size // 4) if label == "square" else (size // 8, size // 2)
            colour = (250, 240, 40) if label == "square" else (40, 240, 250)
            y0 = int(rng.integers(0, size - bh))
            with VideoWriter(root / f"{vid}.mp4", Fraction(10), size, size, "h264") as out, \
                    VideoWriter(root / f"{vid}.mask.mp4", Fraction(10), size, size,
                                "h264") as mask_out:
                for t in range(frames):
                    x0 = round((size - bw) * t / (frames - 1))
                    frame = background.copy()
                    frame[y0:y0 + bh, x0:x0 + bw] = colour
                    mask = np.full((size, size), 255, np.uint8)
                    mask[y0:y0 + bh, x0:x0 + bw] = 0
                    out.write(frame)
                    mask_out.write(np.repeat(mask[..., None], 3, axis=2))
            videos.append({"id": vid, "label": label, "status": "ok",
                           "split": "test" if k % test_every == test_every - 1 else "train",
                           "video": f"{vid}.mp4", "mask": f"{vid}.mask.mp4",
                           "meta": f"{vid}.json", "source": f"{vid}.mp4", "notes": []})
            (root / f"{vid}.json").write_text(json.dumps({"person": {"name": f"p{k}"}}))
    (root / "dataset.json").write_text(json.dumps(
        {"format": "avatarize-dataset/1", "labels": list(LABELS), "videos": videos}))
    return root
