"""SMPL-family bodies from synthetic model files with the official keys and shapes.

The official files are licensed non-commercially and never ship; these tests write small
random models with the same keys and shape rules (template, blend shapes, joint regressor,
skinning weights, kinematic tree), in the chumpy-pickled form of the official .pkl files,
and run them through the same loading code users use.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from smpl_synthetic import VERTS

from stages.smpl_family import (
    SmplFamilyBody,
    convert_model_file,
    find_model_file,
    load_model_file,
)


@pytest.fixture(scope="module")
def model_dir(smpl_model_dir) -> Path:
    return smpl_model_dir


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
