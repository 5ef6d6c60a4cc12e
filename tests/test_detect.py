"""The detect stage: BlazePose people, track ids, the union mask, and bad inputs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.config import RunSection
from pipeline.dataset import VideoItem
from pipeline.stage import VideoFailed, VideoJob
from pipeline.video import VideoWriter, count_frames, iter_frames
from stages.detect import (
    HIST_BINS,
    DetectConfig,
    DetectStage,
    Tracker,
    _Rejections,
    appearance,
    appearance_distance,
)
from stages.pose_backends import (
    PAD_GREY,
    MediapipePoseBackend,
    PersonPose,
    View,
    _crop,
    _frame_mask,
    box_iou,
    padded_view,
    tile_views,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared/data"
ASL_HELP = DATA / "videos/intel__asl_help.mkv"
ASL_WALK = DATA / "videos/intel__asl_walk.mkv"
WALKERS = DATA / "videos/intel__preview_face-demographics-walking.gif"


def _job(path: Path, out: Path, chunk: int = 16) -> tuple[VideoJob, list[int]]:
    out.mkdir(parents=True, exist_ok=True)
    advanced: list[int] = []
    job = VideoJob(
        video=VideoItem(id=path.stem, path=path, rel_path=path.name),
        inputs={},
        out_dir=out,
        run=RunSection(chunk_frames=chunk),
        advance=advanced.append,
    )
    return job, advanced


@pytest.fixture(scope="module")
def stage():
    st = DetectStage(DetectConfig(), RunSection())
    st.setup()
    yield st
    st.teardown()


def _real_video(path: Path = ASL_HELP) -> Path:
    if not path.is_file():
        pytest.skip(f"real test video {path} is absent (only in the project's workspace)")
    return path


# -- tracker (pure) --------------------------------------------------------------------------


def _box(x: float, y: float, w: float = 40, h: float = 100) -> np.ndarray:
    return np.array([x, y, x + w, y + h], dtype=np.float32)


def test_tracker_keeps_a_moving_person_and_separates_a_distant_one():
    tr = Tracker(max_gap_frames=5)
    ids = [tr.assign(t, [_box(10 + 8 * t, 20)])[0] for t in range(10)]
    assert ids == [0] * 10
    # Two people in one frame: the one near the track continues it, the far one is new.
    assert tr.assign(10, [_box(500, 20), _box(92, 22)]) == [1, 0]


def test_tracker_gap_rules():
    tr = Tracker(max_gap_frames=3)
    assert tr.assign(0, [_box(0, 0)]) == [0]
    assert tr.assign(3, [_box(60, 0)]) == [0]  # short gap, moved less than a body height
    # Long gap, somewhere else: a new person.
    assert tr.assign(20, [_box(300, 0)]) == [1]
    # Long gap, same place as track 0's last box: the same person came back.
    assert tr.assign(40, [_box(62, 2)]) == [0]


def _desc(upper: int, lower: int, spread: float = 0.0) -> np.ndarray:
    """A descriptor whose halves sit (mostly) in one histogram bin each."""
    n = int(np.prod(HIST_BINS))
    d = np.full((2, n), spread / n, dtype=np.float32)
    d[0, upper] += 1.0
    d[1, lower] += 1.0
    return d / d.sum(axis=1, keepdims=True)


RED, BLUE = _desc(3, 40), _desc(90, 100)


def test_tracker_keeps_ids_when_two_people_cross():
    # A walks right, B walks left at the same height; they meet at t=10 and B is hidden
    # behind A for three frames. Position alone cannot tell them apart at the crossing.
    tr = Tracker(max_gap_frames=5)
    for t in range(21):
        xa, xb = 100 + 10 * t, 300 - 10 * t
        boxes, descs = [_box(xa, 50)], [RED]
        if not 9 <= t <= 11:
            boxes.append(_box(xb, 52))
            descs.append(BLUE)
        ids = tr.assign(t, boxes, descs)
        assert ids == [0, 1][: len(boxes)], t
    assert len(tr.tracks) == 2


def test_tracker_appearance_beats_position_at_a_swap():
    # Right after crossing, the boxes are where the other person's track predicts less
    # well than appearance says: appearance keeps the ids.
    tr = Tracker(max_gap_frames=5)
    tr.assign(0, [_box(100, 50), _box(140, 50)], [RED, BLUE])
    assert tr.assign(1, [_box(118, 50), _box(124, 50)], [BLUE, RED]) == [1, 0]


def test_tracker_reentry_keeps_the_id_only_for_the_same_appearance():
    tr = Tracker(max_gap_frames=5)
    for t in range(10):
        assert tr.assign(t, [_box(10 + 5 * t, 20)], [RED]) == [0]
    # A different person appears where the first one left: a new id, despite the place.
    assert tr.assign(40, [_box(57, 20)], [BLUE]) == [1]
    # The first person comes back elsewhere, long after, looking (almost) the same: their
    # id again.
    assert tr.assign(80, [_box(400, 30)], [_desc(3, 40, spread=0.02)]) == [0]
    # And a third, unseen appearance gets a third id.
    assert tr.assign(90, [_box(600, 30)], [_desc(120, 7)]) == [2]


def test_appearance_descriptor():
    h, w = 120, 60
    frame = np.zeros((h, w, 3), np.uint8)
    frame[: h // 2] = (200, 30, 30)  # red shirt
    frame[h // 2 :] = (30, 30, 200)  # blue trousers
    region = np.ones((h, w), bool)
    box = np.array([0, 0, w, h], np.float32)
    a = appearance(frame, region, box)
    assert a.shape == (2, int(np.prod(HIST_BINS))) and np.allclose(a.sum(axis=1), 1)
    noisy = np.clip(frame + np.random.default_rng(0).integers(-8, 8, frame.shape), 0, 255)
    assert appearance_distance(a, appearance(noisy.astype(np.uint8), region, box)) < 0.25
    swapped = frame[::-1].copy()  # blue shirt, red trousers: other person
    assert appearance_distance(a, appearance(swapped, region, box)) > 0.6
    assert appearance(frame, np.zeros((h, w), bool), box) is None  # no person pixels


def test_onnx_backend_needs_a_model(tmp_path):
    with pytest.raises(ValidationError, match="onnx_model"):
        DetectConfig(backend="onnx")
    st = DetectStage(DetectConfig(backend="onnx", onnx_model=tmp_path / "no.onnx"), RunSection())
    with pytest.raises(ValueError, match="no.onnx"):
        st.setup()


class _MasklessBackend:
    """A back-end like the ONNX one: landmarks only, no mask, no world landmarks."""

    def __init__(self, people: list[PersonPose]):
        self.people = people

    def reset(self) -> None: ...

    def detect(self, frame_rgb: np.ndarray) -> list[PersonPose]:
        return self.people

    def close(self) -> None: ...


def _standing_pose(x: float, height: float, score: float = 0.9) -> PersonPose:
    kp = np.zeros((33, 3), np.float32)
    ys = np.linspace(10, 10 + height, 33)
    kp[:, 0] = x + 10 * np.sin(np.arange(33))  # a thin, body-like cloud of landmarks
    kp[:, 1] = ys
    kp[:, 2] = 1.0
    return PersonPose(kp, None, None, score)


def test_backend_without_masks_or_world(tmp_path):
    st = DetectStage(DetectConfig(), RunSection())
    tall, small, unsure = _standing_pose(50, 100), _standing_pose(150, 20), _standing_pose(
        120, 100, score=0.2
    )
    st._backend = _MasklessBackend([tall, small, unsure])
    rejected = _Rejections()
    frame = np.full((160, 200, 3), 90, np.uint8)
    dets, union = st.detect_frame(frame, rejected)
    assert len(dets) == 1 and rejected.height == 1 and rejected.visibility == 1
    (det,) = dets
    assert np.isnan(det.world).all() and det.descriptor is not None
    x0, y0, x1, y1 = det.box
    # The box and the mask come from the landmarks' hull, grown a little.
    assert x0 < 40 and x1 > 60 and y0 < 10 and 110 < y1 < 125
    assert union.dtype == np.float32 and union[60, 50] == 1.0 and union[60, 150] == 0.0
    assert union[y0.astype(int) : y1.astype(int), x0.astype(int) : x1.astype(int)].sum() == (
        union.sum()
    )


def test_config_rejects_bad_values():
    with pytest.raises(ValidationError):
        DetectConfig(min_visibility=1.5)
    with pytest.raises(ValidationError):
        DetectConfig(no_such_key=1)


# -- views: padding and tiles ---------------------------------------------------------------


def test_tile_views_cover_the_frame_with_overlap():
    w, h = 340, 256
    tiles = tile_views(w, h, 2, 0.4)
    assert len(tiles) == 4 and all(t.tile for t in tiles)
    covered = np.zeros((h, w), int)
    for t in tiles:
        assert 0 <= t.x0 < t.x1 <= w and 0 <= t.y0 < t.y1 <= h
        covered[t.y0 : t.y1, t.x0 : t.x1] += 1
    assert covered.min() >= 1  # every pixel is in a tile
    left, right = tiles[0], tiles[1]
    tile_w = left.x1 - left.x0
    assert right.x1 == w and abs((left.x1 - right.x0) - 0.4 * tile_w) <= 1
    assert tile_w < 0.65 * w  # a tile is much smaller than the frame: people look larger


def test_padded_crop_and_mask_map_back_to_the_frame():
    frame = np.random.default_rng(0).integers(0, 255, (40, 60, 3)).astype(np.uint8)
    view = padded_view(60, 40, 0.25)
    assert (view.x0, view.y0, view.x1, view.y1) == (-15, -10, 75, 50) and not view.tile
    image = _crop(frame, view)
    assert image.shape == (60, 90, 3)
    assert (image[10:50, 15:75] == frame).all() and (image[:10] == PAD_GREY).all()
    # A mask over the view comes back frame-sized, its padding dropped.
    mask = np.zeros((60, 90), np.float32)
    mask[20:30, 20:40] = 1.0
    back = _frame_mask(mask, view, 60, 40)
    assert back.shape == (40, 60) and back.sum() == 200 and back[10:20, 5:25].all()
    tile = View(30, 20, 60, 40, tile=True)
    assert (_crop(frame, tile) == frame[20:40, 30:60]).all()
    back = _frame_mask(np.ones((20, 30), np.float32), tile, 60, 40)
    assert back[20:, 30:].all() and back.sum() == 600


CHECKER = ((255, 0, 0), (0, 0, 255))


class _FakeBlazePose:
    """Stands in for mediapipe's Pose: a "person" is a red/blue checkerboard rectangle
    (a blur, i.e. painting out, destroys it) and, like BlazePose's detector, it finds only
    people at least 0.3 of its input image tall; it reports the largest such person."""

    MIN_RELATIVE_HEIGHT = 0.3

    def __init__(self, **options): ...

    def reset(self) -> None: ...

    def close(self) -> None: ...

    def process(self, image: np.ndarray):
        from types import SimpleNamespace as NS

        import cv2

        h, w = image.shape[:2]
        pure = np.zeros((h, w), np.uint8)
        for colour in CHECKER:
            pure |= (image == colour).all(axis=-1)
        pure = cv2.dilate(pure, np.ones((3, 3), np.uint8))
        n, _, stats, _ = cv2.connectedComponentsWithStats(pure, connectivity=8)
        people = [s for s in stats[1:n] if s[3] >= self.MIN_RELATIVE_HEIGHT * h]
        if not people:
            return NS(pose_landmarks=None)
        x, y, bw, bh, _ = max(people, key=lambda s: s[4])
        x, y, bw, bh = x + 1, y + 1, bw - 2, bh - 2  # undo the dilation
        ys = np.linspace(y + 1, y + bh - 2, 33)
        xs = x + bw / 2 + 0.3 * bw * np.sin(np.arange(33))
        marks = [NS(x=float(u / w), y=float(v / h), z=0.0, visibility=0.99)
                 for u, v in zip(xs, ys, strict=True)]
        mask = np.zeros((h, w), np.float32)
        mask[y : y + bh, x : x + bw] = 1.0
        return NS(pose_landmarks=NS(landmark=marks), pose_world_landmarks=NS(landmark=marks),
                  segmentation_mask=mask)


def _checker_person(frame: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    frame[y : y + h, x : x + w] = np.where(((xx + yy) % 2 == 0)[..., None], *CHECKER)
    return np.array([x, y, x + w, y + h], np.float32)


def _fake_backend(**options) -> MediapipePoseBackend:
    backend = MediapipePoseBackend(max_people=6, **options)
    backend.close()  # the real BlazePose is not used below
    backend._new_pose = _FakeBlazePose
    return backend


def test_tiles_find_small_people_once_each():
    frame = np.full((480, 640, 3), 90, np.uint8)
    big = _checker_person(frame, 60, 100, 80, 220)  # found by the whole-frame search
    small = [_checker_person(frame, 400, 40, 40, 110), _checker_person(frame, 560, 330, 40, 110)]

    plain = _fake_backend(pad=0.0, tiles=1).detect(frame)
    assert len(plain) == 1  # the small people are too small for the whole frame

    found = _fake_backend(pad=0.25, tiles=2).detect(frame)
    # The big person lies in tiles as well, the small ones in two overlapping tiles each:
    # still each person exactly once, at the right place in the frame.
    assert len(found) == 3
    for person, want in zip(found, [big, *small], strict=True):
        kp = person.keypoints
        assert (kp[:, 2] > 0.9).all()
        lm_box = np.array([*kp[:, :2].min(0), *kp[:, :2].max(0)])
        assert box_iou(lm_box, want) > 0.5
        assert person.mask.shape == (480, 640)
        x0, y0, x1, y1 = want.astype(int)
        assert person.mask[y0:y1, x0:x1].sum() == person.mask.sum() == (x1 - x0) * (y1 - y0)


def test_rescan_every_skips_idle_searches_and_finds_newcomers_late():
    """rescan_every=3: between rescans only the first search and the searches tracking
    someone run; a small person who appears at frame 4 is found at the next rescan
    (frame 6), two frames late; with rescan_every=1 at once."""
    calls: list[int] = []

    class Counting(_FakeBlazePose):
        def process(self, image):
            calls[-1] += 1
            return super().process(image)

    def frames() -> list[np.ndarray]:
        out = []
        for t in range(9):
            frame = np.full((480, 640, 3), 90, np.uint8)
            _checker_person(frame, 60, 100, 80, 220)  # found by the whole-frame search
            if t >= 4:
                _checker_person(frame, 400, 40, 40, 110)  # only a tile finds it
            out.append(frame)
        return out

    def run(every: int) -> tuple[list[int], list[int]]:
        backend = MediapipePoseBackend(max_people=6, pad=0.25, tiles=2, rescan_every=every)
        backend.close()
        backend._new_pose = Counting
        calls.clear()
        people = []
        for frame in frames():
            calls.append(0)
            people.append(len(backend.detect(frame)))
        return people, list(calls)

    people, per_frame = run(1)
    assert people == [1, 1, 1, 1, 2, 2, 2, 2, 2]
    assert min(per_frame) >= 6  # every search, every frame
    people, per_frame = run(3)
    assert people == [1, 1, 1, 1, 1, 1, 2, 2, 2]
    assert per_frame[0] == per_frame[3] >= 6  # rescans
    assert per_frame[1] == per_frame[2] == per_frame[4] == per_frame[5] == 1
    # After the find, the tile tracking the small person runs every frame.
    assert per_frame[7] == per_frame[8] == 2


# -- real video ------------------------------------------------------------------------------


@pytest.mark.real
def test_real_video_finds_one_tracked_person(stage, tmp_path):
    path = _real_video()
    job, advanced = _job(path, tmp_path / "out")
    summary = stage.process(job)

    decoded = count_frames(path)
    first = next(iter_frames(path))
    h, w = first.shape[:2]
    video = summary["video"]
    assert video["frame_count"] == decoded == sum(advanced)
    assert (video["width"], video["height"]) == (w, h)
    assert Fraction(video["fps_num"], video["fps_den"]) == 30

    z = np.load(job.out_dir / "people.npz")
    T, P = decoded, summary["tracks"]
    assert P == 1  # one signer, never out of view: one track
    assert z["keypoints"].shape == (T, P, 33, 3) and z["keypoints"].dtype == np.float32
    assert z["world"].shape == (T, P, 33, 3)
    assert z["boxes"].shape == (T, P, 4) and z["scores"].shape == (T, P)
    assert z["present"].shape == (T, P) and z["present"].dtype == bool
    assert z["track_ids"].tolist() == list(range(P))

    present = z["present"][:, 0]
    assert summary["frames_with_person"] == int(present.sum()) >= 0.9 * T
    kp = z["keypoints"][present, 0]
    visible = kp[kp[..., 2] >= 0.5]
    assert len(visible) > 10 * present.sum()
    # Landmarks BlazePose guesses outside the picture are marked invisible.
    assert (visible[:, 0] >= 0).all() and (visible[:, 0] < w).all()
    assert (visible[:, 1] >= 0).all() and (visible[:, 1] < h).all()
    boxes = z["boxes"][present, 0]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= h).all()
    assert (boxes[:, 3] - boxes[:, 1] >= DetectConfig().min_person_height_px).all()
    assert np.isnan(z["boxes"][~present]).all()
    assert (z["scores"][present, 0] >= DetectConfig().min_visibility).all()
    world_height = np.ptp(z["world"][present, 0, :, 1], axis=1)
    assert (world_height > 0.3).all() and (world_height < 2.5).all()  # metres, a body

    masks = list(iter_frames(job.out_dir / "mask.mkv", "gray"))
    assert len(masks) == T and masks[0].shape == (h, w)
    for t, mask in enumerate(masks):
        if not present[t]:
            assert mask.max() == 0
            continue
        person = mask >= 128
        assert person.sum() > 0.02 * h * w
        x0, y0, x1, y1 = z["boxes"][t, 0].astype(int)
        # The mask is the person whose box this is: most of it lies inside the box.
        assert person[y0:y1, x0:x1].sum() >= 0.9 * person.sum()


@pytest.mark.real
def test_small_people_are_rejected(tmp_path):
    path = _real_video()
    # Only the whole-frame search: the extra views would reject the same people, slower.
    cfg = DetectConfig(min_person_height_px=100_000, pad=0.0, tiles=1)
    st = DetectStage(cfg, RunSection())
    st.setup()
    try:
        job, _ = _job(path, tmp_path / "out", chunk=64)
        summary = st.process(job)
    finally:
        st.teardown()
    assert summary["tracks"] == 0 and summary["frames_with_person"] == 0
    assert "no person detected" in summary["notes"]
    assert any("smaller than 100000px" in n for n in summary["notes"])


@pytest.mark.real
def test_finds_both_walkers(stage, tmp_path):
    path = _real_video(WALKERS)  # two people walking side by side, an animated GIF
    job, _ = _job(path, tmp_path / "out", chunk=64)
    summary = stage.process(job)
    z = np.load(job.out_dir / "people.npz")
    T = summary["video"]["frame_count"]
    assert T == count_frames(path)
    assert summary["tracks"] == 2
    assert (z["present"].sum(axis=0) >= 0.7 * T).all()
    both = z["present"].all(axis=1)
    a, b = z["boxes"][both, 0], z["boxes"][both, 1]
    # Two different people: their boxes barely overlap.
    ix = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    assert (ix * iy < 0.3 * area).all()


@pytest.mark.real
def test_two_people_side_by_side_keep_their_tracks(stage, tmp_path):
    # Two signers composited side by side (each real video at half size): two people in
    # every frame, who must keep two separate, stable ids.
    left, right = _real_video(ASL_HELP), _real_video(ASL_WALK)
    src = tmp_path / "pair.mkv"
    frames = 30
    with VideoWriter(src, Fraction(30), 640, 240, kind="rgb") as writer:
        for _, a, b in zip(range(frames), iter_frames(left), iter_frames(right), strict=False):
            half = [a[::2, ::2], b[::2, ::2]]
            writer.write(np.ascontiguousarray(np.hstack(half)))
    job, _ = _job(src, tmp_path / "out")
    summary = stage.process(job)
    z = np.load(job.out_dir / "people.npz")
    assert summary["tracks"] == 2
    assert (z["present"].sum(axis=0) >= 0.9 * frames).all()
    centres = (z["boxes"][..., 0] + z["boxes"][..., 2]) / 2
    sides = [np.nanmax(centres[:, k]) < 320 for k in range(2)]
    # One track always on the left, the other always on the right: the ids never swap.
    assert sorted(sides) == [False, True]
    other = int(sides[0])  # index of the right-hand track
    assert (np.nanmin(centres[:, other]) >= 320)


@pytest.mark.real
def test_tiles_find_small_real_people_the_plain_search_misses():
    # A real signer three times in a 960x540 frame: once 240 px tall, twice 120 px (about
    # 106 px of person), too small for BlazePose's detector on the whole frame.
    import cv2

    signer = next(iter_frames(_real_video()))
    frame = np.full((540, 960, 3), 120, np.uint8)
    frame[280:520, 40:360] = cv2.resize(signer, (320, 240), interpolation=cv2.INTER_AREA)
    small = cv2.resize(signer, (160, 120), interpolation=cv2.INTER_AREA)
    places = [(560, 60), (760, 360)]
    for x, y in places:
        frame[y : y + 120, x : x + 160] = small
    found = {}
    for name, cfg in {"plain": DetectConfig(pad=0.0, tiles=1), "tiles": DetectConfig()}.items():
        st = DetectStage(cfg, RunSection())
        st.setup()
        try:
            found[name], _ = st.detect_frame(frame, _Rejections())
        finally:
            st.teardown()
    assert len(found["plain"]) == 1 and found["plain"][0].box[0] < 360
    dets = found["tiles"]
    assert len(dets) == 3  # the big signer once (not again in a tile), each small one once
    assert np.allclose(dets[0].box, found["plain"][0].box, atol=2)
    for det, (x, y) in zip(dets[1:], places, strict=True):
        x0, y0, x1, y1 = det.box
        # (a box edge may pass a landmark guessed a pixel or two past the picture)
        assert x - 3 <= x0 < x1 <= x + 163 and y - 3 <= y0 < y1 <= y + 123 and y1 - y0 > 80


# -- synthetic and broken inputs -------------------------------------------------------------


def _write_empty_scene(path: Path, frames: int = 20, w: int = 160, h: int = 120) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    with VideoWriter(path, Fraction(25), w, h, kind="rgb") as writer:
        for t in range(frames):
            frame = np.stack([(xx * 255 // w + 3 * t) % 256, yy * 255 // h, (xx + yy) % 256], -1)
            noise = rng.integers(-20, 20, frame.shape)
            writer.write(np.clip(frame + noise, 0, 255).astype(np.uint8))


def test_video_without_people(stage, tmp_path):
    src = tmp_path / "empty.mkv"
    _write_empty_scene(src, frames=20)
    job, advanced = _job(src, tmp_path / "out", chunk=8)
    summary = stage.process(job)

    assert summary["tracks"] == 0 and summary["frames_with_person"] == 0
    assert "no person detected" in summary["notes"]
    assert summary["video"] == {
        "width": 160, "height": 120, "fps_num": 25, "fps_den": 1, "frame_count": 20
    }
    assert advanced == [8, 8, 4]
    z = np.load(job.out_dir / "people.npz")
    assert z["keypoints"].shape == (20, 0, 33, 3) and z["boxes"].shape == (20, 0, 4)
    assert z["present"].shape == (20, 0) and z["track_ids"].shape == (0,)
    masks = np.stack(list(iter_frames(job.out_dir / "mask.mkv", "gray")))
    assert masks.shape == (20, 120, 160) and masks.max() == 0


def test_corrupt_file_fails_the_video(stage, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("this is not a video\n" * 50)
    job, _ = _job(bad, tmp_path / "out")
    with pytest.raises(VideoFailed, match="bad.mp4"):
        stage.process(job)


def test_empty_file_fails_the_video(stage, tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    job, _ = _job(empty, tmp_path / "out")
    with pytest.raises(VideoFailed, match="empty file"):
        stage.process(job)
