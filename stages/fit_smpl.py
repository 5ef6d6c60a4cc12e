"""The fit stage's description of SMPL, SMPL-H and SMPL-X bodies (stages.smpl_family).

stages/fit.py fits every body model with one SMPLify-style optimizer; a `BodySpec` tells
it what differs per model. For the SMPL family, against Anny's (stages/fit.py):

- frame: Y up, the body facing +Z, its left towards +X (Anny: Z up, facing -Y); the
  camera frame is reached through smpl_family.SMPL_TO_CAMERA.
- rest pose: a T-pose with straight elbows (Anny: arms 45 degrees down, elbows bent 36
  degrees). The relaxed stance the pose prior pulls to (arms at the sides, elbows a little
  bent) therefore lowers the arms by about 1.4 rad and bends the elbows about 0.4 rad, and
  the arm ranges are Anny's shifted by that rest-pose difference (ARM_REST, ELBOW_REST).
- joints: three spine joints instead of Anny's five; each gets 5/3 of an Anny spine bone's
  range and 3/5 of its stiffness, so a bend spread over the spine costs and reaches the
  same. Then neck, head, collars, shoulders (upper arms), elbows (hinges), wrists, hips,
  knees (hinges), ankles; hands, fingers, jaw and eyes stay at zero.
- shape: betas ~ N(0, 1), so the shape prior pulls them towards 0 and they are clamped to
  |beta| <= BETA_BOUND (Anny: the phenotype towards 0.5, clamped to [0, 1]).
- keypoints (SmplKeypointModel): COCO-23 are smplx's kinematic joints (hips, knees,
  ankles, shoulders, elbows, wrists) and vertex keypoints (nose, eyes, ears, toes, heels),
  both exact blends of joint transforms; pose-corrective blend shapes (posedirs) are left
  out of this fast path: the kinematic joints never depend on them, the vertex keypoints
  move by millimetres.
"""

from __future__ import annotations

import math

import torch

from stages.fit import (
    FACE,
    L_SHOULDER,
    R_SHOULDER,
    TORSO,
    BodySpec,
    BoneKeypointModel,
    JointRange,
    RestBody,
    Vec,
)
from stages.smpl_family import SMPL_TO_CAMERA, SmplFamilyBody, coco23_indices

# The body joints every model of the family shares, in smplx's order.
SMPL_JOINTS = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist",
)
SIDES = (("left", "L"), ("right", "R"))

# Directions in SMPL's frame (Y up, the body facing +Z, its left towards +X).
FORWARD, BACKWARD, UP = (0.0, 0.0, 1.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)
LEFT, RIGHT = (1.0, 0.0, 0.0), (-1.0, 0.0, 0.0)
SIDE_DIR = {"left": LEFT, "right": RIGHT}

# Anny's rest pose against SMPL's: its arms hang 45 degrees below SMPL's horizontal ones
# (abduction), its elbows are bent 36 degrees where SMPL's are straight (flexion).
ARM_REST = math.pi / 4
ELBOW_REST = math.radians(36.0)
# Anny spreads a spine bend over five bones, SMPL over three.
SPINE_SHARE = 5.0 / 3.0
BETA_BOUND = 3.0  # |beta| beyond 3 standard deviations is no body the model was fit to

# Optimized joints and their pose-prior stiffness (relative to fit.w_pose_prior), as
# Anny's BODY_BONES.
SMPL_BONES: dict[str, float] = {
    "spine1": 8.0 / SPINE_SHARE, "spine2": 8.0 / SPINE_SHARE, "spine3": 8.0 / SPINE_SHARE,
    "neck": 4.0, "head": 4.0,
    "left_collar": 10.0, "right_collar": 10.0,
    "left_shoulder": 0.5, "right_shoulder": 0.5,
    "left_elbow": 0.5, "right_elbow": 0.5,
    "left_wrist": 4.0, "right_wrist": 4.0,
    "left_hip": 0.5, "right_hip": 0.5,
    "left_knee": 0.5, "right_knee": 0.5,
    "left_ankle": 8.0, "right_ankle": 8.0,
}
# The COCO-23 keypoints at the far end of each joint's segment (Anny's BONE_ENDS).
SMPL_BONE_ENDS: dict[str, tuple[int, ...]] = {
    "spine1": TORSO[:2], "spine2": TORSO[:2], "spine3": TORSO[:2], "neck": FACE, "head": FACE,
    "left_collar": (L_SHOULDER,), "right_collar": (R_SHOULDER,),
    "left_shoulder": (7,), "right_shoulder": (8,), "left_elbow": (9,), "right_elbow": (10,),
    "left_wrist": (), "right_wrist": (),
    "left_hip": (13,), "right_hip": (14,), "left_knee": (15,), "right_knee": (16,),
    "left_ankle": (17, 19, 21), "right_ankle": (18, 20, 22),
}
# Hinges: elbow flexion swings the forearm forward, knee flexion the shin backward.
SMPL_HINGES: tuple[tuple[str, str, Vec], ...] = (
    ("left_elbow", "left_wrist", FORWARD), ("right_elbow", "right_wrist", FORWARD),
    ("left_knee", "left_ankle", BACKWARD), ("right_knee", "right_ankle", BACKWARD),
)
# Anny's relaxed stance (arms at the sides, elbows bent ~22 degrees) from SMPL's T-pose.
SMPL_RELAXED: dict[str, Vec] = {
    **{f"{s}_shoulder": (0.0, -0.6 - ARM_REST, 0.0) for s in ("left", "right")},
    **{f"{s}_elbow": (ELBOW_REST - 0.25, 0.0, 0.0) for s in ("left", "right")},
}


def _spine(range_: tuple[float, float]) -> tuple[float, float]:
    return (range_[0] * SPINE_SHARE, range_[1] * SPINE_SHARE)


# Anny's JOINT_RANGES in SMPL's joints and frame, shifted by the rest-pose difference.
SMPL_JOINT_RANGES: dict[str, JointRange] = {
    **{name: ((name, nxt), FORWARD, LEFT,
              (_spine((-0.12, 0.3)), _spine((-0.12, 0.12)), _spine((-0.15, 0.15))))
       for name, nxt in (("spine1", "spine2"), ("spine2", "spine3"), ("spine3", "neck"))},
    "neck": (("neck", "head"), FORWARD, LEFT, ((-0.5, 0.6), (-0.4, 0.4), (-0.7, 0.7))),
    "head": (UP, FORWARD, LEFT, ((-0.4, 0.5), (-0.3, 0.3), (-0.6, 0.6))),
    **{f"{s}_collar": ((f"{s}_collar", f"{s}_shoulder"), FORWARD, UP,
                       ((-0.3, 0.3), (-0.2, 0.45), (-0.3, 0.3))) for s, _ in SIDES},
    **{f"{s}_shoulder": ((f"{s}_shoulder", f"{s}_elbow"), FORWARD, UP,
                         ((-1.0, 2.9), (-0.9 - ARM_REST, 2.4 - ARM_REST), (-1.5, 1.5)))
       for s, _ in SIDES},
    **{f"{s}_elbow": ((f"{s}_elbow", f"{s}_wrist"), FORWARD, UP,
                      ((-0.65 + ELBOW_REST, 2.5 + ELBOW_REST), (-9.0, 9.0), (-9.0, 9.0)))
       for s, _ in SIDES},
    **{f"{s}_wrist": ((f"{s}_elbow", f"{s}_wrist"), FORWARD, UP,
                      ((-1.2, 1.2), (-0.5, 0.5), (-0.4, 0.4))) for s, _ in SIDES},
    **{f"{s}_hip": ((f"{s}_hip", f"{s}_knee"), FORWARD, SIDE_DIR[s],
                    ((-0.5, 2.3), (-0.45, 0.9), (-0.7, 0.7))) for s, _ in SIDES},
    **{f"{s}_knee": ((f"{s}_knee", f"{s}_ankle"), BACKWARD, SIDE_DIR[s],
                     ((-0.05, 2.6), (-9.0, 9.0), (-9.0, 9.0))) for s, _ in SIDES},
    **{f"{s}_ankle": (FORWARD, UP, SIDE_DIR[s],
                      ((-0.9, 0.6), (-0.35, 0.35), (-0.35, 0.35))) for s, _ in SIDES},
}
# Limb joints initialized from BlazePose's world landmarks (Anny's LIMB_SEGMENTS).
SMPL_LIMB_SEGMENTS: tuple[tuple[str, str | None, tuple[int, int]], ...] = (
    ("left_shoulder", None, (5, 7)), ("left_elbow", "left_shoulder", (7, 9)),
    ("right_shoulder", None, (6, 8)), ("right_elbow", "right_shoulder", (8, 10)),
    ("left_hip", None, (11, 13)), ("left_knee", "left_hip", (13, 15)),
    ("right_hip", None, (12, 14)), ("right_knee", "right_hip", (14, 16)),
)


class SmplKeypointModel(BoneKeypointModel):
    """SmplFamilyBody's COCO-23 keypoints for poses of a few joints (BoneKeypointModel).

    SMPL's pose has the structure of Anny's local-ref one with identity rest frames: joint
    j's transform is A_j = A_parent [R_j | (I - R_j) J_j], J_j the rest joint
    (J_regressor applied to v_template + shapedirs . betas). A kinematic joint's keypoint
    is A_j [J_j; 1]; a vertex keypoint is sum_j w_vj A_j [v; 1] (without posedirs). Both
    are blends of joint transforms, linear in the betas: a = a0 + betas . a_n. Coordinates
    are taken relative to the pelvis joint, which SmplFamilyBody.forward places at
    `transl` (the translation commutes with the chain).
    """

    def __init__(self, body: SmplFamilyBody, bones: list[int]):
        self.body = body
        model = body.model
        dev, dt = body.device, body.dtype
        nj = body.num_bones
        with torch.no_grad():
            template = model.v_template.to(dev, dt)  # (V, 3)
            shapedirs = model.shapedirs.to(dev, dt)  # (V, 3, N)
            jreg = model.J_regressor.to(dev, dt)  # (J, V)
            weights = model.lbs_weights.to(dev, dt)  # (V, J)
            self.j0 = jreg @ template  # (J, 3) rest joints at betas 0
            self.jn = torch.einsum("jv,vcn->njc", jreg, shapedirs)  # (N, J, 3)
            extra = model.vertex_joint_selector.extra_joints_idxs.to(dev)
            coco = coco23_indices(body.model_type)
            # Kinematic keypoints select rest joints, vertex keypoints rest vertices.
            verts = torch.stack([extra[i - nj] for i in coco if i >= nj])
            self.v0 = template[verts]  # (E, 3)
            self.vn = shapedirs[verts].permute(2, 0, 1)  # (N, E, 3)
            n_vert = 0
            source, carry = [], torch.zeros(len(coco), nj, device=dev, dtype=dt)
            for k, i in enumerate(coco):
                if i < nj:
                    source.append(i)
                    carry[k, i] = 1.0
                else:
                    source.append(nj + n_vert)
                    carry[k] = weights[verts[n_vert]]
                    n_vert += 1
        self.source = torch.tensor(source, device=dev)  # into cat(joints, vertex keypoints)
        parents = [int(x) for x in model.parents]
        super().__init__(parents, nj, bones, SMPL_TO_CAMERA, dev, dt)
        self.carry = carry @ self.member  # (K, O + 1): each keypoint's weight per group

    def rest(self, betas: torch.Tensor) -> RestBody:
        b = betas.to(self.body.device, self.body.dtype)
        joints = self.j0 + torch.einsum("pn,njc->pjc", b, self.jn)  # (P, J, 3)
        verts = self.v0 + torch.einsum("pn,nec->pec", b, self.vn)  # (P, E, 3)
        root = joints[:, :1]
        points = torch.cat([joints, verts], 1)[:, self.source] - root  # (P, K, 3)
        homog = torch.cat([points, torch.ones_like(points[..., :1])], -1)
        blend = homog[:, :, None, :] * self.carry[None, :, :, None]  # (P, K, O + 1, 4)
        return RestBody(joints[:, self.bones] - root, blend)


def smpl_spec(body: SmplFamilyBody) -> BodySpec:
    """The fitter's description of an SMPL, SMPL-H or SMPL-X body."""
    return BodySpec(body.kind, SMPL_BONES, SMPL_BONE_ENDS, SMPL_HINGES, SMPL_RELAXED,
                    SMPL_JOINT_RANGES, SMPL_LIMB_SEGMENTS, 0.0, (-BETA_BOUND, BETA_BOUND),
                    SMPL_JOINTS.index, lambda bones: SmplKeypointModel(body, bones))
