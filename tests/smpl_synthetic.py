"""Synthetic SMPL-family model files: the official keys and shape rules, a made-up body.

The official files are licensed non-commercially and never ship, so tests write their own:
a T-posed stick figure in SMPL's frame (Y up, facing +Z, the body's left towards +X) whose
limbs are closed tubes rigidly skinned to the joint they hang from, a head, and the vertex
keypoints smplx reads (nose, eyes, ears, toes, heels) where they belong. Vertex and joint
counts, blend-shape and regressor shapes, the kinematic tree and the chumpy-pickled .pkl
form are those of the real files, so the same loading, fitting and rendering code runs.
"""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import scipy.sparse

NUM_JOINTS = {"smpl": 24, "smplh": 52, "smplx": 55}
VERTS = {"smpl": 6890, "smplh": 6890, "smplx": 10475}

# SMPL's 22 body joints in a T-pose, metres (Y up, facing +Z, left = +X).
BODY_JOINTS = np.array([
    [0.0, 0.0, 0.0],  # 0 pelvis
    [0.08, -0.08, 0.0], [-0.08, -0.08, 0.0],  # 1, 2 hips
    [0.0, 0.10, -0.01],  # 3 spine1
    [0.09, -0.48, 0.01], [-0.09, -0.48, 0.01],  # 4, 5 knees
    [0.0, 0.22, -0.01],  # 6 spine2
    [0.09, -0.88, -0.02], [-0.09, -0.88, -0.02],  # 7, 8 ankles
    [0.0, 0.30, -0.01],  # 9 spine3
    [0.09, -0.93, 0.10], [-0.09, -0.93, 0.10],  # 10, 11 feet
    [0.0, 0.50, -0.02],  # 12 neck
    [0.07, 0.42, -0.01], [-0.07, 0.42, -0.01],  # 13, 14 collars
    [0.0, 0.62, 0.01],  # 15 head
    [0.17, 0.45, -0.01], [-0.17, 0.45, -0.01],  # 16, 17 shoulders
    [0.42, 0.45, -0.01], [-0.42, 0.45, -0.01],  # 18, 19 elbows
    [0.66, 0.45, -0.01], [-0.66, 0.45, -0.01],  # 20, 21 wrists
])
BODY_PARENTS = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19]


def parents(model_type: str) -> np.ndarray:
    if model_type == "smpl":
        return np.array(BODY_PARENTS + [20, 21])
    hands = []
    first = 22 if model_type == "smplh" else 25
    for wrist, start in ((20, first), (21, first + 15)):
        for finger in range(5):
            base = start + 3 * finger
            hands += [wrist, base, base + 1]
    if model_type == "smplx":
        return np.array(BODY_PARENTS + [15, 15, 15] + hands)  # jaw, eyes hang off the head
    return np.array(BODY_PARENTS + hands)


def joint_positions(model_type: str) -> np.ndarray:
    par = parents(model_type)
    joints = np.zeros((len(par), 3))
    joints[:22] = BODY_JOINTS
    for j in range(22, len(par)):
        p = par[j]
        if p in (20, 21):  # first finger joint: spread across the hand
            side = 1.0 if p == 20 else -1.0
            joints[j] = joints[p] + [side * 0.06, 0.0, 0.02 * ((j % 5) - 2)]
        elif p == 15:  # jaw, eyes
            joints[j] = joints[p] + [0.0, 0.02, 0.08]
        else:  # next finger joint along the finger
            side = 1.0 if joints[p, 0] > 0 else -1.0
            joints[j] = joints[p] + [side * 0.025, 0.0, 0.0]
    if model_type == "smpl":  # SMPL's hand joints
        joints[22], joints[23] = joints[20] + [0.08, 0, 0], joints[21] - [0.08, 0, 0]
    return joints


def _vertex_keypoints(model_type: str) -> dict[int, tuple[np.ndarray, int]]:
    """smplx's vertex keypoints: vertex id -> (position, the joint that carries it)."""
    from smplx.vertex_ids import vertex_ids

    ids = vertex_ids["smplx" if model_type == "smplx" else "smplh"]
    j = BODY_JOINTS
    at = {
        "nose": (j[15] + [0.0, 0.0, 0.11], 15), "leye": (j[15] + [0.035, 0.04, 0.09], 15),
        "reye": (j[15] + [-0.035, 0.04, 0.09], 15), "lear": (j[15] + [0.08, 0.02, 0.0], 15),
        "rear": (j[15] + [-0.08, 0.02, 0.0], 15),
        "LBigToe": (j[10] + [0.02, -0.02, 0.06], 10), "RBigToe": (j[11] + [-0.02, -0.02, 0.06], 11),
        "LSmallToe": (j[10] + [0.05, -0.02, 0.04], 10),
        "RSmallToe": (j[11] + [-0.05, -0.02, 0.04], 11),
        "LHeel": (j[7] + [0.0, -0.06, -0.06], 7), "RHeel": (j[8] + [0.0, -0.06, -0.06], 8),
    }
    for name, hand in (("thumb", 20), ("index", 20), ("middle", 20), ("ring", 20),
                       ("pinky", 20)):
        for side, wrist in (("l", hand), ("r", hand + 1)):
            sign = 1.0 if side == "l" else -1.0
            at[f"{side}{name}"] = (j[wrist] + [sign * 0.17, 0.0, 0.0], wrist)
    return {ids[k]: v for k, v in at.items() if k in ids}


def _tube(a: np.ndarray, b: np.ndarray, radius: float, rings: int = 5,
          sides: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A closed tube from a to b: vertices (rings * sides + 2, 3) and triangles."""
    d = b - a
    length = np.linalg.norm(d)
    axis = d / length
    ref = np.array([0.0, 0.0, 1.0]) if abs(axis[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    u = np.cross(axis, ref)
    u /= np.linalg.norm(u)
    v = np.cross(axis, u)
    ang = np.linspace(0, 2 * np.pi, sides, endpoint=False)
    verts = [a + t * d + radius * (np.cos(ang)[:, None] * u + np.sin(ang)[:, None] * v)
             for t in np.linspace(0.0, 1.0, rings)]
    pts = np.concatenate([*verts, a[None], b[None]])
    faces = []
    for r in range(rings - 1):
        for s in range(sides):
            i0, i1 = r * sides + s, r * sides + (s + 1) % sides
            j0, j1 = i0 + sides, i1 + sides
            faces += [[i0, j0, i1], [i1, j0, j1]]
    cap_a, cap_b = rings * sides, rings * sides + 1
    last = (rings - 1) * sides
    for s in range(sides):
        faces += [[cap_a, (s + 1) % sides, s], [cap_b, last + s, last + (s + 1) % sides]]
    return pts, np.array(faces)


def _sphere(centre: np.ndarray, radius: float, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    import trimesh

    mesh = trimesh.creation.uv_sphere(radius=radius, count=[n, n])
    return np.asarray(mesh.vertices) + centre, np.asarray(mesh.faces)


def synthetic_model(model_type: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    v, nj = VERTS[model_type], NUM_JOINTS[model_type]
    par = parents(model_type)
    joints = joint_positions(model_type)
    keypoints = _vertex_keypoints(model_type)
    free = [i for i in range(v) if i not in keypoints]  # mesh vertices avoid keypoint ids
    template = np.zeros((v, 3))
    owner = np.zeros(v, dtype=np.int64)
    faces: list[np.ndarray] = []
    used = 0
    parts = []
    for j in range(1, 22):
        p = par[j]
        if p == 0 and j == 3:
            parts.append((*_tube(joints[0], joints[12], 0.13, sides=12), 0))  # torso
        elif p not in (0, 3, 6, 9) or j in (1, 2):  # limbs (and hips from the pelvis)
            radius = 0.07 if j in (4, 5, 7, 8) else 0.045
            parts.append((*_tube(joints[p], joints[j], radius), p))
    parts.append((*_sphere(joints[15], 0.1), 15))
    for pts, tri, joint in parts:
        idx = np.array(free[used:used + len(pts)])
        used += len(pts)
        template[idx] = pts
        owner[idx] = joint
        faces.append(idx[tri])
    for i, (pos, joint) in keypoints.items():
        template[i], owner[i] = pos, joint
    rest = np.array(free[used:])
    template[rest] = joints[owner[rest]]  # unused vertices sit on the pelvis
    # Each joint regressed from a ring of vertices around its true position, so the
    # regressed skeleton is the designed one and moves with the shape.
    regressor = np.zeros((nj, v))
    spare = rest[: 4 * nj].reshape(nj, 4)
    for j in range(nj):
        offsets = np.array([[0.01, 0, 0], [-0.01, 0, 0], [0, 0.01, 0], [0, -0.01, 0]])
        template[spare[j]] = joints[j] + offsets
        owner[spare[j]] = j
        regressor[j, spare[j]] = 0.25
    weights = np.zeros((v, nj))
    weights[np.arange(v), owner] = 1.0
    n_shape = 20 if model_type == "smplx" else 10
    shapedirs = rng.normal(0, 0.004, size=(v, 3, n_shape))
    shapedirs[:, :, 0] = template * 0.05  # beta 0: overall size
    model = {
        "v_template": template,
        "f": np.concatenate(faces).astype(np.uint32),
        "shapedirs": shapedirs,
        "posedirs": rng.normal(0, 1e-4, size=(v, 3, 9 * (nj - 1))),
        "J_regressor": scipy.sparse.csc_matrix(regressor),
        "weights": weights,
        "kintree_table": np.stack([par.astype(np.int64) % 2**32,
                                   np.arange(nj)]).astype(np.int64),
    }
    if model_type != "smpl":
        for side in "lr":
            model[f"hands_components{side}"] = np.eye(45)
            model[f"hands_mean{side}"] = np.zeros(45)
    if model_type == "smplx":
        nf = len(model["f"])
        model["lmk_faces_idx"] = rng.integers(0, nf, size=51)
        model["lmk_bary_coords"] = np.full((51, 3), 1 / 3)
    return model


class _FakeCh:
    """Pickles like chumpy.Ch: a class from the chumpy package whose state holds 'x'."""

    def __init__(self, x: np.ndarray):
        self.x = x


def write_chumpy_pkl(model: dict, path: Path) -> None:
    module = types.ModuleType("chumpy.ch")
    _FakeCh.__module__ = "chumpy.ch"
    _FakeCh.__qualname__ = "Ch"
    module.Ch = _FakeCh
    sys.modules["chumpy"] = types.ModuleType("chumpy")
    sys.modules["chumpy.ch"] = module
    try:
        wrapped = {k: _FakeCh(v) if k in ("shapedirs", "posedirs") else v
                   for k, v in model.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(wrapped, protocol=2))
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]


def write_model_folder(root: Path, kinds: tuple[str, ...] = ("smpl", "smplh", "smplx")) -> Path:
    """<root>/<kind>/<KIND>_NEUTRAL.pkl for each kind, as the user's folder would hold."""
    for kind in kinds:
        write_chumpy_pkl(synthetic_model(kind), root / kind / f"{kind.upper()}_NEUTRAL.pkl")
    return root
