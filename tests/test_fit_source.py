"""fit.source: file: body parameters from another tool, read into fit's bodies.npz arrays.

The round trip is the contract: smplx's own forward on the file's raw parameters must give
the same vertices as SmplFamilyBody.forward on what load_body_params returns. Bodies come
from the synthetic SMPL-family files of the `smpl_model_dir` fixture (the real ones are
licensed and never ship).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.stage import VideoFailed
from stages.body_config import BodySection, load_body_model
from stages.fit_source import (
    load_body_params,
    reprojection_error,
    save_body_params,
    source_path,
)

CAMERA = np.array([500.0, 500.0, 320.0, 240.0])
T = 4


def body_of(kind: str, model_dir):
    return load_body_model(BodySection(model=kind, model_path=model_dir))


def random_params(kind: str, t: int, p: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Parameters as a tool writes them: people upright-ish facing the camera, 2-4 m away."""
    rng = np.random.default_rng(seed)
    params = {
        "betas": rng.normal(0, 1.5, (p, 8)),
        "global_orient": np.array([np.pi, 0, 0]) + rng.normal(0, 0.4, (t, p, 3)),
        "body_pose": rng.normal(0, 0.3, (t, p, 69 if kind == "smpl" else 63)),
        "transl": np.array([0.0, 0.2, 3.0]) + rng.normal(0, 0.5, (t, p, 3)),
    }
    if kind != "smpl":
        params["left_hand_pose"] = rng.normal(0, 0.3, (t, p, 45))
        params["right_hand_pose"] = rng.normal(0, 0.3, (t, p, 15, 3))
    if kind == "smplx":
        for key in ("jaw_pose", "leye_pose", "reye_pose"):
            params[key] = rng.normal(0, 0.2, (t, p, 3))
    return params


def smplx_vertices(body, params: dict[str, np.ndarray]) -> torch.Tensor:
    """smplx's own forward on the raw parameters, every frame and person: (T, P, V, 3)."""
    t, p = params["transl"].shape[:2]

    def rows(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x, dtype=torch.float32).reshape(t * p, -1)

    betas = np.zeros((t, p, body.num_betas))
    betas[..., :params["betas"].shape[1]] = params["betas"]
    kwargs = {k: rows(v) for k, v in params.items() if k != "betas"}
    if body.kind == "smplx":
        kwargs["expression"] = torch.zeros(t * p, 10)
    with torch.no_grad():
        out = body.model(betas=rows(betas), **kwargs)
    return out.vertices.reshape(t, p, -1, 3)


def our_forward(body, out: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """SmplFamilyBody.forward on the loaded arrays, every frame and person."""
    t, p = out["present"].shape

    def rows(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x).reshape(t * p, *x.shape[2:])

    shape = np.repeat(out["phenotype"][None], t, axis=0)
    with torch.no_grad():
        res = body.forward(rows(out["pose"]), rows(shape), rows(out["root_orient"]),
                           rows(out["transl"]))
    return {k: v.reshape(t, p, *v.shape[1:]) for k, v in res.items() if v.ndim == 3}


@pytest.mark.parametrize("kind", ["smpl", "smplx"])
def test_round_trip_matches_smplx_forward(kind, smpl_model_dir, tmp_path):
    body = body_of(kind, smpl_model_dir)
    p = 2
    params = random_params(kind, T, p)
    path = save_body_params(tmp_path / "walk" / "clip.npz", kind, **params)
    out = load_body_params(path, body, T, CAMERA, kind)

    assert out["pose"].shape == (T, p, body.num_bones, 3)
    assert not out["pose"][:, :, 0].any()
    assert out["present"].all() and out["present"].dtype == bool
    assert out["track_ids"].dtype == np.int32 and out["track_ids"].tolist() == [0, 1]
    np.testing.assert_array_equal(out["camera"], CAMERA.astype(np.float32))
    assert out["phenotype"].shape == (p, body.num_betas)
    assert np.isnan(out["fit_error"]).all()
    # The conversion moves the root by J0(betas): far more than the tolerance, so a loader
    # that skipped it would fail.
    shift = np.abs(out["transl"] - params["transl"]).max()
    assert shift > 1e-3
    ours = our_forward(body, out)
    err = (ours["vertices"] - smplx_vertices(body, params)).abs().amax((2, 3))
    assert (err < 1e-5).all(), err
    np.testing.assert_allclose(out["joints3d"], ours["keypoints"].numpy(), atol=1e-5)


def test_upright_facing_camera_is_identity(smpl_model_dir, tmp_path):
    """An orient of (pi, 0, 0), as the tools write an upright person facing the camera, is
    our zero root orientation."""
    body = body_of("smpl", smpl_model_dir)
    params = {"betas": np.zeros(10), "global_orient": np.tile([np.pi, 0.0, 0.0], (T, 1)),
              "body_pose": np.zeros((T, 23, 3)), "transl": np.tile([0.0, 0.0, 3.0], (T, 1))}
    out = load_body_params(save_body_params(tmp_path / "a.npz", "smpl", **params), body, T,
                           CAMERA, "smpl")
    np.testing.assert_allclose(out["root_orient"], 0.0, atol=1e-6)
    kp = out["joints3d"][0, 0]
    assert kp[0, 1] < kp[15, 1]  # nose above the ankle (y down)
    assert kp[5, 0] > kp[6, 0]  # the person's left shoulder on the image right


def test_single_person_form_equals_one_track(smpl_model_dir, tmp_path):
    body = body_of("smplx", smpl_model_dir)
    params = random_params("smplx", T, 1, seed=3)
    multi = load_body_params(save_body_params(tmp_path / "multi.npz", "smplx", **params),
                             body, T, CAMERA, "smplx")
    single_params = {k: v[0] if k == "betas" else v[:, 0] for k, v in params.items()}
    path = save_body_params(tmp_path / "single.npz", "smplx", present=np.ones(T, bool),
                            track_ids=[7], **single_params)
    single = load_body_params(path, body, T, CAMERA, "smplx")
    assert single["track_ids"].tolist() == [7]
    for key in ("pose", "root_orient", "transl", "phenotype", "joints3d", "present"):
        np.testing.assert_array_equal(single[key], multi[key], err_msg=key)


def test_two_people_with_absent_frames(smpl_model_dir, tmp_path):
    body = body_of("smpl", smpl_model_dir)
    t, p = 6, 3
    params = random_params("smpl", t, p, seed=1)
    params["body_pose"] = params["body_pose"].reshape(t, p, 23, 3)
    params["transl"][:, 0] = np.linspace([0, 0, 2], [1, 0, 2], t)
    # Person 0: frames 2-3 NaN (absent by default). Person 2: never present.
    params["transl"][2:4, 0] = np.nan
    params["body_pose"][2:4, 0] = np.nan
    params["global_orient"][:, 2] = np.nan
    path = save_body_params(tmp_path / "two.npz", "smpl", track_ids=[4, 9, 11],
                            camera=[800, 810, 300, 200], **params)
    out = load_body_params(path, body, t, CAMERA, "smpl")

    expected = np.ones((t, p), bool)
    expected[2:4, 0] = False
    expected[:, 2] = False
    np.testing.assert_array_equal(out["present"], expected)
    assert out["track_ids"].tolist() == [4, 9, 11]
    np.testing.assert_allclose(out["camera"], [800, 810, 300, 200])
    for key in ("pose", "root_orient", "transl", "joints3d"):
        assert np.isfinite(out[key]).all(), key
    # Absent frames are interpolated between their neighbours, like fit's unfitted frames.
    x = out["transl"][:, 0, 0]
    np.testing.assert_allclose(x[2:4], np.interp([2, 3], [1, 4], x[[1, 4]]), atol=1e-6)
    assert not out["pose"][:, 2].any() and not out["phenotype"][2].any()
    # The 63-value form: SMPL's two hand joints stay at zero.
    params63 = dict(params, body_pose=params["body_pose"][:, :, :21].reshape(t, p, 63))
    out63 = load_body_params(save_body_params(tmp_path / "b.npz", "smpl", **params63),
                             body, t, CAMERA, "smpl")
    assert not out63["pose"][:, :, 22:].any()
    np.testing.assert_array_equal(out63["pose"][:, :, :22], out["pose"][:, :, :22])


def _write(path, **changes):
    params = random_params("smpl", T, 2)
    params.update(changes)
    return save_body_params(path, "smpl", **params)


def _raw(path, **changes):
    """A file written with np.savez directly (for what save_body_params would refuse)."""
    params = {k: np.asarray(v) for k, v in random_params("smpl", T, 2).items()}
    params["body_model"] = np.array("smpl")
    params.update(changes)
    params = {k: v for k, v in params.items() if v is not None}
    np.savez(path, **params)
    return path


BAD_FILES = {
    "missing file": (lambda d: d / "nope.npz", "does not exist"),
    "missing key": (lambda d: _raw(d / "x.npz", transl=None), "missing key 'transl'"),
    "wrong shape": (lambda d: _write(d / "x.npz", body_pose=np.zeros((T, 2, 60))),
                    "'body_pose' has shape"),
    "wrong body_model": (lambda d: _raw(d / "x.npz", body_model=np.array("smplx")),
                         "'body_model' is smplx but body.model is smpl"),
    "frame count": (lambda d: _write(d / "x.npz", **{k: v[:3] for k, v in random_params(
        "smpl", T, 2).items() if k != "betas"}), "'global_orient' has 3 frames, the video has 4"),
    "non-finite present row": (lambda d: _write(d / "x.npz", present=np.ones((T, 2), bool),
                               transl=np.full((T, 2, 3), np.nan)), "non-finite values in"),
    "pickled objects": (lambda d: _raw(d / "x.npz", track_ids=np.array([{"a": 1}, 2],
                                                                      dtype=object)),
                        "Python objects"),
    "too many betas": (lambda d: _write(d / "x.npz", betas=np.zeros((2, 16))),
                       "'betas' has 16 coefficients"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_fail_the_video_with_a_clear_reason(case, smpl_model_dir, tmp_path):
    body = body_of("smpl", smpl_model_dir)
    make, message = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(VideoFailed, match=message) as info:
        load_body_params(path, body, T, CAMERA, "smpl")
    assert str(path) in str(info.value)


def test_anny_body_model_is_refused(smpl_model_dir, tmp_path):
    body = body_of("smpl", smpl_model_dir)
    with pytest.raises(VideoFailed, match="body.model is anny"):
        load_body_params(_write(tmp_path / "x.npz"), body, T, CAMERA, "anny")


def test_source_path_mirrors_the_input_layout(tmp_path):
    assert source_path(tmp_path, "walk/clip01") == tmp_path / "walk" / "clip01.npz"


def test_reprojection_error_pairs_bodies_with_detections():
    """Detections in another order, with an extra person: each body is scored against the
    detection it matches, not the one with its index."""
    rng = np.random.default_rng(0)
    t, p = 3, 2
    joints = np.concatenate([rng.uniform(-0.5, 0.5, (t, p, 23, 2)),
                             rng.uniform(2.5, 3.5, (t, p, 23, 1))], -1)
    present = np.ones((t, p), bool)
    present[1, 1] = False
    fx, fy, cx, cy = CAMERA
    proj = np.stack([fx * joints[..., 0] / joints[..., 2] + cx,
                     fy * joints[..., 1] / joints[..., 2] + cy], -1)
    keypoints = np.stack([proj[:, 1] + [3.0, 4.0],  # body 1, 5 px off
                          np.full((t, 23, 2), 5000.0),  # nobody
                          proj[:, 0]], 1)  # body 0, exact
    weights = np.ones((t, 3, 23))
    weights[:, 0, :10] = 0.0  # unseen keypoints do not count
    keypoints[:, 0, :10] = 0.0
    err = reprojection_error(joints, present, CAMERA, keypoints, weights)
    np.testing.assert_allclose(err[:, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(err[[0, 2], 1], 5.0, atol=1e-6)
    assert np.isnan(err[1, 1])
    none = reprojection_error(joints, present, CAMERA, keypoints[:, :0], weights[:, :0])
    assert np.isnan(none).all()


def test_no_people(smpl_model_dir, tmp_path):
    body = body_of("smpl", smpl_model_dir)
    path = save_body_params(tmp_path / "empty.npz", "smpl", np.zeros((0, 10)),
                            np.zeros((T, 0, 3)), np.zeros((T, 0, 69)), np.zeros((T, 0, 3)))
    out = load_body_params(path, body, T, CAMERA, "smpl")
    assert out["pose"].shape == (T, 0, 24, 3) and out["joints3d"].shape == (T, 0, 23, 3)
    assert out["present"].shape == (T, 0) and out["phenotype"].shape == (0, 10)


def test_fit_stage_reads_the_file_instead_of_fitting(smpl_model_dir, tmp_path):
    from pydantic import ValidationError
    from test_fit import make_job, write_people

    from pipeline.config import RunSection
    from stages.fit import FitConfig, FitStage, camera_for

    t = 5
    body_cfg = BodySection(model="smpl", model_path=smpl_model_dir)
    stage = FitStage(FitConfig(device="cpu", source="file", source_dir=tmp_path / "params"),
                     RunSection(), shared={"body": body_cfg})
    stage.setup()
    params = random_params("smpl", t, 1)
    save_body_params(tmp_path / "params" / "synthetic.npz", "smpl", params["betas"],
                     params["global_orient"], params["body_pose"], params["transl"])
    camera = camera_for(320, 240, stage.config.fov_deg)
    expected = load_body_params(tmp_path / "params" / "synthetic.npz", stage.body, t, camera,
                                "smpl")
    job, steps = make_job(tmp_path / "job", t)
    write_people(job.inputs["detect"] / "people.npz", [expected["joints3d"][:, 0]], camera,
                 world_noise=0.0)
    summary = stage.process(job)
    with np.load(job.out_dir / "bodies.npz") as npz:
        for key in ("pose", "root_orient", "transl", "phenotype", "joints3d", "present"):
            np.testing.assert_array_equal(npz[key], expected[key])
        assert np.nanmax(npz["fit_error"]) < 0.5  # the detections are its own projection
    assert summary["body_model"] == "smpl" and summary["tracks"] == 1 and sum(steps) == t
    assert summary["source"].endswith("synthetic.npz")

    with pytest.raises(ValidationError, match="fit.source_dir"):
        FitConfig(source="file")
    anny = FitStage(FitConfig(device="cpu", source="file", source_dir=tmp_path), RunSection())
    with pytest.raises(ValueError, match="body.model"):
        anny.setup()
