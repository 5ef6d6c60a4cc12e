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
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
import pyrender  # noqa: E402
from OpenGL.error import Error as GLError  # noqa: E402

# Camera pose (camera -> world) that turns pyrender's OpenGL camera into an OpenCV one
# when the world frame is the OpenCV camera frame.
_CV_TO_GL = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass
class MeshData:
    """One mesh in OpenCV camera coordinates, coloured per vertex or by a texture."""

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


def _primitive(mesh: MeshData) -> pyrender.Primitive:
    vertices = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.uint32)
    normals = mesh.normals if mesh.normals is not None else vertex_normals(vertices, faces)
    kwargs: dict = {}
    texture = None
    if mesh.texture is not None:
        if mesh.uv is None:
            raise ValueError("a textured mesh needs per-vertex uv")
        tex = np.ascontiguousarray(mesh.texture)
        texture = pyrender.Texture(source=tex, source_channels="RGBA"[: tex.shape[2]])
        kwargs["texcoord_0"] = np.asarray(mesh.uv, dtype=np.float32)
    elif mesh.colors is not None:
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
    def render_scene(cls, build: Callable[[], pyrender.Scene], width: int,
                     height: int) -> tuple[np.ndarray, np.ndarray]:
        with cls.lock:
            for attempt in range(2):
                if cls.renderer is None:
                    cls.renderer = pyrender.OffscreenRenderer(width, height)
                r = cls.renderer
                r.viewport_width, r.viewport_height = width, height
                try:
                    return r.render(build(), flags=pyrender.RenderFlags.RGBA)
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
        if not self._alive:
            raise RuntimeError("render() after delete()")
        if not meshes:
            return (np.zeros((self.height, self.width, 4), np.uint8),
                    np.zeros((self.height, self.width), np.float32))
        lights = lights or Lighting()
        data = [m if isinstance(m, MeshData) else MeshData(*m) for m in meshes]

        def build() -> pyrender.Scene:
            scene = pyrender.Scene(bg_color=(0.0, 0.0, 0.0, 0.0),
                                   ambient_light=(lights.ambient,) * 3)
            for mesh in data:
                scene.add(pyrender.Mesh(primitives=[_primitive(mesh)]))
            camera = pyrender.IntrinsicsCamera(
                fx=float(fx), fy=float(fy), cx=float(cx) + 0.5, cy=float(cy) + 0.5,
                znear=self.znear, zfar=self.zfar,
            )
            scene.add(camera, pose=_CV_TO_GL)
            if lights.key_intensity > 0:
                key = pyrender.DirectionalLight(color=lights.key_color,
                                                intensity=lights.key_intensity)
                scene.add(key, pose=_look_along(lights.key_direction))
            return scene

        color, depth = _SharedContext.render_scene(build, self.width, self.height)
        return _unpremultiply(color), np.asarray(depth, dtype=np.float32)

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
