"""Joint sequences for the motion attackers and the motion anonymizer.

A video gives one sequence: its main person track (the one present in the most frames),
COCO-23 keypoints in camera coordinates (stages.body.COCO23), from

- a pipeline workdir: fit/<id>/bodies.npz (`joints3d`: the real person as fitted),
  motion/<id>/bodies.npz (the anonymized poses, still on the fitted shape: what render
  reads), or render/<id>/avatar_joints.npz (the avatars as drawn: the motion the output
  shows, on the avatar's new body; what an attacker with a perfect pose estimator would
  get from the output video);
- the generator's ground truth: <dataset>/<id>.gt.npz (`joints3d`, one person).

Normalization follows Moon et al. (PRIVACY_EVAL.md section 1), with one difference said
here: each frame is centred on its own mid-hip (so the path through the room, which
depends on the scene and the camera, is removed), and the whole sequence is rotated once
so the mean hips -> shoulders direction is vertical (+y up) and the mean shoulder line
horizontal (+x from the right to the left shoulder). Bone lengths are KEPT by default
(metres): body size identifies people, and an attacker is allowed to use it. With
`scale=True` the sequence is also divided by its mean torso length (hips to shoulders),
which removes overall size but keeps proportions.

Arrays for the networks are N x 3 x T x V (V = 23), T fixed by linear resampling over
the frames where the track is present (`fixed_length(..., mode="resample")`) or by a
centred crop / edge padding at the native frame rate (`mode="crop"`, which keeps speed:
the anonymizer trains on that so it sees motion at the rate it is applied at).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from pipeline.config import ConfigError
from privacy.labels import LabelTable, VideoLabels
from stages.body import COCO23

NUM_JOINTS = len(COCO23)
L_HIP, R_HIP = COCO23.index("left_hip"), COCO23.index("right_hip")
L_SHOULDER, R_SHOULDER = COCO23.index("left_shoulder"), COCO23.index("right_shoulder")

Source = Literal["fit", "motion", "render", "gt"]


class MotionDataError(ConfigError):
    """A sequence cannot be read or has too few usable frames (a ConfigError, so the CLI
    reports it as a usage error with its message)."""


@dataclass(frozen=True)
class Normalization:
    """How one sequence was normalized: x_norm = R (x - centre_t) / scale."""

    centre: np.ndarray  # (T, 3) mid-hip per frame
    rotation: np.ndarray  # (3, 3) rows: the new x, y, z axes in camera coordinates
    scale: float

    def apply(self, joints: np.ndarray) -> np.ndarray:
        return ((joints - self.centre[:, None]) @ self.rotation.T) / self.scale

    def invert(self, normed: np.ndarray) -> np.ndarray:
        return (normed * self.scale) @ self.rotation + self.centre[:, None]


def normalization_of(joints: np.ndarray, scale: bool = False) -> Normalization:
    """The normalization of a (T, 23, 3) sequence (all frames finite)."""
    hips = 0.5 * (joints[:, L_HIP] + joints[:, R_HIP])
    shoulders = 0.5 * (joints[:, L_SHOULDER] + joints[:, R_SHOULDER])
    torso = shoulders - hips
    up = torso.mean(axis=0)
    up /= max(float(np.linalg.norm(up)), 1e-9)
    across = (joints[:, L_SHOULDER] - joints[:, R_SHOULDER]).mean(axis=0)
    across = across - up * float(across @ up)  # Gram-Schmidt: horizontal shoulder line
    norm = float(np.linalg.norm(across))
    if norm < 1e-9:  # degenerate shoulders: any axis orthogonal to up
        across = np.cross(up, [0.0, 0.0, 1.0])
        if np.linalg.norm(across) < 1e-6:
            across = np.cross(up, [1.0, 0.0, 0.0])
        norm = float(np.linalg.norm(across))
    across /= norm
    rotation = np.stack([across, up, np.cross(across, up)])
    size = float(np.linalg.norm(torso, axis=-1).mean()) if scale else 1.0
    return Normalization(hips, rotation, max(size, 1e-6))


def normalize(joints: np.ndarray, scale: bool = False) -> np.ndarray:
    return normalization_of(joints, scale).apply(joints)


def fixed_length(seq: np.ndarray, frames: int,
                 mode: Literal["resample", "crop"] = "resample") -> np.ndarray:
    """(T, ...) -> (frames, ...): linear resampling over time, or a centred crop (edge
    frames repeated when the sequence is shorter)."""
    t = len(seq)
    if t == 0:
        raise MotionDataError("empty sequence")
    if mode == "crop":
        if t >= frames:
            start = (t - frames) // 2
            return seq[start:start + frames]
        before = (frames - t) // 2
        idx = np.clip(np.arange(frames) - before, 0, t - 1)
        return seq[idx]
    pos = np.linspace(0.0, t - 1, frames)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, t - 1)
    w = (pos - lo).reshape(-1, *([1] * (seq.ndim - 1)))
    return (1 - w) * seq[lo] + w * seq[hi]


def main_track(joints: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Joints (T', 23, 3) of the track present (and finite) in the most frames, only at
    those frames. joints: (T, P, 23, 3); present: (T, P)."""
    if joints.ndim != 4 or joints.shape[1] == 0:
        raise MotionDataError("no person track")
    ok = present.astype(bool) & np.isfinite(joints).all(axis=(2, 3))
    best = int(np.argmax(ok.sum(axis=0)))
    seq = joints[ok[:, best], best]
    if len(seq) < 2:
        raise MotionDataError("main track has fewer than 2 usable frames")
    return seq.astype(np.float64)


def read_sequence(source: Source, video_id: str, workdir: Path | None = None,
                  dataset: Path | None = None) -> np.ndarray:
    """The main track's joints (T', 23, 3), camera coordinates, of one video."""
    if source == "gt":
        if dataset is None:
            raise MotionDataError("ground-truth joints need the dataset folder")
        path = Path(dataset) / f"{video_id}.gt.npz"
        key, present = "joints3d", None
    else:
        if workdir is None:
            raise MotionDataError(f"{source} joints need the workdir")
        name = "avatar_joints.npz" if source == "render" else "bodies.npz"
        path = Path(workdir) / source / video_id / name
        key, present = "joints3d", "present"
    if not path.is_file():
        raise MotionDataError(f"{path}: missing")
    with np.load(path) as z:
        if key not in z.files:
            raise MotionDataError(f"{path}: no {key}")
        joints = z[key]
        pres = z[present] if present else None
    if pres is None:  # ground truth: one person, every frame
        joints = joints[:, None]
        pres = np.ones(joints.shape[:2], bool)
    if joints.shape[-2:] != (NUM_JOINTS, 3):
        raise MotionDataError(f"{path}: joints3d shape {joints.shape}, expected (..., 23, 3)")
    return main_track(joints, pres)


def to_array(seqs: list[np.ndarray], frames: int, scale: bool = False,
             mode: Literal["resample", "crop"] = "resample") -> np.ndarray:
    """Normalized, fixed-length sequences as float32 (N, 3, frames, 23)."""
    out = [fixed_length(normalize(s, scale), frames, mode) for s in seqs]
    return np.stack(out).transpose(0, 3, 1, 2).astype(np.float32)


@dataclass
class MotionSet:
    """Sequences of one split with their labels (class indices in the table's order)."""

    x: np.ndarray  # (N, 3, T, V) float32
    labels: dict[str, np.ndarray]  # "action" and each private attribute -> (N,) int
    ids: list[str]


def load_split(table: LabelTable, split: str, source: Source, frames: int,
               workdir: Path | None = None, dataset: Path | None = None,
               scale: bool = False, mode: Literal["resample", "crop"] = "resample",
               ) -> MotionSet:
    """A split of a labelled dataset as a MotionSet. Videos without a usable track are
    left out (their ids are not in `ids`)."""
    videos: list[VideoLabels] = []
    seqs, first_error = [], None
    for v in table.split(split):
        try:
            seqs.append(read_sequence(source, v.id, workdir, dataset))
        except MotionDataError as exc:
            first_error = first_error or exc
            continue
        videos.append(v)
    if not videos:
        raise MotionDataError(f"no usable {source} joint sequence in split {split!r}"
                              + (f" (first problem: {first_error})" if first_error else ""))
    labels = {"action": np.asarray(table.encode_action(videos))}
    for attr in table.classes:
        if all(attr in v.attributes for v in videos):
            labels[attr] = np.asarray(table.encode(attr, videos))
    return MotionSet(to_array(seqs, frames, scale, mode), labels, [v.id for v in videos])


# ---- synthetic gaits: people with a style, for tests and smoke checks ----------------

# A stick figure in a body frame (x left, y up, z forward), metres, COCO-23 order.
_REST = np.array([
    [0.0, 1.62, 0.08], [0.03, 1.66, 0.06], [-0.03, 1.66, 0.06], [0.07, 1.63, 0.0],
    [-0.07, 1.63, 0.0], [0.19, 1.42, 0.0], [-0.19, 1.42, 0.0], [0.22, 1.13, 0.0],
    [-0.22, 1.13, 0.0], [0.24, 0.87, 0.0], [-0.24, 0.87, 0.0], [0.1, 0.92, 0.0],
    [-0.1, 0.92, 0.0], [0.1, 0.5, 0.0], [-0.1, 0.5, 0.0], [0.1, 0.08, 0.0],
    [-0.1, 0.08, 0.0], [0.11, 0.0, 0.15], [-0.11, 0.0, 0.15], [0.14, 0.0, 0.12],
    [-0.14, 0.0, 0.12], [0.1, 0.0, -0.05], [-0.1, 0.0, -0.05],
])
# (joint, its parent) for the limbs that swing: upper arm, forearm, thigh, shank.
_ARM = {"left": (5, 7, 9), "right": (6, 8, 10)}
_LEG = {"left": (11, 13, 15, (17, 19, 21)), "right": (12, 14, 16, (18, 20, 22))}
SYNTHETIC_ACTIONS = ("walk", "wave", "squat", "punch")


def _rot_x(a: np.ndarray) -> np.ndarray:
    """(T,) angles -> (T, 3, 3) rotations about x (positive: forward swing)."""
    c, s = np.cos(a), np.sin(a)
    out = np.zeros((len(a), 3, 3))
    out[:, 0, 0] = 1.0
    out[:, 1, 1], out[:, 1, 2] = c, -s
    out[:, 2, 1], out[:, 2, 2] = s, c
    return out


def _swing(pose: np.ndarray, pivot: int, chain: tuple[int, ...], angle: np.ndarray) -> None:
    """Rotate the joints of `chain` about `pivot` (per frame, about x), in place."""
    r = _rot_x(angle)
    rel = pose[:, list(chain)] - pose[:, pivot:pivot + 1]
    pose[:, list(chain)] = pose[:, pivot:pivot + 1] + np.einsum("tij,tkj->tki", r, rel)


@dataclass(frozen=True)
class SyntheticPerson:
    """A style: body size and proportions, posture, how wide and how fast they move."""

    height: float  # scale of the whole figure
    shoulder: float  # shoulder width factor
    hip: float  # hip width factor
    lean: float  # forward lean of the torso, rad
    arm_carry: float  # arms held away from the body, rad (abduction-like offset)
    amplitude: float  # swing amplitude factor
    gender: str


def synthetic_people(n: int, rng: np.random.Generator) -> list[SyntheticPerson]:
    people = []
    for i in range(n):
        gender = "female" if i % 2 else "male"
        g = 1.0 if gender == "male" else -1.0
        people.append(SyntheticPerson(
            height=float(rng.uniform(0.9, 1.1) + 0.03 * g),
            shoulder=float(rng.uniform(0.85, 1.15) + 0.08 * g),
            hip=float(rng.uniform(0.85, 1.15) - 0.08 * g),
            lean=float(rng.uniform(-0.15, 0.15)),
            arm_carry=float(rng.uniform(0.0, 0.35)),
            amplitude=float(rng.uniform(0.75, 1.25)),
            gender=gender,
        ))
    return people


def synthetic_sequence(person: SyntheticPerson, action: str, frames: int,
                       rng: np.random.Generator) -> np.ndarray:
    """(frames, 23, 3) joints of `person` doing `action`, in a camera frame (y down) with
    a random position and heading, and a little noise, speed and phase jitter."""
    t = np.arange(frames) / 15.0
    omega = 2 * np.pi * rng.uniform(0.9, 1.1) * {"walk": 1.0, "wave": 1.5, "squat": 0.6,
                                                    "punch": 1.2}[action]
    ph = omega * t + rng.uniform(0, 2 * np.pi)
    a = person.amplitude
    pose = np.repeat(_REST[None].copy(), frames, axis=0)
    pose[:, [5, 7, 9], 0] *= person.shoulder
    pose[:, [6, 8, 10], 0] *= person.shoulder
    pose[:, [11, 13, 15, 17, 19, 21], 0] *= person.hip
    pose[:, [12, 14, 16, 18, 20, 22], 0] *= person.hip
    # Arms held out sideways: move elbows and wrists outwards, more at the wrist.
    for side, sign in (("left", 1.0), ("right", -1.0)):
        s, e, w = _ARM[side]
        pose[:, e, 0] += sign * 0.29 * np.sin(person.arm_carry)
        pose[:, w, 0] += sign * 0.55 * np.sin(person.arm_carry)
    for k, side in enumerate(("left", "right")):
        s, e, w = _ARM[side]
        hip, knee, ankle, foot = _LEG[side]
        opp = np.pi * k
        if action == "walk":
            _swing(pose, hip, (knee, ankle, *foot), 0.45 * a * np.sin(ph + opp))
            _swing(pose, knee, (ankle, *foot), -0.5 * a * np.clip(np.sin(ph + opp), 0, None))
            _swing(pose, s, (e, w), -0.4 * a * np.sin(ph + opp))
        elif action == "wave" and side == "right":
            _swing(pose, s, (e, w), np.full(frames, -2.6))
            _swing(pose, e, (w,), 0.5 * a * np.sin(ph))
        elif action == "squat":
            depth = 0.5 * a * (1 - np.cos(ph))
            _swing(pose, hip, (knee, ankle, *foot), depth)
            _swing(pose, knee, (ankle, *foot), -2.0 * depth)
            _swing(pose, s, (e, w), 0.8 * depth)
        elif action == "punch":
            reach = a * np.clip(np.sin(ph + opp), 0, None)
            _swing(pose, s, (e, w), 1.4 * reach + 0.3)
            _swing(pose, e, (w,), 1.2 * (1 - reach))
    # Torso lean: everything above the hips tilts forward about the mid-hip.
    upper = list(range(0, 11))
    _swing(pose, 11, tuple(upper), np.full(frames, person.lean))
    pose *= person.height
    pose += rng.normal(0.0, 0.005, pose.shape)
    # Into a camera frame: y down, a random heading about the vertical, 3-5 m away.
    heading = rng.uniform(-np.pi, np.pi)
    c, s_ = np.cos(heading), np.sin(heading)
    rot = np.array([[c, 0, s_], [0, -1.0, 0], [-s_, 0, c]])
    shift = np.array([rng.uniform(-1, 1), 1.0, rng.uniform(3, 5)])
    return pose @ rot.T + shift


def synthetic_dataset(people: int = 6, actions: tuple[str, ...] = SYNTHETIC_ACTIONS,
                      train_reps: int = 4, test_reps: int = 2, frames: int = 48,
                      seed: int = 0) -> tuple[list[np.ndarray], list[VideoLabels]]:
    """Raw sequences (camera coordinates) and their labels: every person does every action
    train_reps + test_reps times; the last test_reps repetitions are the test split."""
    rng = np.random.default_rng(seed)
    persons = synthetic_people(people, rng)
    seqs, videos = [], []
    for pi, person in enumerate(persons):
        for action in actions:
            for rep in range(train_reps + test_reps):
                seqs.append(synthetic_sequence(person, action, frames, rng))
                videos.append(VideoLabels(
                    id=f"p{pi}/{action}_{rep}", action=action,
                    split="train" if rep < train_reps else "test",
                    attributes={"identity": f"p{pi}", "gender": person.gender},
                    repetition=rep))
    return seqs, videos


def synthetic_sets(frames: int = 32, scale: bool = False, seed: int = 0, **kwargs: int,
                   ) -> tuple[MotionSet, MotionSet, LabelTable]:
    """synthetic_dataset as train and test MotionSets."""
    seqs, videos = synthetic_dataset(seed=seed, **kwargs)
    table = LabelTable(videos)
    sets = []
    for split in ("train", "test"):
        idx = [i for i, v in enumerate(videos) if v.split == split]
        vs = [videos[i] for i in idx]
        labels = {"action": np.asarray(table.encode_action(vs))}
        for attr in ("identity", "gender"):
            labels[attr] = np.asarray(table.encode(attr, vs))
        sets.append(MotionSet(to_array([seqs[i] for i in idx], frames, scale, "crop"),
                              labels, [v.id for v in vs]))
    return sets[0], sets[1], table


# ---- retargeting: every body gets the same bone lengths --------------------------------

# (parent, child) in tree order from the mid-hip; -1 is the mid-hip, -2 the mid-shoulder
# (virtual joints: the bones from them reach the real ones).
KINEMATIC_TREE: tuple[tuple[int, int], ...] = tuple(
    (COCO23.index(a) if a not in ("mid_hip", "mid_shoulder") else
     {"mid_hip": -1, "mid_shoulder": -2}[a], COCO23.index(b) if b != "mid_shoulder" else -2)
    for a, b in (
        ("mid_hip", "left_hip"), ("mid_hip", "right_hip"), ("mid_hip", "mid_shoulder"),
        ("mid_shoulder", "left_shoulder"), ("mid_shoulder", "right_shoulder"),
        ("mid_shoulder", "nose"), ("nose", "left_eye"), ("nose", "right_eye"),
        ("left_eye", "left_ear"), ("right_eye", "right_ear"),
        ("left_shoulder", "left_elbow"), ("right_shoulder", "right_elbow"),
        ("left_elbow", "left_wrist"), ("right_elbow", "right_wrist"),
        ("left_hip", "left_knee"), ("right_hip", "right_knee"),
        ("left_knee", "left_ankle"), ("right_knee", "right_ankle"),
        ("left_ankle", "left_big_toe"), ("right_ankle", "right_big_toe"),
        ("left_ankle", "left_small_toe"), ("right_ankle", "right_small_toe"),
        ("left_ankle", "left_heel"), ("right_ankle", "right_heel"),
    ))


def _with_virtual(joints: torch.Tensor) -> dict[int, torch.Tensor]:
    """(..., V, 3) -> joint index -> (..., 3), plus the virtual -1 / -2."""
    out = {j: joints[..., j, :] for j in range(joints.shape[-2])}
    out[-1] = 0.5 * (out[L_HIP] + out[R_HIP])
    out[-2] = 0.5 * (out[L_SHOULDER] + out[R_SHOULDER])
    return out


def bone_lengths(joints: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(..., V, 3) -> (..., B) lengths of KINEMATIC_TREE's bones."""
    j = _with_virtual(torch.as_tensor(joints))
    return torch.stack([(j[c] - j[p]).norm(dim=-1) for p, c in KINEMATIC_TREE], dim=-1)


def retarget(joints: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Joints (..., V, 3) with every bone of KINEMATIC_TREE set to `lengths` (B,) (or one
    set per leading index, (..., B)), keeping
    each bone's direction and the mid-hip: body size and proportions, which identify people,
    become the same for everyone (the pairs of bones from the mid-hip and from the
    mid-shoulder take their mean length). Differentiable."""
    src = _with_virtual(joints)
    # The left and right bones from a virtual joint get one length, so the virtual joint
    # (their midpoint) stays where it was.
    lengths = lengths.clone()
    for left, right in ((0, 1), (3, 4)):
        mean = 0.5 * (lengths[..., left] + lengths[..., right])
        lengths[..., left], lengths[..., right] = mean, mean
    new = {-1: src[-1]}
    for b, (p, c) in enumerate(KINEMATIC_TREE):
        d = src[c] - src[p]
        new[c] = new[p] + d / d.norm(dim=-1, keepdim=True).clamp(min=1e-8) * lengths[..., b, None]
    return torch.stack([new[j] for j in range(joints.shape[-2])], dim=-2)
