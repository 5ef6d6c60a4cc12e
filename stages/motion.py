"""motion: optionally anonymize how each person moves before the avatar is rendered.

Disabled (the default), fit/<id>/bodies.npz is copied unchanged to motion/<id>/bodies.npz,
so render's output is exactly what it is without this stage. Enabled, each track goes
through the trained adversarial anonymizer (privacy.motion_anonymizer, trained with
`avatarize motion train`, loaded from motion.weights):

1. its COCO-23 joints (fit's joints3d, the frames where it is present) are normalized
   (mid-hip centred, upright; privacy.motion_data) and anonymized;
2. the anonymized joints go back to the camera frame (same mid-hip per frame, same heading);
3. a short inverse-kinematics fit brings them back to body-model poses, since render poses
   the avatar from bone rotations: Adam on the bones fit optimizes and the global
   orientation (from fit's values), matching the DIRECTION of every bone of
   privacy.motion_data.KINEMATIC_TREE (so the fit is the same whatever the bone lengths:
   the anonymizer retargets bodies to template proportions) and the mid-hip's position
   (so the avatar stays where the person was), with a weak pull towards fit's pose.
   The translation is kept. Keypoints come from fit's fast keypoint model
   (stages.fit.BoneKeypointModel: exactly the body model's keypoints for these bones).

motion/<id>/bodies.npz has fit's format (stages/__init__.py), pose, root_orient and
joints3d replaced where the track was anonymized; joints3d is the keypoints of the new
pose with the fitted shape, so render's placement and the motion attackers read the motion
the avatar really makes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, model_validator

from pipeline.config import Section
from pipeline.stage import Resources, Stage, VideoFailed, VideoJob
from privacy.motion_anonymizer import (
    AnonymizerTrainConfig,
    anonymize_sequence,
    load_anonymizer,
)
from privacy.motion_data import KINEMATIC_TREE, L_HIP, L_SHOULDER, R_HIP, R_SHOULDER
from stages.body import axis_angle_to_matrix, resolve_device
from stages.body_config import body_section, load_body_model


class MotionConfig(Section):
    enabled: bool = Field(False, description="anonymize motion before rendering; false: "
                          "fit's bodies pass through unchanged")
    weights: Path | None = Field(None, description="the trained anonymizer checkpoint "
                                 "(avatarize motion train --out); relative to the config file")
    ik_steps: int = Field(150, ge=1, le=10000, description="Adam steps of the inverse "
                          "kinematics that turns anonymized joints into poses")
    ik_lr: float = Field(0.03, gt=0.0, le=1.0, description="Adam step size of the IK")
    # 0 by default: any pull towards fit's pose hands the real person's pose back (on the
    # 72-video benchmark, identity on the rendered joints 0.33 at 0.01, 0.21 at 0). The IK
    # starts from fit's pose, so what the joints do not fix (a limb's roll) stays as fitted.
    ik_pose_prior: float = Field(0.0, ge=0.0, le=100.0,
                                 description="IK: weight of the pull towards fit's pose")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="anonymizer and IK device")
    train: AnonymizerTrainConfig = Field(
        default_factory=AnonymizerTrainConfig,
        description="settings of `avatarize motion train` (read by training only)")

    @model_validator(mode="after")
    def _needs_weights(self) -> MotionConfig:
        if self.enabled and self.weights is None:
            raise ValueError("motion.enabled needs motion.weights: the anonymizer checkpoint "
                             "(train one with `avatarize motion train`)")
        return self


def _bone_dirs(kps: torch.Tensor) -> torch.Tensor:
    """(..., 23, 3) -> (..., B, 3) unit directions of KINEMATIC_TREE's bones."""
    hip = 0.5 * (kps[..., L_HIP, :] + kps[..., R_HIP, :])
    sho = 0.5 * (kps[..., L_SHOULDER, :] + kps[..., R_SHOULDER, :])

    def at(j: int) -> torch.Tensor:
        return hip if j == -1 else sho if j == -2 else kps[..., j, :]

    d = torch.stack([at(c) - at(p) for p, c in KINEMATIC_TREE], dim=-2)
    return d / d.norm(dim=-1, keepdim=True).clamp(min=1e-8)


class MotionStage(Stage):
    name = "motion"
    version = "1"
    requires = ("fit",)
    config_model = MotionConfig
    shared_sections = ("body",)
    resources = Resources(cpus=1.0, gpus=0.0)

    config: MotionConfig

    def setup(self) -> None:
        if not self.config.enabled:
            return
        self.device = resolve_device(self.config.device)
        assert self.config.weights is not None  # the config validator ensures it
        self.anonymizer, self.train_config = load_anonymizer(self.config.weights)
        self.anonymizer.to(self.device)
        from stages.fit import body_spec  # heavy: only when enabled

        self.body: Any = load_body_model(body_section(self), self.device)
        spec = body_spec(self.body)
        self.bones = [spec.bone_index(n) for n in spec.bones]
        self.keypoint_model = spec.keypoint_model(self.bones)

    def teardown(self) -> None:
        for attr in ("anonymizer", "body", "keypoint_model"):
            self.__dict__.pop(attr, None)

    def process(self, job: VideoJob) -> dict[str, Any]:
        src = job.inputs["fit"] / "bodies.npz"
        if not src.is_file():
            raise VideoFailed("fit artifact bodies.npz is missing")
        if not self.config.enabled:
            shutil.copyfile(src, job.out_dir / "bodies.npz")
            return {"enabled": False}
        if not hasattr(self, "anonymizer"):
            self.setup()
        with np.load(src) as z:
            data = {k: z[k] for k in z.files}
        if "joints3d" not in data:
            raise VideoFailed("fit's bodies.npz has no joints3d: rerun fit")
        present = data["present"].astype(bool)
        shifts, errors, done = [], [], 0
        for p in range(present.shape[1]):
            ok = present[:, p] & np.isfinite(data["joints3d"][:, p]).all(axis=(1, 2)) \
                & np.isfinite(data["pose"][:, p]).all(axis=(1, 2))
            if ok.sum() < 2:
                continue
            joints = data["joints3d"][ok, p].astype(np.float64)
            target = anonymize_sequence(self.anonymizer, joints,
                                        self.train_config.scale_normalize)
            pose, orient, kps, err = self._inverse_kinematics(
                data["pose"][ok, p], data["root_orient"][ok, p], data["transl"][ok, p],
                data["phenotype"][p], target)
            data["pose"][ok, p] = pose.astype(data["pose"].dtype)
            data["root_orient"][ok, p] = orient.astype(data["root_orient"].dtype)
            data["joints3d"][ok, p] = kps.astype(data["joints3d"].dtype)
            shifts.append(float(np.linalg.norm(kps - joints, axis=-1).mean()))
            errors.append(err)
            done += 1
        with (job.out_dir / "bodies.npz").open("wb") as fh:
            np.savez_compressed(fh, **data)
        job.advance(int(present.shape[0]))
        return {"enabled": True, "tracks_anonymized": done,
                "mean_joint_shift_m": round(float(np.mean(shifts)), 4) if shifts else None,
                "mean_ik_direction_error_deg": round(float(np.mean(errors)), 2)
                if errors else None}

    def _inverse_kinematics(self, pose: np.ndarray, orient: np.ndarray, transl: np.ndarray,
                            shape: np.ndarray, target: np.ndarray,
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Poses (T, J, 3), orientations (T, 3), keypoints (T, 23, 3) whose bone directions
        and mid-hip follow `target` (T, 23, 3); and the mean bone-direction error, deg."""
        km, dev, dt = self.keypoint_model, self.body.device, self.body.dtype

        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(x), device=dev, dtype=dt)

        with torch.no_grad():
            rest = km.rest(tensor(shape[None]))
        init = tensor(pose[:, self.bones])[None]  # (1, T, O, 3)
        bones = init.clone().requires_grad_(True)
        root = tensor(orient)[None].clone().requires_grad_(True)
        trans = tensor(transl)[None]
        goal = tensor(target)[None]
        goal_dirs = _bone_dirs(goal)
        goal_hip = 0.5 * (goal[..., L_HIP, :] + goal[..., R_HIP, :])
        opt = torch.optim.Adam([bones, root], lr=self.config.ik_lr)
        for _ in range(self.config.ik_steps):
            kps = km.keypoints(bones, rest, axis_angle_to_matrix(root), trans)
            hip = 0.5 * (kps[..., L_HIP, :] + kps[..., R_HIP, :])
            loss = (_bone_dirs(kps) - goal_dirs).pow(2).sum(-1).mean() \
                + (hip - goal_hip).pow(2).sum(-1).mean() \
                + self.config.ik_pose_prior * (bones - init).pow(2).sum((-1, -2)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            kps = km.keypoints(bones, rest, axis_angle_to_matrix(root), trans)
            cos = (_bone_dirs(kps) * goal_dirs).sum(-1).clamp(-1.0, 1.0)
            err = float(torch.rad2deg(torch.acos(cos)).mean())
        full = pose.copy()
        full[:, self.bones] = bones.detach()[0].cpu().numpy()
        return full, root.detach()[0].cpu().numpy(), kps[0].cpu().numpy(), err

