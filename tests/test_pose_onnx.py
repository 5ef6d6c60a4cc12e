"""The ONNX pose back-end, through tiny ONNX models built here whose outputs depend on the
image: the centroid of the input's bright pixels places every detection, so a wrong
letterbox or a wrong mapping back to frame pixels moves the keypoints away from where the
test expects them."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="onnx builds the test models (dev dependency)")
pytest.importorskip("onnxruntime", reason="the ONNX back-end needs onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from stages.pose_onnx import (  # noqa: E402
    COCO_TO_BLAZEPOSE,
    Letterbox,
    OnnxModelError,
    OnnxPoseBackend,
)

S = 64  # model input size: small keeps the tests fast
SCORES = (0.9, 0.3)  # detection 0 passes the default 0.5 threshold, detection 1 does not
# Keypoint k of detection n sits at the centroid + OFFSETS[n, k] (input pixels).
OFFSETS = np.stack(
    [np.stack([np.arange(17) - 8.0, (np.arange(17) - 8.0) * 2.0], axis=1) * (n + 1)
     for n in range(2)]
).astype(np.float32)
CONF = np.linspace(0.2, 1.0, 17, dtype=np.float32)
BOX_HALF = np.array([-5.0, -10.0, 5.0, 10.0], dtype=np.float32)


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=numpy_helper.from_array(np.asarray(array), name)
    )


def _model(
    path: Path,
    *,
    batch: bool = False,
    masks: bool = False,
    drop_keypoints: bool = False,
    combined: bool = False,
    fp16: bool = False,
    input_rank: int = 4,
    size: int | str = S,
) -> Path:
    """An ONNX pose model of the back-end's interface; returns its path.

    centroid c = sum(w * grid) / sum(w) in input pixels (pixel centres at i + 0.5), with
    w = relu(gray - 0.5): bright pixels only, not the letterbox's grey (114/255) padding;
    boxes[n] = (c + BOX_HALF, SCORES[n]), keypoints[n, k] = (c + OFFSETS[n, k], CONF[k]),
    masks[n] = gray (the input's channel mean). `combined`: one output `output0`
    [1, N, 57] = boxes, class 0, keypoints flattened (the Ultralytics nms=True layout)."""
    grid = np.arange(S, dtype=np.float32) + 0.5
    nodes = [
        _const("gx", np.broadcast_to(grid[None, :], (S, S)).reshape(1, 1, S, S)),
        _const("gy", np.broadcast_to(grid[:, None], (S, S)).reshape(1, 1, S, S)),
        _const("one", np.array([1], dtype=np.int64)),
        _const("offsets", OFFSETS),
        _const("conf", np.broadcast_to(CONF[None, :, None], (2, 17, 1)).copy()),
        _const("box_half", np.broadcast_to(BOX_HALF, (2, 4)).copy()),
        _const("scores", np.array(SCORES, dtype=np.float32)[:, None]),
        helper.make_node("Cast", ["images"], ["rgb"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["rgb"], ["gray"], axes=[1], keepdims=1),
        _const("half", np.array(0.5, dtype=np.float32)),
        helper.make_node("Sub", ["gray", "half"], ["g0"]),
        helper.make_node("Relu", ["g0"], ["bright"]),
        helper.make_node("ReduceSum", ["bright"], ["total"], keepdims=0),
    ]
    for axis in ("x", "y"):
        nodes += [
            helper.make_node("Mul", ["bright", f"g{axis}"], [f"w{axis}"]),
            helper.make_node("ReduceSum", [f"w{axis}"], [f"s{axis}"], keepdims=0),
            helper.make_node("Div", [f"s{axis}", "total"], [f"c{axis}0"]),
            helper.make_node("Reshape", [f"c{axis}0", "one"], [f"c{axis}"]),
        ]
    nodes += [
        helper.make_node("Concat", ["cx", "cy"], ["c"], axis=0),  # [2]
        helper.make_node("Add", ["offsets", "c"], ["kxy"]),  # [2, 17, 2]
        helper.make_node("Concat", ["kxy", "conf"], ["kp"], axis=2),
        helper.make_node("Concat", ["c", "c"], ["cc"], axis=0),  # [4]
        helper.make_node("Add", ["box_half", "cc"], ["xyxy"]),
        helper.make_node("Concat", ["xyxy", "scores"], ["bx"], axis=1),
    ]
    outs = {"boxes": ("bx", [2, 5]), "keypoints": ("kp", [2, 17, 3])}
    if masks:
        nodes.append(helper.make_node("Reshape", ["gray", "mask_shape"], ["mk"]))
        nodes.append(_const("mask_shape", np.array([1, S, S], dtype=np.int64)))
        nodes.append(helper.make_node("Expand", ["mk", "mask_n"], ["mk2"]))
        nodes.append(_const("mask_n", np.array([2, S, S], dtype=np.int64)))
        outs["masks"] = ("mk2", [2, S, S])
    if drop_keypoints:
        del outs["keypoints"]
    if combined:
        nodes += [
            _const("flat", np.array([2, 51], dtype=np.int64)),
            _const("cls", np.zeros((2, 1), dtype=np.float32)),
            helper.make_node("Reshape", ["kp", "flat"], ["kpf"]),
            helper.make_node("Concat", ["bx", "cls", "kpf"], ["rows"], axis=1),
        ]
        outs = {"output0": ("rows", [2, 57])}
        batch = True
    outputs = []
    for name, (src, shape) in outs.items():
        if batch:
            nodes.append(helper.make_node("Unsqueeze", [src, "zero"], [name]))
            shape = [1, *shape]
        else:
            nodes.append(helper.make_node("Identity", [src], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    if batch:
        nodes.append(_const("zero", np.array([0], dtype=np.int64)))
    in_shape = [1, 3, size, size][4 - input_rank :] if input_rank <= 4 else None
    in_type = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    graph = helper.make_graph(
        _topological(nodes), "tiny_pose",
        [helper.make_tensor_value_info("images", in_type, in_shape)], outputs,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    if input_rank == 4:  # a rank-3 input is broken on purpose: the checker would refuse it
        onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """Constants first: ONNX wants producers before consumers."""
    return sorted(nodes, key=lambda n: n.op_type != "Constant")


def _frame(w: int = 160, h: int = 90, rect: tuple[int, int, int, int] = (100, 20, 130, 60)):
    """Black non-square frame with one white rectangle x0, y0, x1, y1 (px, x1/y1 exclusive)."""
    frame = np.zeros((h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = rect
    frame[y0:y1, x0:x1] = 255
    return frame


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    return {
        "plain": _model(d / "plain.onnx"),
        "batch_masks": _model(d / "batch_masks.onnx", batch=True, masks=True),
        "dynamic": _model(d / "dynamic.onnx", size="S"),
    }


def test_letterbox_round_trip():
    box = Letterbox.fit(160, 90, S)
    assert (box.width, box.height, box.pad_x, box.pad_y) == (64, 36, 0, 14)
    pts = np.array([[0.0, 0.0], [160.0, 90.0], [37.5, 12.25]], dtype=np.float32)
    back = box.to_frame(pts * [box.scale_x, box.scale_y] + [box.pad_x, box.pad_y])
    np.testing.assert_allclose(back, pts, atol=1e-4)
    # 333 x 200 -> 64 x 38 (38.4 rounded): the picture's corners map to the frame's
    odd = Letterbox.fit(333, 200, S)
    assert (odd.width, odd.height, odd.pad_x, odd.pad_y) == (64, 38, 0, 13)
    corners = np.array([[0, 13], [64, 13 + 38]], dtype=np.float32)
    np.testing.assert_allclose(odd.to_frame(corners), [[0, 0], [333, 200]], atol=1e-3)


@pytest.mark.parametrize(
    ("size", "rect"),
    [
        ((160, 90), (100, 20, 130, 60)),  # wide: padded above and below
        ((160, 90), (10, 50, 40, 90)),  # legs guessed below the frame: visibility 0
        ((90, 160), (20, 100, 60, 130)),  # tall: padded left and right
    ],
)
def test_keypoints_come_back_in_frame_pixels(models, size, rect):
    w, h = size
    backend = OnnxPoseBackend(models["plain"], input_size=S)
    people = backend.detect(_frame(w, h, rect))
    assert len(people) == 1  # detection 1 scores 0.3 < 0.5
    person = people[0]
    assert person.score == pytest.approx(SCORES[0])
    assert person.keypoints.shape == (33, 3) and person.keypoints.dtype == np.float32
    assert person.world is None and person.mask is None

    # Expected without the back-end's letterbox code: the model finds the rectangle's
    # centre; offsets in input pixels are 1 / scale times larger in frame pixels.
    centre = np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])
    scale = S / max(w, h)
    expected = centre + OFFSETS[0] / scale
    got = person.keypoints[list(COCO_TO_BLAZEPOSE)]
    np.testing.assert_allclose(got[:, :2], expected, atol=0.6)  # < 1/4 input pixel
    inside = (
        (expected[:, 0] >= 0) & (expected[:, 0] < w) & (expected[:, 1] >= 0) & (expected[:, 1] < h)
    )
    # the model's confidence where the keypoint is in the frame, 0 outside
    np.testing.assert_allclose(got[:, 2], np.where(inside, CONF, 0.0), atol=1e-6)
    backend.close()


def test_blazepose_slots():
    from stages.pose_onnx import coco_to_blazepose

    coco = np.stack([np.arange(17) * 10.0, np.arange(17) * 10.0 + 1, np.full(17, 0.8)], 1)
    bp = coco_to_blazepose(coco.astype(np.float32))
    names = {0: 0, 2: 1, 5: 2, 7: 3, 8: 4, 11: 5, 12: 6, 13: 7, 14: 8, 15: 9, 16: 10,
             23: 11, 24: 12, 25: 13, 26: 14, 27: 15, 28: 16}  # BlazePose slot: COCO index
    for slot, k in names.items():
        np.testing.assert_allclose(bp[slot], coco[k], err_msg=f"slot {slot}")
    others = sorted(set(range(33)) - set(names))
    assert len(others) == 16 and (bp[others, 2] == 0).all()
    assert np.isfinite(bp).all()
    coco[3, 0] = np.nan  # a model's NaN keypoint is not visible
    assert coco_to_blazepose(coco.astype(np.float32))[7, 2] == 0.0
    np.testing.assert_allclose(bp[17, :2], bp[15, :2])  # left pinky sits at the left wrist
    np.testing.assert_allclose(bp[32, :2], bp[28, :2])  # right toes at the right ankle


def test_score_threshold(models):
    frame = _frame()
    low = OnnxPoseBackend(models["plain"], input_size=S, score_threshold=0.2)
    assert [p.score for p in low.detect(frame)] == pytest.approx(list(SCORES))
    high = OnnxPoseBackend(models["plain"], input_size=S, score_threshold=0.95)
    assert high.detect(frame) == []


def test_batch_dim_and_masks(models):
    frame = _frame()
    backend = OnnxPoseBackend(models["batch_masks"], input_size=S, score_threshold=0.2)
    people = backend.detect(frame)
    assert len(people) == 2
    mask = people[0].mask
    assert mask is not None and mask.shape == (90, 160) and mask.dtype == np.float32
    # the model's mask is the input's brightness: the white rectangle, cropped of padding
    assert mask[25:55, 105:125].min() > 0.95
    assert mask[:, :90].max() < 0.05 and mask[70:, :].max() < 0.05
    plain = OnnxPoseBackend(models["plain"], input_size=S, score_threshold=0.2)
    np.testing.assert_allclose(
        people[1].keypoints, plain.detect(frame)[1].keypoints, atol=1e-4
    )


def test_combined_single_output_layout(models, tmp_path):
    path = _model(tmp_path / "combined.onnx", combined=True)
    frame = _frame()
    got = OnnxPoseBackend(path, input_size=S, score_threshold=0.2).detect(frame)
    want = OnnxPoseBackend(models["plain"], input_size=S, score_threshold=0.2).detect(frame)
    assert [p.score for p in got] == pytest.approx(list(SCORES))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.keypoints, w.keypoints, atol=1e-4)


def test_float16_input(models, tmp_path):
    path = _model(tmp_path / "fp16.onnx", fp16=True)
    frame = _frame()
    got = OnnxPoseBackend(path, input_size=S).detect(frame)[0].keypoints
    want = OnnxPoseBackend(models["plain"], input_size=S).detect(frame)[0].keypoints
    np.testing.assert_allclose(got, want, atol=0.05)


def test_dynamic_input_size(models):
    backend = OnnxPoseBackend(models["dynamic"], input_size=S)
    assert len(backend.detect(_frame())) == 1


def test_missing_file(tmp_path):
    with pytest.raises(OnnxModelError, match="not found.*nope.onnx"):
        OnnxPoseBackend(tmp_path / "nope.onnx")


def test_missing_output_is_named(tmp_path):
    path = _model(tmp_path / "no_kp.onnx", drop_keypoints=True)
    with pytest.raises(OnnxModelError, match=r"lacks output\(s\) \['keypoints'\]"):
        OnnxPoseBackend(path, input_size=S)


def test_unknown_single_output_is_refused(models, tmp_path):
    model = onnx.load(models["plain"])
    del model.graph.output[1]  # keypoints
    model.graph.output[0].name = "output0"
    for node in model.graph.node:
        node.output[:] = ["output0" if o == "boxes" else o for o in node.output]
    onnx.save(model, tmp_path / "boxes_only.onnx")
    with pytest.raises(OnnxModelError, match=r"'output0' has shape \[2, 5\].*\[N, 57\]"):
        OnnxPoseBackend(tmp_path / "boxes_only.onnx", input_size=S)


def test_wrong_input_rank(tmp_path):
    path = _model(tmp_path / "rank3.onnx", input_rank=3)
    with pytest.raises(OnnxModelError, match=r"input 'images'.*rank 3.*\[1, 3, S, S\]"):
        OnnxPoseBackend(path, input_size=S)


def test_fixed_size_must_match_input_size(models):
    with pytest.raises(OnnxModelError, match="set input_size to 64"):
        OnnxPoseBackend(models["plain"], input_size=640)


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(OnnxModelError, match="cannot load"):
        OnnxPoseBackend(path)


def test_frame_must_be_uint8_rgb(models):
    backend = OnnxPoseBackend(models["plain"], input_size=S)
    with pytest.raises(ValueError, match="uint8 RGB"):
        backend.detect(np.zeros((10, 10), dtype=np.uint8))


def test_detect_stage_runs_the_onnx_backend(models, tmp_path):
    """The detect stage end to end with `backend: onnx` on a short synthetic video: one
    track, present in every frame, keypoints following the moving rectangle."""
    from pipeline.config import RunSection
    from pipeline.dataset import VideoItem
    from pipeline.stage import VideoJob
    from pipeline.video import VideoWriter
    from stages.detect import DetectConfig, DetectStage

    w, h, frames = 320, 180, 8
    # Edges on multiples of 5 px (1 input px at scale 64 / 320): the resize blurs nothing
    # asymmetrically, so the centroid is exact.
    rects = [(100 + 10 * t, 40, 140 + 10 * t, 120) for t in range(frames)]
    video = tmp_path / "walk.mkv"
    with VideoWriter(video, Fraction(25), w, h, kind="rgb") as writer:
        for rect in rects:
            writer.write(_frame(w, h, rect))
    out = tmp_path / "out"
    out.mkdir()
    job = VideoJob(
        video=VideoItem(id="walk", path=video, rel_path=video.name),
        inputs={},
        out_dir=out,
        run=RunSection(chunk_frames=4),
        advance=lambda n: None,
    )
    cfg = DetectConfig(backend="onnx", onnx_model=models["plain"], onnx_input_size=S)
    stage = DetectStage(cfg, RunSection())
    try:
        summary = stage.process(job)
    finally:
        stage.teardown()
    people = np.load(out / "people.npz")
    assert summary["tracks"] == 1 and people["present"].all()
    scale = S / w
    for t, rect in enumerate(rects):
        centre = np.array([(rect[0] + rect[2]) / 2, (rect[1] + rect[3]) / 2])
        got = people["keypoints"][t, 0][list(COCO_TO_BLAZEPOSE), :2]
        np.testing.assert_allclose(got, centre + OFFSETS[0] / scale, atol=1.0)
