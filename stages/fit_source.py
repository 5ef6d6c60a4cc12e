"""Bring your own poses: per-frame SMPL / SMPL-H / SMPL-X parameters from another tool.

With `fit.source: file` the fit stage does not optimize: it reads the body parameters that
a pose estimator (HMR2 / 4D-Humans, VIBE, WHAM, SMPLer-X, ...) wrote for each video and
turns them into fit's `bodies.npz` (see stages/__init__.py). `body.model` selects the
model (smpl | smplh | smplx) and `body.model_path` its files, as for fitting.

File format: one NPZ per video at `<fit.source_dir>/<video id>.npz`, the video id being the
video's path relative to the input folder without its extension (the folder mirrors the
input layout: `source/walk/clip01.npz` for `input/walk/clip01.mp4`). The arrays use the
OpenCV camera frame (x right, y down, z forward, metres), as these tools write them. T is
the video's frame count, P the number of people, B the number of shape coefficients.

    body_model      str               smpl | smplh | smplx; must equal body.model
    betas           [P, B] or [B]     shape coefficients, B <= body.num_betas (the missing
                                      ones are 0); [B] gives every person the same shape
    global_orient   [T, P, 3]         axis-angle, body-model frame -> camera frame (an
                                      upright person facing the camera is about (pi, 0, 0))
    body_pose       [T, P, 63 | 69]   or [T, P, 21 | 23, 3]: joints 1.. of the kinematic
                                      tree; 69 (23 joints, with SMPL's two hand joints) for
                                      smpl only, whose 63-value form leaves the hands at 0
    transl          [T, P, 3]         smplx's `transl`: added after global_orient, which
                                      rotates the body about its pelvis joint
    left_hand_pose, right_hand_pose  [T, P, 45] or [T, P, 15, 3], optional (smplh, smplx):
                                      full axis-angle per finger joint, not PCA; default 0
    jaw_pose, leye_pose, reye_pose   [T, P, 3], optional (smplx); default 0
    present         [T, P] bool       optional; default: the rows whose values are all finite
    track_ids       [P] int           optional; default 0 .. P-1
    camera          [4]               optional fx, fy, cx, cy in pixels; default: fit.fov_deg
                                      and the principal point at the image centre

A single person may drop the P axis everywhere ([T, 3], [T, 63], [B], [T] ...); the file
counts as single-person when `global_orient` is [T, 3]. A row (frame, person) with any
NaN or infinite value counts as absent when `present` is not given; values of absent rows
are ignored (fit fills them in from the neighbouring frames, as it does for frames it
could not fit). Other keys (expression, vertices, a tool's own camera fields) are
ignored, and so are parameters the model does not have (hand poses for smpl, jaw and eyes
for smplh); SMPL-X expressions are not carried (avatars get the neutral face).
`save_body_params` writes this format from your own arrays. Files are read without pickle:
a file holding Python objects is refused.

Conversion to fit's convention (stages/body.py `place_in_camera`): there the fixed
SMPL_TO_CAMERA rotation S and then `root_orient` rotate the body about its root joint J0,
which lands at `transl`. smplx computes R_file (v - J0) + J0 + transl_file, so
root_orient = R_file S^T and transl = J0(betas) + transl_file.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.spatial.transform import Rotation

from pipeline.stage import VideoFailed
from stages.fit import fill_gaps, fill_rotations
from stages.smpl_family import NUM_JOINTS, SMPL_TO_CAMERA

MODELS = ("smpl", "smplh", "smplx")
NUM_COCO = 23
FORWARD_BATCH = 256  # bodies per forward pass when computing joints3d (bounds memory)

# Per model: the per-frame pose keys, their joint counts allowed in the file (the first is
# the model's own), where they go in fit's pose (J, 3), and whether the key is required.
PoseKey = tuple[str, tuple[int, ...], int, bool]
POSE_KEYS: dict[str, tuple[PoseKey, ...]] = {
    "smpl": (("body_pose", (23, 21), 1, True),),
    "smplh": (("body_pose", (21,), 1, True), ("left_hand_pose", (15,), 22, False),
              ("right_hand_pose", (15,), 37, False)),
    "smplx": (("body_pose", (21,), 1, True), ("jaw_pose", (1,), 22, False),
              ("leye_pose", (1,), 23, False), ("reye_pose", (1,), 24, False),
              ("left_hand_pose", (15,), 25, False), ("right_hand_pose", (15,), 40, False)),
}


def source_path(source_dir: Path, video_id: str) -> Path:
    """Where the parameters of a video live: `<source_dir>/<video id>.npz`."""
    return Path(source_dir) / f"{video_id}.npz"


# ----------------------------------------------------------------------------- writing


def save_body_params(
    path: Path,
    body_model: str,
    betas: np.ndarray,
    global_orient: np.ndarray,
    body_pose: np.ndarray,
    transl: np.ndarray,
    *,
    present: np.ndarray | None = None,
    track_ids: Sequence[int] | np.ndarray | None = None,
    camera: Sequence[float] | np.ndarray | None = None,
    **optional_poses: np.ndarray,
) -> Path:
    """Write body parameters in the format above (creates the folder); returns the path.

    `optional_poses` takes left_hand_pose, right_hand_pose, jaw_pose, leye_pose and
    reye_pose. Shapes are written as given, so both the multi-person and the single-person
    forms come out as they went in; `load_body_params` checks them."""
    if body_model not in MODELS:
        raise ValueError(f"body_model must be one of {MODELS}, not {body_model!r}")
    known = {k for keys in POSE_KEYS.values() for k, *_ in keys} - {"body_pose"}
    unknown = set(optional_poses) - known
    if unknown:
        raise ValueError(f"unknown pose keys {sorted(unknown)}; known: {sorted(known)}")
    arrays: dict[str, np.ndarray] = {
        "body_model": np.array(body_model),
        "betas": np.asarray(betas, np.float32),
        "global_orient": np.asarray(global_orient, np.float32),
        "body_pose": np.asarray(body_pose, np.float32),
        "transl": np.asarray(transl, np.float32),
    }
    arrays.update({k: np.asarray(v, np.float32) for k, v in optional_poses.items()})
    if present is not None:
        arrays["present"] = np.asarray(present, bool)
    if track_ids is not None:
        arrays["track_ids"] = np.asarray(track_ids, np.int64)
    if camera is not None:
        arrays["camera"] = np.asarray(camera, np.float64)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


# ----------------------------------------------------------------------------- reading


class _File:
    """The arrays of one parameter file, with errors that name it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.arrays = self._read()

    def fail(self, message: str) -> VideoFailed:
        return VideoFailed(f"fit.source file {self.path}: {message}")

    def _read(self) -> dict[str, np.ndarray]:
        if not self.path.is_file():
            raise self.fail("does not exist (expected <fit.source_dir>/<video id>.npz)")
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        except ValueError as exc:  # numpy refuses object arrays without pickle
            raise self.fail(f"holds Python objects (pickle), which are refused: {exc}") from exc
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise self.fail(f"not a readable NPZ file: {exc}") from exc

    def get(self, key: str) -> np.ndarray | None:
        return self.arrays.get(key)

    def require(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise self.fail(f"missing key '{key}' (has {sorted(self.arrays)})")
        return self.arrays[key]

    def numeric(self, key: str, value: np.ndarray) -> np.ndarray:
        if value.dtype.kind not in "fiub":
            raise self.fail(f"'{key}' has dtype {value.dtype}, expected numbers")
        return value.astype(np.float64)


def _body_model(src: _File, expected_model: str) -> str:
    raw = src.require("body_model")
    if raw.dtype.kind not in "US" or raw.size != 1:
        raise src.fail(f"'body_model' must be one string (smpl | smplh | smplx), got "
                       f"{raw.dtype} {raw.shape}")
    value = raw.reshape(()).item()
    model = (value.decode() if isinstance(value, bytes) else str(value)).strip().lower()
    if model not in MODELS:
        raise src.fail(f"'body_model' is {model!r}, expected smpl | smplh | smplx")
    if model != expected_model:
        raise src.fail(f"'body_model' is {model} but body.model is {expected_model}: "
                       "set body.model to the file's model (and body.model_path to its files)")
    return model


def _per_frame(src: _File, key: str, value: np.ndarray, t: int, p: int, single: bool,
               joints: tuple[int, ...]) -> np.ndarray:
    """A per-frame rotation key as (T, P, n, 3), n one of `joints`."""
    lead = (t,) if single else (t, p)
    shape = value.shape
    rest = shape[len(lead):]
    n = None
    if shape[:len(lead)] == lead:
        if len(rest) == 1 and rest[0] % 3 == 0 and rest[0] // 3 in joints:
            n = rest[0] // 3
        elif len(rest) == 2 and rest[1] == 3 and rest[0] in joints:
            n = rest[0]
    if n is None:
        forms = " or ".join(f"{list(lead) + [3 * j]}" for j in joints)
        raise src.fail(f"'{key}' has shape {list(shape)}, expected {forms} (or the same with "
                       "a last axis of 3 per joint)")
    return src.numeric(key, value).reshape(t, p, n, 3)


def _vector(src: _File, key: str, t: int, p: int, single: bool) -> np.ndarray:
    """A required per-frame 3-vector key as (T, P, 3)."""
    value = src.require(key)
    lead = (t, 3) if single else (t, p, 3)
    if value.shape != lead:
        raise src.fail(f"'{key}' has shape {list(value.shape)}, expected {list(lead)}")
    return src.numeric(key, value).reshape(t, p, 3)


def _layout(src: _File, frame_count: int) -> tuple[int, int, bool]:
    """(T, P, single-person) from global_orient; T must be the video's frame count."""
    orient = src.require("global_orient")
    if orient.ndim == 2 and orient.shape[1] == 3:
        t, p, single = orient.shape[0], 1, True
    elif orient.ndim == 3 and orient.shape[2] == 3:
        t, p, single = orient.shape[0], orient.shape[1], False
    else:
        raise src.fail(f"'global_orient' has shape {list(orient.shape)}, expected [T, P, 3] "
                       "or [T, 3]")
    if t != frame_count:
        raise src.fail(f"'global_orient' has {t} frames, the video has {frame_count}")
    return t, p, single


def _betas(src: _File, p: int, single: bool, num_betas: int) -> np.ndarray:
    raw = src.require("betas")
    if raw.ndim == 1 or (raw.ndim == 2 and raw.shape[0] == 1):
        betas = np.broadcast_to(raw.reshape(1, -1), (p, raw.shape[-1]))
    elif raw.ndim == 2 and raw.shape[0] == p and not single:
        betas = raw
    else:
        raise src.fail(f"'betas' has shape {list(raw.shape)}, expected [{p}, B] or [B]")
    if betas.shape[1] > num_betas:
        raise src.fail(f"'betas' has {betas.shape[1]} coefficients, body.num_betas is "
                       f"{num_betas}: raise body.num_betas")
    out = np.zeros((p, num_betas))
    out[:, :betas.shape[1]] = src.numeric("betas", np.asarray(betas))
    return out


def _present(src: _File, values: dict[str, np.ndarray], t: int, p: int,
             single: bool) -> np.ndarray:
    """Given `present` (checked against the values) or the rows whose values are finite."""
    finite = np.ones((t, p), bool)
    for value in values.values():
        finite &= np.isfinite(value).reshape(t, p, -1 if p else 0).all(-1)
    raw = src.get("present")
    if raw is None:
        return finite
    lead = (t,) if single else (t, p)
    if raw.shape != lead or raw.dtype.kind not in "biu":
        raise src.fail(f"'present' is {raw.dtype} {list(raw.shape)}, expected bool {list(lead)}")
    present = raw.astype(bool).reshape(t, p)
    bad = present & ~finite
    if bad.any():
        f, i = np.argwhere(bad)[0]
        keys = [k for k, v in values.items() if not np.isfinite(v[f, i]).all()]
        raise src.fail(f"non-finite values in {keys} at frame {f}, person {i}, which "
                       f"'present' marks present ({int(bad.sum())} such rows)")
    return present


def _track_ids(src: _File, p: int) -> np.ndarray:
    raw = src.get("track_ids")
    if raw is None:
        return np.arange(p, dtype=np.int32)
    if raw.dtype.kind not in "iu" or raw.size != p or raw.ndim > 1:
        raise src.fail(f"'track_ids' is {raw.dtype} {list(raw.shape)}, expected int [{p}]")
    ids = raw.reshape(p).astype(np.int32)
    if len(np.unique(ids)) != p:
        raise src.fail(f"'track_ids' are not unique: {ids.tolist()}")
    return ids


def _camera(src: _File, default_camera: np.ndarray) -> np.ndarray:
    raw = src.get("camera")
    if raw is None:
        return np.asarray(default_camera, np.float64)
    cam = src.numeric("camera", raw).reshape(-1) if raw.size == 4 else None
    if cam is None or not np.isfinite(cam).all() or cam[0] <= 0 or cam[1] <= 0:
        raise src.fail(f"'camera' must be 4 finite numbers fx > 0, fy > 0, cx, cy; got "
                       f"{raw.tolist()}")
    return cam


def _pose(src: _File, model: str, t: int, p: int, single: bool) -> dict[str, np.ndarray]:
    """Every per-frame pose key of the model, as (T, P, n, 3), by key."""
    out = {}
    for key, joints, _, required in POSE_KEYS[model]:
        value = src.require(key) if required else src.get(key)
        if value is not None:
            out[key] = _per_frame(src, key, value, t, p, single, joints)
    return out


def _assemble_pose(model: str, poses: dict[str, np.ndarray], num_bones: int) -> np.ndarray:
    """fit's pose (T, P, J, 3): joint 0 zero (root_orient places the body), the rest from
    the file's keys at their place in the kinematic tree, 0 where a key is not given."""
    t, p = poses["body_pose"].shape[:2]
    pose = np.zeros((t, p, num_bones, 3))
    for key, _, start, _ in POSE_KEYS[model]:
        if key in poses:
            n = poses[key].shape[2]
            pose[:, :, start:start + n] = poses[key]
    return pose


def _root_joint(body: Any, betas: np.ndarray) -> np.ndarray:
    """J0(betas), the pelvis joint in the body model's frame (P, 3); it depends on the
    shape only, and smplx's global_orient rotates the body about it."""
    from smplx.lbs import blend_shapes, vertices2joints

    model = body.model
    with torch.no_grad():
        b = torch.as_tensor(betas, dtype=model.shapedirs.dtype, device=model.shapedirs.device)
        shaped = model.v_template + blend_shapes(b, model.shapedirs)
        joints = vertices2joints(model.J_regressor, shaped)
    return joints[:, 0].double().cpu().numpy()


def _fill_absent(present: np.ndarray, pose: np.ndarray, orient: np.ndarray,
                 transl: np.ndarray) -> None:
    """In place: absent rows from the neighbouring frames (as fit fills unfitted frames),
    0 / identity for a person never present."""
    t, p = present.shape
    for i in range(p):
        ok = present[:, i]
        pose[~ok, i] = 0.0
        transl[~ok, i] = 0.0
        orient[~ok, i] = np.eye(3)
        pose[:, i] = fill_gaps(ok, pose[:, i])
        transl[:, i] = fill_gaps(ok, transl[:, i])
        orient[:, i] = fill_rotations(ok, orient[:, i])


def _joints3d(body: Any, pose: np.ndarray, shape: np.ndarray, orient: np.ndarray,
              transl: np.ndarray) -> np.ndarray:
    """COCO-23 keypoints in camera coordinates (T, P, 23, 3) from body.forward, in batches."""
    t, p, j, _ = pose.shape
    flat_pose = pose.reshape(t * p, j, 3)
    flat_shape = np.broadcast_to(shape[None], (t, *shape.shape)).reshape(t * p, shape.shape[1])
    flat_orient, flat_transl = orient.reshape(t * p, 3), transl.reshape(t * p, 3)
    out = np.zeros((t * p, NUM_COCO, 3))
    dev, dt = body.device, body.dtype

    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(x), device=dev, dtype=dt)

    with torch.no_grad():
        for start in range(0, t * p, FORWARD_BATCH):
            s = slice(start, start + FORWARD_BATCH)
            res = body.forward(tensor(flat_pose[s]), tensor(flat_shape[s]),
                               tensor(flat_orient[s]), tensor(flat_transl[s]))
            out[s] = res["keypoints"].double().cpu().numpy()
    return out.reshape(t, p, NUM_COCO, 3)


def load_body_params(path: Path, body: Any, frame_count: int, default_camera: np.ndarray,
                     expected_model: str) -> dict[str, np.ndarray]:
    """Read a parameter file (format above) into the arrays of fit's bodies.npz.

    `body` is the loaded SmplFamilyBody of `expected_model` (body.model). Returns
    track_ids, present, pose, root_orient, transl, phenotype (the betas), joints3d,
    camera and fit_error (all NaN: see `reprojection_error`), with fit's dtypes. Every
    problem with the file raises VideoFailed naming the file and the key."""
    src = _File(path)
    if expected_model not in MODELS:
        raise src.fail(f"fit.source: file reads SMPL-family parameters, but body.model is "
                       f"{expected_model}: set body.model to smpl, smplh or smplx")
    model = _body_model(src, expected_model)
    t, p, single = _layout(src, frame_count)
    num_bones = NUM_JOINTS[model]
    betas = _betas(src, p, single, int(body.num_betas))
    values = {"global_orient": _vector(src, "global_orient", t, p, single),
              "transl": _vector(src, "transl", t, p, single),
              **_pose(src, model, t, p, single)}
    present = _present(src, values, t, p, single)
    used = present.any(0)
    if not np.isfinite(betas[used]).all():
        raise src.fail("'betas' has non-finite values for a person who is present")
    betas[~used] = 0.0
    pose = _assemble_pose(model, values, num_bones)
    # root_orient = R_file S^T, transl = J0 + transl_file (module docstring).
    orient_file = values["global_orient"].reshape(-1, 3)
    finite = np.isfinite(orient_file).all(-1)
    r_file = np.broadcast_to(np.eye(3), (t * p, 3, 3)).copy()
    r_file[finite] = Rotation.from_rotvec(orient_file[finite]).as_matrix()
    orient = (r_file @ SMPL_TO_CAMERA.double().numpy().T).reshape(t, p, 3, 3)
    transl = _root_joint(body, betas)[None] + values["transl"]
    _fill_absent(present, pose, orient, transl)
    root_orient = Rotation.from_matrix(orient.reshape(-1, 3, 3)).as_rotvec().reshape(t, p, 3)
    joints = _joints3d(body, pose, betas, root_orient, transl)
    floats = {"pose": pose, "root_orient": root_orient, "transl": transl, "phenotype": betas,
              "joints3d": joints, "fit_error": np.full((t, p), np.nan),
              "camera": _camera(src, default_camera)}
    return {"track_ids": _track_ids(src, p), "present": present,
            **{k: v.astype(np.float32) for k, v in floats.items()}}


# ----------------------------------------------------------------------------- checking


def reprojection_error(joints3d: np.ndarray, present: np.ndarray, camera: np.ndarray,
                       keypoints: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean reprojection error (px) of each body against the detected person it matches.

    joints3d (T, P, 23, 3) and present (T, P) are the loaded bodies; keypoints (T, Q, 23, 2)
    and weights (T, Q, 23) are the detections mapped to COCO-23 (fit's Detections.kp and
    .w2d, or map_blazepose), a keypoint counting as seen where its weight is above 0. The
    file's people and the detector's tracks need not share ids (nor count): in each frame
    bodies and detections are paired by least total error (Hungarian), and a body's error
    is the mean pixel distance over its pair's seen keypoints. NaN where the body is
    absent or has no pair with a seen keypoint."""
    t, p = present.shape
    out = np.full((t, p), np.nan)
    if p == 0 or keypoints.shape[1] == 0:
        return out
    fx, fy, cx, cy = np.asarray(camera, np.float64)
    z = np.maximum(joints3d[..., 2], 1e-3)
    proj = np.stack([fx * joints3d[..., 0] / z + cx, fy * joints3d[..., 1] / z + cy], -1)
    dist = np.linalg.norm(proj[:, :, None] - keypoints[:, None], axis=-1)  # (T, P, Q, 23)
    seen = (weights > 0)[:, None]  # (T, 1, Q, 23)
    count = seen.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cost = np.where(seen, dist, 0.0).sum(-1) / count  # (T, P, Q)
    usable = present[:, :, None] & (count > 0)
    for f in np.flatnonzero(usable.any((1, 2))):
        rows, cols = linear_sum_assignment(np.where(usable[f], cost[f], 1e9))
        for r, c in zip(rows, cols, strict=True):
            if usable[f, r, c]:
                out[f, r] = cost[f, r, c]
    return out
