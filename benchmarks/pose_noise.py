"""Perturbed cameras for the pose-refinement benchmark (issue 15, BARF's protocol), used by
benchmarks/lego.py ``--pose-noise``.

* :func:`perturb`: each camera-to-world pose gets a random rotation about its own centre and a
  random shift, both drawn per component from N(0, sigma^2) (radians and scene units), as BARF
  perturbs NeRF-synthetic's cameras (sigma 0.15: about 14 degrees and 0.24 units on average).
* :func:`align`: the similarity (scale, rotation, shift) that best maps the true camera centres
  onto the estimated ones (Umeyama's least squares): refinement is free of the gauge (what moves
  every camera together), so estimates are compared after it, as BARF does.
* :func:`errors`: mean, median and largest rotation error (degrees), the share of cameras within
  1 degree, and mean centre error (scene units) of estimated poses against true ones, after that
  alignment.

Poses are (N, 4, 4) float64 camera-to-world matrices (Blender's camera convention; only the
rotation block and the centre matter here).
"""
from __future__ import annotations

import numpy as np


def rotations(axis_angles: np.ndarray) -> np.ndarray:
    """(N, 3) rotation vectors (radians) -> (N, 3, 3) rotation matrices (Rodrigues)."""
    w = np.asarray(axis_angles, dtype=np.float64)
    angle = np.linalg.norm(w, axis=-1, keepdims=True)
    k = w / np.maximum(angle, 1e-12)
    kx = np.zeros(w.shape[:-1] + (3, 3))
    kx[..., 0, 1], kx[..., 0, 2], kx[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    kx = kx - np.swapaxes(kx, -1, -2)
    s, c = np.sin(angle)[..., None], np.cos(angle)[..., None]
    return np.eye(3) + s * kx + (1.0 - c) * (kx @ kx)


def perturb(poses: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """``poses`` with each camera turned about its centre by N(0, sigma^2) per rotation-vector
    component (radians) and shifted by N(0, sigma^2) per axis (scene units)."""
    poses = np.array(poses, dtype=np.float64, copy=True)
    if sigma <= 0:
        return poses
    rng = np.random.default_rng(seed)
    n = len(poses)
    turn = rotations(rng.normal(0.0, sigma, (n, 3)))
    poses[:, :3, :3] = turn @ poses[:, :3, :3]
    poses[:, :3, 3] += rng.normal(0.0, sigma, (n, 3))
    return poses


def align(true: np.ndarray, estimated: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale s, rotation R (3, 3), shift t (3,)) minimising sum |s R c_true + t - c_est|^2 over
    the camera centres (Umeyama 1991).  Needs three or more cameras not on one line."""
    a = np.asarray(true, dtype=np.float64)[:, :3, 3]
    b = np.asarray(estimated, dtype=np.float64)[:, :3, 3]
    if len(a) < 3:
        raise ValueError(f"aligning cameras needs at least 3 of them, got {len(a)}")
    ma, mb = a.mean(0), b.mean(0)
    da, db = a - ma, b - mb
    cov = db.T @ da / len(a)
    u, d, vt = np.linalg.svd(cov)
    fix = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        fix[2, 2] = -1.0
    rot = u @ fix @ vt
    var = float((da ** 2).sum() / len(a))
    if var <= 0:
        raise ValueError("the cameras' centres coincide: nothing to align")
    scale = float(np.trace(np.diag(d) @ fix) / var)
    return scale, rot, mb - scale * rot @ ma


def apply(poses: np.ndarray, scale: float, rot: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``poses`` moved by the similarity: orientation R @ R_cam, centre s R c + t."""
    out = np.array(poses, dtype=np.float64, copy=True)
    out[:, :3, :3] = rot @ out[:, :3, :3]
    out[:, :3, 3] = scale * out[:, :3, 3] @ rot.T + shift
    return out


def errors(true: np.ndarray, estimated: np.ndarray) -> dict:
    """Mean and largest rotation error (degrees) and mean centre error (in the true poses' units)
    of ``estimated`` against ``true`` after :func:`align`."""
    scale, rot, shift = align(true, estimated)
    moved = apply(true, scale, rot, shift)
    rel = np.swapaxes(moved[:, :3, :3], -1, -2) @ np.asarray(estimated, dtype=np.float64)[:, :3, :3]
    cos = np.clip((np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    deg = np.degrees(np.arccos(cos))
    centre = np.linalg.norm(moved[:, :3, 3] - np.asarray(estimated)[:, :3, 3], axis=-1) / scale
    return {"rotation_deg": round(float(deg.mean()), 4), "max_rotation_deg": round(float(deg.max()), 4),
            "median_rotation_deg": round(float(np.median(deg)), 4),
            "within_1_deg": round(float((deg <= 1.0).mean()), 4),      # share of the cameras that came back
            "centre_error": round(float(centre.mean()), 6), "scale": round(scale, 6)}
