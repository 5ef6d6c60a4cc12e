"""render: every tracked person becomes an avatar with a new identity, moving the same way.

For each track a new identity is drawn (stages/appearance.py), seeded by render.seed, the
video id and the track id, so it is reproducible and fixed for the whole video, and
independent of the real person's fitted shape. The avatar takes the fitted pose, global
orientation and translation with the new phenotype. A different body shape moves the hips
relative to the root bone, so each frame the avatar is shifted to put its mid-hip exactly
where the real person's was (same pixel, same depth).

Every frame is one scene with all present avatars (the depth test handles occlusion), seen
through the fitted camera with an ambient light and a directional key light, rendered
offscreen through EGL (stages/rendering.py).

Artifacts (see stages/__init__.py): avatar.mkv (RGBA, straight alpha), depth.mkv (uint16
millimetres, 0 where no avatar) and identities.json.
"""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

from collections.abc import Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from fractions import Fraction  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Literal  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pydantic import Field, field_validator  # noqa: E402

from pipeline.config import Section  # noqa: E402
from pipeline.stage import Resources, Stage, VideoFailed, VideoJob  # noqa: E402
from pipeline.video import VideoDecodeError, VideoWriter, count_frames, probe  # noqa: E402
from stages.appearance import (  # noqa: E402
    BodyRegions,
    Identity,
    PaintedMesh,
    identity_seed,
    load_palettes,
    sample_identity,
)
from stages.body import COCO23, AnnyBody, load_body, resolve_device  # noqa: E402
from stages.rendering import Lighting, MeshData, OffscreenRenderer, vertex_normals  # noqa: E402

HIPS = (COCO23.index("left_hip"), COCO23.index("right_hip"))
# Bodies per Anny forward call: bounds memory when chunk_frames x tracks is large.
FORWARD_BATCH = 64
MAX_DEPTH_MM = 65535


class RenderConfig(Section):
    seed: int = Field(
        0, description="identity seed; with the video id and track id it fixes each avatar"
    )
    identity: Literal["random"] = Field(
        "random", description="how identities are chosen: random draws from the palettes"
    )
    palette: Path | None = Field(
        None, description="appearance palettes YAML (default: the packaged assets/appearance.yaml)"
    )
    ambient: float = Field(0.3, ge=0.0, le=2.0, description="ambient light intensity")
    key_light: float = Field(2.5, ge=0.0, le=20.0, description="directional key light intensity")
    key_direction: tuple[float, float, float] = Field(
        (-0.4, 0.6, 1.0),
        description="direction the key light travels, camera frame (x right, y down, z ahead)",
    )
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="body model device (rendering itself goes through EGL)",
    )

    @field_validator("key_direction")
    @classmethod
    def _nonzero(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if float(np.linalg.norm(v)) < 1e-6:
            raise ValueError("key_direction must not be the zero vector")
        return v


@dataclass
class Bodies:
    """fit/<id>/bodies.npz, checked."""

    track_ids: np.ndarray  # (P,)
    present: np.ndarray  # (T, P) bool; False where the fit is not finite either
    pose: np.ndarray  # (T, P, J, 3)
    root_orient: np.ndarray  # (T, P, 3)
    transl: np.ndarray  # (T, P, 3)
    phenotype: np.ndarray  # (P, K)
    joints3d: np.ndarray | None  # (T, P, 23, 3)
    camera: np.ndarray  # (4,)


def load_bodies(path: Path, frames: int, num_bones: int) -> Bodies:
    if not path.is_file():
        raise VideoFailed(f"fit artifact {path.name} is missing")
    with np.load(path) as z:
        missing = {"track_ids", "present", "pose", "root_orient", "transl", "phenotype",
                   "camera"} - set(z.files)
        if missing:
            raise VideoFailed(f"{path.name} lacks {', '.join(sorted(missing))}")
        data = {name: z[name] for name in z.files}
    present = data["present"].astype(bool)
    t, p = present.shape
    if t != frames:
        raise VideoFailed(f"{path.name} has {t} frames, the video has {frames}")
    pose = data["pose"]
    if pose.shape[:2] != (t, p) or (p and pose.shape[2] != num_bones):
        raise VideoFailed(f"{path.name}: pose shape {pose.shape} does not match "
                          f"({t}, {p}, {num_bones}, 3)")
    camera = data["camera"].astype(np.float64).reshape(-1)
    if camera.shape != (4,) or not np.all(np.isfinite(camera)) or camera[0] <= 0:
        raise VideoFailed(f"{path.name}: bad camera {camera.tolist()}")
    finite = np.isfinite(pose).all(axis=(2, 3)) & np.isfinite(data["root_orient"]).all(-1) \
        & np.isfinite(data["transl"]).all(-1) & (data["transl"][..., 2] > 0)
    joints = data.get("joints3d")
    if joints is not None and joints.shape[:2] != (t, p):
        joints = None
    return Bodies(
        track_ids=data["track_ids"].astype(np.int64).reshape(p),
        present=present & finite,
        pose=pose,
        root_orient=data["root_orient"],
        transl=data["transl"],
        phenotype=data["phenotype"].reshape(p, data["phenotype"].shape[-1]),
        joints3d=joints,
        camera=camera,
    )


def _video_info(job: VideoJob) -> dict[str, Any]:
    """Size, fps and decoded frame count: detect's summary, else probed from the source."""
    info = job.upstream.get("detect", {}).get("video")
    if isinstance(info, dict):
        return info
    try:
        info = probe(job.video.path).to_dict()
        if info["frame_count"] <= 0:
            info["frame_count"] = count_frames(job.video.path)
    except VideoDecodeError as exc:
        raise VideoFailed(str(exc)) from exc
    return info


@functools.lru_cache(maxsize=2)
def _regions_for(body: AnnyBody) -> BodyRegions:
    """Body-part labels of the (process-wide, cached) body model: built once."""
    return BodyRegions.from_body(body)


def depth_to_mm(depth: np.ndarray) -> np.ndarray:
    mm = np.rint(depth.astype(np.float64) * 1000.0)
    # Anything drawn stays non-zero: 0 means "no avatar".
    mm = np.where(depth > 0, np.clip(mm, 1, MAX_DEPTH_MM), 0)
    return mm.astype(np.uint16)


class RenderStage(Stage):
    name = "render"
    version = "1"
    requires = ("detect", "fit")
    config_model = RenderConfig
    resources = Resources(cpus=1.0, gpus=0.0)

    config: RenderConfig

    def setup(self) -> None:
        self.body: AnnyBody = load_body(resolve_device(self.config.device))
        self.regions = _regions_for(self.body)
        self.palettes = load_palettes(self.config.palette)
        self._renderer: OffscreenRenderer | None = None

    def teardown(self) -> None:
        if getattr(self, "_renderer", None) is not None:
            self._renderer.delete()
            self._renderer = None
        for attr in ("body", "regions", "palettes"):
            self.__dict__.pop(attr, None)

    def renderer(self, width: int, height: int) -> OffscreenRenderer:
        """A renderer for this frame size, kept while videos share it (created lazily:
        a video without people never needs one)."""
        old = self._renderer
        if old is None or (old.width, old.height) != (width, height):
            # Create before deleting, so the shared GL context survives the switch.
            self._renderer = OffscreenRenderer(width, height)
            if old is not None:
                old.delete()
        return self._renderer

    @property
    def lighting(self) -> Lighting:
        c = self.config
        return Lighting(ambient=c.ambient, key_intensity=c.key_light,
                        key_direction=tuple(c.key_direction))

    # -- per video

    def process(self, job: VideoJob) -> dict[str, Any]:
        if not hasattr(self, "body"):
            self.setup()
        video = _video_info(job)
        width, height = int(video["width"]), int(video["height"])
        frames = int(video["frame_count"])
        fps = Fraction(int(video["fps_num"]), int(video["fps_den"]))
        bodies = load_bodies(job.inputs["fit"] / "bodies.npz", frames, self.body.num_bones)

        identities = [
            sample_identity(identity_seed(self.config.seed, job.video.id, int(tid)),
                            self.palettes)
            for tid in bodies.track_ids
        ]
        painted = [self.regions.paint(ident) for ident in identities]
        self._write_identities(job, bodies, identities)

        covered = 0.0
        out = job.out_dir
        with VideoWriter(out / "avatar.mkv", fps, width, height, kind="rgba") as rgba_out, \
                VideoWriter(out / "depth.mkv", fps, width, height, kind="gray16") as depth_out:
            for rgba, depth in self._frames(job, bodies, identities, painted, width, height):
                rgba_out.write(rgba)
                depth_out.write(depth_to_mm(depth))
                covered += float((rgba[..., 3] > 0).mean())
        if rgba_out.frames != frames:
            raise VideoFailed(f"wrote {rgba_out.frames} frames, expected {frames}")
        return {
            "tracks": len(identities),
            "identities": [{"track_id": int(tid), **ident.short()}
                           for tid, ident in zip(bodies.track_ids, identities, strict=True)],
            "mean_coverage": round(covered / max(frames, 1), 5),
            "frames_with_avatar": int(bodies.present.any(axis=1).sum()),
        }

    def _write_identities(self, job: VideoJob, bodies: Bodies,
                          identities: list[Identity]) -> None:
        doc = {
            "video": job.video.id,
            "render_seed": self.config.seed,
            "identity": self.config.identity,
            "phenotype_labels": list(self.body.phenotype_labels),
            "tracks": [{"track_id": int(tid), **ident.to_dict()}
                       for tid, ident in zip(bodies.track_ids, identities, strict=True)],
        }
        (job.out_dir / "identities.json").write_text(json.dumps(doc, indent=2) + "\n")

    def _frames(self, job: VideoJob, bodies: Bodies, identities: list[Identity],
                painted: list[PaintedMesh], width: int, height: int,
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(RGBA, depth in metres) per frame, bodies posed chunk by chunk."""
        frames = bodies.present.shape[0]
        chunk = job.run.chunk_frames
        empty = (np.zeros((height, width, 4), np.uint8), np.zeros((height, width), np.float32))
        new_phen = np.stack([i.phenotype_vector(self.body.phenotype_labels) for i in identities]) \
            if identities else np.zeros((0, len(self.body.phenotype_labels)), np.float32)
        fx, fy, cx, cy = bodies.camera
        for start in range(0, frames, chunk):
            stop = min(start + chunk, frames)
            entries = np.argwhere(bodies.present[start:stop])  # (n, 2): frame offset, track
            verts = self._pose(bodies, new_phen, entries + [start, 0]) if len(entries) else None
            for dt in range(stop - start):
                rows = np.nonzero(entries[:, 0] == dt)[0]
                if len(rows) == 0:
                    yield empty
                    continue
                meshes = []
                for row in rows:
                    v = verts[row]
                    pm = painted[entries[row, 1]]
                    normals = vertex_normals(v, self.body.faces)
                    meshes.append(MeshData(pm.vertices(v), pm.faces, pm.colors,
                                           normals=pm.vertices(normals)))
                yield self.renderer(width, height).render(meshes, fx, fy, cx, cy,
                                                          self.lighting)
            job.advance(stop - start)

    @torch.no_grad()
    def _pose(self, bodies: Bodies, new_phen: np.ndarray, entries: np.ndarray) -> np.ndarray:
        """Model vertices (n, V, 3) of the avatars at (frame, track) `entries`, shifted so
        each avatar's mid-hip sits where the fitted real body's did."""
        t, p = entries[:, 0], entries[:, 1]
        out = []
        for s in range(0, len(entries), FORWARD_BATCH):
            sl = slice(s, s + FORWARD_BATCH)
            pose, orient, transl = (self._tensor(x[t[sl], p[sl]])
                                    for x in (bodies.pose, bodies.root_orient, bodies.transl))
            avatar = self.body.forward(pose, self._tensor(new_phen[p[sl]]), orient, transl)
            real_hip = self._real_hips(bodies, t[sl], p[sl], pose, orient, transl)
            new_hip = avatar["keypoints"][:, HIPS].mean(dim=1)
            shift = real_hip - new_hip
            out.append((avatar["vertices"] + shift[:, None]).cpu().numpy())
        return np.concatenate(out)

    def _real_hips(self, bodies: Bodies, t: np.ndarray, p: np.ndarray, pose: torch.Tensor,
                   orient: torch.Tensor, transl: torch.Tensor) -> torch.Tensor:
        """Mid-hips of the fitted bodies: from fit's joints3d, or re-posed where absent."""
        hips = np.full((len(t), 3), np.nan)
        if bodies.joints3d is not None:
            hips = bodies.joints3d[t, p][:, HIPS].mean(axis=1).astype(np.float64)
        missing = ~np.isfinite(hips).all(axis=1)
        result = self._tensor(np.nan_to_num(hips))
        if missing.any():
            m = torch.as_tensor(missing, device=pose.device)
            real = self.body.forward(pose[m], self._tensor(bodies.phenotype[p[missing]]),
                                     orient[m], transl[m])
            result[m] = real["keypoints"][:, HIPS].mean(dim=1)
        return result

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x), device=self.body.device,
                               dtype=self.body.dtype)
