"""fit: a 3D body per person per frame from the detected 2D keypoints.

The body model is the shared `body` section's (stages/body_config.py): Anny (default) or
SMPL / SMPL-H / SMPL-X through smplx. One optimizer fits all; a `BodySpec` holds what
differs per model: the optimized joints and their stiffness, bone ends, hinges, relaxed
stance, joint ranges (all in the model's own frame), the model -> camera rotation, the
shape prior and the keypoint model. Anny's tables are this module's constants (BODY_BONES
... JOINT_RANGES, LIMB_SEGMENTS); the SMPL family's, and how they differ, are in
stages/fit_smpl.py.

SMPLify-style: a perspective camera with the focal length of a configured field of view
and the principal point at the image centre; per track one shape (Anny's phenotype or SMPL
betas) and per frame a pose, a global orientation and a translation, found by Adam on

    robust (Geman-McClure) reprojection of the body's 23 COCO keypoints onto the BlazePose
    landmarks they correspond to, weighted by visibility, normalized by the person's size
  + pose prior (L2 on the bone rotations away from a relaxed stance, arms at the sides
    (RELAXED), stiffer for spine, neck, clavicles, wrists, feet, and much stiffer for a
    bone whose end keypoint is unseen in that frame: an unseen limb hangs naturally)
  + joint limits: each bone's rotation, split into flexion, abduction and twist about
    anatomical axes, kept within a range (JOINT_RANGES; knees and elbows are hinges)
  + temporal smoothness (second differences of pose, orientation and translation)
  + a weak 3D term on BlazePose's world landmarks (metric, hip-centred), which tells a limb
    pointing at the camera from one pointing away
  + a shape prior (towards the average shape: Anny's phenotype 0.5, clamped to [0, 1];
    SMPL betas 0, clamped to +-3).

Only the major bones are optimized (spine, neck, head, clavicles, upper and lower arms,
wrists, upper and lower legs, feet); fingers, toes, twist bones (SMPL-H/X: hands, jaw,
eyes) stay at zero. bodies.npz holds the full pose of the model: J = Anny's bone count,
24 (SMPL), 52 (SMPL-H) or 55 (SMPL-X); `phenotype` holds the shape (P, K) and the summary
names its entries (phenotype_labels: Anny's phenotype or beta0..).

Per window of frames: initialize each frame's orientation from the torso of BlazePose's
world landmarks (so a person seen from behind starts turned round), its depth from the
torso's size in pixels, and its arms and legs from the directions of the world landmarks'
limb segments (so a limb starts on the right side of the camera's depth ambiguity); then
Adam in two stages: orientation and translation on the torso
keypoints (squared error), then everything, the robust scale shrinking from wide to
`robust_sigma` (far from the data a robust loss has no gradient). Long videos are fitted
in windows of `chunk_frames` frames; each starts from the previous window's last pose and
is tied to its last two frames by the smoothness term, so memory stays bounded. A video
that fits in one window estimates the shape in that window; a longer one first estimates
each track's shape on `shape_frames` frames spread over the track and keeps it fixed.
Frames where a track is absent (or shows too few keypoints) are interpolated afterwards.

The optimizer never skins the mesh (`BoneKeypointModel`): a keypoint is a fixed blend of
skinned vertices (or joints), hence of bone transforms, and only the bones being fitted
move, so a few 3x3 products per frame give exactly what AnnyBody.forward would
(SmplFamilyBody.forward up to its pose-corrective blend shapes, see stages/fit_smpl.py).
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from scipy.spatial.transform import Rotation, Slerp

from pipeline.config import Section
from pipeline.stage import Resources, Stage, VideoFailed, VideoJob
from stages.body import (
    ANNY_TO_CAMERA,
    BLAZEPOSE_FOR_COCO23,
    AnnyBody,
    axis_angle_to_matrix,
    resolve_device,
)
from stages.body_config import body_section, load_body_model

NUM_COCO = 23
NUM_BLAZEPOSE = 33
# COCO-23 indices (stages.body.COCO23).
L_SHOULDER, R_SHOULDER, L_HIP, R_HIP = 5, 6, 11, 12
TORSO = (L_SHOULDER, R_SHOULDER, L_HIP, R_HIP)
FACE = (0, 1, 2, 3, 4)

# The optimized bones and their pose-prior stiffness (relative to fit.w_pose_prior). The
# spine is split in five short bones: a stiff prior spreads a bend over all of them.
BODY_BONES: dict[str, float] = {
    "spine05": 8.0, "spine04": 8.0, "spine03": 8.0, "spine02": 8.0, "spine01": 8.0,
    "neck01": 4.0, "head": 4.0,
    "clavicle.L": 10.0, "clavicle.R": 10.0,
    "upperarm01.L": 0.5, "upperarm01.R": 0.5,
    "lowerarm01.L": 0.5, "lowerarm01.R": 0.5,
    "wrist.L": 4.0, "wrist.R": 4.0,
    "upperleg01.L": 0.5, "upperleg01.R": 0.5,
    "lowerleg01.L": 0.5, "lowerleg01.R": 0.5,
    "foot.L": 8.0, "foot.R": 8.0,
}
# The keypoints at the far end of each bone's segment. A bone whose end is unseen in a
# frame cannot be fitted there (e.g. legs below the image), only dragged by small gains
# elsewhere (the hip keypoint moves a little with the thigh): its prior gets stiffer.
BONE_ENDS: dict[str, tuple[int, ...]] = {
    "spine05": TORSO[:2], "spine04": TORSO[:2], "spine03": TORSO[:2], "spine02": TORSO[:2],
    "spine01": TORSO[:2], "neck01": FACE, "head": FACE,
    "clavicle.L": (L_SHOULDER,), "clavicle.R": (R_SHOULDER,),
    "upperarm01.L": (7,), "upperarm01.R": (8,), "lowerarm01.L": (9,), "lowerarm01.R": (10,),
    "wrist.L": (), "wrist.R": (),
    "upperleg01.L": (13,), "upperleg01.R": (14,), "lowerleg01.L": (15,), "lowerleg01.R": (16,),
    "foot.L": (17, 19, 21), "foot.R": (18, 20, 22),
}
UNSEEN_STIFFNESS = 50.0
# Hinge joints: (bone, the bone whose head ends the segment, the way the segment swings
# when the joint flexes, in Anny's frame: Z up, the body facing -Y).
HINGES = (
    ("lowerarm01.L", "wrist.L", (0.0, -1.0, 0.0)),
    ("lowerarm01.R", "wrist.R", (0.0, -1.0, 0.0)),
    ("lowerleg01.L", "foot.L", (0.0, 1.0, 0.0)),
    ("lowerleg01.R", "foot.R", (0.0, 1.0, 0.0)),
)
HINGE_BONES = frozenset(h[0] for h in HINGES)
# Where the pose prior pulls (and an unseen limb rests): arms hanging at the sides with the
# elbows a little bent, as people stand, rather than Anny's rest A-pose (arms 45 degrees
# out, elbows bent 36). (flexion, abduction, twist) about the JOINT_RANGES axes, radians.
RELAXED: dict[str, tuple[float, float, float]] = {
    "upperarm01.L": (0.0, -0.6, 0.0), "upperarm01.R": (0.0, -0.6, 0.0),
    "lowerarm01.L": (-0.25, 0.0, 0.0), "lowerarm01.R": (-0.25, 0.0, 0.0),
}
# Rotation about anything but a hinge's axis costs this much more than the hinge angle.
HINGE_OFF_AXIS = 20.0
# Directions in Anny's frame (Z up, the body facing -Y, its left towards +X).
FORWARD, BACKWARD, UP = (0.0, -1.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
LEFT, RIGHT = (1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)
Range = tuple[float, float]
# Anatomical ranges per optimized bone, in radians from Anny's rest pose (arms in an A,
# elbows bent ~36 degrees): (segment, flexion swing, abduction swing, (flexion, abduction,
# twist) ranges). The segment (from one bone's head to another's, or a fixed direction) is
# the twist axis; flexion rotates it towards the flexion swing, abduction towards the
# abduction swing. A hinge's off-axis rotation has its own penalty (HINGE_OFF_AXIS), so
# only its flexion range is used. Limits are generous: they keep the fit out of poses no
# body takes (a knee bent forward, a thigh through the belly), not out of unusual ones.
JOINT_RANGES: dict[str, tuple[Any, tuple[float, ...], tuple[float, ...],
                              tuple[Range, Range, Range]]] = {
    **{f"spine0{i}": ((f"spine0{i}", nxt), FORWARD, LEFT,
                      ((-0.12, 0.3), (-0.12, 0.12), (-0.15, 0.15)))
       for i, nxt in ((5, "spine04"), (4, "spine03"), (3, "spine02"), (2, "spine01"),
                      (1, "neck01"))},
    "neck01": (("neck01", "head"), FORWARD, LEFT, ((-0.5, 0.6), (-0.4, 0.4), (-0.7, 0.7))),
    "head": (UP, FORWARD, LEFT, ((-0.4, 0.5), (-0.3, 0.3), (-0.6, 0.6))),
    **{f"clavicle.{s}": ((f"clavicle.{s}", f"upperarm01.{s}"), FORWARD, UP,
                         ((-0.3, 0.3), (-0.2, 0.45), (-0.3, 0.3))) for s in "LR"},
    **{f"upperarm01.{s}": ((f"upperarm01.{s}", f"lowerarm01.{s}"), FORWARD, UP,
                           ((-1.0, 2.9), (-0.9, 2.4), (-1.5, 1.5))) for s in "LR"},
    **{f"lowerarm01.{s}": ((f"lowerarm01.{s}", f"wrist.{s}"), FORWARD, UP,
                           ((-0.65, 2.5), (-9.0, 9.0), (-9.0, 9.0))) for s in "LR"},
    **{f"wrist.{s}": ((f"lowerarm01.{s}", f"wrist.{s}"), FORWARD, UP,
                      ((-1.2, 1.2), (-0.5, 0.5), (-0.4, 0.4))) for s in "LR"},
    **{f"upperleg01.{s}": ((f"upperleg01.{s}", f"lowerleg01.{s}"), FORWARD, side,
                           ((-0.5, 2.3), (-0.45, 0.9), (-0.7, 0.7)))
       for s, side in (("L", LEFT), ("R", RIGHT))},
    **{f"lowerleg01.{s}": ((f"lowerleg01.{s}", f"foot.{s}"), BACKWARD, side,
                           ((-0.05, 2.6), (-9.0, 9.0), (-9.0, 9.0)))
       for s, side in (("L", LEFT), ("R", RIGHT))},
    **{f"foot.{s}": (FORWARD, UP, side, ((-0.9, 0.6), (-0.35, 0.35), (-0.35, 0.35)))
       for s, side in (("L", LEFT), ("R", RIGHT))},
}
# Anny's ear keypoints average the whole head; BlazePose's are on the ears.
FACE_WEIGHT = 0.5
MIN_KEYPOINTS = 4  # visible keypoints needed to fit a frame; fewer: interpolated
MIN_DEPTH = 0.5  # m: the body's root stays at least this far in front of the camera
ROBUST_ANNEAL = 8.0  # the robust scale starts this many times wider
WORLD_SIGMA = 0.15  # m: robust scale of the world-landmark term (BlazePose's 3D is rough)


class FitConfig(Section):
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="where to optimize: auto picks cuda when available",
    )
    fov_deg: float = Field(
        55.0, gt=10.0, lt=170.0, description="assumed horizontal field of view of the camera"
    )
    iterations_global: int = Field(
        60, ge=0, le=5000, description="Adam steps on orientation and translation only"
    )
    iterations_full: int = Field(
        160, ge=0, le=5000, description="Adam steps on pose, orientation, translation (and shape)"
    )
    lr: float = Field(0.1, gt=0.0, le=1.0, description="Adam step size (radians, ~metres)")
    chunk_frames: int = Field(
        96, ge=4, le=4096, description="frames optimized together (bounds memory)"
    )
    shape_frames: int = Field(
        24, ge=0, le=1024,
        description="frames per track used to estimate its shape when the video spans "
        "several chunks (0: keep the average shape)",
    )
    min_visibility: float = Field(
        0.3, ge=0.0, le=1.0, description="landmarks less visible than this are ignored"
    )
    robust_sigma: float = Field(
        0.08, gt=0.0, description="Geman-McClure scale, as a fraction of the person's size"
    )
    w_pose_prior: float = Field(2e-4, ge=0.0, description="weight of the L2 pose prior")
    w_joint_limits: float = Field(
        0.05, ge=0.0,
        description="weight of the penalty on bone rotations beyond their anatomical range "
        "(squared radians)"
    )
    w_smooth_pose: float = Field(
        2e-3, ge=0.0, description="weight of second differences of bone rotations"
    )
    w_smooth_root: float = Field(
        2e-3, ge=0.0, description="weight of second differences of the global orientation"
    )
    w_smooth_transl: float = Field(
        2e-2, ge=0.0, description="weight of second differences of the translation (m)"
    )
    w_world: float = Field(
        0.02, ge=0.0, description="weight of the 3D term on BlazePose world landmarks (m)"
    )
    init_limbs_from_world: bool = Field(
        True, description="start each frame's arms and legs where BlazePose's 3D world "
        "landmarks point them (picks towards/away from the camera, which 2D cannot)"
    )
    w_shape_prior: float = Field(
        1e-3, ge=0.0, description="weight pulling the shape towards the average (Anny's "
        "phenotype 0.5, SMPL betas 0)"
    )
    source: Literal["detections", "file"] = Field(
        "detections", description="detections: fit bodies to detect's keypoints; file: read "
        "per-frame SMPL / SMPL-H / SMPL-X parameters another tool wrote, from "
        "fit.source_dir/<video id>.npz (format: stages/fit_source.py, README)")
    source_dir: Path | None = Field(
        None, description="fit.source file: folder of <video id>.npz parameter files, "
        "mirroring the input layout; relative to the config file")

    @model_validator(mode="after")
    def _source_needs_dir(self) -> FitConfig:
        if self.source == "file" and self.source_dir is None:
            raise ValueError("fit.source: file needs fit.source_dir: the folder of "
                             "<video id>.npz parameter files")
        return self


# ----------------------------------------------------------------------------- body model


@dataclass
class RestBody:
    """What a keypoint model needs of one shape (P tracks)."""

    heads: torch.Tensor  # (P, O, 3) reference-pose heads of the optimized bones
    blend: torch.Tensor  # (P, K, O + 1, 4) keypoint blend vectors per bone group


class BoneKeypointModel:
    """COCO-23 keypoints of a body posed at a few of its joints, without skinning the mesh.

    Anny's local-ref pose and the SMPL family's pose share one structure: joint j's posed
    transform is G_j = G_parent [D_j | (I - D_j) q_j], its rotation D_j about its reference
    head q_j, in the reference pose's axes. A keypoint is a fixed blend of bone transforms
    (of skinned vertices or of joints), so with only O bones posed, and the others moving
    with their nearest posed ancestor, keypoint k = sum_o G_o b_ko over O + 1 groups (the
    root's is fixed). Forward kinematics then takes one 3x3 product per level of the posed
    bones' tree. Subclasses give, per shape, the heads q and the blends b (`rest`).
    """

    def __init__(self, parents: list[int], num_joints: int, bones: list[int],
                 to_camera: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.bones = bones
        # Each bone's group: its nearest posed ancestor (itself if posed), 0 for the root's.
        group_of = {b: i + 1 for i, b in enumerate(bones)}

        def group(j: int) -> int:
            while j > 0 and j not in group_of:
                j = parents[j]
            return group_of.get(j, 0)

        member = torch.zeros(num_joints, len(bones) + 1, device=device, dtype=dtype)
        for j in range(num_joints):
            member[j, group(j)] = 1.0
        self.member = member
        # The posed bones' tree, level by level: (positions, their parent groups).
        self.parent_group = [group(parents[b]) for b in bones]
        depth: list[int] = []
        for g in self.parent_group:
            depth.append(0 if g == 0 else depth[g - 1] + 1)
        # Python lists for the loop, a device tensor for the gather (no per-step syncs).
        self.levels = []
        for lv in range(max(depth) + 1):
            members = [i for i, d in enumerate(depth) if d == lv]
            self.levels.append((torch.tensor(members, device=device), members,
                                [self.parent_group[i] for i in members]))
        self.to_camera = to_camera.to(device, dtype)

    def rest(self, shape: torch.Tensor) -> RestBody:
        raise NotImplementedError

    def keypoints(
        self,
        pose: torch.Tensor,  # (P, T, O, 3) axis-angle of the posed bones
        rest: RestBody,
        root_rot: torch.Tensor,  # (P, T, 3, 3) global orientation in the camera frame
        transl: torch.Tensor,  # (P, T, 3)
    ) -> torch.Tensor:
        """COCO-23 keypoints (P, T, K, 3) in camera coordinates."""
        p, t, o = pose.shape[:3]
        rot = axis_angle_to_matrix(pose)  # (P, T, O, 3, 3)
        heads = rest.heads[:, None].expand(p, t, o, 3)
        # Each bone's move alone: rotation D about its head q, offset (I - D) q.
        offset = heads - (rot @ heads[..., None])[..., 0]
        eye = torch.eye(3, device=pose.device, dtype=pose.dtype).expand(p, t, 1, 3, 3)
        g_rot = [eye[:, :, 0]] + [None] * o
        g_off = [torch.zeros_like(heads[:, :, 0])] + [None] * o
        for idx, members, par in self.levels:
            pr = torch.stack([g_rot[g] for g in par], 2)
            po = torch.stack([g_off[g] for g in par], 2)
            r = pr @ rot[:, :, idx]
            off = (pr @ offset[:, :, idx, :, None])[..., 0] + po
            for n, i in enumerate(members):
                g_rot[i + 1], g_off[i + 1] = r[:, :, n], off[:, :, n]
        grot = torch.stack(g_rot, 2)  # (P, T, O + 1, 3, 3)
        goff = torch.stack(g_off, 2)
        blend = rest.blend  # (P, K, O + 1, 4)
        kps = torch.einsum("ptorc,pkoc->ptkr", grot, blend[..., :3]) + torch.einsum(
            "ptor,pko->ptkr", goff, blend[..., 3])
        glob = root_rot @ self.to_camera
        return kps @ glob.transpose(-1, -2) + transl[:, :, None]


class KeypointModel(BoneKeypointModel):
    """AnnyBody's COCO-23 keypoints for poses of a few bones (see BoneKeypointModel).

    With linear blend skinning a posed vertex is sum_j w_vj T_j [v; 1], so the regressed
    keypoint k = sum_v r_kv v' is sum_j T_j a_kj with a_kj = sum_v r_kv w_vj [v; 1]; the
    rest vertices are linear in the blendshape coefficients c, hence a = a0 + c . a_n.

    In Anny's local-ref parameterization a bone's posed frame is its reference frame Q_j
    moved by G_j, so b_ko = sum of Q_j P_j^-1 a_kj over the group's bones (P_j: rest pose,
    T_j = G_j Q_j P_j^-1), instead of Anny's 104-bone chain.
    """

    def __init__(self, body: AnnyBody, bones: list[int]):
        self.body = body
        model = body.model
        self.model = model
        dev, dt = body.device, body.dtype
        reg = body.keypoints.regression_weights.to(dev, dt)  # (K, V)
        if body.keypoints.is_sparse:
            raise RuntimeError("sparse keypoint regressors are not supported")
        weights = model.vertex_bone_weights.to(dt)  # (V, S)
        index = model.vertex_bone_indices.long()
        dense = torch.zeros(reg.shape[1], body.num_bones, device=dev, dtype=dt)
        dense.scatter_add_(1, index, weights)  # (V, J)
        template = model.template_vertices.to(dt)  # (V, 3)
        shapes = model.blendshapes.to(dt)  # (N, V, 3)
        a0 = torch.zeros(NUM_COCO, body.num_bones, 4, device=dev, dtype=dt)
        an = torch.zeros(shapes.shape[0], NUM_COCO, body.num_bones, 3, device=dev, dtype=dt)
        with torch.no_grad():
            for k in range(reg.shape[0]):
                idx = torch.nonzero(reg[k]).squeeze(1)
                rw = reg[k, idx, None] * dense[idx]  # (S, J): r_kv w_vj
                a0[k, :, :3] = rw.T @ template[idx]
                a0[k, :, 3] = rw.sum(0)
                an[:, k] = torch.einsum("vj,nvc->njc", rw, shapes[:, idx])
        self.a0, self.an = a0, an
        super().__init__([int(x) for x in model.bone_parents], body.num_bones, bones,
                         ANNY_TO_CAMERA, dev, dt)
        # keypoints() leaves out AnnyBody.forward's "minus the root bone's position": the
        # posed root sits at the origin in the local-ref parameterization.
        eye = torch.eye(4, device=dev, dtype=dt).expand(1, body.num_bones, 4, 4)
        with torch.no_grad():
            rest = model.get_rest_model(model.get_phenotype_blendshape_coefficients())
            root = model.get_bone_transforms(eye, rest["rest_bone_poses"])[1][:, 0, :3, 3]
        if root.abs().max() > 1e-5:
            raise RuntimeError("fit: expected Anny's posed root bone at the origin")

    def rest(self, phenotype: torch.Tensor) -> RestBody:
        model = self.model
        phen = phenotype.to(self.body.device, self.body.dtype).clamp(0.0, 1.0)
        p = phen.shape[0]
        kwargs = {label: phen[:, i] for i, label in enumerate(self.body.phenotype_labels)}
        _, params, local, facial = model.get_tensor_inputs(None, kwargs, None, None)
        coeffs = model._get_phenotype_blendshape_coefficients(params, local, facial)
        rest_poses = model.get_rest_model(coeffs)["rest_bone_poses"]
        eye = torch.eye(4, device=phen.device, dtype=phen.dtype).expand(p, self.body.num_bones,
                                                                        4, 4)
        transforms, ref_poses = model.get_bone_transforms(eye, rest_poses)
        a = self.a0[None, :, :, :3] + torch.einsum("pn,nkjc->pkjc", coeffs, self.an)
        a = torch.cat([a, self.a0[None, :, :, 3:].expand(p, -1, -1, -1)], -1)
        # transforms = Q P^-1 at zero pose.
        blend = torch.einsum("pjrs,pkjs,jo->pkor", transforms, a, self.member)
        return RestBody(ref_poses[:, self.bones, :3, 3], blend)


Vec = tuple[float, float, float]
JointRange = tuple[Any, Vec, Vec, tuple[Range, Range, Range]]


@dataclass(frozen=True)
class BodySpec:
    """How the fitter treats one body model; every table is in the model's own frame and
    keyed by its joint names (see BODY_BONES ... JOINT_RANGES for what each holds)."""

    kind: str
    bones: dict[str, float]  # optimized joints -> pose-prior stiffness
    bone_ends: dict[str, tuple[int, ...]]  # optimized joint -> keypoints ending its segment
    hinges: tuple[tuple[str, str, Vec], ...]  # (joint, joint ending the segment, flex swing)
    relaxed: dict[str, Vec]  # where the pose prior pulls, (flexion, abduction, twist)
    joint_ranges: dict[str, JointRange]
    limb_segments: tuple[tuple[str, str | None, tuple[int, int]], ...]
    shape_mean: float  # where the shape prior pulls each shape coefficient
    shape_bounds: tuple[float, float] | None  # the coefficients' clamp (None: free)
    bone_index: Callable[[str], int]  # joint name -> index in the body's pose
    keypoint_model: Callable[[list[int]], BoneKeypointModel]  # for these joint indices

    @property
    def hinge_bones(self) -> frozenset[str]:
        return frozenset(h[0] for h in self.hinges)


def anny_spec(body: AnnyBody) -> BodySpec:
    return BodySpec("anny", BODY_BONES, BONE_ENDS, HINGES, RELAXED, JOINT_RANGES,
                    LIMB_SEGMENTS, 0.5, (0.0, 1.0), body.bone_index,
                    lambda bones: KeypointModel(body, bones))


def body_spec(body: Any) -> BodySpec:
    """The fitter's description of `body` (AnnyBody or stages.smpl_family.SmplFamilyBody)."""
    if body.kind == "anny":
        return anny_spec(body)
    from stages.fit_smpl import smpl_spec  # it builds on this module's classes

    return smpl_spec(body)


def _rest_heads(km: BoneKeypointModel, body: Any) -> torch.Tensor:
    """(O, 3) heads of the optimized bones for the body's average shape."""
    with torch.no_grad():
        return km.rest(body.default_shape(1)).heads[0]


def _hinge_axes(km: BoneKeypointModel, body: Any, spec: BodySpec,
                bones: list[int]) -> list[tuple[int, torch.Tensor]]:
    """(position in `bones`, flexion axis in the model's frame) per hinge joint.

    In the local-ref parameterization a bone's rotation is expressed in axes aligned with
    the model's frame in the reference pose, so the axis that swings the segment from its
    rest direction d towards `swing` is d x swing, whatever the parents do.
    """
    heads = _rest_heads(km, body)
    out = []
    for name, end, swing_to in spec.hinges:
        pos = bones.index(spec.bone_index(name))
        d = heads[bones.index(spec.bone_index(end))] - heads[pos]
        axis = torch.linalg.cross(d, torch.tensor(swing_to, device=d.device, dtype=d.dtype))
        out.append((pos, axis / axis.norm()))
    return out


@dataclass
class JointLimits:
    """Per optimized bone: anatomical axes (rows: flexion, abduction, twist) in the model's
    frame and the allowed range of the rotation's component along each."""

    axes: torch.Tensor  # (B, 3, 3)
    low: torch.Tensor  # (B, 3)
    high: torch.Tensor  # (B, 3)

    def penalty(self, pose: torch.Tensor) -> torch.Tensor:
        """(..., B, 3) axis-angle -> (...): squared excess beyond the ranges. The
        components of an axis-angle vector along fixed axes approximate Euler angles well
        within the ranges used here (a few tens of degrees per axis)."""
        comp = (self.axes @ pose[..., None])[..., 0]
        excess = torch.relu(self.low - comp) + torch.relu(comp - self.high)
        return (excess * excess).sum((-1, -2))


def joint_limits(km: BoneKeypointModel, body: Any, spec: BodySpec) -> JointLimits:
    """JointLimits of the optimized bones (in the order of spec.bones), from the average
    body's rest pose."""
    heads = _rest_heads(km, body).double().cpu().numpy()
    pos = {name: i for i, name in enumerate(spec.bones)}
    axes, low, high = [], [], []
    for name in spec.bones:
        segment, flex_swing, abd_swing, ranges = spec.joint_ranges[name]
        if isinstance(segment[0], str):
            d = heads[pos[segment[1]]] - heads[pos[segment[0]]]
        else:
            d = np.asarray(segment, dtype=np.float64)
        d = d / np.linalg.norm(d)
        flex = np.cross(d, flex_swing)
        flex /= np.linalg.norm(flex)
        abd = np.cross(d, abd_swing)
        abd -= (abd @ flex) * flex  # orthonormal: each component is its own angle
        abd /= np.linalg.norm(abd)
        axes.append(np.stack([flex, abd, d]))
        low.append([r[0] for r in ranges])
        high.append([r[1] for r in ranges])

    def tensor(x: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(x), device=body.device, dtype=body.dtype)

    return JointLimits(tensor(axes), tensor(low), tensor(high))

# ----------------------------------------------------------------------------- data


@dataclass
class Observations:
    """One window of detections for the tracks being fitted, mapped to COCO-23."""

    kp: torch.Tensor  # (P, T, 23, 2) px
    w2d: torch.Tensor  # (P, T, 23) weights (0 where unseen or unmapped)
    scale: torch.Tensor  # (P, T) person size in px (normalizes the reprojection error)
    world: torch.Tensor  # (P, T, 23, 3) BlazePose world landmarks, hip-centred, m
    w3d: torch.Tensor  # (P, T, 23)
    valid: np.ndarray  # (P, T) bool: present with enough visible keypoints


def map_blazepose(
    keypoints: np.ndarray, world: np.ndarray, present: np.ndarray, min_visibility: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """BlazePose-33 (..., 33, 3) -> COCO-23 pixels, weights, world points, world weights."""
    src = np.array([max(i, 0) for i in BLAZEPOSE_FOR_COCO23])
    mapped = np.array([i >= 0 for i in BLAZEPOSE_FOR_COCO23])
    kp = keypoints[..., src, :].astype(np.float64)
    wl = world[..., src, :].astype(np.float64)
    vis = np.nan_to_num(kp[..., 2], nan=0.0)
    finite = np.isfinite(kp[..., :2]).all(-1)
    w = np.where((vis >= min_visibility) & finite & mapped & present[..., None], vis, 0.0)
    w = w * np.where(np.isin(np.arange(NUM_COCO), FACE), FACE_WEIGHT, 1.0)
    w3 = np.where(np.isfinite(wl).all(-1) & (np.abs(wl).sum(-1) > 0), w, 0.0)
    return np.nan_to_num(kp[..., :2]), w, np.nan_to_num(wl), w3


def person_scale(kp: np.ndarray, w: np.ndarray, floor: float) -> np.ndarray:
    """Diagonal (px) of the box of the visible keypoints, at least `floor`."""
    seen = (w > 0)[..., None]
    lo = np.where(seen, kp, np.inf).min(axis=-2)
    hi = np.where(seen, kp, -np.inf).max(axis=-2)
    diag = np.linalg.norm(np.where(np.isfinite(hi - lo), hi - lo, 0.0), axis=-1)
    return np.maximum(diag, floor)


# ----------------------------------------------------------------------------- initialization


def kabsch(src: np.ndarray, dst: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The rotation R minimizing sum w |R src - dst|^2 over centred point sets (N, 3)."""
    ws = w / max(w.sum(), 1e-9)
    a = src - (ws[:, None] * src).sum(0)
    b = dst - (ws[:, None] * dst).sum(0)
    u, _, vt = np.linalg.svd((b * ws[:, None]).T @ a)
    d = np.sign(np.linalg.det(u @ vt)) or 1.0
    return u @ np.diag([1.0, 1.0, d]) @ vt


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass
class FrameInit:
    rot: np.ndarray  # (3, 3) global orientation
    ray: np.ndarray  # (3,) the anchor's viewing ray, z = 1
    depth: float  # the anchor's depth estimate (m)
    offset: np.ndarray  # (3,) the anchor relative to the root, oriented


LIMBS = ((L_HIP, 13), (13, 15), (R_HIP, 14), (14, 16), (5, 7), (7, 9), (6, 8), (8, 10))


def init_frame(
    rest_kp: np.ndarray,  # (23, 3) the body at zero pose and orientation, root at 0
    kp: np.ndarray,  # (23, 2) px
    w: np.ndarray,  # (23,)
    world: np.ndarray,  # (23, 3)
    w3: np.ndarray,  # (23,)
    camera: np.ndarray,  # fx, fy, cx, cy
) -> FrameInit | None:
    """Global orientation and placement from the torso; None if too little is seen."""
    torso = list(TORSO)
    if (w3[torso] > 0).sum() >= 3:
        # BlazePose's world landmarks are metric and camera-aligned: their torso gives the
        # full 3D orientation, the back of a person included.
        rot = kabsch(rest_kp[torso], world[torso], w3[torso])
    else:
        pairs = [(a, b) for a, b in ((L_SHOULDER, R_SHOULDER), (L_HIP, R_HIP))
                 if w[a] > 0 and w[b] > 0]
        if not pairs:
            return None
        # Facing the camera, the person's left side is on the image's right.
        facing = sum(kp[a, 0] - kp[b, 0] for a, b in pairs)
        rot = np.eye(3) if facing >= 0 else _rot_y(math.pi)
        if all(w[i] > 0 for i in torso):
            up = (kp[[L_SHOULDER, R_SHOULDER]].mean(0) - kp[[L_HIP, R_HIP]].mean(0))
            rot = _rot_z(math.atan2(up[0], -up[1])) @ rot
    seen = [i for i in torso if w[i] > 0]
    if not seen:
        seen = [i for i in range(NUM_COCO) if w[i] > 0]
        if len(seen) < 2:
            return None
    model = rest_kp @ rot.T
    # Depth: the oriented body's metric extent across the image plane against its pixels.
    # Three torso sides fix it; with fewer, the limbs (as they hang at rest) help.
    sides = ((L_SHOULDER, R_SHOULDER), (L_HIP, R_HIP), (L_SHOULDER, L_HIP), (R_SHOULDER, R_HIP))
    segs = [(a, b) for a, b in sides if w[a] > 0 and w[b] > 0]
    if len(segs) < 3:
        segs += [(a, b) for a, b in LIMBS if w[a] > 0 and w[b] > 0]
    if not segs:
        return None
    metres = sum(np.linalg.norm(model[a, :2] - model[b, :2]) for a, b in segs)
    pixels = sum(np.linalg.norm(kp[a] - kp[b]) for a, b in segs)
    fx, fy, cx, cy = camera
    depth = float(np.clip(fx * metres / max(pixels, 1.0), MIN_DEPTH, 100.0))
    anchor_px = kp[seen].mean(0)
    ray = np.array([(anchor_px[0] - cx) / fx, (anchor_px[1] - cy) / fy, 1.0])
    return FrameInit(rot, ray, depth, model[seen].mean(0))


# Limb bones initialized from BlazePose's world landmarks: (bone, parent limb bone or None,
# the COCO-23 keypoints that span its segment).
LIMB_SEGMENTS = (
    ("upperarm01.L", None, (5, 7)), ("lowerarm01.L", "upperarm01.L", (7, 9)),
    ("upperarm01.R", None, (6, 8)), ("lowerarm01.R", "upperarm01.R", (8, 10)),
    ("upperleg01.L", None, (11, 13)), ("lowerleg01.L", "upperleg01.L", (13, 15)),
    ("upperleg01.R", None, (12, 14)), ("lowerleg01.R", "upperleg01.R", (14, 16)),
)


def swing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The shortest rotation (axis-angle, (N, 3)) turning directions a into b (N, 3)."""
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-9)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-9)
    axis = np.cross(a, b)
    sin = np.linalg.norm(axis, axis=-1, keepdims=True)
    angle = np.arctan2(sin, (a * b).sum(-1, keepdims=True))
    return np.where(sin > 1e-9, axis / np.maximum(sin, 1e-9) * angle, 0.0)


def limb_pose_from_world(
    rest_kp: np.ndarray,  # (23, 3) the body at zero pose, camera axes (root rotation I)
    world: np.ndarray,  # (T, 23, 3) BlazePose world landmarks
    w3: np.ndarray,  # (T, 23) their weights
    rots: np.ndarray,  # (T, 3, 3) the initial global orientations
    to_camera: np.ndarray,  # (3, 3) the model's frame -> the body's camera-convention axes
    limits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],  # bone: axes, low, high
    segments: tuple[tuple[str, str | None, tuple[int, int]], ...] = LIMB_SEGMENTS,
    hinge_bones: frozenset[str] = HINGE_BONES,
) -> dict[str, np.ndarray]:
    """Per limb bone of `segments` (Anny's by default), a (T, 3) axis-angle rotation (the
    model's axes) that points its segment
    where BlazePose's 3D landmarks point it, clamped to the bone's range. From a straight
    start the 2D reprojection cannot tell a limb swung towards the camera from one swung
    away (the image changes only to second order), and the fit stays in whichever basin
    it starts in; BlazePose's learned 3D picks the basin. NaN where the segment is unseen."""
    out: dict[str, np.ndarray] = {}
    to_model = to_camera.T
    for bone, parent, (a, b) in segments:
        seen = (w3[:, a] > 0) & (w3[:, b] > 0)
        # The target in the body's rest frame, then in the model's axes.
        target = np.einsum("tji,tj->ti", rots, world[:, b] - world[:, a]) @ to_model.T
        rest = np.broadcast_to((rest_kp[b] - rest_kp[a]) @ to_model.T, target.shape)
        if parent is not None:
            # A child bone's rotation acts after its parent's: undo the parent's.
            prot = Rotation.from_rotvec(np.nan_to_num(out[parent]))
            target = prot.inv().apply(target)
        rv = swing(rest, target)
        axes, low, high = limits[bone]
        comp = np.clip(rv @ axes.T, low, high)
        if bone in hinge_bones:
            comp[:, 1:] = 0.0  # a hinge only flexes
        rv = comp @ axes
        out[bone] = np.where(seen[:, None], rv, np.nan)
    return out


def median_filter(values: np.ndarray, radius: int) -> np.ndarray:
    """Running median over +-radius entries: one frame's bad estimate does not spread."""
    out = values.copy()
    for i in range(len(values)):
        out[i] = np.median(values[max(0, i - radius): i + radius + 1])
    return out


def fill_gaps(valid: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Linear interpolation over frames (axis 0) where `valid` is False; holds at the ends."""
    out = values.copy()
    idx = np.flatnonzero(valid)
    if len(idx) == 0 or len(idx) == len(valid):
        return out
    flat = values.reshape(len(valid), -1)
    filled = np.stack([np.interp(np.arange(len(valid)), idx, flat[idx, c])
                       for c in range(flat.shape[1])], 1)
    return filled.reshape(values.shape).astype(values.dtype)


def fill_rotations(valid: np.ndarray, rots: np.ndarray) -> np.ndarray:
    """Slerp of rotation matrices (T, 3, 3) over invalid frames; holds at the ends."""
    idx = np.flatnonzero(valid)
    if len(idx) == 0 or len(idx) == len(valid):
        return rots.copy()
    if len(idx) == 1:
        return np.broadcast_to(rots[idx[0]], rots.shape).copy()
    times = np.clip(np.arange(len(valid)), idx[0], idx[-1])
    return Slerp(idx, Rotation.from_matrix(rots[idx]))(times).as_matrix()


# ----------------------------------------------------------------------------- optimization


def geman_mcclure(sq: torch.Tensor, sigma: float) -> torch.Tensor:
    """rho of a squared residual; ~ the squared residual below sigma, bounded above it."""
    s2 = sigma * sigma
    return s2 * sq / (s2 + sq)


@dataclass
class Window:
    """The variables of one optimization window (P tracks x T frames)."""

    pose: torch.Tensor  # (P, T, B, 3) the body bones only
    root: torch.Tensor  # (P, T, 3, 3) initial global orientation (fixed)
    delta: torch.Tensor  # (P, T, 3) optimized correction of `root` (axis-angle)
    transl: torch.Tensor  # (P, T, 3)
    phenotype: torch.Tensor  # (P, K)

    def orientation(self) -> torch.Tensor:
        return axis_angle_to_matrix(self.delta) @ self.root


@dataclass
class Anchor:
    """The two frames before a window, fixed, so smoothness carries across windows."""

    pose: torch.Tensor  # (P, 2, B, 3)
    orient: torch.Tensor  # (P, 2, 3, 3)
    transl: torch.Tensor  # (P, 2, 3)
    active: torch.Tensor  # (P,) bool: the track was fitted in the previous window


class Fitter:
    """Fits windows of frames for several tracks at once."""

    def __init__(self, body: Any, config: FitConfig, spec: BodySpec | None = None):
        self.body = body  # AnnyBody or SmplFamilyBody
        self.config = config
        self.spec = spec = spec if spec is not None else body_spec(body)
        self.bones = [spec.bone_index(name) for name in spec.bones]
        self.km = spec.keypoint_model(self.bones)
        self.stiffness = torch.tensor(list(spec.bones.values()), device=body.device,
                                      dtype=body.dtype)
        self.hinges = _hinge_axes(self.km, body, spec, self.bones)
        self.limits = joint_limits(self.km, body, spec)
        relaxed = torch.zeros(len(self.bones), 3, device=body.device, dtype=body.dtype)
        for k, name in enumerate(spec.bones):
            if name in spec.relaxed:
                relaxed[k] = torch.as_tensor(spec.relaxed[name], device=body.device,
                                             dtype=body.dtype) @ self.limits.axes[k]
        self.relaxed = relaxed  # (B, 3) axis-angle, the pose prior's mean
        self.bone_ends = [spec.bone_ends[name] for name in spec.bones]
        self.camera = (1.0, 1.0, 0.0, 0.0)  # fx, fy, cx, cy of the video being fitted

    def keypoints(self, win: Window, rest: RestBody | None = None) -> torch.Tensor:
        rest = rest if rest is not None else self.km.rest(win.phenotype)
        return self.km.keypoints(win.pose, rest, win.orientation(), win.transl)

    def rest_keypoints(self, phenotype: torch.Tensor) -> np.ndarray:
        """(P, 23, 3): each track's body at zero pose and orientation, root at the origin."""
        with torch.no_grad():
            rest = self.km.rest(phenotype)
            p = phenotype.shape[0]
            zeros = torch.zeros(p, 1, len(self.bones), 3, device=phenotype.device,
                                dtype=phenotype.dtype)
            eye = torch.eye(3, device=zeros.device, dtype=zeros.dtype).expand(p, 1, 3, 3)
            kp = self.km.keypoints(zeros, rest, eye, zeros[:, :, 0])
        return kp[:, 0].cpu().double().numpy()

    # -- losses

    def unseen_stiffness(self, obs: Observations) -> torch.Tensor:
        """(P, T, B) pose-prior stiffness, much stiffer for bones whose end is unseen in a
        frame that is fitted (frames without data follow their neighbours instead)."""
        seen = obs.w2d > 0
        unseen = torch.stack([~seen[..., list(ends)].any(-1) for ends in self.bone_ends], -1)
        valid = torch.as_tensor(obs.valid, device=unseen.device)[..., None]
        return self.stiffness * (1.0 + UNSEEN_STIFFNESS * (unseen & valid).to(obs.w2d.dtype))

    def _pose_prior(self, pose: torch.Tensor, stiff: torch.Tensor) -> torch.Tensor:
        """(P, T) L2 prior (hinge joints stiff off their axis) plus anatomical limits."""
        cfg = self.config
        dev = pose - self.relaxed
        prior = (dev * dev).sum(-1) * stiff
        for pos, axis in self.hinges:
            r = dev[..., pos, :]
            angle = r @ axis
            off = r - angle[..., None] * axis
            prior[..., pos] = stiff[..., pos] * angle**2 + HINGE_OFF_AXIS * (off * off).sum(-1)
        return cfg.w_pose_prior * prior.sum(-1) + cfg.w_joint_limits * self.limits.penalty(pose)

    def _smoothness(self, win: Window, anchor: Anchor | None) -> torch.Tensor:
        cfg = self.config
        pose, orient, transl = win.pose, win.orientation(), win.transl
        if anchor is not None:
            keep = anchor.active[:, None, None]
            # Inactive tracks repeat their first frame: zero second difference at the seam.
            pose = torch.cat([torch.where(keep[..., None], anchor.pose, pose[:, :1]), pose], 1)
            orient = torch.cat(
                [torch.where(keep[..., None], anchor.orient, orient[:, :1]), orient], 1)
            transl = torch.cat([torch.where(keep, anchor.transl, transl[:, :1]), transl], 1)
        if pose.shape[1] < 3:
            return pose.sum() * 0.0

        def second(x: torch.Tensor) -> torch.Tensor:
            d = x[:, 2:] - 2 * x[:, 1:-1] + x[:, :-2]
            return (d * d).flatten(2).sum(-1).sum()

        return (cfg.w_smooth_pose * second(pose) + cfg.w_smooth_root * second(orient)
                + cfg.w_smooth_transl * second(transl))

    def _data(self, kp3d: torch.Tensor, obs: Observations, joint_weights: torch.Tensor,
              sigma: float | None) -> torch.Tensor:
        """Reprojection error (P, T), robust at scale `sigma` (None: squared), and, weakly,
        the 3D world-landmark error."""
        cfg = self.config
        fx, fy, cx, cy = self.camera
        z = kp3d[..., 2].clamp(min=0.05)
        proj = torch.stack([fx * kp3d[..., 0] / z + cx, fy * kp3d[..., 1] / z + cy], -1)
        res = (proj - obs.kp) / obs.scale[..., None, None]
        sq = (res * res).sum(-1)
        rho = sq if sigma is None else geman_mcclure(sq, sigma)
        data = (obs.w2d * joint_weights * rho).sum(-1)
        if cfg.w_world > 0:
            hips = kp3d[..., [L_HIP, R_HIP], :].mean(-2, keepdim=True)
            whips = obs.world[..., [L_HIP, R_HIP], :].mean(-2, keepdim=True)
            model, world = kp3d - hips, obs.world - whips
            # BlazePose's world skeleton has a canonical size: matched at the size of the
            # fitted torso, it steers the limbs' directions but not the body's height.
            torso = list(TORSO)
            size = (model[..., torso, :].norm(dim=-1) * obs.w3d[..., torso]).sum(-1)
            ref = (world[..., torso, :].norm(dim=-1) * obs.w3d[..., torso]).sum(-1)
            ratio = torch.where(ref > 1e-6, size.detach() / ref.clamp(min=1e-6), 1.0)
            d3 = model - ratio[..., None, None] * world
            sq3 = (d3 * d3).sum(-1)
            data = data + cfg.w_world * (obs.w3d * geman_mcclure(sq3, WORLD_SIGMA)).sum(-1)
        return data

    # -- the optimizer

    def optimize(self, win: Window, obs: Observations, anchor: Anchor | None,
                 fit_shape: bool, temporal: bool) -> None:
        """Two Adam stages: orientation and translation on the torso, then everything."""
        cfg = self.config
        n = max(int(obs.valid.sum()), 1)
        torso_only = torch.zeros(NUM_COCO, device=win.pose.device, dtype=win.pose.dtype)
        torso_only[list(TORSO)] = 1.0
        all_joints = torch.ones_like(torso_only)
        stages = (
            (cfg.iterations_global, [win.delta, win.transl], torso_only, False),
            (cfg.iterations_full, [win.pose, win.delta, win.transl], all_joints, True),
        )

        def sigma_at(step: int) -> float:
            # The robust loss is flat far from the data, so a limb that starts far from its
            # keypoints would never get there: begin wide (nearly squared error) and narrow
            # to robust_sigma over the first half of the steps.
            frac = min(1.0, step / max(cfg.iterations_full * 0.5, 1.0))
            return cfg.robust_sigma * ROBUST_ANNEAL ** (1.0 - frac)

        stiff = self.unseen_stiffness(obs)
        for iters, params, joint_w, full in stages:
            if iters == 0:
                continue
            shape_free = full and fit_shape
            if shape_free:
                params = [*params, win.phenotype]
            with torch.no_grad():
                rest = self.km.rest(win.phenotype)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=cfg.lr)
            # Cosine decay to a tenth: large steps to get there, small ones to settle.
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda i, m=iters: 0.1 + 0.45 * (1 + math.cos(math.pi * i / m)))
            for step in range(iters):
                opt.zero_grad(set_to_none=True)
                kp3d = self.keypoints(win, None if shape_free else rest)
                loss = self._data(kp3d, obs, joint_w, sigma_at(step) if full else None).sum()
                if full:
                    loss = loss + self._pose_prior(win.pose, stiff).sum()
                if shape_free:
                    dev = win.phenotype - self.spec.shape_mean
                    loss = loss + cfg.w_shape_prior * n * (dev * dev).sum()
                if temporal:
                    loss = loss + self._smoothness(win, anchor)
                (loss / n).backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    win.transl[..., 2].clamp_(min=MIN_DEPTH)
                    if shape_free and self.spec.shape_bounds is not None:
                        win.phenotype.clamp_(*self.spec.shape_bounds)
            for p in params:
                p.requires_grad_(False)


# ----------------------------------------------------------------------------- the stage


@dataclass
class Detections:
    """A video's detections mapped to COCO-23 (whole video, all tracks)."""

    kp: np.ndarray  # (T, P, 23, 2)
    w2d: np.ndarray  # (T, P, 23)
    scale: np.ndarray  # (T, P)
    world: np.ndarray  # (T, P, 23, 3)
    w3d: np.ndarray  # (T, P, 23)
    present: np.ndarray  # (T, P)
    valid: np.ndarray  # (T, P): present with enough keypoints to fit
    track_ids: np.ndarray  # (P,)


@dataclass
class Track:
    """The fitted values of every track over the whole video (filled window by window)."""

    pose: np.ndarray  # (T, P, B, 3) body bones
    orient: np.ndarray  # (T, P, 3, 3)
    transl: np.ndarray  # (T, P, 3)
    phenotype: np.ndarray  # (P, K)


def camera_for(width: int, height: int, fov_deg: float) -> np.ndarray:
    fx = width / 2.0 / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([fx, fx, width / 2.0, height / 2.0])


def load_detections(path: Path, min_visibility: float, frame_count: int,
                    height: int) -> Detections:
    try:
        with np.load(path) as npz:
            keypoints = npz["keypoints"]
            world = npz["world"]
            present = npz["present"].astype(bool)
            track_ids = npz["track_ids"].astype(np.int32)
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise VideoFailed(f"fit: cannot read {path.name}: {exc}") from exc
    t, p = present.shape
    if keypoints.shape != (t, p, NUM_BLAZEPOSE, 3) or world.shape != keypoints.shape:
        raise VideoFailed(f"fit: {path.name} has keypoints {keypoints.shape}, expected "
                          f"({t}, {p}, {NUM_BLAZEPOSE}, 3)")
    if t != frame_count:
        raise VideoFailed(f"fit: {path.name} has {t} frames, the video {frame_count}")
    kp, w, wl, w3 = map_blazepose(keypoints, world, present, min_visibility)
    valid = present & ((w > 0).sum(-1) >= MIN_KEYPOINTS)
    w, w3 = w * valid[..., None], w3 * valid[..., None]
    return Detections(kp, w, person_scale(kp, w, 0.05 * height), wl, w3, present, valid,
                      track_ids)


class FitStage(Stage):
    """detect/<id>/people.npz -> fit/<id>/bodies.npz (see stages/__init__.py)."""

    name = "fit"
    version = "3"
    requires = ("detect",)
    config_model = FitConfig
    shared_sections = ("body",)
    resources = Resources(cpus=1.0, gpus=0.0)

    config: FitConfig

    def setup(self) -> None:
        device = resolve_device(self.config.device)
        # A missing SMPL-family file fails here, naming body.model_path: a config error
        # stops the run rather than failing every video.
        if self.config.source == "file" and body_section(self).model == "anny":
            raise ValueError("fit.source: file reads SMPL-family parameters: set body.model "
                             "to smpl, smplh or smplx (and body.model_path)")
        self.body = load_body_model(body_section(self), device)
        self.fitter = Fitter(self.body, self.config)

    def teardown(self) -> None:
        self.__dict__.pop("fitter", None)
        self.__dict__.pop("body", None)

    def _ensure_setup(self) -> None:
        if not hasattr(self, "fitter"):
            self.setup()

    # -- per video

    def process(self, job: VideoJob) -> dict[str, Any]:
        self._ensure_setup()
        video = _video_info(job)
        width, height, frames = video["width"], video["height"], video["frame_count"]
        camera = camera_for(width, height, self.config.fov_deg)
        det = load_detections(job.inputs["detect"] / "people.npz", self.config.min_visibility,
                              frames, height)
        if self.config.source == "file":
            return self._from_file(job, det, camera)
        self.fitter.camera = tuple(float(c) for c in camera)
        t, p = det.present.shape
        if p == 0:
            job.advance(t)
            return self._write(job.out_dir, det, None, camera)
        with _cpu_threads(1 if self.body.device.type == "cpu" else None):
            track = self._fit_video(det, camera, job)
            return self._write(job.out_dir, det, track, camera)

    def _from_file(self, job: VideoJob, det: Detections, camera: np.ndarray) -> dict[str, Any]:
        """fit.source: file: the bodies another tool estimated, scored against detect's."""
        from stages.fit_source import load_body_params, reprojection_error, source_path

        assert self.config.source_dir is not None
        path = source_path(self.config.source_dir, job.video.id)
        t = det.present.shape[0]
        arrays = load_body_params(path, self.body, t, camera, body_section(self).model)
        arrays["fit_error"] = reprojection_error(
            arrays["joints3d"], arrays["present"], arrays["camera"], det.kp, det.w2d
        ).astype(np.float32)
        job.advance(t)
        job.out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(job.out_dir / "bodies.npz", **arrays)
        errors = arrays["fit_error"][np.isfinite(arrays["fit_error"])]
        return {"body_model": self.body.kind, "tracks": int(arrays["present"].shape[1]),
                "mean_fit_error_px": float(errors.mean()) if errors.size else None,
                "phenotype_labels": list(self.body.shape_labels), "source": str(path)}

    def _fit_video(self, det: Detections, camera: np.ndarray, job: VideoJob) -> Track:
        cfg = self.config
        t, p = det.present.shape
        nb = len(self.fitter.bones)
        track = Track(np.zeros((t, p, nb, 3)), np.broadcast_to(np.eye(3), (t, p, 3, 3)).copy(),
                      np.zeros((t, p, 3)), self._default_shape(p))
        one_window = t <= cfg.chunk_frames
        if not one_window and cfg.shape_frames > 0:
            track.phenotype = self._fit_shapes(det, camera)
        anchor: Anchor | None = None
        for start in range(0, t, cfg.chunk_frames):
            stop = min(start + cfg.chunk_frames, t)
            anchor = self._fit_window(det, camera, track, start, stop, anchor, one_window)
            job.advance(stop - start)
        return track

    def _observations(self, det: Detections, frames: np.ndarray, tracks: np.ndarray,
                      ) -> Observations:
        """Observations of `tracks` at `frames` ((P, T) frame indices)."""
        dev, dt = self.body.device, self.body.dtype
        cols = tracks[:, None]

        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(x[frames, cols], device=dev, dtype=dt)

        return Observations(tensor(det.kp), tensor(det.w2d), tensor(det.scale),
                            tensor(det.world), tensor(det.w3d), det.valid[frames, cols])

    def _init_window(self, obs: Observations, phenotype: np.ndarray, camera: np.ndarray,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-frame orientation (P, T, 3, 3) and translation (P, T, 3) from the torsos, and
        the limbs' pose (P, T, B, 3) from the world landmarks (NaN: no estimate)."""
        dev, dt = self.body.device, self.body.dtype
        rest_kp = self.fitter.rest_keypoints(torch.as_tensor(phenotype, device=dev, dtype=dt))
        kp, w = obs.kp.cpu().double().numpy(), obs.w2d.cpu().double().numpy()
        world, w3 = obs.world.cpu().double().numpy(), obs.w3d.cpu().double().numpy()
        p, t = obs.valid.shape
        rots = np.broadcast_to(np.eye(3), (p, t, 3, 3)).copy()
        transl = np.zeros((p, t, 3))
        for i in range(p):
            ok = np.zeros(t, bool)
            inits: list[FrameInit] = []
            for j in np.flatnonzero(obs.valid[i]):
                got = init_frame(rest_kp[i], kp[i, j], w[i, j], world[i, j], w3[i, j], camera)
                if got is not None:
                    inits.append(got)
                    ok[j] = True
            if not ok.any():
                transl[i, :, 2] = 3.0  # nothing to go on: a person a few metres away
                continue
            depth = median_filter(np.array([x.depth for x in inits]), 3)
            rots[i, ok] = [x.rot for x in inits]
            transl[i, ok] = [x.ray * z - x.offset for x, z in zip(inits, depth, strict=True)]
            rots[i] = fill_rotations(ok, rots[i])
            transl[i] = fill_gaps(ok, transl[i])
        return rots, transl, self._init_limbs(rest_kp, world, w3, rots, obs.valid)

    def _init_limbs(self, rest_kp: np.ndarray, world: np.ndarray, w3: np.ndarray,
                    rots: np.ndarray, valid: np.ndarray) -> np.ndarray:
        p, t = valid.shape
        pose = np.full((p, t, len(self.fitter.bones), 3), np.nan)
        if not self.config.init_limbs_from_world:
            return pose
        lim = self.fitter.limits
        spec = self.fitter.spec
        names = list(spec.bones)
        limits = {name: (lim.axes[k].cpu().double().numpy(), lim.low[k].cpu().double().numpy(),
                         lim.high[k].cpu().double().numpy()) for k, name in enumerate(names)}
        to_camera = self.fitter.km.to_camera.cpu().double().numpy()
        for i in range(p):
            limbs = limb_pose_from_world(rest_kp[i], world[i], w3[i] * valid[i][:, None],
                                         rots[i], to_camera, limits, spec.limb_segments,
                                         spec.hinge_bones)
            for bone, rv in limbs.items():
                pose[i, :, names.index(bone)] = rv
        return pose

    def _window(self, rots: np.ndarray, transl: np.ndarray, pose: np.ndarray,
                phenotype: np.ndarray) -> Window:
        dev, dt = self.body.device, self.body.dtype

        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(x), device=dev, dtype=dt).clone()

        return Window(tensor(pose), tensor(rots), torch.zeros(*rots.shape[:2], 3, device=dev,
                                                              dtype=dt),
                      tensor(transl), tensor(phenotype))

    def _fit_shapes(self, det: Detections, camera: np.ndarray) -> np.ndarray:
        """Each track's phenotype from up to shape_frames frames spread over the track."""
        cfg = self.config
        p = det.present.shape[1]
        frames = np.zeros((p, cfg.shape_frames), dtype=np.int64)
        for i in range(p):
            idx = np.flatnonzero(det.valid[:, i])
            if len(idx) == 0:
                idx = np.array([0])
            pick = np.linspace(0, len(idx) - 1, cfg.shape_frames).round().astype(int)
            frames[i] = idx[pick]
        tracks = np.arange(p)
        obs = self._observations(det, frames, tracks)
        # A frame picked twice (short tracks) counts once.
        for i in range(p):
            _, first = np.unique(frames[i], return_index=True)
            dup = np.ones(cfg.shape_frames, bool)
            dup[first] = False
            obs.valid[i, dup] = False
            obs.w2d[i, torch.as_tensor(dup)] = 0.0
            obs.w3d[i, torch.as_tensor(dup)] = 0.0
        phen = self._default_shape(p)
        rots, transl, limbs = self._init_window(obs, phen, camera)
        relaxed = self.fitter.relaxed.cpu().double().numpy()
        win = self._window(rots, transl, np.where(np.isnan(limbs), relaxed, limbs), phen)
        self.fitter.optimize(win, obs, None, fit_shape=True, temporal=False)
        return win.phenotype.detach().cpu().double().numpy()

    def _fit_window(self, det: Detections, camera: np.ndarray, track: Track, start: int,
                    stop: int, anchor: Anchor | None, fit_shape: bool) -> Anchor | None:
        window_valid = det.valid[start:stop]
        active = np.flatnonzero(window_valid.any(0))
        if len(active) == 0:
            return None
        frames = np.broadcast_to(np.arange(start, stop), (len(active), stop - start))
        obs = self._observations(det, frames, active)
        phen = track.phenotype[active]
        rots, transl, limbs = self._init_window(obs, phen, camera)
        relaxed = self.fitter.relaxed.cpu().double().numpy()
        pose = np.broadcast_to(relaxed, (len(active), stop - start, *relaxed.shape)).copy()
        sub_anchor = None
        if anchor is not None:
            # Keep the anchor rows of this window's active tracks, in their order.
            rows = torch.as_tensor(active, device=anchor.pose.device)
            sub_anchor = Anchor(anchor.pose[rows], anchor.orient[rows], anchor.transl[rows],
                                anchor.active[rows])
            carried = anchor.active[rows].cpu().numpy()
            last = anchor.pose[rows][:, -1].cpu().double().numpy()
            pose[carried] = last[carried][:, None]
        pose = np.where(np.isnan(limbs), pose, limbs)
        win = self._window(rots, transl, pose, phen)
        self.fitter.optimize(win, obs, sub_anchor, fit_shape=fit_shape, temporal=True)
        with torch.no_grad():
            orient = win.orientation()
        cols = active[None, :]
        span = np.arange(start, stop)[:, None]
        track.pose[span, cols] = win.pose.detach().cpu().double().numpy().transpose(1, 0, 2, 3)
        track.orient[span, cols] = orient.cpu().double().numpy().transpose(1, 0, 2, 3)
        track.transl[span, cols] = win.transl.detach().cpu().double().numpy().transpose(1, 0, 2)
        if fit_shape:
            track.phenotype[active] = win.phenotype.detach().cpu().double().numpy()
        return self._next_anchor(track, det, active, stop)

    def _next_anchor(self, track: Track, det: Detections, active: np.ndarray,
                     stop: int) -> Anchor | None:
        if stop < 2:
            return None
        dev, dt = self.body.device, self.body.dtype
        p = det.present.shape[1]
        flags = np.zeros(p, bool)
        flags[active] = True

        def tensor(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(x), device=dev, dtype=dt)

        last = slice(stop - 2, stop)
        return Anchor(tensor(track.pose[last].transpose(1, 0, 2, 3)),
                      tensor(track.orient[last].transpose(1, 0, 2, 3)),
                      tensor(track.transl[last].transpose(1, 0, 2)),
                      torch.as_tensor(flags, device=dev))

    def _default_shape(self, tracks: int) -> np.ndarray:
        """(P, K): the average shape (Anny: phenotype 0.5; SMPL family: betas 0)."""
        return self.body.default_shape(tracks).cpu().double().numpy()

    # -- output

    def _finish(self, det: Detections, track: Track, camera: np.ndarray,
                ) -> dict[str, np.ndarray]:
        """Fill the frames not fitted, then the joints and reprojection error of all."""
        t, p = det.present.shape
        for i in range(p):
            ok = det.valid[:, i]
            track.pose[:, i] = fill_gaps(ok, track.pose[:, i])
            track.transl[:, i] = fill_gaps(ok, track.transl[:, i])
            track.orient[:, i] = fill_rotations(ok, track.orient[:, i])
        joints = np.zeros((t, p, NUM_COCO, 3))
        dev, dt = self.body.device, self.body.dtype
        km = self.fitter.km
        with torch.no_grad():
            rest = km.rest(torch.as_tensor(track.phenotype, device=dev, dtype=dt))
            for start in range(0, t, self.config.chunk_frames):
                span = slice(start, min(start + self.config.chunk_frames, t))

                def tensor(x: np.ndarray) -> torch.Tensor:
                    return torch.as_tensor(np.ascontiguousarray(x), device=dev, dtype=dt)

                kp = km.keypoints(tensor(track.pose[span].swapaxes(0, 1)), rest,
                                  tensor(track.orient[span].swapaxes(0, 1)),
                                  tensor(track.transl[span].swapaxes(0, 1)))
                joints[span] = kp.cpu().double().numpy().swapaxes(0, 1)
        fx, fy, cx, cy = camera
        z = np.maximum(joints[..., 2], 1e-3)
        proj = np.stack([fx * joints[..., 0] / z + cx, fy * joints[..., 1] / z + cy], -1)
        dist = np.linalg.norm(proj - det.kp, axis=-1)
        seen = det.w2d > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            err = np.where(seen, dist, 0.0).sum(-1) / seen.sum(-1)
        err = np.where(det.present & (seen.sum(-1) > 0), err, np.nan)
        full = np.zeros((t, p, self.body.num_bones, 3))
        full[:, :, self.fitter.bones] = track.pose
        rotvec = Rotation.from_matrix(track.orient.reshape(-1, 3, 3)).as_rotvec()
        return {"pose": full, "root_orient": rotvec.reshape(t, p, 3), "transl": track.transl,
                "phenotype": track.phenotype, "joints3d": joints, "fit_error": err}

    def _write(self, out_dir: Path, det: Detections, track: Track | None,
               camera: np.ndarray) -> dict[str, Any]:
        t, p = det.present.shape
        j, k = self.body.num_bones, len(self.body.shape_labels)
        if track is None:
            arrays = {"pose": np.zeros((t, p, j, 3)), "root_orient": np.zeros((t, p, 3)),
                      "transl": np.zeros((t, p, 3)), "phenotype": np.zeros((p, k)),
                      "joints3d": np.zeros((t, p, NUM_COCO, 3)),
                      "fit_error": np.full((t, p), np.nan)}
        else:
            arrays = self._finish(det, track, camera)
        out = {name: value.astype(np.float32) for name, value in arrays.items()}
        out_dir.mkdir(parents=True, exist_ok=True)
        np.savez(out_dir / "bodies.npz", track_ids=det.track_ids.astype(np.int32),
                 present=det.present.astype(bool), camera=camera.astype(np.float32), **out)
        errors = out["fit_error"][det.present]
        errors = errors[np.isfinite(errors)]
        return {
            "body_model": self.body.kind,
            "tracks": int(p),
            "mean_fit_error_px": float(errors.mean()) if errors.size else None,
            "phenotype_labels": list(self.body.shape_labels),
        }


@contextmanager
def _cpu_threads(n: int | None) -> Iterator[None]:
    """Run with n torch threads: the fit's tensors are small (a few thousand numbers), and
    on CPU the threads' synchronization costs more than it saves."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _video_info(job: VideoJob) -> dict[str, int]:
    info = job.upstream.get("detect", {}).get("video")
    if not info:
        raise VideoFailed("fit: the detect summary has no video information")
    return {key: int(info[key]) for key in ("width", "height", "frame_count")}
