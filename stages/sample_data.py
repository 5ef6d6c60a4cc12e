"""The embedded sample dataset: Anny people performing scripted actions in generated rooms.

`generate_sample(DIR)` writes a class-per-folder action dataset with every label known by
construction, so utility and leakage can be measured exactly (PRIVACY_EVAL.md):

    DIR/<action>/<action>_<k>.mp4      H.264 video
    DIR/<action>/<action>_<k>.gt.npz   2D/3D COCO-23 joints, camera, body parameters
    DIR/<action>/<action>_<k>.json     action, person identity and attributes, room, camera
    DIR/manifest.csv                   path,label,split (written last: it marks completion)

The .gt.npz holds, for T frames: joints2d [T,23,2] px and joints3d [T,23,3] camera metres
(Anny's COCO-23 order, stages.body.COCO23), boxes [T,4] (x0, y0, x1, y1 px of every body
vertex), camera [4] (fx, fy, cx, cy), intrinsics [3,3], cam_rot [T,3,3] (world -> camera)
and cam_center [3] (world), phenotype [6] with phenotype_labels, and the body parameters
pose [T,J,3], root_orient [T,3], transl [T,3] in camera coordinates, from which
stages.body's forward reproduces joints3d.

`generate_benchmark(DIR)` (`avatarize sample-data DIR --benchmark`) writes the privacy
benchmark in the same format: people x actions x repetitions (sizes: the recipes'
`benchmark` table), every person with one body, clothing and motion style (the recipes'
people.style and people.traits) in all their videos, stratified gender, age group, skin
tone and build, videos DIR/<action>/<action>_<person>_r<rep>.mp4 whose sidecar also holds
`repetition` and the repetition's `motion_style`; the last repetition of each (person,
action) is the test split. DIR/benchmark.json holds the people table and the settings.

Nothing is downloaded: people are Anny bodies with sampled phenotype, skin, hair and
clothing painted as per-vertex colours; actions are keyframed joint rotations; rooms are
textured quads whose textures (posters with faces, text with names and addresses, a number
plate, a screen) are drawn with OpenCV. Frames are rendered with pyrender (EGL, headless).
Every draw comes from `seed`, so the same seed gives the same dataset.

World frame: OpenCV-like, x right, y down, z away from the camera's rest direction, floor
at y = 0, the room's back wall at z = ROOM_BACK_Z.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

# pyrender picks its GL platform when imported; headless rendering needs EGL.
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

RECIPES_PATH = Path(__file__).resolve().parents[1] / "assets" / "sample_recipes.yaml"
GENERATOR_VERSION = 1
ROOM_BACK_Z = 7.0
FRAME_MARGIN_PX = 3  # the whole body stays this far inside the frame
TEXTURE_PX_PER_M = 160

# COCO-23 indices used to place bodies.
_ANKLES = (15, 16)


# ----------------------------------------------------------------------------- recipes


def load_recipes(path: Path | None = None) -> dict[str, Any]:
    with open(path or RECIPES_PATH) as fh:
        return yaml.safe_load(fh)


def _uniform(rng: np.random.Generator, bounds: list[float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _pick(rng: np.random.Generator, table: dict[str, Any]) -> tuple[str, Any]:
    name = list(table)[int(rng.integers(len(table)))]
    return name, table[name]


def _choose(rng: np.random.Generator, probs: dict[str, float]) -> str:
    names = list(probs)
    p = np.asarray([probs[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _rgb(c: list[int] | tuple[int, ...], jitter: float = 0.0,
         rng: np.random.Generator | None = None) -> np.ndarray:
    out = np.asarray(c, dtype=np.float32)
    if jitter and rng is not None:
        out = out * (1.0 + rng.uniform(-jitter, jitter))
    return np.clip(out, 0, 255)


# ----------------------------------------------------------------------------- people


@dataclass
class Person:
    id: str
    phenotype: np.ndarray  # (6,) in Anny's phenotype order
    attributes: dict[str, Any]
    colors: dict[str, np.ndarray]  # region -> sRGB float (0-255)
    sleeves: str
    legwear: str
    left_handed: bool
    style: dict[str, float]
    # Benchmark people's further motion traits (recipes people.traits); empty: none.
    traits: dict[str, float] = field(default_factory=dict)


def _age_to_anny(years: float, mapping: dict[str, list[float]]) -> float:
    return float(np.interp(years, mapping["years"], mapping["anny"]))


def sample_person(rng: np.random.Generator, recipe: dict[str, Any], index: int,
                  phenotype_labels: tuple[str, ...], fixed: dict[str, str] | None = None,
                  traits: bool = False) -> Person:
    """A person drawn from the recipe. `fixed` forces classes of gender, age_group,
    skin_tone and build (the benchmark stratifies them); `traits` draws the further motion
    traits. Without either, the draws (and so the plain sample) are as they always were."""
    fixed = fixed or {}
    gender, g_range = _fixed_pick(rng, recipe["genders"], fixed.get("gender"))
    age_group, a_range = _fixed_pick(rng, recipe["age_groups"], fixed.get("age_group"))
    years = _uniform(rng, a_range)
    build, b = _fixed_pick(rng, recipe["builds"], fixed.get("build"))
    values = {
        "gender": _uniform(rng, g_range),
        "age": _age_to_anny(years, recipe["age_mapping"]),
        "muscle": _uniform(rng, b["muscle"]),
        "weight": _uniform(rng, b["weight"]),
        "height": _uniform(rng, recipe["height"]),
        "proportions": _uniform(rng, recipe["proportions"]),
    }
    phenotype = np.asarray([values[k] for k in phenotype_labels], dtype=np.float32)
    skin_name, skin = _fixed_pick(rng, recipe["skin_tones"], fixed.get("skin_tone"))
    hair_name, hair = _pick(rng, recipe["hair"])
    if age_group == "older_adult" and rng.random() < 0.5:
        hair_name, hair = "grey", recipe["hair"]["grey"]
    eye_name, eye = _pick(rng, recipe["eye_colors"])
    top_name, top = _pick(rng, recipe["tops"])
    bottom_name, bottom = _pick(rng, recipe["bottoms"])
    shoe_name, shoe = _pick(rng, recipe["shoes"])
    sleeves = _choose(rng, recipe["sleeves"])
    legwear = _choose(rng, recipe["legwear"])
    left_handed = bool(rng.random() < recipe["left_handed"])
    style = {k: _uniform(rng, v) for k, v in recipe["style"].items()}
    colors = {
        "skin": _rgb(skin, 0.04, rng),
        "hair": _rgb(hair, 0.06, rng),
        "eye": _rgb(eye),
        "top": _rgb(top, 0.06, rng),
        "bottom": _rgb(bottom, 0.06, rng),
        "shoes": _rgb(shoe, 0.06, rng),
    }
    attributes = {
        "gender": gender,
        "age_group": age_group,
        "age_years": round(years, 1),
        "skin_tone": skin_name,
        "build": build,
        "height_param": round(values["height"], 3),
        "hair": hair_name,
        "eye_color": eye_name,
        "clothing": {"top": top_name, "sleeves": sleeves, "bottom": bottom_name,
                     "legwear": legwear, "shoes": shoe_name},
        "handedness": "left" if left_handed else "right",
        "phenotype": {k: round(float(v), 4) for k, v in values.items()},
        "style": {k: round(v, 3) for k, v in style.items()},
    }
    # Drawn last, so people without traits draw exactly what they always did.
    person_traits = {k: _uniform(rng, v) for k, v in recipe["traits"].items()} if traits \
        else {}
    if person_traits:
        shift = recipe.get("trait_shift_by_gender", {}).get(gender, {})
        if set(shift) - set(person_traits):
            raise KeyError(f"sample recipes: trait_shift_by_gender.{gender} names unknown "
                           f"traits {sorted(set(shift) - set(person_traits))}")
        person_traits = {k: v + float(shift.get(k, 0.0)) for k, v in person_traits.items()}
    attributes["style"].update({k: round(v, 3) for k, v in person_traits.items()})
    return Person(id=f"person_{index:02d}", phenotype=phenotype, attributes=attributes,
                  colors=colors, sleeves=sleeves, legwear=legwear, left_handed=left_handed,
                  style=style, traits=person_traits)


def _fixed_pick(rng: np.random.Generator, table: dict[str, Any],
                name: str | None) -> tuple[str, Any]:
    """`_pick`, or the forced class `name`; the draw is made either way, so forcing one
    attribute leaves the draws of the others unchanged."""
    picked = _pick(rng, table)
    if name is None:
        return picked
    if name not in table:
        raise ValueError(f"sample recipes: unknown class {name!r} (have {sorted(table)})")
    return name, table[name]


def stratified_classes(rng: np.random.Generator, classes: list[str], n: int) -> list[str]:
    """n labels covering `classes` as evenly as n allows (every class once before any
    twice, the remainder's classes at random), in random order."""
    order = [classes[i] for i in rng.permutation(len(classes))]
    labels = [order[j % len(order)] for j in range(n)]
    return [labels[i] for i in rng.permutation(n)]


# Which clothing region each Anny bone's vertices belong to (by the vertex's dominant bone).
def _bone_region(label: str) -> str:
    if label.startswith(("foot", "toe")):
        return "shoes"
    if label.startswith(("lowerleg",)):
        return "shin"
    if label.startswith(("upperleg", "pelvis")):
        return "thigh"
    if label.startswith(("lowerarm", "wrist", "finger", "metacarpal")):
        return "forearm" if label.startswith("lowerarm") else "hand"
    if label.startswith(("upperarm",)):
        return "upperarm"
    if label.startswith(("neck", "head", "eye")) or label in ("jaw",):
        return "head"
    return "torso"  # root, spine, clavicle, shoulder


def paint_body(rest_verts: np.ndarray, rest_kps: np.ndarray, bone_index: np.ndarray,
               bone_weight: np.ndarray, bone_labels: list[str], person: Person) -> np.ndarray:
    """Per-vertex sRGB colours (V, 4) uint8 for a body in its rest pose (camera frame, the
    person facing the camera: y down, -z towards the viewer). Each bone's region (skin, top,
    trousers, shoes) gives a colour; a vertex blends its bones' colours by sharpened skinning
    weights, so collars and sleeve ends are soft instead of jagged along triangle edges."""
    c = person.colors
    regions = np.array([_bone_region(b) for b in bone_labels])
    region_color = {
        "head": c["skin"], "hand": c["skin"], "upperarm": c["top"], "torso": c["top"],
        "forearm": c["top"] if person.sleeves == "long" else c["skin"],
        "thigh": c["bottom"], "shin": c["bottom"], "shoes": c["shoes"],
    }
    bone_color = np.stack([region_color[r] for r in regions])
    w = bone_weight ** 3
    w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-8)
    colors = np.einsum("vk,vkc->vc", w, bone_color[bone_index]).astype(np.float32)
    dominant = bone_index[np.arange(len(bone_index)), bone_weight.argmax(axis=1)]
    region = regions[dominant]
    y = rest_verts[:, 1]
    hip_y = float(rest_kps[[11, 12], 1].mean())
    knee_y = float(rest_kps[[13, 14], 1].mean())
    shoulder_y = float(rest_kps[[5, 6], 1].mean())
    # The waistband sits a little above the hip joints: torso vertices below it are trousers.
    waist_y = hip_y - 0.18 * (hip_y - shoulder_y)
    colors[(region == "torso") & (y >= waist_y)] = c["bottom"]
    if person.legwear == "shorts":
        legs = (region == "shin") | (region == "thigh")
        colors[legs & (y > knee_y - 0.06)] = c["skin"]
    _paint_face(colors, rest_verts, rest_kps, region, dominant, bone_labels, person)
    rgba = np.concatenate([colors, np.full((len(colors), 1), 255, np.float32)], axis=1)
    return np.clip(rgba, 0, 255).astype(np.uint8)


def _paint_face(colors: np.ndarray, v: np.ndarray, kps: np.ndarray, region: np.ndarray,
                dominant: np.ndarray, bone_labels: list[str], person: Person) -> None:
    """Hair, eyes, brows and lips: the features a face detector keys on."""
    c = person.colors
    head = region == "head"
    eyes_mid = kps[[1, 2]].mean(axis=0)
    nose = kps[0]
    ears_mid = kps[[3, 4]].mean(axis=0)
    eye_dist = float(np.linalg.norm(kps[1] - kps[2]))
    x, y, z = v[:, 0], v[:, 1], v[:, 2]
    front = z < ears_mid[2] - 0.02  # towards the viewer
    # Hair: the scalp above the forehead and the back of the head down to the nape.
    hairline_y = eyes_mid[1] - 0.9 * eye_dist
    scalp = head & (y < hairline_y)
    back = head & (z > ears_mid[2] + 0.01) & (y < ears_mid[1] + 0.35 * eye_dist)
    colors[scalp | back] = c["hair"]
    # Brows: a band above each eye on the front of the face.
    for e in (kps[1], kps[2]):
        dx = np.abs(x - e[0])
        brow = head & front & (dx < 0.55 * eye_dist) & (y < e[1] - 0.25 * eye_dist) & \
            (y > e[1] - 0.42 * eye_dist)
        colors[brow] = 0.7 * c["hair"] + 0.15 * c["skin"]  # hair colour, a shade darker
    # Lips: below the nose, narrow, in front.
    mouth_y = nose[1] + 0.55 * eye_dist
    lips = head & front & (np.abs(x - nose[0]) < 0.45 * eye_dist) & \
        (np.abs(y - mouth_y) < 0.1 * eye_dist)
    colors[lips] = c["skin"] * np.array([0.8, 0.58, 0.58])
    # Eyes: the eyeball vertices (dominant eye bones): white with a dark iris at the front.
    eye_bones = [i for i, b in enumerate(bone_labels) if b.startswith("eye.")]
    for b in eye_bones:
        ball = dominant == b
        if not ball.any():
            continue
        zmin = v[ball, 2].min()
        colors[ball] = (235, 235, 230)
        iris = ball & (z < zmin + 0.004)
        colors[iris] = c["eye"] * 0.6
        pupil = ball & (z < zmin + 0.0015)
        colors[pupil] = (15, 12, 10)


# ----------------------------------------------------------------------------- actions


@dataclass
class Motion:
    """Joint-angle curves (degrees, (T,) each) and the whole body's orientation."""

    joints: dict[str, np.ndarray]
    lean: np.ndarray  # (T,) degrees forward about the root
    yaw: np.ndarray  # (T,) radians, 0 = facing the camera's rest direction


def _mirror(name: str) -> str:
    if name.endswith(".L"):
        return name[:-2] + ".R"
    if name.endswith(".R"):
        return name[:-2] + ".L"
    return name


def _periodic_curve(times: list[float], values: list[float], phase: np.ndarray) -> np.ndarray:
    from scipy.interpolate import CubicSpline

    if len(times) == 1:
        return np.full_like(phase, values[0])
    t = np.asarray(times + [1.0])
    y = np.asarray(values + [values[0]])
    return CubicSpline(t, y, bc_type="periodic")(phase % 1.0)


def animate(action: dict[str, Any], stance: dict[str, float], person: Person, frames: int,
            fps: float, rng: np.random.Generator) -> Motion:
    """Joint curves for one clip: the action's keyframes at the person's tempo and
    amplitude, starting at a random phase of the cycle."""
    style = person.style
    cycle = action["cycle_s"] / style["tempo"]
    t = np.arange(frames) / fps
    phase = t / cycle + rng.uniform(0.0, 1.0)
    keys = action["keyframes"]
    names = sorted({k for kf in keys for k in kf if k != "t"} | set(action.get("base", {})))
    times = [float(kf["t"]) for kf in keys]
    moves: dict[str, np.ndarray] = {}
    bases: dict[str, float] = {}
    for name in names:
        values = [float(kf.get(name, 0.0)) for kf in keys]
        # Amplitude scales the movement, not the posture it moves about.
        moves[name] = _periodic_curve(times, values, phase) * style["amplitude"]
        bases[name] = float(action.get("base", {}).get(name, 0.0))
    if action.get("handed") and person.left_handed:
        moves = {_mirror(k): v for k, v in moves.items()}
        bases = {_mirror(k): v for k, v in bases.items()}
    curves = apply_traits(moves, bases, person.traits, frames)
    for name, angle in stance.items():
        extra = style["arm_rest"] if name.startswith("arm_raise") else 0.0
        curves[name] = curves.get(name, np.zeros(frames)) + angle + extra
    lean = curves.pop("lean", np.zeros(frames))
    yaw = np.full(frames, math.radians(style["facing"]))
    return Motion(joints=curves, lean=lean, yaw=yaw)


# Which traits scale which joints' movement, and which add to which joints' posture
# (degrees per unit of the trait). Knee bend is compensated at the hip and ankle by half
# each, so a person with bent knees still stands upright on flat feet.
_TRAIT_GAINS = {"arm_swing": ("arm_forward.",), "stride": ("hip_flex.", "knee_flex.",
                                                           "ankle_dorsi.")}
_TRAIT_OFFSETS = {
    "slouch": {"spine_bend": 1.0},
    "head_tilt": {"neck_bend": 1.0},
    "knee_bend": {"knee_flex.L": 1.0, "knee_flex.R": 1.0, "hip_flex.L": 0.5,
                  "hip_flex.R": 0.5, "ankle_dorsi.L": 0.5, "ankle_dorsi.R": 0.5},
    "stance_width": {"hip_abduct.L": 1.0, "hip_abduct.R": 1.0},
    "elbow_carry": {"elbow_flex.L": 1.0, "elbow_flex.R": 1.0},
    "torso_twist": {"spine_twist": 1.0},
}


def _movement_gain(joint: str, traits: dict[str, float]) -> float:
    gain = 1.0
    for trait, prefixes in _TRAIT_GAINS.items():
        if trait in traits and joint.startswith(prefixes):
            gain *= traits[trait]
    if "asymmetry" in traits and joint.endswith((".L", ".R")):
        gain *= 1.0 + traits["asymmetry"] * (1.0 if joint.endswith(".L") else -1.0)
    return gain


def apply_traits(moves: dict[str, np.ndarray], bases: dict[str, float],
                 traits: dict[str, float], frames: int) -> dict[str, np.ndarray]:
    """Joint curves = posture + movement x the person's gains, plus their posture offsets
    (recipes people.traits). Traits unknown here raise: a recipe trait must act on the
    motion, or the benchmark would claim a style it does not show."""
    unknown = set(traits) - set(_TRAIT_GAINS) - set(_TRAIT_OFFSETS) - {"asymmetry"}
    if unknown:
        raise KeyError(f"sample recipes: traits without an effect {sorted(unknown)}")
    curves = {n: m * _movement_gain(n, traits) + bases[n] if traits else m + bases[n]
              for n, m in moves.items()}
    for trait, joints in _TRAIT_OFFSETS.items():
        if trait not in traits:
            continue
        for joint, per_unit in joints.items():
            curves[joint] = curves.get(joint, np.zeros(frames)) + per_unit * traits[trait]
    return curves


def travel_path(action: dict[str, Any], frames: int, fps: float, span: tuple[float, float],
                depth: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """World (x, z) of a walk across the room and its heading: left to right or back, at
    the action's speed where the span allows, back and forth where the clip is long."""
    spec = action["travel"]
    duration = max(frames - 1, 1) / fps
    length = span[1] - span[0]
    speed = min(spec["speed_mps"], length / duration)
    speed = max(speed, min(spec["min_speed_mps"], spec["speed_mps"]))
    direction = 1.0 if rng.random() < 0.5 else -1.0
    dz = rng.uniform(-0.25, 0.25)  # a slightly diagonal line through the room
    dist = speed * np.arange(frames) / fps
    # Ping-pong along the span: position on a triangle wave of the distance walked.
    u = np.mod(dist, 2 * length)
    forward = u <= length
    s = np.where(forward, u, 2 * length - u) / length  # 0..1 along the span
    if direction < 0:
        s = 1.0 - s
    x = span[0] + s * length
    z = depth + dz * (s - 0.5)
    heading_sign = np.where(forward, direction, -direction)
    # Body yaw about y: facing (-sin yaw, -cos yaw); moving +x with a little z.
    yaw = np.arctan2(-heading_sign * length, -heading_sign * dz)
    return np.stack([x, z], axis=1), yaw


# ----------------------------------------------------------------------------- the rig


class Rig:
    """Turns joint-angle curves into Anny local-ref pose tensors."""

    def __init__(self, body: Any, joints: dict[str, Any]):
        from stages.body import ANNY_TO_CAMERA

        to_anny = ANNY_TO_CAMERA.numpy().T  # body-frame (camera convention) axis -> Anny
        self.body = body
        self.dofs: dict[str, list[tuple[int, np.ndarray]]] = {}
        for name, spec in joints.items():
            axis = to_anny @ np.asarray(spec["axis"], dtype=np.float64)
            axis /= np.linalg.norm(axis)
            bones = [body.bone_index(b) for b in spec["bones"]]
            self.dofs[name] = [(b, axis / len(bones)) for b in bones]

    def pose(self, curves: dict[str, np.ndarray], frames: int) -> np.ndarray:
        """(T, J, 3) axis-angle. Joints on one bone apply in the recipe's order, each about
        the parent frame's fixed axes (the later rotation acts on the earlier result)."""
        from scipy.spatial.transform import Rotation

        unknown = set(curves) - set(self.dofs)
        if unknown:
            raise KeyError(f"sample recipes: unknown joints {sorted(unknown)}")
        per_bone: dict[int, Rotation] = {}
        for name in (n for n in self.dofs if n in curves):
            angle = np.radians(curves[name])[:, None]
            for bone, axis in self.dofs[name]:
                rot = Rotation.from_rotvec(angle * axis[None])
                per_bone[bone] = rot * per_bone[bone] if bone in per_bone else rot
        pose = np.zeros((frames, self.body.num_bones, 3), np.float32)
        for bone, rot in per_bone.items():
            pose[:, bone] = rot.as_rotvec()
        return pose


def _rot_y(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1),
                     np.stack([-s, z, c], -1)], -2)


def _rot_x(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([o, z, z], -1), np.stack([z, c, -s], -1),
                     np.stack([z, s, c], -1)], -2)


def pose_bodies(body: Any, pose: np.ndarray, phenotype: np.ndarray, root_rot: np.ndarray,
                anchor_xz: np.ndarray, batch: int = 16) -> dict[str, np.ndarray]:
    """World vertices and keypoints of T bodies, each standing on the floor (its lowest
    vertex at y = 0) with its ankles' midpoint at anchor_xz."""
    import torch
    from scipy.spatial.transform import Rotation

    frames = len(pose)
    rotvec = Rotation.from_matrix(root_rot).as_rotvec().astype(np.float32)
    verts, kps = [], []
    with torch.no_grad():
        for i in range(0, frames, batch):
            sl = slice(i, min(i + batch, frames))
            n = sl.stop - sl.start
            out = body(torch.from_numpy(pose[sl]),
                       torch.from_numpy(np.repeat(phenotype[None], n, 0)),
                       root_orient=torch.from_numpy(rotvec[sl]))
            verts.append(out["vertices"].cpu().numpy())
            kps.append(out["keypoints"].cpu().numpy())
    v = np.concatenate(verts)
    k = np.concatenate(kps)
    shift = np.zeros((frames, 3), np.float32)
    shift[:, 1] = -v[:, :, 1].max(axis=1)
    shift[:, [0, 2]] = anchor_xz - k[:, list(_ANKLES)][:, :, [0, 2]].mean(axis=1)
    return {"vertices": v + shift[:, None], "keypoints": k + shift[:, None],
            "transl": shift, "root_rotvec": rotvec}


# ----------------------------------------------------------------------------- camera


@dataclass
class Camera:
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    center: np.ndarray  # (3,) world position
    rot: np.ndarray  # (T, 3, 3) camera -> world rotation (columns: camera axes in world)
    yaw: np.ndarray | None = None  # (T,) radians, how rot was made
    motion: dict[str, Any] = field(default_factory=dict)

    @property
    def intrinsics(self) -> np.ndarray:
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], np.float32)

    def to_camera(self, pts: np.ndarray) -> np.ndarray:
        """World (T, N, 3) -> camera (T, N, 3)."""
        return np.einsum("tij,tni->tnj", self.rot, pts - self.center)

    def project(self, cam_pts: np.ndarray) -> np.ndarray:
        z = np.maximum(cam_pts[..., 2:3], 1e-6)
        uv = cam_pts[..., :2] / z
        return uv * np.array([self.fx, self.fy]) + np.array([self.cx, self.cy])

    def aim(self, target_xz: np.ndarray, height: float) -> None:
        """Pitch the camera at `height` metres above the floor at the target's distance."""
        distance = float(np.linalg.norm(target_xz - self.center[[0, 2]]))
        pitch = math.atan2(-self.center[1] - height, distance)
        # Camera -> world: yaw about y, then pitch down (a camera looking down has a forward
        # axis with +y, i.e. R_x(-pitch)).
        self.rot = _rot_y(self.yaw) @ _rot_x(np.full(len(self.yaw), -pitch))
        self.motion["pitch_deg"] = round(math.degrees(pitch), 3)


def make_camera(rng: np.random.Generator, spec: dict[str, Any], motion: dict[str, Any],
                width: int, height: int, frames: int, target: np.ndarray) -> Camera:
    """A camera `distance` in front of the target point at lens height, static or slowly
    panning, aimed at a standing person's mid-height (`Camera.aim` re-aims it)."""
    f = _uniform(rng, spec["focal_per_width"]) * width
    distance = _uniform(rng, spec["distance"])
    lens = _uniform(rng, spec["height"])
    center = np.array([target[0] + rng.uniform(-0.3, 0.3), -lens, target[1] - distance])
    yaw0 = math.atan2(target[0] - center[0], distance)
    t = np.linspace(0.0, 1.0, frames)
    name = motion["name"]
    info: dict[str, Any] = {"name": name}
    if name == "pan":
        amp = math.radians(_uniform(rng, motion["amplitude"]))
        direction = 1.0 if rng.random() < 0.5 else -1.0
        yaw = yaw0 + direction * amp * (2 * t - 1)  # a slow linear sweep
        info["amplitude_deg"] = round(math.degrees(amp), 3)
        info["direction"] = "right" if direction > 0 else "left"
    elif name == "static":
        yaw = np.full(frames, yaw0)
    else:
        raise ValueError(f"sample recipes: unknown camera motion {name!r}")
    info.update(distance_m=round(distance, 3), height_m=round(lens, 3))
    cam = Camera(fx=f, fy=f, cx=width / 2.0, cy=height / 2.0, width=width, height=height,
                 center=center, rot=np.zeros((frames, 3, 3)), yaw=yaw, motion=info)
    cam.aim(target, 0.95)
    return cam


def out_of_frame_px(cam: Camera, verts_world: np.ndarray) -> float:
    """How far (px) the body's outermost vertex leaves the frame's safe area (<= 0: inside)."""
    uv = cam.project(cam.to_camera(verts_world))
    m = FRAME_MARGIN_PX
    over = np.maximum.reduce([m - uv[..., 0].min(), uv[..., 0].max() - (cam.width - 1 - m),
                              m - uv[..., 1].min(), uv[..., 1].max() - (cam.height - 1 - m)])
    return float(over)


# ----------------------------------------------------------------------------- rooms


@dataclass
class Room:
    name: str
    width: float
    height: float
    textures: dict[str, np.ndarray]  # surface -> RGB uint8
    items: list[dict[str, Any]]
    light: dict[str, Any]


def _fake_identity(rng: np.random.Generator, text: dict[str, list[str]]) -> dict[str, str]:
    first = text["first_names"][int(rng.integers(len(text["first_names"])))]
    last = text["last_names"][int(rng.integers(len(text["last_names"])))]
    street = text["streets"][int(rng.integers(len(text["streets"])))]
    city = text["cities"][int(rng.integers(len(text["cities"])))]
    return {
        "name": f"{first} {last}",
        "street": f"{int(rng.integers(1, 200))} {street}",
        "city": city,
        "phone": f"0{int(rng.integers(100, 999))} {int(rng.integers(100, 999))} "
                 f"{int(rng.integers(1000, 9999))}",
    }


def _draw_face(img: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator,
               skin: np.ndarray, hair: np.ndarray) -> None:
    """A simple portrait: head ellipse, hair, eyes, brows, nose and mouth."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, int(y0 + 0.55 * (y1 - y0))
    rx, ry = int(0.32 * (x1 - x0)), int(0.36 * (y1 - y0))
    col = tuple(int(v) for v in skin)
    hcol = tuple(int(v) for v in hair)
    cv2.ellipse(img, (cx, cy - ry // 5), (int(rx * 1.12), int(ry * 1.05)), 0, 180, 360, hcol, -1)
    cv2.rectangle(img, (cx - rx, y1 - ry // 3), (cx + rx, y1), tuple(int(v * 0.6) for v in skin),
                  -1)  # shoulders
    cv2.ellipse(img, (cx, cy), (rx, ry), 0, 0, 360, col, -1)
    ex, ey, er = int(0.4 * rx), int(cy - 0.15 * ry), max(2, int(0.14 * rx))
    for sx in (-1, 1):
        cv2.ellipse(img, (cx + sx * ex, ey), (er, max(1, int(er * 0.6))), 0, 0, 360,
                    (245, 245, 245), -1)
        cv2.circle(img, (cx + sx * ex, ey), max(1, er // 2), (30, 25, 20), -1)
        cv2.line(img, (cx + sx * ex - er, ey - int(1.6 * er)), (cx + sx * ex + er,
                 ey - int(1.8 * er)), hcol, max(1, er // 2))
    cv2.line(img, (cx, ey + er), (cx - er // 2, cy + int(0.25 * ry)),
             tuple(int(v * 0.7) for v in skin), max(1, er // 3))
    smile = int(rng.integers(0, 2))
    cv2.ellipse(img, (cx, cy + int(0.45 * ry)), (int(0.35 * rx), max(2, int(0.12 * ry))), 0,
                0 if smile else 180, 180 if smile else 360, (150, 50, 60), max(1, er // 2))


def _text_block(img: np.ndarray, org: tuple[int, int], lines: list[str], scale: float,
                color: tuple[int, int, int], thickness: int = 1) -> None:
    step = int(32 * scale) + 4
    for i, line in enumerate(lines):
        cv2.putText(img, line, (org[0], org[1] + i * step), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    color, thickness, cv2.LINE_AA)


def _fit_scale(lines: list[str], scale: float, width: int, thickness: int) -> float:
    """The font scale, shrunk where the longest line would overflow `width` pixels."""
    widest = max(cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)[0][0]
                 for t in lines)
    return scale * min(1.0, width / max(widest, 1))


def _item_poster(rng: np.random.Generator, text: dict[str, Any], people: dict[str, Any],
                 ppm: float) -> tuple[np.ndarray, dict[str, Any]]:
    w, h = int(0.55 * ppm), int(0.75 * ppm)
    bg = rng.integers(120, 240, 3)
    img = np.empty((h, w, 3), np.uint8)
    img[:] = bg
    _, skin = _pick(rng, people["skin_tones"])
    _, hair = _pick(rng, people["hair"])
    _draw_face(img, (int(0.1 * w), int(0.06 * h), int(0.9 * w), int(0.7 * h)), rng,
               np.asarray(skin), np.asarray(hair))
    who = _fake_identity(rng, text)
    name = who["name"].upper()
    scale = _fit_scale([name], 0.45 * ppm / 160, int(0.88 * w), 2)
    _text_block(img, (int(0.06 * w), int(0.8 * h)), [name], scale, (20, 20, 20), 2)
    _text_block(img, (int(0.06 * w), int(0.92 * h)), [who["phone"]], 0.35 * ppm / 160,
                (40, 40, 40), 1)
    cv2.rectangle(img, (0, 0), (w - 1, h - 1), (40, 40, 40), 3)
    return img, {"kind": "poster_face", "text": [who["name"], who["phone"]]}


def _item_notice(rng: np.random.Generator, text: dict[str, Any], ppm: float
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """A note with a heading, one person's name, address and phone, and another's phone."""
    w, h = int(0.75 * ppm), int(0.6 * ppm)
    img = np.full((h, w, 3), (246, 244, 236), np.uint8)
    heading = text["headings"][int(rng.integers(len(text["headings"])))]
    a, b = _fake_identity(rng, text), _fake_identity(rng, text)
    lines = [a["name"], a["street"], a["city"], a["phone"], b["name"], b["phone"]]
    scale = _fit_scale(lines, 0.3 * ppm / 160, w - 16, 1)
    _text_block(img, (8, int(0.14 * h)), [heading], scale * 1.2, (150, 20, 20), 2)
    _text_block(img, (8, int(0.27 * h)), lines, scale, (20, 20, 60), 1)
    cv2.rectangle(img, (0, 0), (w - 1, h - 1), (120, 120, 120), 2)
    return img, {"kind": "notice_text", "text": [heading, *lines]}


def _item_plate(rng: np.random.Generator, ppm: float) -> tuple[np.ndarray, dict[str, Any]]:
    w, h = int(0.62 * ppm), int(0.15 * ppm)
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    plate = "".join(letters[int(rng.integers(len(letters)))] for _ in range(2)) + \
        f"{int(rng.integers(10, 99))} " + \
        "".join(letters[int(rng.integers(len(letters)))] for _ in range(3))
    yellow = rng.random() < 0.5
    img = np.full((h, w, 3), (240, 200, 40) if yellow else (245, 245, 245), np.uint8)
    cv2.rectangle(img, (0, 0), (w - 1, h - 1), (20, 20, 20), 3)
    cv2.rectangle(img, (0, 0), (int(0.09 * w), h - 1), (30, 60, 160), -1)
    scale = 0.9 * ppm / 160
    size, _ = cv2.getTextSize(plate, cv2.FONT_HERSHEY_DUPLEX, scale, 3)
    cv2.putText(img, plate, (int(0.11 * w) + max(0, (int(0.88 * w) - size[0]) // 2),
                (h + size[1]) // 2), cv2.FONT_HERSHEY_DUPLEX, scale, (15, 15, 15), 3,
                cv2.LINE_AA)
    return img, {"kind": "number_plate", "text": [plate]}


def _item_screen(rng: np.random.Generator, text: dict[str, Any], people: dict[str, Any],
                 ppm: float) -> tuple[np.ndarray, dict[str, Any]]:
    w, h = int(0.9 * ppm), int(0.56 * ppm)
    img = np.full((h, w, 3), (18, 18, 20), np.uint8)
    b = max(3, int(0.03 * w))
    inner = img[b:h - b, b:w - b]
    top = rng.integers(40, 120, 3)
    grad = np.linspace(0, 1, inner.shape[0])[:, None, None]
    inner[:] = (top * (1 - grad) + np.array([200, 210, 230]) * grad).astype(np.uint8)
    _, skin = _pick(rng, people["skin_tones"])
    _, hair = _pick(rng, people["hair"])
    iw, ih = inner.shape[1], inner.shape[0]
    _draw_face(inner, (int(0.05 * iw), int(0.1 * ih), int(0.45 * iw), int(0.95 * ih)), rng,
               np.asarray(skin), np.asarray(hair))
    who = _fake_identity(rng, text)
    lines = ["Video call", who["name"], who["phone"]]
    _text_block(inner, (int(0.5 * iw), int(0.3 * ih)), lines, 0.32 * ppm / 160,
                (250, 250, 250), 1)
    return img, {"kind": "screen", "text": lines}


def _wall_base(rng: np.random.Generator, w: int, h: int, color: np.ndarray) -> np.ndarray:
    img = np.empty((h, w, 3), np.float32)
    img[:] = color
    shade = np.linspace(1.04, 0.92, h)[:, None, None]  # a little darker near the floor
    img *= shade
    img += rng.normal(0, 2.5, (h, w, 1))
    skirting = max(4, int(0.012 * h * 8))
    img[h - skirting:] = color * 0.55
    return np.clip(img, 0, 255).astype(np.uint8)


def _floor_texture(rng: np.random.Generator, kind: str, size: int = 512) -> np.ndarray:
    """A tileable floor texture covering 2 x 2 m."""
    img = np.zeros((size, size, 3), np.float32)
    if kind == "wood":
        base = np.array([150, 105, 65]) * rng.uniform(0.8, 1.15)
        planks = 10
        pw = size // planks
        for i in range(planks):
            tone = base * rng.uniform(0.85, 1.12)
            img[:, i * pw:(i + 1) * pw] = tone
            grain = np.sin(np.linspace(0, rng.uniform(20, 40), size))[:, None] * 6
            img[:, i * pw:(i + 1) * pw] += grain[:, :, None]
            img[:, i * pw:i * pw + 2] *= 0.6
            cut = int(rng.integers(0, size))
            img[cut:cut + 2, i * pw:(i + 1) * pw] *= 0.6
    elif kind == "carpet":
        base = np.array([110, 110, 125]) * rng.uniform(0.7, 1.2)
        img[:] = base
        img += rng.normal(0, 9, (size, size, 1))
    else:  # concrete with expansion joints
        base = np.array([140, 140, 136]) * rng.uniform(0.85, 1.1)
        img[:] = base
        noise = cv2.GaussianBlur(rng.normal(0, 14, (size, size)).astype(np.float32), (0, 0), 3)
        img += noise[:, :, None] + rng.normal(0, 4, (size, size, 1))
        img[:3] *= 0.7
        img[:, :3] *= 0.7
    return np.clip(img, 0, 255).astype(np.uint8)


def _place_items(rng: np.random.Generator, wall: np.ndarray, items: list[np.ndarray],
                 ppm: float, floor_margin_m: float = 0.9) -> list[tuple[int, int]]:
    """Hang images on a wall texture without overlaps, between 0.9 m and the top."""
    h, w = wall.shape[:2]
    placed: list[tuple[int, int, int, int]] = []
    spots = []
    for img in items:
        ih, iw = img.shape[:2]
        for _ in range(200):
            x = int(rng.integers(int(0.03 * w), max(int(0.03 * w) + 1, w - iw - int(0.03 * w))))
            y_top = int(0.12 * ppm)
            y_bottom = h - int(floor_margin_m * ppm) - ih
            y = int(rng.integers(y_top, max(y_top + 1, y_bottom)))
            box = (x - 10, y - 10, x + iw + 10, y + ih + 10)
            if all(box[2] < p[0] or box[0] > p[2] or box[3] < p[1] or box[1] > p[3]
                   for p in placed):
                break
        placed.append(box)
        wall[y:y + ih, x:x + iw] = img
        spots.append((x, y))
    return spots


def build_room(rng: np.random.Generator, name: str, spec: dict[str, Any],
               recipes: dict[str, Any]) -> Room:
    ppm = TEXTURE_PX_PER_M
    width = _uniform(rng, spec["size"]["width"])
    height = _uniform(rng, spec["size"]["height"])
    wall_color = np.asarray(spec["walls"][int(rng.integers(len(spec["walls"])))], np.float32)
    back = _wall_base(rng, int(width * ppm), int(height * ppm), wall_color)
    side_len = ROOM_BACK_Z
    left = _wall_base(rng, int(side_len * ppm), int(height * ppm), wall_color * 0.97)
    right = _wall_base(rng, int(side_len * ppm), int(height * ppm), wall_color * 0.95)
    counts = {k: int(rng.integers(v[0], v[1] + 1)) for k, v in spec["items"].items()}
    made: list[tuple[np.ndarray, dict[str, Any]]] = []
    for _ in range(counts.get("poster", 0)):
        made.append(_item_poster(rng, recipes["text"], recipes["people"], ppm))
    for _ in range(counts.get("notice", 0)):
        made.append(_item_notice(rng, recipes["text"], ppm))
    for _ in range(counts.get("plate", 0)):
        made.append(_item_plate(rng, ppm))
    for _ in range(counts.get("screen", 0)):
        made.append(_item_screen(rng, recipes["text"], recipes["people"], ppm))
    # Most items go on the back wall (always in view); the rest on the side walls' far ends.
    order = rng.permutation(len(made))
    items_meta = []
    back_imgs, side_imgs = [], []
    for rank, i in enumerate(order):
        (back_imgs if rank < max(3, len(made) - 2) else side_imgs).append(made[i])
    for (img, meta), (x, y) in zip(back_imgs, _place_items(rng, back, [m[0] for m in back_imgs],
                                                          ppm), strict=True):
        items_meta.append({**meta, "wall": "back", "box_m": _box_m(x, y, img, ppm)})
    for k, (img, meta) in enumerate(side_imgs):
        wall, wall_name = (left, "left") if k % 2 == 0 else (right, "right")
        # Hang near the back corner so the camera sees it: the left wall's texture ends
        # there, the right wall's starts there (both are seen from inside the room).
        near = int(1.6 * ppm)
        offset = wall.shape[1] - near if wall_name == "left" else 0
        (x, y), = _place_items(rng, wall[:, offset:offset + near], [img], ppm)
        items_meta.append({**meta, "wall": wall_name, "box_m": _box_m(x + offset, y, img, ppm)})
    light = spec["light"]
    return Room(
        name=name, width=width, height=height,
        textures={"back": back, "left": left, "right": right,
                  "floor": _floor_texture(rng, spec["floor"]),
                  "ceiling": np.full((8, 8, 3), (236, 236, 232), np.uint8)},
        items=items_meta,
        light={"ambient": _uniform(rng, light["ambient"]),
               "intensity": _uniform(rng, light["intensity"]),
               "tint": np.asarray(light["tint"], np.float32) / 255.0,
               "floor": spec["floor"], "wall_rgb": [int(v) for v in wall_color]},
    )


def _box_m(x: int, y: int, img: np.ndarray, ppm: float) -> list[float]:
    """An item's box on its wall in metres: x0, y0 from the wall's left/top edge, x1, y1."""
    return [round(x / ppm, 3), round(y / ppm, 3), round((x + img.shape[1]) / ppm, 3),
            round((y + img.shape[0]) / ppm, 3)]


# ----------------------------------------------------------------------------- rendering


def _quad(pyrender: Any, corners: np.ndarray, texture: np.ndarray, repeat: tuple[float, float],
          emissive: float = 0.0) -> Any:
    """A textured rectangle; corners in order top-left, top-right, bottom-right, bottom-left
    as seen from the side that faces the room (the GL world is the OpenCV world with y and z
    negated). RGBA textures blend by their alpha."""
    gl = corners * np.array([1.0, -1.0, -1.0])
    uv = np.array([[0, 1], [1, 1], [1, 0], [0, 0]], np.float32) * np.array(repeat, np.float32)
    normal = np.cross(gl[3] - gl[0], gl[1] - gl[0])
    normal /= np.linalg.norm(normal)
    blend = texture.shape[2] == 4
    # RGBA rows are always 4-byte aligned; RGB rows of odd widths would shear under GL's
    # default unpack alignment.
    rgba = texture if blend else np.concatenate(
        [texture, np.full(texture.shape[:2] + (1,), 255, np.uint8)], axis=2)
    tex = pyrender.Texture(source=np.ascontiguousarray(rgba), source_channels="RGBA",
                           sampler=pyrender.Sampler(wrapS=10497, wrapT=10497))  # GL_REPEAT
    mat = pyrender.MetallicRoughnessMaterial(
        baseColorTexture=tex, metallicFactor=0.0, roughnessFactor=1.0,
        alphaMode="BLEND" if blend else "OPAQUE",
        # pyrender only sorts a mesh into its transparent pass when this alpha is below 1
        # (its texture test misreads uint8 alpha).
        baseColorFactor=[1.0, 1.0, 1.0, 0.999 if blend else 1.0],
        emissiveTexture=tex if emissive else None,
        emissiveFactor=[emissive] * 3 if emissive else None)
    prim = pyrender.Primitive(positions=gl.astype(np.float32),
                              normals=np.repeat(normal[None], 4, 0).astype(np.float32),
                              texcoord_0=uv, indices=np.array([[0, 2, 1], [0, 3, 2]], np.uint32),
                              material=mat)
    return pyrender.Mesh([prim])


def room_meshes(pyrender: Any, room: Room) -> list[Any]:
    w2, h, zb = room.width / 2, room.height, ROOM_BACK_Z
    zf = -4.0  # far behind any camera
    side = room.textures["left"].shape[1] / TEXTURE_PX_PER_M
    return [
        _quad(pyrender, np.array([[-w2, -h, zb], [w2, -h, zb], [w2, 0, zb], [-w2, 0, zb]]),
              room.textures["back"], (1, 1)),
        # Side walls, seen from inside: the left texture ends at the back corner, the right
        # one starts there.
        _quad(pyrender, np.array([[-w2, -h, zb - side], [-w2, -h, zb], [-w2, 0, zb],
                                  [-w2, 0, zb - side]]), room.textures["left"], (1, 1)),
        _quad(pyrender, np.array([[w2, -h, zb], [w2, -h, zb - side], [w2, 0, zb - side],
                                  [w2, 0, zb]]), room.textures["right"], (1, 1)),
        _quad(pyrender, np.array([[-w2, 0, zb], [w2, 0, zb], [w2, 0, zf], [-w2, 0, zf]]),
              room.textures["floor"], (room.width / 2, (zb - zf) / 2)),
        # The ceiling faces away from the lights; it glows a little as if lamp-lit.
        _quad(pyrender, np.array([[-w2, -h, zf], [w2, -h, zf], [w2, -h, zb], [-w2, -h, zb]]),
              room.textures["ceiling"], (1, 1), emissive=0.5),
    ]


def _shadow_mesh(pyrender: Any, radius: tuple[float, float] = (0.5, 0.4)) -> Any:
    """A soft dark ellipse on the floor (centred at the origin) grounding the person: a
    contact shadow without a shadow-map pass, which would double the render time."""
    size = 64
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    alpha = np.clip(1.0 - np.sqrt(xx ** 2 + yy ** 2), 0.0, 1.0) ** 1.5 * 0.7
    tex = np.zeros((size, size, 4), np.uint8)
    tex[..., 3] = (alpha * 255).astype(np.uint8)
    rx, rz = radius
    corners = np.array([[-rx, -0.003, rz], [rx, -0.003, rz], [rx, -0.003, -rz],
                        [-rx, -0.003, -rz]])
    return _quad(pyrender, corners, tex, (1, 1))


class _VertexNormals:
    """Smooth per-vertex normals of a fixed triangle topology, as one sparse product."""

    def __init__(self, faces: np.ndarray, num_vertices: int):
        from scipy.sparse import csr_matrix

        self.faces = faces
        rows = faces.reshape(-1)
        cols = np.repeat(np.arange(len(faces)), 3)
        self.incidence = csr_matrix((np.ones(len(rows), np.float32), (rows, cols)),
                                    shape=(num_vertices, len(faces)))

    def __call__(self, verts: np.ndarray) -> np.ndarray:
        a, b, c = (verts[self.faces[:, i]] for i in range(3))
        n = self.incidence @ np.cross(b - a, c - a)  # area-weighted
        return (n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)).astype(
            np.float32)


class SceneRenderer:
    """One offscreen GL context for the whole dataset; a scene per video."""

    def __init__(self, width: int, height: int):
        import pyrender

        self.pyrender = pyrender
        self.width, self.height = width, height
        self.renderer = pyrender.OffscreenRenderer(width, height)

    def render_video(self, room: Room, cam: Camera, verts: np.ndarray, feet_xz: np.ndarray,
                     faces: np.ndarray, colors: np.ndarray, normals: _VertexNormals):
        """Yield RGB uint8 frames of the posed body `verts` (T, V, 3, world) standing at
        `feet_xz` (T, 2) in the room."""
        pr = self.pyrender
        tint = room.light["tint"]
        scene = pr.Scene(ambient_light=tint * room.light["ambient"], bg_color=[0, 0, 0, 1])
        for mesh in room_meshes(pr, room):
            scene.add(mesh)
        flip = np.diag([1.0, -1.0, -1.0])  # OpenCV <-> GL axes
        # Key light from above, behind the camera and to one side; a fill from the other.
        for direction, scale in (((0.35, 0.8, 0.5), 1.0), ((-0.5, 0.5, 0.7), 0.35)):
            d = np.asarray(direction) / np.linalg.norm(direction)  # travel direction, OpenCV
            pose = np.eye(4)
            pose[:3, :3] = flip @ _look_rotation(d) @ flip
            scene.add(pr.DirectionalLight(color=tint, intensity=room.light["intensity"] * scale),
                      pose=pose)
        camera = pr.IntrinsicsCamera(cam.fx, cam.fy, cam.cx, cam.cy, znear=0.05, zfar=30.0)
        cam_node = scene.add(camera, pose=np.eye(4))
        material = pr.MetallicRoughnessMaterial(baseColorFactor=[1.0, 1.0, 1.0, 1.0],
                                                metallicFactor=0.0, roughnessFactor=0.75)
        shadow_node = scene.add(_shadow_mesh(pr))
        # pyrender lights in linear space and gamma-encodes the result, but multiplies vertex
        # colours in after lighting: hand it linear colours so sRGB comes out.
        linear = _srgb_to_linear(colors[:, :3].astype(np.float32) / 255.0)
        colors_lin = np.concatenate([linear, np.ones((len(linear), 1), np.float32)], axis=1)
        body_node = None
        for t in range(len(verts)):
            shadow = np.eye(4)
            shadow[[0, 2], 3] = feet_xz[t] * np.array([1.0, -1.0])
            scene.set_pose(shadow_node, shadow)
            v = verts[t]
            prim = pr.Primitive(positions=(v * np.array([1, -1, -1])).astype(np.float32),
                                normals=normals(v) * np.array([1, -1, -1], np.float32),
                                color_0=colors_lin, indices=faces.astype(np.uint32),
                                material=material)
            if body_node is not None:
                scene.remove_node(body_node)
            body_node = scene.add(pr.Mesh([prim]))
            pose = np.eye(4)
            pose[:3, :3] = flip @ cam.rot[t] @ flip
            pose[:3, 3] = cam.center * np.array([1, -1, -1])
            scene.set_pose(cam_node, pose)
            rgb, _ = self.renderer.render(scene)
            yield rgb

    def close(self) -> None:
        self.renderer.delete()


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _look_rotation(forward: np.ndarray) -> np.ndarray:
    """OpenCV-style rotation whose z axis is `forward` (used to aim directional lights:
    pyrender lights shine along their node's -z in GL, i.e. +z in OpenCV axes)."""
    z = forward / np.linalg.norm(forward)
    up = np.array([0.0, -1.0, 0.0]) if abs(z[1]) < 0.99 else np.array([0.0, 0.0, 1.0])
    x = np.cross(up, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return np.stack([x, y, z], axis=1)


# ----------------------------------------------------------------------------- the dataset


def _split(k: int, n_actions: int) -> str:
    """A quarter of the videos are test, one action per block of four videos, so every
    action reaches the test split once the dataset has four videos per action."""
    return "test" if (k + k // n_actions) % 4 == 3 else "train"


def _atomic_path(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def _write_json(path: Path, data: Any) -> None:
    tmp = _atomic_path(path)
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass
class _Kit:
    """What every video of a dataset shares: the body model, its rig and skinning, the
    GL context, the recipes and the clip format."""

    body: Any
    rig: Rig
    bone_index: np.ndarray  # (V, K) skinning bones per vertex
    bone_weight: np.ndarray  # (V, K)
    normals: _VertexNormals
    renderer: SceneRenderer
    recipes: dict[str, Any]
    width: int
    height: int
    frames: int
    fps: int
    # Person id -> painted vertex colours: a person's look is fixed, and painting needs a
    # body forward pass (about as slow as posing a clip's frames).
    paint: dict[str, np.ndarray] = field(default_factory=dict)


def generate_sample(out_dir: Path, videos: int = 4, seed: int = 0, width: int = 320,
                    height: int = 240, frames: int = 48, fps: int = 24,
                    progress: bool = True) -> list[dict]:
    """Write the sample dataset into `out_dir` and return one metadata dict per video
    (what its .json holds: path, label, split, person, room, camera, seed)."""
    from stages.body import load_body

    if videos < 1:
        raise ValueError("videos must be at least 1")
    if width < 32 or height < 32 or frames < 1 or fps <= 0:
        raise ValueError("sample frames must be at least 32x32, frames >= 1 and fps > 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipes = load_recipes()
    body = load_body()
    action_names = list(recipes["actions"])
    people_spec = recipes["people"]
    # Each identity appears in about videos_per_person videos; at least two people.
    n_people = max(min(videos, 2), math.ceil(videos / people_spec["videos_per_person"]))
    people = [sample_person(np.random.default_rng([seed, 1, i]), people_spec, i,
                            tuple(body.phenotype_labels)) for i in range(n_people)]
    rooms = _Rooms(recipes, seed)
    kit = _make_kit(body, recipes, width, height, frames, fps)
    bar = _progress(progress, videos * frames, "sample-data")
    items: list[dict] = []
    try:
        for k in range(videos):
            action = action_names[k % len(action_names)]
            rel = Path(action) / f"{action}_{k // len(action_names):02d}.mp4"
            meta = _make_video(kit, out_dir, rel, k, action, people[k % n_people], rooms[k],
                               np.random.default_rng([seed, 3, k]), bar)
            meta["split"] = _split(k, len(action_names))
            meta["seed"] = seed
            _write_json(out_dir / rel.with_suffix(".json"), meta)
            items.append(meta)
    finally:
        kit.renderer.close()
        if bar is not None:
            bar.close()
    _write_manifest(out_dir, items)
    return items


# ----------------------------------------------------------------------------- the benchmark

# The attributes the benchmark stratifies, and the recipe table of each one's classes.
STRATIFIED = {"gender": "genders", "age_group": "age_groups", "skin_tone": "skin_tones",
              "build": "builds"}
BENCHMARK_KEYS = ("people", "repetitions", "actions", "width", "height", "frames", "fps")


def benchmark_settings(recipes: dict[str, Any], seed: int = 0,
                       **overrides: Any) -> dict[str, Any]:
    """The recipes' `benchmark` sizes with the non-None `overrides`, checked."""
    spec = recipes["benchmark"]
    unknown = set(overrides) - set(BENCHMARK_KEYS)
    if unknown:
        raise TypeError(f"unknown benchmark settings {sorted(unknown)}")
    out: dict[str, Any] = {k: spec[k] for k in BENCHMARK_KEYS}
    out.update({k: v for k, v in overrides.items() if v is not None})
    out["actions"] = list(out["actions"])
    out["seed"] = int(seed)
    out["jitter"] = dict(spec["jitter"])
    # Which recipes made the videos: a resumed run keeps only videos of the same ones.
    out["recipes_digest"] = hashlib.sha256(
        json.dumps(recipes, sort_keys=True).encode()).hexdigest()[:16]
    if out["people"] < 2:
        raise ValueError("benchmark people must be at least 2 (identity needs classes)")
    if out["repetitions"] < 2:
        raise ValueError("benchmark repetitions must be at least 2 (one train, one test)")
    missing = [a for a in out["actions"] if a not in recipes["actions"]]
    if missing or not out["actions"] or len(set(out["actions"])) < len(out["actions"]):
        raise ValueError(f"benchmark actions must be distinct names of {list(recipes['actions'])}"
                         f", got {out['actions']}")
    if out["width"] < 32 or out["height"] < 32 or out["frames"] < 1 or out["fps"] <= 0:
        raise ValueError("sample frames must be at least 32x32, frames >= 1 and fps > 0")
    return out


def benchmark_people(recipe: dict[str, Any], n: int, seed: int,
                     phenotype_labels: tuple[str, ...]) -> list[Person]:
    """n people with motion traits whose gender, age group, skin tone and build are
    stratified: every class of each is as evenly represented as n allows."""
    rng = np.random.default_rng([seed, 5])
    fixed = {attr: stratified_classes(rng, list(recipe[table]), n)
             for attr, table in STRATIFIED.items()}
    return [sample_person(np.random.default_rng([seed, 1, i]), recipe, i, phenotype_labels,
                          fixed={a: labels[i] for a, labels in fixed.items()}, traits=True)
            for i in range(n)]


def jitter_person(person: Person, jitter: dict[str, float], trait_ranges: dict[str, list],
                  rng: np.random.Generator) -> Person:
    """The person as they move in one repetition: their style and traits, each varied a
    little (recipes benchmark.jitter), as nobody repeats a movement exactly."""
    style = dict(person.style)
    style["tempo"] *= 1.0 + rng.uniform(-jitter["tempo"], jitter["tempo"])
    style["amplitude"] *= 1.0 + rng.uniform(-jitter["amplitude"], jitter["amplitude"])
    style["facing"] += rng.uniform(-jitter["facing_deg"], jitter["facing_deg"])
    frac = jitter["trait_fraction"]
    traits = {k: v + rng.uniform(-frac, frac) * (trait_ranges[k][1] - trait_ranges[k][0])
              for k, v in person.traits.items()}
    return replace(person, style=style, traits=traits)


def benchmark_rel_path(action: str, person_id: str, repetition: int) -> Path:
    return Path(action) / f"{action}_{person_id}_r{repetition}.mp4"


def generate_benchmark(out_dir: Path, people: int | None = None,
                       repetitions: int | None = None, actions: list[str] | None = None,
                       width: int | None = None, height: int | None = None,
                       frames: int | None = None, fps: int | None = None, seed: int = 0,
                       progress: bool = True) -> list[dict]:
    """Write the privacy benchmark into `out_dir` (sizes: recipes `benchmark`, overridden
    by the non-None arguments) and return one metadata dict per video.

    Every person performs every action `repetitions` times; repetition r of a (person,
    action) differs in room, camera, start position and phase, and a little in timing,
    amplitude and traits. The last repetition is `test`, the others `train`. Videos are
    DIR/<action>/<action>_<person>_r<r>.mp4 (+ .gt.npz, .json with `repetition`), then
    DIR/benchmark.json (people table, settings) and DIR/manifest.csv, last. Videos whose
    sidecar says they were made with the same settings are kept (an interrupted run
    resumes where it stopped)."""
    from stages.body import load_body

    recipes = load_recipes()
    settings = benchmark_settings(recipes, seed, people=people, repetitions=repetitions,
                                  actions=actions, width=width, height=height, frames=frames,
                                  fps=fps)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    body = load_body()
    cast = benchmark_people(recipes["people"], settings["people"], seed,
                            tuple(body.phenotype_labels))
    names, reps = settings["actions"], settings["repetitions"]
    total = len(cast) * len(names) * reps
    rooms = _Rooms(recipes, seed)
    kit = _make_kit(body, recipes, settings["width"], settings["height"], settings["frames"],
                    settings["fps"])
    bar = _progress(progress, total * settings["frames"], "sample-data --benchmark")
    items: list[dict] = []
    try:
        for p, person in enumerate(cast):
            for a, action in enumerate(names):
                for r in range(reps):
                    rel = benchmark_rel_path(action, person.id, r)
                    meta = _kept_video(out_dir, rel, settings)
                    if meta is None:
                        rng = np.random.default_rng([seed, 4, p, a, r])
                        moving = jitter_person(person, settings["jitter"],
                                               recipes["people"]["traits"], rng)
                        # Rooms and camera motions rotate with the repetition, so no
                        # person or action is tied to one room or one camera.
                        meta = _make_video(kit, out_dir, rel, len(items), action, moving,
                                           rooms[p + a + r], rng, bar, camera_motion=p + r)
                        meta.update(_benchmark_meta(moving, r, reps, settings))
                        _write_json(out_dir / rel.with_suffix(".json"), meta)
                    elif bar is not None:
                        bar.update(settings["frames"])
                    items.append(meta)
    finally:
        kit.renderer.close()
        if bar is not None:
            bar.close()
    _write_json(out_dir / "benchmark.json", _benchmark_summary(cast, items, settings))
    _write_manifest(out_dir, items)
    return items


def _benchmark_meta(moving: Person, repetition: int, reps: int,
                    settings: dict[str, Any]) -> dict[str, Any]:
    """What a benchmark sidecar adds: the split, the repetition and how the person moved
    in it (their style with this repetition's jitter)."""
    return {
        "split": "test" if repetition == reps - 1 else "train",
        "seed": settings["seed"],
        "repetition": repetition,
        "motion_style": {k: round(float(v), 4) for k, v in {**moving.style,
                                                             **moving.traits}.items()},
        "benchmark_settings": settings,
    }


def _kept_video(out_dir: Path, rel: Path, settings: dict[str, Any]) -> dict | None:
    """The metadata of a video an earlier run with the same settings finished, else None."""
    sidecar = out_dir / rel.with_suffix(".json")
    if not (sidecar.is_file() and (out_dir / rel).is_file()
            and (out_dir / rel.with_suffix(".gt.npz")).is_file()):
        return None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("benchmark_settings") != settings or \
            meta.get("generator_version") != GENERATOR_VERSION:
        return None
    return meta


def _benchmark_summary(cast: list[Person], items: list[dict],
                       settings: dict[str, Any]) -> dict[str, Any]:
    counts: dict[str, dict[str, int]] = {}
    for person in cast:
        for attr in STRATIFIED:
            cls = person.attributes[attr]
            counts.setdefault(attr, {})[cls] = counts.setdefault(attr, {}).get(cls, 0) + 1
    return {
        "generator_version": GENERATOR_VERSION,
        "settings": settings,
        "videos": len(items),
        "splits": {s: sum(it["split"] == s for it in items) for s in ("train", "test")},
        "people_per_class": counts,
        "people": {p.id: p.attributes for p in cast},
    }


class _Rooms:
    """The dataset's rooms, each recipe instanced once (on first use) and reused, as one
    film set is in a real dataset; indexed by any int, cycling through the recipes."""

    def __init__(self, recipes: dict[str, Any], seed: int):
        self.recipes, self.seed = recipes, seed
        self.names = list(recipes["rooms"])
        self.built: dict[int, Room] = {}

    def __getitem__(self, k: int) -> Room:
        r = k % len(self.names)
        if r not in self.built:
            self.built[r] = build_room(np.random.default_rng([self.seed, 2, r]), self.names[r],
                                       self.recipes["rooms"][self.names[r]], self.recipes)
        return self.built[r]


def _make_kit(body: Any, recipes: dict[str, Any], width: int, height: int, frames: int,
              fps: int) -> _Kit:
    return _Kit(body=body, rig=Rig(body, recipes["joints"]),
                bone_index=body.model.vertex_bone_indices.cpu().numpy(),
                bone_weight=body.model.vertex_bone_weights.cpu().numpy(),
                normals=_VertexNormals(body.faces,
                                       int(body.model.vertex_bone_indices.shape[0])),
                renderer=SceneRenderer(width, height), recipes=recipes, width=width,
                height=height, frames=frames, fps=fps)


def _progress(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="frame", desc=desc)


def _write_manifest(out_dir: Path, items: list[dict]) -> None:
    """The manifest goes last: its presence means the dataset is complete."""
    manifest = out_dir / "manifest.csv"
    tmp = _atomic_path(manifest)
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        for it in items:
            writer.writerow([it["path"], it["label"], it["split"]])
    os.replace(tmp, manifest)


def _make_video(kit: _Kit, out_dir: Path, rel: Path, k: int, action_name: str, person: Person,
                room: Room, rng: np.random.Generator, bar: Any,
                camera_motion: int | None = None) -> dict[str, Any]:
    """Animate, frame, render and write one clip with its ground truth; return its
    metadata (without split and seed). The camera motion is the recipes' number
    `camera_motion` (default: the video's index k), cycling."""
    from scipy.spatial.transform import Rotation

    from pipeline.video import VideoWriter

    recipes, frames, fps = kit.recipes, kit.frames, kit.fps
    action = recipes["actions"][action_name]
    cam_spec = recipes["camera"]
    motion = animate(action, recipes["stance"], person, frames, fps, rng)
    pose = kit.rig.pose(motion.joints, frames)
    depth = ROOM_BACK_Z - _uniform(rng, cam_spec["back_gap"])
    place = np.array([rng.uniform(-0.3, 0.3), depth])
    motion_k = k if camera_motion is None else camera_motion
    cam = make_camera(rng, cam_spec, cam_spec["motions"][motion_k % len(cam_spec["motions"])],
                      kit.width, kit.height, frames, place)
    yaw, anchor = motion.yaw, np.repeat(place[None], frames, 0)
    if "travel" in action:
        # The walk spans what the camera sees at the person's depth, less a body's width.
        half = (depth - cam.center[2]) * (kit.width / 2) / cam.fx
        anchor, yaw = travel_path(action, frames, fps,
                                  (place[0] - 0.62 * half, place[0] + 0.62 * half), depth, rng)
    root_rot = _rot_y(yaw) @ _rot_x(np.radians(motion.lean))
    posed = pose_bodies(kit.body, pose, person.phenotype, root_rot, anchor)
    # Aim at the middle of the space the body sweeps (raised arms reach higher), then back
    # the camera off until the whole body is in every frame.
    cam.aim(anchor.mean(axis=0), -0.5 * float(posed["vertices"][..., 1].min()))
    for _ in range(12):
        if out_of_frame_px(cam, posed["vertices"]) <= 0:
            break
        back = cam.rot[0][:, 2] * np.array([1.0, 0.0, 1.0])
        cam.center = cam.center - 0.2 * back / np.linalg.norm(back)
    cam.motion["distance_m"] = round(float(np.linalg.norm(anchor.mean(0) - cam.center[[0, 2]])),
                                     3)
    joints3d = cam.to_camera(posed["keypoints"]).astype(np.float32)
    uv = cam.project(cam.to_camera(posed["vertices"]))
    # Body parameters in camera coordinates: body.forward(pose, phenotype, root_orient,
    # transl) reproduces joints3d.
    rot_cam = np.einsum("tji,tjk->tik", cam.rot, root_rot)
    gt = {
        "joints2d": cam.project(joints3d).astype(np.float32),
        "joints3d": joints3d,
        "boxes": np.concatenate([uv.min(1), uv.max(1)], axis=1).astype(np.float32),
        "camera": np.array([cam.fx, cam.fy, cam.cx, cam.cy], np.float32),
        "intrinsics": cam.intrinsics,
        "cam_rot": np.transpose(cam.rot, (0, 2, 1)).astype(np.float32),  # world -> camera
        "cam_center": cam.center.astype(np.float32),
        "phenotype": person.phenotype,
        "phenotype_labels": np.array(kit.body.phenotype_labels),
        "pose": pose,
        "root_orient": Rotation.from_matrix(rot_cam).as_rotvec().astype(np.float32),
        "transl": cam.to_camera(posed["transl"][:, None])[:, 0].astype(np.float32),
        "fps": np.array([fps, 1], np.int32),
    }
    if person.id not in kit.paint:
        rest = _rest_body(kit.body, person)
        kit.paint[person.id] = paint_body(rest["vertices"], rest["keypoints"], kit.bone_index,
                                          kit.bone_weight, kit.body.bone_labels, person)
    colors = kit.paint[person.id]

    target = out_dir / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_path(target)
    feet = posed["keypoints"][:, list(_ANKLES)][:, :, [0, 2]].mean(axis=1)
    with VideoWriter(tmp, Fraction(fps), kit.width, kit.height, kind="h264") as writer:
        for rgb in kit.renderer.render_video(room, cam, posed["vertices"], feet,
                                             kit.body.faces, colors, kit.normals):
            writer.write(rgb)
            if bar is not None:
                bar.update(1)
    os.replace(tmp, target)
    gt_path = target.with_suffix(".gt.npz")
    tmp_gt = _atomic_path(gt_path)
    with tmp_gt.open("wb") as fh:
        np.savez_compressed(fh, **gt)
    os.replace(tmp_gt, gt_path)
    return {
        "path": rel.as_posix(),
        "label": action_name,
        "action": action_name,
        "frames": frames, "fps": fps, "width": kit.width, "height": kit.height,
        "person": {"id": person.id, **person.attributes},
        "room": {"name": room.name, "width_m": round(room.width, 3),
                 "height_m": round(room.height, 3), "floor": room.light["floor"],
                 "wall_rgb": room.light["wall_rgb"], "sensitive_items": room.items},
        "camera": {**cam.motion, "fx": round(cam.fx, 3), "fy": round(cam.fy, 3),
                   "cx": cam.cx, "cy": cam.cy},
        "video_index": k,
        "generator_version": GENERATOR_VERSION,
    }


def _rest_body(body: Any, person: Person) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        out = body(torch.zeros(1, body.num_bones, 3),
                   torch.from_numpy(person.phenotype[None]))
    return {"vertices": out["vertices"][0].numpy(), "keypoints": out["keypoints"][0].numpy()}
