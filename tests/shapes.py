"""Analytic shapes for surface fits (no bpy): signed distance functions ray-traced with numpy
into posed RGBA views with optional supervision passes, and scores of a fitted surface against
the analytic one.  Used by the surface-field tests (tests/backend/fitting/).

The shapes sit at world centre (3, -2, 5), scaled by 2.5, in a box of half-size 2.875: a leak of
the trainer's normalised frame (centre 0, half-size 1) into the field's values or the mesh would
be off by metres.
"""
from __future__ import annotations

import numpy as np
import torch

from fit_implicit.backend.fitting import metrics
from fit_implicit.backend.fitting.config import make_config
from fit_implicit.backend.fitting.data import PosedImages
from fit_implicit.backend.fitting.loop import fit
from fit_implicit.backend.fitting.runs import save_run
from fit_implicit.shared import cameras

CENTER = np.array([3.0, -2.0, 5.0])
TEST_STEPS = 200       # CPU test fits of spheres (the draft preset's 300, shortened)
SCALE = 2.5
LIGHT = np.array([0.4, -0.5, 0.77]) / np.linalg.norm([0.4, -0.5, 0.77])


# ---- analytic shapes (world units) -------------------------------------------------------------
def sphere_sdf(p: np.ndarray) -> np.ndarray:
    """Sphere of radius 0.6 * SCALE at CENTER; p (..., 3) -> (...,)."""
    return np.linalg.norm(p - CENTER, axis=-1) - 0.6 * SCALE


def torus_sdf(p: np.ndarray) -> np.ndarray:
    """Torus around the z axis through CENTER: radii 0.55 and 0.22 (times SCALE)."""
    q = (p - CENTER) / SCALE
    ring = np.sqrt(q[..., 0] ** 2 + q[..., 1] ** 2) - 0.55
    return (np.sqrt(ring ** 2 + q[..., 2] ** 2) - 0.22) * SCALE


def two_colours(p: np.ndarray) -> np.ndarray:
    """Base colour: red above CENTER's z, blue below (sRGB)."""
    up = (p[..., 2] > CENTER[2])[..., None]
    return np.where(up, [0.85, 0.15, 0.1], [0.1, 0.2, 0.85])


def gradient(sdf, p: np.ndarray, h: float = 1e-4) -> np.ndarray:
    e = np.eye(3) * h
    g = np.stack([sdf(p + e[i]) - sdf(p - e[i]) for i in range(3)], -1)
    return g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)


def trace(sdf, colour, origins, dirs):
    """Sphere tracing.  Returns shaded rgb (..., 3), albedo (..., 3), hit (...,) bool."""
    t = np.zeros(origins.shape[:-1])
    for _ in range(96):
        t = np.minimum(t + sdf(origins + t[..., None] * dirs), 100.0 * SCALE)
    p = origins + t[..., None] * dirs
    hit = np.abs(sdf(p)) < 1e-3 * SCALE
    n = gradient(sdf, p)
    albedo = np.where(hit[..., None], colour(p), 0.0)
    shade = 0.3 + 0.7 * np.clip(np.sum(n * LIGHT, -1), 0.0, 1.0)
    return albedo * shade[..., None], albedo, hit


def two_roughnesses(p: np.ndarray) -> np.ndarray:
    """Roughness: 0.2 above CENTER's z (glossy), 0.8 below (matte)."""
    return np.where(p[..., 2] > CENTER[2], 0.2, 0.8)


def shape_scene(sdf, colour=lambda p: np.broadcast_to([0.8, 0.6, 0.3], p.shape), count: int = 16,
                size: int = 40, ss: int = 2, passes: tuple = (), roughness=two_roughnesses) -> PosedImages:
    """Views on a ring around the shape (elevations -20, 15, 50 deg), RGBA with alpha masks;
    ``passes`` among "albedo", "normal", "depth", "roughness" adds those supervision passes
    (shared/protocol.py PASS_DTYPES; roughness from ``roughness(points)``, -1 where no sub-pixel hit)."""
    pos = cameras.ring_positions(CENTER, 4.2 * SCALE, count, elevations_deg=(-20.0, 15.0, 50.0))
    poses = np.stack([cameras.look_at(p, CENTER) for p in pos])
    k = cameras.intrinsics_from_fov(0.7, size, size)
    images, albedos, normals, depths, roughs = [], [], [], [], []
    for pose in poses:
        o, d = cameras.pixel_rays(k * ss, pose, size * ss, size * ss)
        rgb, alb, hit = trace(sdf, colour, o, d)
        a = hit.astype(np.float64)[..., None]

        def down(x):
            return x.reshape(size, ss, size, ss, -1).mean((1, 3))

        alpha = down(a)
        straight = down(rgb * a) / np.maximum(alpha, 1e-9)
        images.append(np.concatenate([straight, alpha], -1))
        albedos.append(down(alb * a) / np.maximum(alpha, 1e-9))
        # normal and z-depth at the hit points, averaged over the sub-pixels that hit
        t = np.zeros(o.shape[:-1])
        for _ in range(96):
            t = np.minimum(t + sdf(o + t[..., None] * d), 100.0 * SCALE)
        n = down(gradient(sdf, o + t[..., None] * d) * a)
        normals.append(n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9) * (alpha > 0))
        z = t[..., None] * (d @ -pose[:3, 2])[..., None]
        depths.append((down(z * a) / np.maximum(alpha, 1e-9))[..., 0])
        r = down(roughness(o + t[..., None] * d)[..., None] * a) / np.maximum(alpha, 1e-9)
        roughs.append(np.where(alpha > 0, r, -1.0)[..., 0])
    images = (np.clip(np.stack(images), 0, 1) * 255 + 0.5).astype(np.uint8)
    aabb = np.stack([CENTER - 1.15 * SCALE, CENTER + 1.15 * SCALE])
    passes = {name: value for name, value in (
        ("albedo", (np.clip(np.stack(albedos), 0, 1) * 255 + 0.5).astype(np.uint8)),
        ("normal", np.stack(normals).astype(np.float32)),
        ("depth", np.stack(depths).astype(np.float32)),
        ("roughness", np.stack(roughs).astype(np.float32))) if name in passes}
    ks = np.repeat(k[None], count, 0)
    return PosedImages(images, ks, poses, aabb, [f"view_{i}" for i in range(count)], passes=passes)


# ---- meshes --------------------------------------------------------------------------------------
def grid_values(fn, aabb: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """fn on an n^3 grid over aabb: values (n, n, n) and spacing (3,)."""
    axes = [np.linspace(aabb[0][i], aabb[1][i], n) for i in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    return fn(pts).reshape(n, n, n), (aabb[1] - aabb[0]) / (n - 1)


def mesh_of(fn, aabb: np.ndarray, n: int, level: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes of ``fn`` (world points (M, 3) -> (M,)) at ``level``: world vertices, faces."""
    from skimage.measure import marching_cubes

    values, spacing = grid_values(fn, aabb, n)
    verts, faces, _, _ = marching_cubes(values, level, spacing=tuple(spacing))
    return verts + aabb[0], faces


def model_mesh(model, n: int = 64):
    """Level 0 of the fitted field's inside_field (positive inside)."""
    def fn(p):
        return model.inside_field(torch.from_numpy(p).float().to(model.device)).cpu().numpy()
    return mesh_of(fn, model.aabb, n)


def surface_scores(model, sdf, n: int = 64, threshold_share: float = 0.01) -> dict:
    """Chamfer / F-score of the fitted surface against the analytic one (both meshed), the
    distances as shares of the ground-truth box diagonal."""
    gt_v, gt_f = mesh_of(lambda p: -sdf(p), model.aabb, 128)
    v, f = model_mesh(model, n)
    diag = float(np.linalg.norm(gt_v.max(0) - gt_v.min(0)))
    s = metrics.chamfer(gt_v, gt_f, v, f, samples=20000, threshold=threshold_share * diag)
    return {"chamfer_share": s["chamfer"] / diag, "fscore": s["fscore"], "diag": diag}


def fitted_run(tmp_path_factory, method: str, data: PosedImages, name: str, steps: int = TEST_STEPS):
    """A CPU fit (draft preset, ``steps`` steps, seed 0) of ``data`` saved as a run: (model, folder)."""
    model = fit(data, make_config(method, "draft", device="cpu", steps=steps, preview_size=0, seed=0))
    run = tmp_path_factory.mktemp(name)
    save_run(model, run)
    return model, run
