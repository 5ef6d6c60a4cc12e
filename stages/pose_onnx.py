"""ONNX pose back-end: a user-provided person/pose model run through onnxruntime.

Any model exported to the interface below can replace BlazePose in the detect stage (for
instance a YOLO-pose model exported with its non-maximum suppression included). The weights
come from a local path only; nothing is downloaded.

Model interface (S = the back-end's `input_size`; names matter, N may be dynamic)

    input   images     float32 (or float16) [1, 3, S, S]  RGB in 0..1, letterboxed
    output  boxes      float32 [N, 5]        x0, y0, x1, y1, score  (input pixels, score 0..1)
            keypoints  float32 [N, 17, 3]    COCO-17 x, y (input pixels), confidence 0..1
            masks      float32 [N, S, S]     optional: person probability 0..1 per detection

Each output may carry a leading batch dimension of 1 ([1, N, 5], ...). The detections must
already be final: one row per person, after non-maximum suppression (rows scoring below the
threshold, such as zero padding, are dropped). A model whose only input has another name is
accepted too; with several inputs one must be called `images`. The spatial size may be
fixed in the model (it must then equal `input_size`) or dynamic.

Instead of `boxes` and `keypoints`, a model may have one single output of any name, [N, 57]
or [1, N, 57], with columns x0, y0, x1, y1, score, class, then 17 x (x, y, confidence): the
layout Ultralytics documents for YOLO-pose exported with `nms=True` (e.g. `yolo export
model=yolo11n-pose.pt format=onnx nms=True`); the class column is ignored.

Letterbox: the frame is scaled by S / max(H, W) (aspect ratio kept), centred and padded with
grey 114/255, the YOLO convention. Coordinates are in input pixels with pixel edges at
integers (pixel i covers [i, i + 1)); the back-end maps them back to frame pixels and crops
the masks to the picture before resizing them to the frame.

Keypoints: COCO-17 fills the BlazePose-33 slots it shares (nose, eyes, ears, shoulders,
elbows, wrists, hips, knees, ankles). The other 16 slots (inner/outer eyes, mouth, hands,
heels, toes) get visibility 0 and the position of the nearest shared joint (eye, nose,
wrist, ankle), so that no NaN reaches code that weights positions by visibility. As with
BlazePose, keypoints outside the frame (guessed in the letterbox padding or beyond) keep
their position with visibility 0. No world landmarks (None); no mask unless the model has
`masks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from stages.pose_backends import NUM_LANDMARKS, PersonPose, hide_outside

INPUT_NAME = "images"
BOXES, KEYPOINTS, MASKS = "boxes", "keypoints", "masks"
NUM_COCO = 17
# Single-output layout: box (4), score, class, then the COCO keypoints.
COMBINED_COLUMNS = 6 + NUM_COCO * 3
PAD_VALUE = 114  # letterbox grey, as YOLO trains with
# COCO-17 index -> BlazePose-33 slot.
COCO_TO_BLAZEPOSE = (0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28)
# BlazePose slots COCO lacks -> the BlazePose slot whose position they borrow.
BORROWED = {
    1: 2, 3: 2, 4: 5, 6: 5,  # inner/outer eyes <- eyes
    9: 0, 10: 0,  # mouth <- nose
    17: 15, 19: 15, 21: 15, 18: 16, 20: 16, 22: 16,  # pinky, index, thumb <- wrists
    29: 27, 31: 27, 30: 28, 32: 28,  # heels, toes <- ankles
}
FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class OnnxModelError(ValueError):
    """The model file is missing or does not follow the interface in this module's doc."""


@dataclass(frozen=True)
class Letterbox:
    """Frame -> model input transform: input = frame * (scale_x, scale_y) + (pad_x, pad_y).

    The two scales differ only by the rounding of the resized picture to whole pixels."""

    scale_x: float
    scale_y: float
    pad_x: int
    pad_y: int
    width: int  # scaled picture inside the input, px
    height: int

    @classmethod
    def fit(cls, frame_w: int, frame_h: int, size: int) -> Letterbox:
        scale = size / max(frame_w, frame_h)
        w = min(size, max(1, round(frame_w * scale)))
        h = min(size, max(1, round(frame_h * scale)))
        return cls(w / frame_w, h / frame_h, (size - w) // 2, (size - h) // 2, w, h)

    def apply(self, frame: np.ndarray, size: int) -> np.ndarray:
        canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
        resized = cv2.resize(frame, (self.width, self.height), interpolation=cv2.INTER_LINEAR)
        canvas[self.pad_y : self.pad_y + self.height, self.pad_x : self.pad_x + self.width] = (
            resized
        )
        return canvas

    def to_frame(self, xy: np.ndarray) -> np.ndarray:
        """Input-pixel coordinates [..., 2] -> frame pixels."""
        pad = np.array([self.pad_x, self.pad_y], dtype=np.float32)
        scale = np.array([self.scale_x, self.scale_y], dtype=np.float32)
        return ((xy - pad) / scale).astype(np.float32)


def coco_to_blazepose(coco: np.ndarray) -> np.ndarray:
    """COCO-17 [17, 3] (x, y, confidence) -> BlazePose-33 [33, 3] (x, y, visibility)."""
    out = np.zeros((NUM_LANDMARKS, 3), dtype=np.float32)
    out[list(COCO_TO_BLAZEPOSE)] = coco
    for slot, source in BORROWED.items():
        out[slot, :2] = out[source, :2]  # visibility stays 0
    out[:, 2] = np.clip(np.nan_to_num(out[:, 2], nan=0.0), 0.0, 1.0)
    out[~np.isfinite(out[:, :2]).all(axis=1), 2] = 0.0
    return out


def _dims(shape: list[Any]) -> list[int | None]:
    """Static dims as int, symbolic or unknown dims as None."""
    return [d if isinstance(d, int) and d > 0 else None for d in shape]


def _check_tail(name: str, shape: list[Any], tail: list[int | None], what: str) -> None:
    """`shape` must be `tail`, optionally after a leading batch dim of 1 (None = any)."""
    dims = _dims(shape)
    ranks = (len(tail), len(tail) + 1)
    if len(dims) not in ranks:
        raise OnnxModelError(
            f"output '{name}' has shape {shape}, expected {what} (rank {ranks[0]}, or "
            f"{ranks[1]} with a leading batch dim of 1)"
        )
    if len(dims) == ranks[1] and dims[0] not in (None, 1):
        raise OnnxModelError(f"output '{name}' has batch dim {shape[0]}, expected 1")
    for got, want in zip(dims[-len(tail) :], tail, strict=True):
        if want is not None and got is not None and got != want:
            raise OnnxModelError(f"output '{name}' has shape {shape}, expected {what}")


def _squeeze_batch(array: np.ndarray, rank: int, name: str) -> np.ndarray:
    if array.ndim == rank + 1:
        if array.shape[0] != 1:
            raise OnnxModelError(f"output '{name}' returned batch size {array.shape[0]}, not 1")
        array = array[0]
    if array.ndim != rank:
        raise OnnxModelError(f"output '{name}' returned shape {array.shape}")
    return array


class OnnxPoseBackend:
    """PoseBackend over an ONNX model with the interface of this module's docstring."""

    def __init__(
        self,
        model_path: Path,
        input_size: int = 640,
        score_threshold: float = 0.5,
        num_threads: int = 0,
    ) -> None:
        """num_threads: onnxruntime's intra-op threads, 0 = its default (one per core)."""
        import onnxruntime as ort  # here, so that mediapipe-only runs need not import it

        path = Path(model_path)
        if not path.is_file():
            raise OnnxModelError(f"ONNX pose model not found: {path}")
        if input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {input_size}")
        self.model_path = path
        self.input_size = int(input_size)
        self.score_threshold = float(score_threshold)
        # CUDA first where this onnxruntime build has it; the CPU provider always works.
        available = ort.get_available_providers()
        providers = [
            p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
        ]
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(0, int(num_threads))
        try:
            self._session: Any = ort.InferenceSession(
                str(path), sess_options=options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise OnnxModelError(f"{path}: onnxruntime cannot load the model: {exc}") from exc
        self._input, self._input_dtype = self._check_input()
        self._outputs = self._check_outputs()

    # -- validation at load ----------------------------------------------------------------

    def _check_input(self) -> tuple[str, type]:
        inputs = self._session.get_inputs()
        named = [i for i in inputs if i.name == INPUT_NAME]
        if named:
            inp = named[0]
        elif len(inputs) == 1:
            inp = inputs[0]
        else:
            names = [i.name for i in inputs]
            raise OnnxModelError(
                f"{self.model_path}: model has inputs {names}; expected one input "
                f"'{INPUT_NAME}' float32 [1, 3, S, S]"
            )
        where = f"{self.model_path}: input '{inp.name}'"
        if inp.type not in FLOAT_TYPES:
            raise OnnxModelError(f"{where} has type {inp.type}, expected float32 or float16")
        dims = _dims(inp.shape)
        if len(dims) != 4:
            raise OnnxModelError(
                f"{where} has shape {inp.shape} (rank {len(dims)}), expected [1, 3, S, S]"
            )
        if dims[0] not in (None, 1) or dims[1] not in (None, 3):
            raise OnnxModelError(f"{where} has shape {inp.shape}, expected [1, 3, S, S]")
        for d in dims[2:]:
            if d is not None and d != self.input_size:
                raise OnnxModelError(
                    f"{where} has fixed shape {inp.shape} but input_size is "
                    f"{self.input_size}; set input_size to {d}"
                )
        return inp.name, FLOAT_TYPES[inp.type]

    def _check_outputs(self) -> list[str]:
        """Output names to fetch; a single one means the combined [N, 57] layout."""
        outputs = {o.name: o for o in self._session.get_outputs()}
        try:
            if len(outputs) == 1 and not {BOXES, KEYPOINTS} & set(outputs):
                (name, out), = outputs.items()
                _check_tail(name, out.shape, [None, COMBINED_COLUMNS], f"[N, {COMBINED_COLUMNS}]")
                return [name]
            missing = [n for n in (BOXES, KEYPOINTS) if n not in outputs]
            if missing:
                raise OnnxModelError(
                    f"model lacks output(s) {missing}; it has {sorted(outputs)}; expected "
                    f"'boxes' [N, 5] and 'keypoints' [N, 17, 3] (or one output [N, 57])"
                )
            s = self.input_size
            _check_tail(BOXES, outputs[BOXES].shape, [None, 5], "[N, 5]")
            _check_tail(KEYPOINTS, outputs[KEYPOINTS].shape, [None, NUM_COCO, 3], "[N, 17, 3]")
            if MASKS in outputs:
                _check_tail(MASKS, outputs[MASKS].shape, [None, s, s], f"[N, {s}, {s}]")
        except OnnxModelError as exc:
            raise OnnxModelError(f"{self.model_path}: {exc}") from None
        return [n for n in (BOXES, KEYPOINTS, MASKS) if n in outputs]

    def _parse(
        self, raw: list[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Model outputs -> boxes [N, 5], COCO keypoints [N, 17, 3], masks [N, S, S] or None."""
        if len(self._outputs) == 1:
            name = self._outputs[0]
            rows = _squeeze_batch(np.asarray(raw[0], np.float32), 2, name)
            if rows.shape[1] != COMBINED_COLUMNS:
                raise OnnxModelError(f"output '{name}' returned shape {rows.shape}")
            return rows[:, :5], rows[:, 6:].reshape(-1, NUM_COCO, 3), None
        out = dict(zip(self._outputs, raw, strict=True))
        boxes = _squeeze_batch(np.asarray(out[BOXES], np.float32), 2, BOXES)
        kps = _squeeze_batch(np.asarray(out[KEYPOINTS], np.float32), 3, KEYPOINTS)
        if len(boxes) != len(kps):
            raise OnnxModelError(f"'boxes' has {len(boxes)} rows but 'keypoints' {len(kps)}")
        masks = None
        if MASKS in out:
            masks = _squeeze_batch(np.asarray(out[MASKS], np.float32), 3, MASKS)
        return boxes, kps, masks

    # -- PoseBackend -----------------------------------------------------------------------

    def reset(self) -> None:
        """Stateless: every frame is detected on its own."""

    def close(self) -> None:
        self._session = None

    def detect(self, frame_rgb: np.ndarray) -> list[PersonPose]:
        if frame_rgb.dtype != np.uint8 or frame_rgb.ndim != 3 or frame_rgb.shape[2] != 3:
            raise ValueError(
                f"expected a uint8 RGB frame [H, W, 3], got {frame_rgb.dtype} {frame_rgb.shape}"
            )
        if self._session is None:
            raise RuntimeError("OnnxPoseBackend used after close()")
        h, w = frame_rgb.shape[:2]
        box = Letterbox.fit(w, h, self.input_size)
        image = box.apply(frame_rgb, self.input_size)
        tensor = (image.transpose(2, 0, 1)[None].astype(np.float32) * (1.0 / 255.0)).astype(
            self._input_dtype, copy=False
        )
        try:
            raw = self._session.run(self._outputs, {self._input: tensor})
        except Exception as exc:  # onnxruntime's Fail / InvalidArgument carry the reason
            raise RuntimeError(f"{self.model_path}: inference failed: {exc}") from exc
        boxes, kps, masks = self._parse(raw)
        people = []
        for i in np.flatnonzero(np.nan_to_num(boxes[:, 4], nan=0.0) >= self.score_threshold):
            coco = kps[i].copy()
            coco[:, :2] = box.to_frame(coco[:, :2])
            mask = None if masks is None else self._frame_mask(masks[i], box, w, h)
            keypoints = hide_outside(coco_to_blazepose(coco), w, h)
            people.append(PersonPose(keypoints, None, mask, float(min(boxes[i, 4], 1.0))))
        return people

    @staticmethod
    def _frame_mask(mask: np.ndarray, box: Letterbox, w: int, h: int) -> np.ndarray:
        """Input-space mask -> frame-space probability: crop the padding, resize back."""
        inner = mask[box.pad_y : box.pad_y + box.height, box.pad_x : box.pad_x + box.width]
        frame = cv2.resize(np.ascontiguousarray(inner), (w, h), interpolation=cv2.INTER_LINEAR)
        return np.clip(frame, 0.0, 1.0).astype(np.float32)
