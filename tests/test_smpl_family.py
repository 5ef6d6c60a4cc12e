"""SMPL-family bodies from synthetic model files with the official keys and shapes.

The official files are licensed non-commercially and never ship; these tests write small
random models with the same keys and shape rules (template, blend shapes, joint regressor,
skinning weights, kinematic tree), in the chumpy-pickled form of the official .pkl files,
and run them through the same loading code users use.
"""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
import torch

from stages.smpl_family import (
    NUM_JOINTS,
    SmplFamilyBody,
    convert_model_file,
    find_model_file,
    load_model_file,
)

VERTS = {"smpl": 6890, "smplh": 6890, "smplx": 10475}


def _parents(model_type: str) -> np.ndarray:
    body = [-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19]
    if model_type == "smpl":
        return np.array(body + [20, 21])
    hands = []
    first = 22 if model_type == "smplh" else 25
    for wrist, start in ((20, first), (21, first + 15)):
        for finger in range(5):
            base = start + 3 * finger
            hands += [wrist, base, base + 1]
    if model_type == "smplx":
        return np.array(body + [15, 15, 15] + hands)  # jaw, eyes hang off the head
    return np.array(body + hands)


def _joint_positions(n: int, rng: np.random.Generator) -> np.ndarray:
    j = rng.normal(0, 0.15, size=(n, 3))
    j[0] = 0
    j[[1, 2], 0] = [0.1, -0.1]  # hips left (+x) and right
    j[[16, 17], 0], j[[16, 17], 1] = [0.2, -0.2], 0.45  # shoulders
    j[[18, 19], 0], j[[18, 19], 1] = [0.45, -0.45], 0.45  # elbows
    j[[20, 21], 0], j[[20, 21], 1] = [0.7, -0.7], 0.45  # wrists
    j[[4, 5], 0], j[[4, 5], 1] = [0.1, -0.1], -0.45  # knees
    j[[7, 8], 0], j[[7, 8], 1] = [0.1, -0.1], -0.85  # ankles
    j[15] = [0, 0.65, 0]  # head
    return j


def synthetic_model(model_type: str, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    v, nj = VERTS[model_type], NUM_JOINTS[model_type]
    joints = _joint_positions(nj, rng)
    # Vertices scattered around the joints; each vertex skinned to its joint.
    owner = rng.integers(0, nj, size=v)
    template = joints[owner] + rng.normal(0, 0.03, size=(v, 3))
    weights = np.zeros((v, nj))
    weights[np.arange(v), owner] = 1.0
    regressor = np.zeros((nj, v))
    for j in range(nj):
        members = np.flatnonzero(owner == j)[:20]
        regressor[j, members] = 1.0 / len(members)
    n_shape = 20 if model_type == "smplx" else 10
    model = {
        "v_template": template,
        "f": rng.integers(0, v, size=(2 * v, 3)).astype(np.uint32),
        "shapedirs": rng.normal(0, 0.01, size=(v, 3, n_shape)),
        "posedirs": rng.normal(0, 0.001, size=(v, 3, 9 * (nj - 1))),
        "J_regressor": scipy.sparse.csc_matrix(regressor),
        "weights": weights,
        "kintree_table": np.stack([_parents(model_type).astype(np.int64) % 2**32,
                                   np.arange(nj)]).astype(np.int64),
    }
    if model_type != "smpl":
        for side in "lr":
            model[f"hands_components{side}"] = np.eye(45)
            model[f"hands_mean{side}"] = np.zeros(45)
    if model_type == "smplx":
        model["lmk_faces_idx"] = rng.integers(0, 2 * v, size=51)
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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    for kind in ("smpl", "smplh", "smplx"):
        write_chumpy_pkl(synthetic_model(kind), root / kind / f"{kind.upper()}_NEUTRAL.pkl")
    return root


def test_safe_loader_unwraps_chumpy_and_sparse(model_dir):
    data = load_model_file(model_dir / "smpl" / "SMPL_NEUTRAL.pkl")
    assert isinstance(data["shapedirs"], np.ndarray) and data["shapedirs"].shape == (6890, 3, 10)
    assert isinstance(data["J_regressor"], np.ndarray) and data["J_regressor"].shape == (24, 6890)
    assert "chumpy" not in sys.modules


def test_safe_loader_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    path = tmp_path / "SMPL_NEUTRAL.pkl"
    path.write_bytes(pickle.dumps({"v_template": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        load_model_file(path)


def test_conversion_to_npz_loads_without_pickle(model_dir, tmp_path):
    dst = tmp_path / "SMPL_NEUTRAL.npz"
    keys = convert_model_file(model_dir / "smpl" / "SMPL_NEUTRAL.pkl", dst)
    assert {"v_template", "shapedirs", "J_regressor", "kintree_table"} <= set(keys)
    a = load_model_file(model_dir / "smpl" / "SMPL_NEUTRAL.pkl")
    b = load_model_file(dst)
    np.testing.assert_array_equal(a["posedirs"], b["posedirs"])


def test_missing_model_file_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="SMPLX_FEMALE"):
        find_model_file(tmp_path, "smplx", "female")


@pytest.mark.parametrize("kind", ["smpl", "smplh", "smplx"])
def test_forward_places_body_in_camera_frame(model_dir, kind):
    body = SmplFamilyBody(kind, model_dir, gender="neutral")
    b = 3
    pose = torch.zeros(b, body.num_bones, 3)
    out = body(pose, body.default_shape(b), transl=torch.tensor([0.0, 0.0, 3.0]).expand(b, 3))
    kp = out["keypoints"][0]
    assert out["vertices"].shape == (b, VERTS[kind], 3)
    assert kp.shape == (23, 3)
    # Upright, facing the camera: head above (smaller y) the ankles; the person's left
    # shoulder on the image right (+x); all about 3 m in front of the camera.
    assert kp[0, 1] < kp[15, 1]
    assert kp[5, 0] > kp[6, 0]
    assert torch.allclose(out["vertices"][..., 2].mean(), torch.tensor(3.0), atol=0.3)


def test_pose_moves_the_arm_and_is_differentiable(model_dir):
    body = SmplFamilyBody("smpl", model_dir)
    pose = torch.zeros(1, 24, 3, requires_grad=True)
    rest = body(pose, body.default_shape(1))["keypoints"].detach()
    bent = torch.zeros(1, 24, 3)
    bent[0, 18, 2] = 1.2  # left elbow
    moved = body(bent, body.default_shape(1))["keypoints"]
    assert (moved[0, 9] - rest[0, 9]).norm() > 0.1  # the left wrist moved
    assert torch.allclose(moved[0, 5], rest[0, 5], atol=1e-5)  # the shoulder did not
    body(pose, body.default_shape(1))["keypoints"].sum().backward()
    assert pose.grad is not None and pose.grad.abs().sum() > 0


def test_cli_conversion(model_dir, tmp_path, capsys):
    from pipeline.cli import main

    dst = tmp_path / "SMPLH_NEUTRAL.npz"
    assert main(["convert-body-model", str(model_dir / "smplh" / "SMPLH_NEUTRAL.pkl"),
                 str(dst)]) == 0
    assert "hands_componentsl" in load_model_file(dst)
    assert main(["convert-body-model", str(tmp_path / "missing.pkl"), str(dst)]) == 2
    assert "does not exist" in capsys.readouterr().err
