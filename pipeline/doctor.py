"""`avatarize doctor`: check what the pipeline needs and say how to fix what is missing."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path

EGL_PACKAGES = "libegl1 libegl-mesa0 libgl1-mesa-dri"


def check_video_codecs() -> str:
    import av

    missing = [c for c in ("libx264", "ffv1") if c not in av.codecs_available]
    if missing:
        raise RuntimeError(f"PyAV lacks encoders {missing}; reinstall the 'av' wheel from PyPI")
    return f"PyAV {av.__version__}: libx264 and ffv1 available"


def check_rendering() -> str:
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import numpy as np
    import pyrender
    import trimesh

    try:
        renderer = pyrender.OffscreenRenderer(64, 64)
    except Exception as exc:
        raise RuntimeError(
            f"EGL offscreen rendering failed ({exc.__class__.__name__}: {exc}); install "
            f"{EGL_PACKAGES} (Debian) and keep PYOPENGL_PLATFORM=egl"
        ) from exc
    try:
        scene = pyrender.Scene(bg_color=[0, 0, 0, 0], ambient_light=[1.0, 1.0, 1.0])
        box = trimesh.creation.box(extents=[1, 1, 1])
        scene.add(pyrender.Mesh.from_trimesh(box))
        pose = np.eye(4)
        pose[2, 3] = 3.0
        scene.add(pyrender.PerspectiveCamera(yfov=0.8), pose=pose)
        _, depth = renderer.render(scene)
    finally:
        renderer.delete()
    if not (depth > 0).any():
        raise RuntimeError("EGL rendered an empty image; the GL driver is not working")
    from OpenGL import GL

    vendor = GL.glGetString(GL.GL_RENDERER) if hasattr(GL, "glGetString") else b"?"
    return f"EGL offscreen rendering works ({vendor!r})" if vendor else "EGL rendering works"


def check_detector() -> str:
    import mediapipe as mp
    import numpy as np

    image = np.zeros((64, 64, 3), dtype=np.uint8)
    with mp.solutions.pose.Pose(static_image_mode=True, enable_segmentation=True) as pose:
        pose.process(image)
    with mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0) as seg:
        seg.process(image)
    return f"mediapipe {mp.__version__}: BlazePose and selfie segmentation load offline"


def check_body_model() -> str:
    cache = Path(os.environ.get("ANNY_CACHE_DIR", Path.home() / ".cache/anny"))
    started = time.perf_counter()
    from stages.body import load_body

    body = load_body("cpu")
    seconds = time.perf_counter() - started
    return (f"Anny body model loads ({len(body.bone_labels)} bones) in {seconds:.1f} s; "
            f"cache at {cache}")


def check_torch() -> str:
    import torch

    if torch.cuda.is_available():
        return f"torch {torch.__version__}: CUDA {torch.cuda.get_device_name(0)}"
    return f"torch {torch.__version__}: CPU only (no CUDA device; everything runs, slower)"


CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("video codecs", check_video_codecs),
    ("rendering (EGL)", check_rendering),
    ("detector models", check_detector),
    ("body model cache", check_body_model),
    ("torch device", check_torch),
]


def run_checks(verbose: bool = False) -> int:
    failed = 0
    for name, check in CHECKS:
        try:
            message = check()
            print(f"[ ok ] {name}: {message}")
        except Exception as exc:  # noqa: BLE001 - doctor reports every failure
            failed += 1
            print(f"[FAIL] {name}: {exc}")
            if verbose:
                traceback.print_exc()
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 0 if not failed else 1
