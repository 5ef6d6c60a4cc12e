"""Pose accuracy metrics (numpy only): MPJPE, PA-MPJPE, 2D reprojection error, PCK.

Conventions: joints are (..., J, D) arrays; a joint that is missing is masked out with a
boolean `valid` of shape (..., J) (or NaN coordinates, which count as missing). Per-frame
functions return one value per leading index (NaN where nothing could be compared); the
`mean_*` helpers average over the frames that have a value.
"""

from __future__ import annotations

import numpy as np

M_TO_MM = 1000.0


def _valid_mask(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    if pred.shape != ref.shape:
        raise ValueError(f"shapes differ: {pred.shape} vs {ref.shape}")
    ok = np.isfinite(pred).all(-1) & np.isfinite(ref).all(-1)
    if valid is not None:
        ok &= np.broadcast_to(np.asarray(valid, bool), ok.shape)
    return ok


def _masked_mean_distance(pred: np.ndarray, ref: np.ndarray, ok: np.ndarray) -> np.ndarray:
    dist = np.linalg.norm(np.nan_to_num(pred - ref), axis=-1)
    n = ok.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (dist * ok).sum(-1) / n, np.nan)


def mpjpe(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None,
          scale: float = M_TO_MM) -> np.ndarray:
    """Mean per-joint position error per frame (..., J, 3) -> (...), times `scale`
    (metres in, millimetres out by default). No alignment at all."""
    ok = _valid_mask(pred, ref, valid)
    return _masked_mean_distance(pred, ref, ok) * scale


def procrustes_align(pred: np.ndarray, ref: np.ndarray,
                     valid: np.ndarray | None = None) -> np.ndarray:
    """`pred` (J, D) moved onto `ref` by the similarity transform (rotation, uniform scale,
    translation) that minimizes the squared distance over the valid joints (Umeyama).
    Reflections are excluded: a mirrored body is an error, not an alignment."""
    ok = _valid_mask(pred, ref, valid)
    if ok.sum() < 2:
        return np.full_like(pred, np.nan, dtype=np.float64)
    x = pred[ok].astype(np.float64)
    y = ref[ok].astype(np.float64)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    var_x = (xc * xc).sum()
    if var_x <= 0:
        return np.full_like(pred, np.nan, dtype=np.float64)
    u, s, vt = np.linalg.svd(yc.T @ xc)
    d = np.ones(len(s))
    d[-1] = np.sign(np.linalg.det(u @ vt)) or 1.0
    rot = u @ np.diag(d) @ vt
    scale = (s * d).sum() / var_x
    return (scale * (pred.astype(np.float64) - mx) @ rot.T) + my


def pa_mpjpe(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray | None = None,
             scale: float = M_TO_MM) -> np.ndarray:
    """Procrustes-aligned MPJPE per frame: (T, J, 3) or (J, 3) -> (T,) or ()."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    single = pred.ndim == 2
    if single:
        pred, ref = pred[None], ref[None]
        valid = None if valid is None else np.asarray(valid)[None]
    ok = _valid_mask(pred, ref, valid)
    out = np.full(pred.shape[0], np.nan)
    for t in range(pred.shape[0]):
        if ok[t].sum() >= 3:
            aligned = procrustes_align(pred[t], ref[t], ok[t])
            out[t] = _masked_mean_distance(aligned, ref[t], ok[t]) * scale
    return out[0] if single else out


def reprojection_error(pred2d: np.ndarray, ref2d: np.ndarray,
                       valid: np.ndarray | None = None) -> np.ndarray:
    """Mean 2D distance (px) per frame between (..., J, 2) point sets."""
    ok = _valid_mask(pred2d, ref2d, valid)
    return _masked_mean_distance(pred2d, ref2d, ok)


def project(points: np.ndarray, camera: np.ndarray) -> np.ndarray:
    """Pinhole projection of camera-frame points (..., 3) with camera (fx, fy, cx, cy)."""
    fx, fy, cx, cy = (float(c) for c in camera)
    z = np.where(np.abs(points[..., 2]) > 1e-9, points[..., 2], np.nan)
    return np.stack([fx * points[..., 0] / z + cx, fy * points[..., 1] / z + cy], -1)


def body_extent(ref2d: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """The person's size per frame (px): the larger side of the box around the valid
    reference keypoints (the height for a standing person; a lying one still counts)."""
    ok = np.isfinite(ref2d).all(-1)
    if valid is not None:
        ok &= np.broadcast_to(np.asarray(valid, bool), ok.shape)
    lo = np.where(ok[..., None], ref2d, np.inf).min(-2)
    hi = np.where(ok[..., None], ref2d, -np.inf).max(-2)
    with np.errstate(invalid="ignore"):
        side = (hi - lo).max(-1)
    return np.where(ok.sum(-1) >= 2, side, np.nan)


def pck(pred2d: np.ndarray, ref2d: np.ndarray, valid: np.ndarray | None = None,
        threshold: float = 0.1) -> np.ndarray:
    """Per frame: the fraction of valid joints whose 2D error is within `threshold` x the
    reference person's extent (body_extent). NaN where nothing could be compared."""
    ok = _valid_mask(pred2d, ref2d, valid)
    extent = body_extent(ref2d, ok)
    dist = np.linalg.norm(np.nan_to_num(pred2d - ref2d), axis=-1)
    hit = (dist <= threshold * extent[..., None]) & ok
    n = ok.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n > 0) & np.isfinite(extent), hit.sum(-1) / n, np.nan)


def nanmean(values: np.ndarray) -> float:
    """Mean over the finite entries; NaN if there are none (no warning)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")
