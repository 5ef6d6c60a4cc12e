"""SMPL, SMPL-H and SMPL-X bodies through `smplx`, from model files the user provides.

The official model files are under non-commercial licences and never ship with avatarize:
`body.model_path` points at the user's folder in the layout smplx expects
(`<model_path>/smpl/SMPL_NEUTRAL.pkl`, `<model_path>/smplh/SMPLH_MALE.pkl`, ... or `.npz`).

The official `.pkl` files hold chumpy objects. We never `pickle.load` them as they are:
`load_model_file` uses an unpickler that only admits numpy arrays, scipy sparse matrices
and chumpy's array class (replaced by a stand-in that keeps the array), and refuses any
other global, so a tampered file cannot run code. `convert_model_file` writes the arrays
to a plain `.npz` once, which then loads without pickle at all.

`SmplFamilyBody` has the same forward as `stages.body.AnnyBody`: pose (B, J, 3) axis-angle
per joint (joint 0, the global orientation, is ignored), shape (B, K) betas, root
orientation and translation in the OpenCV camera frame, and returns vertices and COCO-23
keypoints in camera coordinates.
"""

from __future__ import annotations

import io
import pickle
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from stages.body import place_in_camera

ModelType = Literal["smpl", "smplh", "smplx"]

# SMPL family (Y up, facing +Z) -> camera (y down, facing the camera, i.e. towards -z).
SMPL_TO_CAMERA = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]])

# Body joints shared by the family: 1/2 hips, 4/5 knees, 7/8 ankles, 16/17 shoulders,
# 18/19 elbows, 20/21 wrists. Joint counts of the kinematic tree per model.
NUM_JOINTS = {"smpl": 24, "smplh": 52, "smplx": 55}

# smplx appends vertex keypoints after the kinematic joints, in this order: nose, right
# eye, left eye, right ear, left ear, left big toe, left small toe, left heel, right big
# toe, right small toe, right heel (then finger tips). Offsets from the first of them:
_EXTRA = {"nose": 0, "reye": 1, "leye": 2, "rear": 3, "lear": 4, "LBigToe": 5,
          "LSmallToe": 6, "LHeel": 7, "RBigToe": 8, "RSmallToe": 9, "RHeel": 10}


def coco23_indices(model_type: ModelType) -> list[int]:
    """Indices into smplx's joint output for the COCO-23 keypoints (stages.body.COCO23)."""
    n = NUM_JOINTS[model_type]
    e = {k: n + v for k, v in _EXTRA.items()}
    return [e["nose"], e["leye"], e["reye"], e["lear"], e["rear"], 16, 17, 18, 19, 20, 21,
            1, 2, 4, 5, 7, 8, e["LBigToe"], e["RBigToe"], e["LSmallToe"], e["RSmallToe"],
            e["LHeel"], e["RHeel"]]


# ---- safe loading --------------------------------------------------------------------

class _ChumpyStandIn:
    """Takes the place of chumpy.Ch while unpickling; keeps the pickled state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def array(self) -> np.ndarray:
        state = self.state
        if isinstance(state, dict):
            for key in ("x", "r", "_x"):
                if isinstance(state.get(key), np.ndarray):
                    return state[key]
            arrays = [v for v in state.values() if isinstance(v, np.ndarray)]
            if len(arrays) == 1:
                return arrays[0]
        raise pickle.UnpicklingError("a chumpy object in the model file holds no plain array")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("scipy.sparse.csc", "csc_matrix"), ("scipy.sparse._csc", "csc_matrix"),
    ("scipy.sparse.csr", "csr_matrix"), ("scipy.sparse._csr", "csr_matrix"),
    ("scipy.sparse.compressed", "_cs_matrix"),
    ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
    ("__builtin__", "object"), ("builtins", "object"),
    # Python 3 pickles of bytes at protocol 2 go through codecs; it only encodes text.
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("chumpy"):
            return _ChumpyStandIn
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a body model file: only arrays are "
            "expected (is this really an SMPL-family model?)")


def _plain(value: Any) -> Any:
    if isinstance(value, _ChumpyStandIn):
        return np.asarray(value.array())
    if hasattr(value, "toarray") and hasattr(value, "tocsr"):  # scipy sparse
        return np.asarray(value.toarray())
    return value


def load_model_file(path: Path) -> dict[str, Any]:
    """The arrays of an SMPL-family .pkl (chumpy or not) or .npz file, as numpy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"body model file {path} does not exist")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if path.suffix != ".pkl":
        raise ValueError(f"{path}: expected a .pkl or .npz body model file")
    raw = _SafeUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not an SMPL-family model (top level is not a dict)")
    return {k: _plain(v) for k, v in raw.items()}


def convert_model_file(src: Path, dst: Path) -> list[str]:
    """One-time conversion of an official .pkl into a pickle-free .npz; returns the keys."""
    data = load_model_file(src)
    arrays = {}
    for key, value in data.items():
        arr = np.asarray(value)
        if arr.dtype != object:  # strings such as 'bs_style' are kept as text arrays
            arrays[key] = arr
    np.savez(dst, **arrays)
    return sorted(arrays)


def find_model_file(model_path: Path, model_type: ModelType, gender: str) -> Path:
    root = Path(model_path)
    if root.is_file():
        return root
    folder = root / model_type if (root / model_type).is_dir() else root
    stem = f"{model_type.upper()}_{gender.upper()}"
    for ext in (".npz", ".pkl"):
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    raise FileNotFoundError(
        f"body.model_path: no {stem}.pkl or {stem}.npz in {folder} (the layout smplx "
        f"expects: <model_path>/{model_type}/{stem}.pkl)")


class SmplFamilyBody:
    """An SMPL / SMPL-H / SMPL-X model with AnnyBody's forward, in camera coordinates."""

    def __init__(self, model_type: ModelType, model_path: Path, gender: str = "neutral",
                 num_betas: int = 10, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        import smplx
        from smplx.utils import Struct

        self.model_type = model_type
        self.kind = model_type
        self.device = torch.device(device)
        self.dtype = dtype
        file = find_model_file(model_path, model_type, gender)
        data = load_model_file(file)
        missing = [k for k in ("v_template", "f", "shapedirs", "posedirs", "J_regressor",
                               "weights", "kintree_table") if k not in data]
        if missing:
            raise ValueError(f"{file}: not an SMPL-family model, missing {missing}")
        kwargs: dict[str, Any] = {"num_betas": num_betas, "dtype": dtype}
        if model_type == "smpl":
            model = smplx.SMPL(str(file.parent), data_struct=Struct(**data), **kwargs)
        elif model_type == "smplh":
            model = smplx.SMPLH(str(file.parent), data_struct=Struct(**data), use_pca=False,
                                **kwargs)
        else:
            model = self._load_smplx(smplx.SMPLX, data, kwargs)
        self.model = model.to(self.device)
        self.num_bones = NUM_JOINTS[model_type]
        self.num_betas = self.model.num_betas
        self.faces = np.asarray(data["f"], dtype=np.int64)
        self._coco = torch.as_tensor(coco23_indices(model_type), device=self.device)
        self._to_cam = SMPL_TO_CAMERA.to(self.device, dtype)

    @staticmethod
    def _load_smplx(cls: Any, data: dict[str, Any], kwargs: dict[str, Any]) -> Any:
        # smplx.SMPLX reads its file itself (pickle for .pkl): hand it a pickle-free .npz
        # of the arrays we loaded safely.
        with tempfile.TemporaryDirectory() as tmp:
            npz = Path(tmp) / "SMPLX_NEUTRAL.npz"
            np.savez(npz, **{k: np.asarray(v) for k, v in data.items()
                             if np.asarray(v).dtype != object})
            return cls(str(npz), ext="npz", use_pca=False, use_face_contour=False,
                       num_expression_coeffs=10, **kwargs)

    @property
    def shape_labels(self) -> tuple[str, ...]:
        return tuple(f"beta{i}" for i in range(self.num_betas))

    def default_shape(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.num_betas, device=self.device, dtype=self.dtype)

    def _pose_kwargs(self, pose: torch.Tensor) -> dict[str, torch.Tensor]:
        b = pose.shape[0]
        flat = pose.reshape(b, -1, 3)
        out = {"global_orient": torch.zeros(b, 3, device=self.device, dtype=self.dtype)}
        if self.model_type == "smpl":
            out["body_pose"] = flat[:, 1:24].reshape(b, -1)
        elif self.model_type == "smplh":
            out["body_pose"] = flat[:, 1:22].reshape(b, -1)
            out["left_hand_pose"] = flat[:, 22:37].reshape(b, -1)
            out["right_hand_pose"] = flat[:, 37:52].reshape(b, -1)
        else:
            out["body_pose"] = flat[:, 1:22].reshape(b, -1)
            out["jaw_pose"] = flat[:, 22]
            out["leye_pose"] = flat[:, 23]
            out["reye_pose"] = flat[:, 24]
            out["left_hand_pose"] = flat[:, 25:40].reshape(b, -1)
            out["right_hand_pose"] = flat[:, 40:55].reshape(b, -1)
            out["expression"] = torch.zeros(b, 10, device=self.device, dtype=self.dtype)
        return out

    def forward(
        self,
        pose: torch.Tensor,  # (B, J, 3); pose[:, 0] is ignored (root_orient places the body)
        shape: torch.Tensor,  # (B, num_betas)
        root_orient: torch.Tensor | None = None,
        transl: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        pose = pose.to(self.device, self.dtype)
        out = self.model(betas=shape.to(self.device, self.dtype), **self._pose_kwargs(pose),
                         return_verts=True)
        (verts, kps), t = place_in_camera((out.vertices, out.joints[:, self._coco]),
                                          out.joints[:, 0], self._to_cam, root_orient, transl)
        return {"vertices": verts, "keypoints": kps, "root": t}

    __call__ = forward
