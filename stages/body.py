"""The Anny body model as fit, render and the sample generator use it.

Anny's native frame is Z-up, the person facing -Y, metres. Bodies here are posed in the
OpenCV camera frame (x right, y down, z forward): a body with zero root orientation stands
upright facing the camera. Pose is one axis-angle rotation per bone ("local-ref"
parameterization: relative to the bone's rest orientation); the root bone's rotation is
kept at identity and the global orientation and translation are applied rigidly about
the root bone, so fit and render agree on what `root_orient` and `transl` mean.

Loading builds Anny's cache on first use (about 0.8 GB, a minute or two; set
ANNY_CACHE_DIR to keep it somewhere stable); later loads take seconds. One model is kept
per (device, dtype) in the process.
"""

from __future__ import annotations

import functools
import os
import threading

import numpy as np
import torch

PHENOTYPE_LABELS = ("gender", "age", "muscle", "weight", "height", "proportions")

# Anny (Z-up, facing -Y) -> camera (y down, facing the camera, i.e. towards -z).
ANNY_TO_CAMERA = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])

# COCO-23 keypoint names of Anny's regressor, in its output order.
COCO23 = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
    "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip",
    "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle", "left_big_toe",
    "right_big_toe", "left_small_toe", "right_small_toe", "left_heel", "right_heel",
)

# BlazePose-33 index for each COCO-23 keypoint (BlazePose: 0 nose, 2/5 eyes, 7/8 ears,
# 11/12 shoulders, 13/14 elbows, 15/16 wrists, 23/24 hips, 25/26 knees, 27/28 ankles,
# 29/30 heels, 31/32 foot index). Small toes have no BlazePose counterpart (-1).
BLAZEPOSE_FOR_COCO23 = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28,
                        31, 32, -1, -1, 29, 30)

_lock = threading.Lock()


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, differentiable at zero. (..., 3) -> (..., 3, 3)."""
    angle2 = (rotvec * rotvec).sum(-1, keepdim=True)
    angle = torch.sqrt(angle2 + 1e-12)
    axis = rotvec / angle
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*rotvec.shape[:-1], 3, 3)
    s = torch.sin(angle)[..., None]
    c = torch.cos(angle)[..., None]
    eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device).expand_as(k)
    return eye + s * k + (1 - c) * (k @ k)


def place_in_camera(
    points: tuple[torch.Tensor, ...],  # each (B, N, 3) in the model's frame
    root: torch.Tensor,  # (B, 3) the model-frame point that `transl` places
    to_camera: torch.Tensor,  # (3, 3) model frame -> upright camera frame
    root_orient: torch.Tensor | None,  # (B, 3) axis-angle in the camera frame
    transl: torch.Tensor | None,  # (B, 3) camera coordinates of the root
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Rotate the points rigidly about the root and put the root at `transl`."""
    b, dtype, device = root.shape[0], root.dtype, root.device
    glob = to_camera.to(device, dtype).expand(b, 3, 3)
    if root_orient is not None:
        glob = axis_angle_to_matrix(root_orient.to(device, dtype)) @ glob
    t = torch.zeros(b, 3, device=device, dtype=dtype) if transl is None else \
        transl.to(device, dtype)
    placed = tuple((x - root[:, None]) @ glob.transpose(1, 2) + t[:, None] for x in points)
    return placed, t


class AnnyBody:
    """A loaded Anny model with a batched, differentiable forward in camera coordinates."""

    kind = "anny"

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        import anny  # deferred: importing anny initializes warp (slow, noisy)

        self.device = torch.device(device)
        self.dtype = dtype
        model = anny.Anny()
        self.model = model.to(device=self.device, dtype=dtype)
        self.keypoints = anny.KeypointsRegressor.coco(self.model).to(self.device, dtype)
        self.bone_labels: list[str] = list(self.model.bone_labels)
        self.num_bones = len(self.bone_labels)
        self.faces = self.model.get_triangular_faces().cpu().numpy().astype(np.int64)
        self.phenotype_labels = tuple(self.model.phenotype_labels)
        self._to_cam = ANNY_TO_CAMERA.to(self.device, dtype)

    def bone_index(self, label: str) -> int:
        return self.bone_labels.index(label)

    @property
    def shape_labels(self) -> tuple[str, ...]:
        """Names of the shape vector's entries (the phenotype for Anny)."""
        return self.phenotype_labels

    def default_shape(self, batch: int = 1) -> torch.Tensor:
        return self.default_phenotype(batch)

    def default_phenotype(self, batch: int = 1) -> torch.Tensor:
        return torch.full((batch, len(self.phenotype_labels)), 0.5, device=self.device,
                          dtype=self.dtype)

    def forward(
        self,
        pose: torch.Tensor,  # (B, J, 3) axis-angle per bone; pose[:, 0] is ignored
        phenotype: torch.Tensor,  # (B, K) in [0, 1], order self.phenotype_labels
        root_orient: torch.Tensor | None = None,  # (B, 3) axis-angle in the camera frame
        transl: torch.Tensor | None = None,  # (B, 3) camera coords of the root bone
    ) -> dict[str, torch.Tensor]:
        """Vertices (B, V, 3) and COCO-23 keypoints (B, 23, 3) in camera coordinates."""
        b = pose.shape[0]
        rot = axis_angle_to_matrix(pose.to(self.device, self.dtype))
        eye = torch.eye(3, device=self.device, dtype=self.dtype)
        rot = torch.cat([eye.expand(b, 1, 3, 3), rot[:, 1:]], dim=1)
        homog = torch.zeros(b, self.num_bones, 4, 4, device=self.device, dtype=self.dtype)
        homog[..., :3, :3] = rot
        homog[..., 3, 3] = 1.0
        phen = phenotype.to(self.device, self.dtype).clamp(0.0, 1.0)
        kwargs = {label: phen[:, i] for i, label in enumerate(self.phenotype_labels)}
        out = self.model(pose_parameters=homog, phenotype_kwargs=kwargs)
        verts = out["vertices"]
        kps = self.keypoints(out)
        root = out["bone_poses"][:, 0, :3, 3]
        (verts, kps), t = place_in_camera((verts, kps), root, self._to_cam, root_orient, transl)
        return {"vertices": verts, "keypoints": kps, "root": t}

    __call__ = forward


@functools.lru_cache(maxsize=4)
def _cached(device: str, dtype: torch.dtype) -> AnnyBody:
    return AnnyBody(device, dtype)


def load_body(device: str = "cpu", dtype: torch.dtype = torch.float32) -> AnnyBody:
    """The process-wide Anny model for this device and dtype (built once)."""
    os.environ.setdefault("ANNY_CACHE_DIR", os.path.expanduser("~/.cache/avatarize/anny"))
    with _lock:
        return _cached(str(torch.device(device)), dtype)


def resolve_device(setting: str) -> str:
    """`auto` -> cuda when available, else cpu."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting
