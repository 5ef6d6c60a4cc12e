"""render: every tracked person becomes an avatar with a new identity, moving the same way.

Identities (stages/appearance.py): one per track, seeded by render.seed, the video id and
the track id, so it is reproducible and fixed for the whole video. With identity=far the
body is also pushed away from the real person's estimated phenotype (gender to the other
side of 0.5, weight and muscle by a margin); with identity=random it is drawn
independently of it. No two tracks of a video share a look (skin tone, top colour and
pattern, hair, head cover): a colliding draw is redrawn. The bodies are the motion stage's
(fit's, passed through unchanged or with anonymized motion: stages/motion.py). The avatar
takes their pose, global orientation and translation with the new phenotype. A different
body shape moves the hips relative to the root bone, so each frame the avatar is shifted
to put its mid-hip on the real person's (same pixel). A taller or shorter avatar is also
moved along that pixel's ray, in proportion to its size, so it covers the real person at
the same image size instead of being drawn larger or smaller.

The body model is the shared `body` section's (stages/body_config.py): Anny by default,
or an SMPL-family model from the user's files (body.model smpl | smplh | smplx), whose
bodies.npz holds that model's joints and betas. An SMPL-family avatar gets the same kind
of sampled look and its own betas (N(0, 1) clipped to +-2.5; with identity=far the
leading `far_betas` take the opposite sign of the real person's, by `far_beta_margin`);
its gender is the model file's (body.gender). Body parts come from the model's skinning
weights (stages.appearance.BodyRegions.from_smpl_family).

Every frame is one scene with all present avatars (the depth test handles occlusion
between them), seen through the fitted camera with an ambient light and a directional
key light, rendered offscreen through EGL (stages/rendering.py). With lighting=estimated
both lights are scaled, and the key light turned, from the source frame around the
avatars (stages.rendering.LightEstimator), smoothed over time; lighting=fixed uses the
configured values as they are.

Artifacts (see stages/__init__.py): avatar.mkv (RGBA, straight alpha), depth.mkv (uint16
millimetres, 0 where no avatar), instances.mkv (gray8, 1 + track slot, 0 where no avatar),
identities.json, and avatar_joints.npz: the COCO-23 keypoints of the avatars exactly as
drawn (camera coordinates, after the shift), i.e. the motion the output shows, the best a
pose estimator run on the output could recover; the motion attackers read it
(privacy.motion_data, source `render`).
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
from pipeline.video import (  # noqa: E402
    VideoDecodeError,
    VideoWriter,
    count_frames,
    iter_chunks,
    probe,
)
from stages.appearance import (  # noqa: E402
    BodyRegions,
    Identity,
    PaintedMesh,
    assign_identities,
    load_palettes,
    smpl_family_identity,
)
from stages.body import COCO23, resolve_device  # noqa: E402
from stages.body_config import body_section, load_body_model  # noqa: E402
from stages.rendering import (  # noqa: E402
    LightEstimator,
    Lighting,
    MeshData,
    OffscreenRenderer,
    vertex_normals,
)

HIPS = (COCO23.index("left_hip"), COCO23.index("right_hip"))
# Bones whose summed lengths measure a body's size independently of its pose.
SIZE_CHAIN = tuple((COCO23.index(a), COCO23.index(b)) for a, b in (
    ("left_shoulder", "left_hip"), ("right_shoulder", "right_hip"),
    ("left_hip", "left_knee"), ("right_hip", "right_knee"),
    ("left_knee", "left_ankle"), ("right_knee", "right_ankle"),
    ("left_shoulder", "left_elbow"), ("right_shoulder", "right_elbow"),
    ("left_elbow", "left_wrist"), ("right_elbow", "right_wrist"),
))


def _chain_length(keypoints: torch.Tensor) -> torch.Tensor:
    """(n, 23, 3) -> (n,) the summed lengths of SIZE_CHAIN's bones."""
    a = keypoints[:, [i for i, _ in SIZE_CHAIN]]
    b = keypoints[:, [j for _, j in SIZE_CHAIN]]
    return (a - b).norm(dim=-1).sum(dim=-1)
# Bodies per Anny forward call: bounds memory when chunk_frames x tracks is large.
FORWARD_BATCH = 64
MAX_DEPTH_MM = 65535
# Every n-th avatar vertex is enough to find the box the light is measured around.
BOX_VERTEX_STEP = 25


class RenderConfig(Section):
    seed: int = Field(
        0, description="identity seed; with the video id and track id it fixes each avatar"
    )
    # random by default: a far body is a function of the real person's (opposite gender,
    # other build), so an attacker trained on avatars reads the real gender off the
    # avatar's body (measured: motion gender on the output 0.71 random, 0.88 far).
    identity: Literal["random", "far"] = Field(
        "random", description="how identities are chosen: random draws from the palettes, "
        "independently of the real person; far also moves gender and build away from the "
        "real person's estimated phenotype (looks unlike them, but leaks their gender and "
        "build by inversion to an attacker who learns the mapping)",
    )
    far_gender_margin: float = Field(
        0.2, ge=0.05, le=0.45,
        description="identity=far: the avatar's gender lies this far beyond 0.5, on the "
        "other side from the real person's",
    )
    far_build_margin: float = Field(
        0.2, ge=0.05, le=0.45,
        description="identity=far: the avatar's weight and muscle each differ from the real "
        "person's by at least this much",
    )
    far_betas: int = Field(
        2, ge=0, le=10,
        description="identity=far, SMPL-family bodies: how many leading betas (size, build) "
        "take the opposite sign of the real person's",
    )
    far_beta_margin: float = Field(
        0.8, ge=0.1, le=2.0,
        description="identity=far, SMPL-family bodies: those betas lie at least this far "
        "from 0 (betas are drawn from N(0, 1) clipped to +-2.5)",
    )
    lighting: Literal["estimated", "fixed"] = Field(
        "estimated", description="estimated: ambient and key light follow the video around "
        "each person; fixed: the ambient/key_light/key_direction values as given",
    )
    light_reference: float = Field(
        0.35, gt=0.0, le=1.0,
        description="lighting=estimated: linear luminance of the surroundings at which the "
        "configured ambient and key_light apply unscaled (0.35: a typical well-lit room; "
        "the real test videos measure 0.15-0.47)",
    )
    light_gain: tuple[float, float] = Field(
        (0.35, 1.4),
        description="lighting=estimated: the range the light scale is clipped to, so avatars "
        "are never black nor washed out",
    )
    light_smoothing: float = Field(
        0.8, ge=0.0, lt=1.0,
        description="lighting=estimated: weight of the past in the per-frame moving average",
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

    @field_validator("light_gain")
    @classmethod
    def _gain_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 < v[0] <= v[1] <= 10.0:
            raise ValueError("light_gain must be (low, high) with 0 < low <= high <= 10")
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


def load_bodies(path: Path, frames: int, num_bones: int, num_shape: int | None = None,
                ) -> Bodies:
    """Read and check bodies.npz against the body model render poses: `num_bones` joints
    per pose and (when given) `num_shape` shape entries per track."""
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
    shape = data["phenotype"]
    if num_shape is not None and p and (shape.ndim != 2 or shape.shape != (p, num_shape)):
        raise VideoFailed(f"{path.name}: phenotype shape {shape.shape} does not match "
                          f"({p}, {num_shape}): was fit run with another body model?")
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
def _regions_for(body: Any) -> BodyRegions:
    """Body-part labels of the (process-wide, cached) body model: built once."""
    return BodyRegions.from_body(body)


def _box(verts: np.ndarray, camera: np.ndarray) -> tuple[float, float, float, float]:
    """Pixel box (x0, y0, x1, y1) around avatar vertices (n, V, 3), camera coordinates."""
    fx, fy, cx, cy = camera
    v = verts[:, ::BOX_VERTEX_STEP].reshape(-1, 3)
    z = np.maximum(v[:, 2], 1e-3)
    u, w = fx * v[:, 0] / z + cx, fy * v[:, 1] / z + cy
    return float(u.min()), float(w.min()), float(u.max()), float(w.max())


def depth_to_mm(depth: np.ndarray) -> np.ndarray:
    mm = np.rint(depth.astype(np.float64) * 1000.0)
    # Anything drawn stays non-zero: 0 means "no avatar".
    mm = np.where(depth > 0, np.clip(mm, 1, MAX_DEPTH_MM), 0)
    return mm.astype(np.uint16)


class RenderStage(Stage):
    name = "render"
    version = "4"
    # Bodies come from motion (fit's, anonymized or passed through); fit's summary names
    # the body model they were fitted with.
    requires = ("detect", "fit", "motion")
    config_model = RenderConfig
    shared_sections = ("body",)
    resources = Resources(cpus=1.0, gpus=0.0)

    config: RenderConfig

    def setup(self) -> None:
        # AnnyBody or SmplFamilyBody (body.model); a missing model file raises here,
        # naming body.model_path.
        self.body: Any = load_body_model(body_section(self), resolve_device(self.config.device))
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
    def fixed_lighting(self) -> Lighting:
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
        fitted = job.upstream.get("fit", {}).get("body_model")
        if fitted is not None and fitted != self.body.kind:
            raise VideoFailed(f"fit used body model {fitted}, render is set to "
                              f"{self.body.kind} (body.model): rerun fit")
        bodies = load_bodies(job.inputs["motion"] / "bodies.npz", frames, self.body.num_bones,
                             len(self.body.shape_labels))

        identities = self._identities(job, bodies)
        painted = [self.regions.paint(ident) for ident in identities]
        self._write_identities(job, bodies, identities)

        covered, gains = 0.0, []
        out = job.out_dir
        avatar_joints = np.full((*bodies.present.shape, len(COCO23), 3), np.nan, np.float32)
        with VideoWriter(out / "avatar.mkv", fps, width, height, kind="rgba") as rgba_out, \
                VideoWriter(out / "depth.mkv", fps, width, height, kind="gray16") as depth_out, \
                VideoWriter(out / "instances.mkv", fps, width, height, kind="gray") as inst_out:
            for rgba, depth, inst, light in self._frames(job, bodies, identities, painted,
                                                          width, height, avatar_joints):
                rgba_out.write(rgba)
                depth_out.write(depth_to_mm(depth))
                inst_out.write(inst)
                covered += float((rgba[..., 3] > 0).mean())
                if light is not None:
                    gains.append(self._gain(light))
        if rgba_out.frames != frames:
            raise VideoFailed(f"wrote {rgba_out.frames} frames, expected {frames}")
        with (out / "avatar_joints.npz").open("wb") as fh:
            np.savez_compressed(fh, joints3d=avatar_joints, present=bodies.present,
                                track_ids=bodies.track_ids, camera=bodies.camera)
        return {
            "tracks": len(identities),
            "identities": [{"track_id": int(tid), **ident.short()}
                           for tid, ident in zip(bodies.track_ids, identities, strict=True)],
            "mean_coverage": round(covered / max(frames, 1), 5),
            "frames_with_avatar": int(bodies.present.any(axis=1).sum()),
            "lighting": self.config.lighting,
            "mean_light_gain": round(float(np.mean(gains)), 4) if gains else None,
        }

    def _gain(self, light: Lighting) -> float:
        """How much the light was scaled from the configured one."""
        c = self.config
        if c.ambient > 0:
            return light.ambient / c.ambient
        return light.key_intensity / c.key_light if c.key_light > 0 else 1.0

    def _identities(self, job: VideoJob, bodies: Bodies) -> list[Identity]:
        """One new identity per track (see stages.appearance.assign_identities); for an
        SMPL-family body the same look with sampled betas (smpl_family_identity)."""
        c = self.config
        labels = self.body.shape_labels
        estimated = [dict(zip(labels, map(float, row), strict=False))
                     for row in bodies.phenotype]
        anny = self.body.kind == "anny"
        try:
            idents = assign_identities(
                c.seed, job.video.id, [int(t) for t in bodies.track_ids], self.palettes,
                c.identity if anny else "random", estimated if anny else None,
                c.far_gender_margin, c.far_build_margin,
            )
        except ValueError as exc:
            raise VideoFailed(str(exc)) from exc
        if anny:
            return idents
        gender = body_section(self).gender
        return [smpl_family_identity(ident, labels, c.identity, est, c.far_betas,
                                     c.far_beta_margin, model_gender=gender)
                for ident, est in zip(idents, estimated, strict=True)]

    def _write_identities(self, job: VideoJob, bodies: Bodies,
                          identities: list[Identity]) -> None:
        labels = list(self.body.shape_labels)
        doc = {
            "body_model": self.body.kind,
            "video": job.video.id,
            "render_seed": self.config.seed,
            "identity": self.config.identity,
            "phenotype_labels": labels,
            "tracks": [{"track_id": int(tid), "slot": slot,
                        "estimated_phenotype": {k: round(float(v), 4)
                                                for k, v in zip(labels, est, strict=False)},
                        **ident.to_dict()}
                       for slot, (tid, est, ident) in enumerate(
                           zip(bodies.track_ids, bodies.phenotype, identities, strict=True))],
        }
        (job.out_dir / "identities.json").write_text(json.dumps(doc, indent=2) + "\n")

    def _source_chunks(self, job: VideoJob, chunk: int, frames: int,
                       ) -> Iterator[np.ndarray | None]:
        """The source video's frames in chunks of `chunk`, in step with the bodies (only
        read when the light is estimated from them); a source shorter than the fit repeats
        its last frame."""
        if self.config.lighting != "estimated":
            while True:
                yield None
        last = None
        try:
            for frames_chunk in iter_chunks(job.video.path, chunk):
                last = frames_chunk[-1:]
                yield frames_chunk
        except VideoDecodeError as exc:
            raise VideoFailed(f"lighting needs the source frames: {exc}") from exc
        while True:
            yield np.repeat(last, chunk, axis=0)

    def _frames(self, job: VideoJob, bodies: Bodies, identities: list[Identity],
                painted: list[PaintedMesh], width: int, height: int,
                joints_out: np.ndarray,
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, Lighting | None]]:
        """(RGBA, depth in metres, instance ids, lighting or None) per frame, bodies posed
        chunk by chunk; the avatars' keypoints go into joints_out (T, P, 23, 3)."""
        frames = bodies.present.shape[0]
        chunk = job.run.chunk_frames
        empty = (np.zeros((height, width, 4), np.uint8), np.zeros((height, width), np.float32),
                 np.zeros((height, width), np.uint8), None)
        labels = self.body.shape_labels
        new_phen = np.stack([i.phenotype_vector(labels) for i in identities]) if identities \
            else np.zeros((0, len(labels)), np.float32)
        fx, fy, cx, cy = bodies.camera
        estimator = LightEstimator(self.fixed_lighting, reference=self.config.light_reference,
                                   gain_range=self.config.light_gain,
                                   smoothing=self.config.light_smoothing)
        # Instance value per track slot: 1 + slot, 255 for slot 254 and beyond.
        slot_value = np.minimum(np.arange(len(painted)) + 1, 255).astype(np.uint8)
        sources = self._source_chunks(job, chunk, frames)
        for start in range(0, frames, chunk):
            stop = min(start + chunk, frames)
            src = next(sources)
            entries = np.argwhere(bodies.present[start:stop])  # (n, 2): frame offset, track
            verts = None
            if len(entries):
                verts, kps = self._pose(bodies, new_phen, entries + [start, 0])
                joints_out[entries[:, 0] + start, entries[:, 1]] = kps
            for dt in range(stop - start):
                rows = np.nonzero(entries[:, 0] == dt)[0]
                if len(rows) == 0:
                    yield empty
                    continue
                meshes = []
                for row in rows:
                    v = verts[row]
                    pm = painted[entries[row, 1]]
                    painted_v = pm.vertices(v)
                    normals = pm.normals(painted_v, vertex_normals(v, self.body.faces))
                    meshes.append(MeshData(painted_v, pm.faces, pm.colors, normals=normals,
                                           uv=pm.uv, texture=pm.texture))
                light = self.fixed_lighting
                if src is not None:
                    frame = src[min(dt, len(src) - 1)]
                    light = estimator.update(frame, _box(verts[rows], bodies.camera))
                rgba, depth, inst = self.renderer(width, height).render_instances(
                    meshes, fx, fy, cx, cy, light)
                # Mesh i of this frame is track slot entries[rows[i], 1].
                lut = np.zeros(256, np.uint8)
                lut[1: len(rows) + 1] = slot_value[entries[rows, 1]]
                yield rgba, depth, lut[inst], light
            job.advance(stop - start)
        sources.close()  # closes the source decoder before the video ends

    @torch.no_grad()
    def _pose(self, bodies: Bodies, new_phen: np.ndarray, entries: np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray]:
        """Model vertices (n, V, 3) and COCO-23 keypoints (n, 23, 3) of the avatars at
        (frame, track) `entries`, shifted so each avatar's mid-hip sits where the fitted real
        body's did."""
        t, p = entries[:, 0], entries[:, 1]
        out, kps = [], []
        for s in range(0, len(entries), FORWARD_BATCH):
            sl = slice(s, s + FORWARD_BATCH)
            pose, orient, transl = (self._tensor(x[t[sl], p[sl]])
                                    for x in (bodies.pose, bodies.root_orient, bodies.transl))
            avatar = self.body.forward(pose, self._tensor(new_phen[p[sl]]), orient, transl)
            real = self._real_keypoints(bodies, t[sl], p[sl], pose, orient, transl)
            real_hip = real[:, HIPS].mean(dim=1)
            new_hip = avatar["keypoints"][:, HIPS].mean(dim=1)
            # Same pose, so the ratio of limb-chain lengths is the ratio of body sizes.
            scale = _chain_length(avatar["keypoints"]) / _chain_length(real).clamp(min=1e-6)
            shift = real_hip * scale[:, None] - new_hip
            out.append((avatar["vertices"] + shift[:, None]).cpu().numpy())
            kps.append((avatar["keypoints"] + shift[:, None]).cpu().numpy())
        return np.concatenate(out), np.concatenate(kps).astype(np.float32)

    def _real_keypoints(self, bodies: Bodies, t: np.ndarray, p: np.ndarray, pose: torch.Tensor,
                        orient: torch.Tensor, transl: torch.Tensor) -> torch.Tensor:
        """COCO-23 keypoints of the fitted bodies: fit's joints3d, or re-posed where absent."""
        kps = np.full((len(t), len(COCO23), 3), np.nan)
        if bodies.joints3d is not None:
            kps = bodies.joints3d[t, p].astype(np.float64)
        missing = ~np.isfinite(kps).all(axis=(1, 2))
        result = self._tensor(np.nan_to_num(kps))
        if missing.any():
            m = torch.as_tensor(missing, device=pose.device)
            real = self.body.forward(pose[m], self._tensor(bodies.phenotype[p[missing]]),
                                     orient[m], transl[m])
            result[m] = real["keypoints"]
        return result

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x), device=self.body.device,
                               dtype=self.body.dtype)
