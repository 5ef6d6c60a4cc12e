"""A small offscreen renderer: triangle meshes seen through a pinhole camera -> RGBA + depth.

Meshes are given in the OpenCV camera frame (x right, y down, z forward, metres) with
OpenCV intrinsics (pixel centres at integer coordinates, origin top-left). pyrender
works in the OpenGL convention (y up, looking down -z, pixel centres at +0.5), so the
camera node gets a pose that flips y and z and the principal point is shifted by half a
pixel; callers never see OpenGL.

Rendering goes through EGL (headless): on machines with an NVIDIA driver it uses the GPU,
elsewhere Mesa's llvmpipe. PYOPENGL_PLATFORM must be set before PyOpenGL is imported
anywhere in the process, which is why this module sets it first.

All OffscreenRenderer instances in a process draw through one shared GL context, resized
per call: pyrender's EGL teardown terminates the display, which would break any other
renderer still alive (e.g. a stage's and the sample generator's in one process).

The colour buffer comes back with straight (not premultiplied) alpha: pyrender resolves
4x multisampling against a transparent black background, which premultiplies the colour
of partially covered edge pixels, and we divide that back out.
"""

from __future__ import annotations

import os
import threading

os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import TypeVar  # noqa: E402

import numpy as np  # noqa: E402
import pyrender  # noqa: E402
from OpenGL.error import Error as GLError  # noqa: E402

_T = TypeVar("_T")

# Camera pose (camera -> world) that turns pyrender's OpenGL camera into an OpenCV one
# when the world frame is the OpenCV camera frame.
_CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass
class MeshData:
    """One mesh in OpenCV camera coordinates, coloured per vertex, by a texture, or both
    (the product: vertex colours tint the texture)."""

    vertices: np.ndarray  # (V, 3) float, metres
    faces: np.ndarray  # (F, 3) int, counter-clockwise seen from outside
    colors: np.ndarray | None = None  # (V, 3|4) sRGB, uint8 or float in [0, 1]
    normals: np.ndarray | None = None  # (V, 3); computed from the faces when absent
    uv: np.ndarray | None = None  # (V, 2) texture coordinates, origin bottom-left
    texture: np.ndarray | None = None  # (H, W, 3|4) uint8, row 0 at the top
    roughness: float = 0.8


@dataclass(frozen=True)
class Lighting:
    """Ambient light plus one directional key light, both in the OpenCV camera frame."""

    ambient: float = 0.3  # ambient intensity (grey), 0..1
    key_intensity: float = 2.5  # directional light intensity (pyrender units)
    key_direction: tuple[float, float, float] = (-0.4, 0.6, 1.0)  # where the light travels
    key_color: tuple[float, float, float] = (1.0, 1.0, 1.0)


# sRGB byte -> linear light (the same 2.2 power pyrender's shader encodes with), and
# Rec. 709 luma weights: luminance is measured in linear light, where light adds up.
_TO_LINEAR = ((np.arange(256) / 255.0) ** 2.2).astype(np.float32)
_LUMA = np.array([0.2126, 0.7152, 0.0722], np.float32)


def surround_light(frame: np.ndarray, box: Sequence[float], ring: float = 0.5,
                   ) -> tuple[float, float, float]:
    """Light around a person's box in an RGB uint8 frame: (mean linear luminance,
    left-right balance, top-bottom balance). The box (x0, y0, x1, y1 px) is grown by
    `ring` x its larger side; the ring between the two boxes is what lights the person
    (their own pixels would say more about their clothes than about the light). A balance
    is (right - left) / (right + left) of the ring's two halves, in [-1, 1], likewise
    (bottom - top) / (bottom + top)."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = (float(b) for b in box)
    grow = ring * max(x1 - x0, y1 - y0, 1.0)
    ox0, oy0 = int(np.clip(x0 - grow, 0, w - 1)), int(np.clip(y0 - grow, 0, h - 1))
    ox1, oy1 = int(np.clip(x1 + grow, ox0 + 1, w)), int(np.clip(y1 + grow, oy0 + 1, h))
    # Every other pixel is plenty for a mean and keeps this a few ms at 1080p.
    step = 2 if (ox1 - ox0) * (oy1 - oy0) > 40000 else 1
    crop = frame[oy0:oy1:step, ox0:ox1:step, :3]
    lum = _TO_LINEAR[crop] @ _LUMA
    ys = oy0 + step * np.arange(lum.shape[0])[:, None]
    xs = ox0 + step * np.arange(lum.shape[1])[None, :]
    inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
    if inside.all():  # the person fills the frame: the whole frame is all there is
        inside = np.zeros_like(inside)
    cxm, cym = (x0 + x1) / 2, (y0 + y1) / 2

    def mean(sel: np.ndarray) -> float:
        sel = sel & ~inside
        return float(lum[sel].mean()) if sel.any() else float(lum[~inside].mean())

    def balance(a: float, b: float) -> float:
        return (b - a) / max(a + b, 1e-6)

    xs_b, ys_b = np.broadcast_to(xs, lum.shape), np.broadcast_to(ys, lum.shape)
    return (mean(np.ones_like(inside)), balance(mean(xs_b < cxm), mean(xs_b >= cxm)),
            balance(mean(ys_b < cym), mean(ys_b >= cym)))


@dataclass
class LightEstimator:
    """Ambient and key light for the avatars from the video around them.

    Intensity: both lights are the configured ones scaled by the surroundings' linear
    luminance relative to `reference` (the luminance the configured lights suit), so a
    dim scene gets a dim avatar, as a real body there would reflect less light; the gain
    is clipped to `gain_range` so an avatar is never black nor washed out to white.
    Direction: the key light comes from the brighter side of the surroundings, from the
    front and above when they are even. Estimates are smoothed over time with an
    exponential moving average (`smoothing` = weight of the past), so the light does not
    flicker with the content of single frames."""

    base: Lighting
    reference: float = 0.35
    gain_range: tuple[float, float] = (0.35, 1.4)
    smoothing: float = 0.8
    steer: float = 1.5  # how far a full left/right or top/bottom balance turns the key
    _state: np.ndarray | None = field(default=None, repr=False)

    def update(self, frame: np.ndarray, box: Sequence[float]) -> Lighting:
        stats = np.asarray(surround_light(frame, box), dtype=np.float64)
        if self._state is None:
            self._state = stats
        else:
            self._state = self.smoothing * self._state + (1.0 - self.smoothing) * stats
        return self.lighting()

    def lighting(self) -> Lighting:
        if self._state is None:
            return self.base
        lum, dx, dy = self._state
        gain = float(np.clip(lum / self.reference, *self.gain_range))
        # Light travels away from the bright side: towards -x when the right is brighter.
        direction = (-self.steer * dx, 0.5 - self.steer * dy, 1.0)
        return Lighting(ambient=self.base.ambient * gain,
                        key_intensity=self.base.key_intensity * gain,
                        key_direction=tuple(float(d) for d in direction),
                        key_color=self.base.key_color)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals (bincount keeps this a few ms for 14k vertices)."""
    v = np.asarray(vertices, dtype=np.float64)
    tri = v[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    idx = faces.reshape(-1)
    n = np.empty_like(v)
    for axis in range(3):
        n[:, axis] = np.bincount(idx, np.repeat(face_n[:, axis], 3), minlength=len(v))
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return (n / np.maximum(norm, 1e-12)).astype(np.float32)


def _as_float_colors(colors: np.ndarray) -> np.ndarray:
    """sRGB vertex colours -> linear RGBA floats. pyrender's shader multiplies vertex
    colours into its linear lighting and encodes the result with a 1/2.2 power (it
    decodes textures, but not vertex colours), so decoding with the inverse power makes
    a fully lit, unshaded vertex come out exactly as given."""
    c = np.asarray(colors)
    c = c.astype(np.float32) / 255.0 if c.dtype == np.uint8 else c.astype(np.float32)
    c = c.copy()
    c[:, :3] = np.clip(c[:, :3], 0.0, 1.0) ** 2.2
    if c.shape[1] == 3:  # an explicit opaque alpha keeps pyrender from guessing
        c = np.concatenate([c, np.ones((len(c), 1), np.float32)], axis=1)
    return c


def _look_along(direction: Sequence[float]) -> np.ndarray:
    """A node pose whose -z axis points along `direction` (pyrender's light direction)."""
    d = np.asarray(direction, dtype=np.float64)
    d = d / np.linalg.norm(d)
    z = -d
    helper = np.array([0.0, 1.0, 0.0]) if abs(z[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    pose = np.eye(4)
    pose[:3, 0], pose[:3, 1], pose[:3, 2] = x, y, z
    return pose


# sRGB byte -> the byte whose exact sRGB decoding (what pyrender's shader applies to
# textures) equals the 2.2 power it encodes its output with: a fully lit, unshaded texel
# then comes out exactly as given, like a vertex colour (see _as_float_colors).
_TEXTURE_LUT = np.clip(np.rint(255.0 * np.where(
    _TO_LINEAR <= 0.0031308, 12.92 * _TO_LINEAR,
    1.055 * np.power(_TO_LINEAR, 1.0 / 2.4) - 0.055)), 0, 255).astype(np.uint8)


class _TextureCache:
    """pyrender textures by source array, kept while the same array is drawn frame after
    frame: pyrender uploads a texture (and builds its mipmaps) once for as long as it
    stays in consecutive scenes, and a new Texture object each frame would re-upload."""

    size = 32
    entries: dict[int, tuple[np.ndarray, pyrender.Texture]] = {}

    @classmethod
    def get(cls, source: np.ndarray) -> pyrender.Texture:
        hit = cls.entries.get(id(source))
        if hit is not None and hit[0] is source:
            return hit[1]
        tex = np.array(source, copy=True)
        tex[..., :3] = _TEXTURE_LUT[tex[..., :3]]  # alpha is linear already
        texture = pyrender.Texture(source=tex, source_channels="RGBA"[: tex.shape[2]])
        if len(cls.entries) >= cls.size:
            cls.entries.pop(next(iter(cls.entries)))
        cls.entries[id(source)] = (source, texture)
        return texture


def _primitive(mesh: MeshData) -> pyrender.Primitive:
    vertices = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.uint32)
    normals = mesh.normals if mesh.normals is not None else vertex_normals(vertices, faces)
    kwargs: dict = {}
    texture = None
    if mesh.texture is not None:
        if mesh.uv is None:
            raise ValueError("a textured mesh needs per-vertex uv")
        if mesh.texture.dtype != np.uint8:
            raise ValueError("textures are uint8 sRGB")
        texture = _TextureCache.get(mesh.texture)
        kwargs["texcoord_0"] = np.asarray(mesh.uv, dtype=np.float32)
    if mesh.colors is not None:
        # With a texture too, pyrender multiplies the two (white leaves the texture).
        kwargs["color_0"] = _as_float_colors(mesh.colors)
    material = pyrender.MetallicRoughnessMaterial(
        baseColorFactor=(1.0, 1.0, 1.0, 1.0),
        baseColorTexture=texture,
        metallicFactor=0.0,
        roughnessFactor=float(mesh.roughness),
        alphaMode="OPAQUE",
    )
    return pyrender.Primitive(
        positions=vertices,
        normals=np.asarray(normals, dtype=np.float32),
        indices=faces,
        material=material,
        **kwargs,
    )


class _SharedContext:
    """One pyrender renderer (one EGL context) per process, shared by every
    OffscreenRenderer. pyrender's EGL platform calls eglTerminate when a renderer is
    deleted, which breaks every other live context on the same display; sharing one
    context, resized per call, avoids that among our renderers, and a context lost to
    someone else's pyrender renderer is rebuilt (see render_scene). Deleted when its
    last user is."""

    lock = threading.RLock()
    renderer: pyrender.OffscreenRenderer | None = None
    users = 0
    lost: list[pyrender.OffscreenRenderer] = []

    @classmethod
    def acquire(cls) -> None:
        with cls.lock:
            cls.users += 1

    @classmethod
    def release(cls) -> None:
        with cls.lock:
            cls.users -= 1
            if cls.users == 0 and cls.renderer is not None:
                cls.renderer.delete()
                cls.renderer = None

    @classmethod
    def render_scene(cls, draw: Callable[[pyrender.OffscreenRenderer], _T], width: int,
                     height: int) -> _T:
        """`draw(renderer)` with the shared renderer sized to width x height."""
        with cls.lock:
            for attempt in range(2):
                if cls.renderer is None:
                    cls.renderer = pyrender.OffscreenRenderer(width, height)
                r = cls.renderer
                r.viewport_width, r.viewport_height = width, height
                try:
                    return draw(r)
                except GLError:
                    if attempt:
                        raise
                    # The EGL display was terminated under us: start a fresh context.
                    # The dead renderer is kept, never collected: its destructor would
                    # terminate the display again, under the new context.
                    cls.lost.append(r)
                    cls.renderer = None
            raise AssertionError("unreachable")


class OffscreenRenderer:
    """Renders lists of meshes at a fixed frame size. Cheap to create: every instance
    draws through the process's one GL context (see _SharedContext)."""

    def __init__(self, width: int, height: int, znear: float = 0.05, zfar: float = 100.0):
        self.width, self.height = int(width), int(height)
        self.znear, self.zfar = znear, zfar
        _SharedContext.acquire()
        self._alive = True

    def render(
        self,
        meshes: Sequence[MeshData | tuple],
        fx: float,
        fy: float,
        cx: float,
        cy: float,
        lights: Lighting | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """RGBA uint8 (H, W, 4), straight alpha, and depth float32 (H, W) in metres along
        the optical axis (0 where nothing was drawn). Tuples are read as MeshData fields
        in order: (vertices, faces, colors, ...)."""
        rgba, depth, _ = self._render(meshes, (fx, fy, cx, cy), lights, instances=False)
        return rgba, depth

    def render_instances(
        self,
        meshes: Sequence[MeshData | tuple],
        fx: float,
        fy: float,
        cx: float,
        cy: float,
        lights: Lighting | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As render(), plus a uint8 (H, W) instance map: 1 + the index of the mesh seen
        at each pixel centre, 0 where none (at most 255 meshes). The map comes from a
        second, unlit and not antialiased pass over the same scene, so it follows the
        same depth test as the colour, with hard edges; the depth returned is that pass's
        (at pixel centres), so depth and instances agree on every pixel."""
        if len(meshes) > 255:
            raise ValueError("at most 255 meshes have an instance id")
        rgba, depth, inst = self._render(meshes, (fx, fy, cx, cy), lights, instances=True)
        assert inst is not None
        return rgba, depth, inst

    def _render(self, meshes: Sequence[MeshData | tuple], intrinsics: tuple[float, ...],
                lights: Lighting | None, instances: bool,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        if not self._alive:
            raise RuntimeError("render() after delete()")
        if not meshes:
            return (np.zeros((self.height, self.width, 4), np.uint8),
                    np.zeros((self.height, self.width), np.float32),
                    np.zeros((self.height, self.width), np.uint8) if instances else None)
        lights = lights or Lighting()
        data = [m if isinstance(m, MeshData) else MeshData(*m) for m in meshes]
        fx, fy, cx, cy = intrinsics

        def build() -> tuple[pyrender.Scene, list[pyrender.Node]]:
            scene = pyrender.Scene(bg_color=(0.0, 0.0, 0.0, 0.0),
                                   ambient_light=(lights.ambient,) * 3)
            nodes = [scene.add(pyrender.Mesh(primitives=[_primitive(mesh)])) for mesh in data]
            camera = pyrender.IntrinsicsCamera(
                fx=float(fx), fy=float(fy), cx=float(cx) + 0.5, cy=float(cy) + 0.5,
                znear=self.znear, zfar=self.zfar,
            )
            scene.add(camera, pose=_CV_TO_GL)
            if lights.key_intensity > 0:
                key = pyrender.DirectionalLight(color=lights.key_color,
                                                intensity=lights.key_intensity)
                scene.add(key, pose=_look_along(lights.key_direction))
            return scene, nodes

        def draw(r: pyrender.OffscreenRenderer,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
            scene, nodes = build()
            color, depth = r.render(scene, flags=pyrender.RenderFlags.RGBA)
            inst = None
            if instances:
                # pyrender scales segmentation colours by 1/255 into an 8-bit buffer,
                # so the ids come back exactly.
                ids = {node: (i + 1, i + 1, i + 1) for i, node in enumerate(nodes)}
                seg, depth = r.render(scene, flags=pyrender.RenderFlags.SEG, seg_node_map=ids)
                inst = np.ascontiguousarray(seg[..., 0])
            return color, depth, inst

        color, depth, inst = _SharedContext.render_scene(draw, self.width, self.height)
        return _unpremultiply(color), np.asarray(depth, dtype=np.float32), inst

    def delete(self) -> None:
        if self._alive:
            self._alive = False
            _SharedContext.release()

    def __enter__(self) -> OffscreenRenderer:
        return self

    def __exit__(self, *exc) -> None:
        self.delete()


def _unpremultiply(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.float32)
    edge = (alpha > 0) & (alpha < 255)
    if not edge.any():
        return np.ascontiguousarray(rgba)
    rgb = rgba[..., :3].astype(np.float32)
    fixed = np.where(edge, rgb * 255.0 / np.maximum(alpha, 1.0), rgb)
    out = np.empty_like(rgba)
    out[..., :3] = np.clip(np.rint(fixed), 0, 255).astype(np.uint8)
    out[..., 3] = rgba[..., 3]
    return out
