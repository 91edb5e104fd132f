"""Shapes with a known surface, scanned as a scanner sees them (issue 16's cases; numpy only).

A case is an analytic signed distance function (positive outside).  :func:`scan` shoots a grid
of rays from each of a few viewpoints and keeps where they first hit the surface (sphere
tracing), so only what those viewpoints see is sampled; it adds range noise along the rays, a
share of outliers spread over the box, and leaves holes where the surface faces away or is
hidden.  :func:`truth` is the surface itself as a mesh (marching cubes of the SDF on a fine
grid), for Chamfer distance and F-score (backend/fitting/metrics.py ``chamfer``).

Used by tests/backend/fitting/test_points_fit.py (small scans on the CPU) and
benchmarks/points_vs_poisson.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Shape:
    """An analytic shape: ``sdf`` (N, 3) -> (N,) and a box (2, 3) that holds it."""

    name: str
    sdf: Callable[[np.ndarray], np.ndarray]
    box: np.ndarray


def sphere(radius: float = 0.6, centre=(0.1, -0.2, 0.3)) -> Shape:
    c = np.asarray(centre, dtype=np.float64)
    return Shape("sphere", lambda x: np.linalg.norm(x - c, axis=-1) - radius,
                 np.stack([c - radius, c + radius]))


def torus(major: float = 0.6, minor: float = 0.22, centre=(0.0, 0.1, -0.1)) -> Shape:
    c = np.asarray(centre, dtype=np.float64)

    def sdf(x):
        p = x - c
        q = np.stack([np.linalg.norm(p[..., :2], axis=-1) - major, p[..., 2]], axis=-1)
        return np.linalg.norm(q, axis=-1) - minor

    r = major + minor
    return Shape("torus", sdf, np.stack([c - [r, r, minor], c + [r, r, minor]]))


def rounded_box(half=(0.6, 0.4, 0.25), rounding: float = 0.05) -> Shape:
    h = np.asarray(half, dtype=np.float64)

    def sdf(x):
        q = np.abs(x) - (h - rounding)
        return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0) - rounding

    return Shape("rounded_box", sdf, np.stack([-h, h]))


def thin_plate(half=(0.6, 0.45), thickness: float = 0.03) -> Shape:
    """A slab thinner than a few percent of its size: thin parts (issue 16's "over-smooths thin parts")."""
    h = np.asarray([*half, thickness / 2], dtype=np.float64)

    def sdf(x):
        q = np.abs(x) - h
        return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)

    return Shape("thin_plate", sdf, np.stack([-h, h]))


SHAPES = {"sphere": sphere, "torus": torus, "rounded_box": rounded_box, "thin_plate": thin_plate}


def gradient(shape: Shape, x: np.ndarray, h: float = 1e-5) -> np.ndarray:
    """Unit outward normals of the SDF at ``x`` (central differences)."""
    g = np.stack([shape.sdf(x + h * e) - shape.sdf(x - h * e) for e in np.eye(3)], axis=-1)
    return g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)


def viewpoints(shape: Shape, count: int, distance: float = 2.5, elevation: float = 0.35, seed: int = 0) -> np.ndarray:
    """``count`` scanner positions around the shape (evenly in azimuth, a little above it), at
    ``distance`` times the box's half-diagonal from its centre."""
    centre = shape.box.mean(0)
    radius = distance * 0.5 * float(np.linalg.norm(shape.box[1] - shape.box[0]))
    az = np.linspace(0.0, 2 * np.pi, count, endpoint=False) + np.random.default_rng(seed).uniform(0, 0.3)
    el = elevation * np.where(np.arange(count) % 2, 1.0, -0.5)
    return centre + radius * np.stack([np.cos(az) * np.cos(el), np.sin(az) * np.cos(el), np.sin(el)], axis=-1)


def scan(shape: Shape, views: np.ndarray, rays: int = 64, noise: float = 0.0, outliers: float = 0.0,
         seed: int = 0, steps: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """What a range scanner at each of ``views`` records: a ``rays`` x ``rays`` grid of rays over
    the shape's box, the first surface hit of each (sphere tracing), moved along its ray by
    N(0, ``noise``) (world units), plus ``outliers`` (a share of the hits) uniform in 1.5x the box.

    Returns: points (N, 3) float64 and their true outward normals (N, 3) (outliers: random unit
    vectors), both in world units."""
    rng = np.random.default_rng(seed)
    centre = shape.box.mean(0)
    half = 0.5 * float(np.linalg.norm(shape.box[1] - shape.box[0]))
    pts, nrm = [], []
    for eye in views:
        fwd = centre - eye
        fwd /= np.linalg.norm(fwd)
        right = np.cross(fwd, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        up = np.cross(right, fwd)
        span = 1.1 * half / np.linalg.norm(centre - eye)
        s = np.linspace(-span, span, rays)
        u, v = np.meshgrid(s, s)
        d = fwd + u.reshape(-1, 1) * right + v.reshape(-1, 1) * up
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        t = np.zeros(len(d))
        alive = np.ones(len(d), bool)
        far = 2.0 * np.linalg.norm(centre - eye) + 2 * half
        for _ in range(steps):
            x = eye + t[:, None] * d
            f = shape.sdf(x)
            t = np.where(alive, t + f, t)
            alive &= (f > 1e-6) & (t < far)
        x = eye + t[:, None] * d
        hit = np.abs(shape.sdf(x)) < 1e-4
        x, dh = x[hit], d[hit]
        n = gradient(shape, x)
        x = x + dh * rng.normal(0.0, noise, (len(x), 1)) if noise > 0 else x
        pts.append(x)
        nrm.append(n)
    pts, nrm = np.concatenate(pts), np.concatenate(nrm)
    if outliers > 0:
        k = int(round(outliers * len(pts)))
        lo, hi = centre - 0.75 * (shape.box[1] - shape.box[0]), centre + 0.75 * (shape.box[1] - shape.box[0])
        extra = lo + (hi - lo) * rng.random((k, 3))
        en = rng.normal(size=(k, 3))
        pts = np.concatenate([pts, extra])
        nrm = np.concatenate([nrm, en / np.linalg.norm(en, axis=1, keepdims=True)])
    return pts, nrm


def truth(shape: Shape, resolution: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """The shape's surface as a triangle mesh (vertices (V, 3) float64, faces (F, 3)):
    scikit-image's marching cubes of the SDF on a grid over the box plus a margin."""
    from skimage.measure import marching_cubes

    lo, hi = shape.box[0] - 0.05, shape.box[1] + 0.05
    step = float(np.max(hi - lo)) / resolution
    axes = [np.arange(a, b + step, step) for a, b in zip(lo, hi)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    vol = shape.sdf(grid.reshape(-1, 3)).reshape(grid.shape[:3])
    verts, faces, _, _ = marching_cubes(vol, 0.0, spacing=(step, step, step))
    return verts + lo, faces


# ---- a real scan ------------------------------------------------------------------------------
# The Stanford bunny's range images (Cyberware 3030MS optical triangulation scanner, Stanford
# 3D Scanning Repository, 1996) as one public copy holds them (github.com/ksnabb/stan_bun:
# bunny/data/bun000..bun315.ply and bun.conf, bunny.ply = the zippered reconstruction).  Copy
# those into one folder (bun_zipper.ply for the reconstruction); docs/benchmarks.md says how.
BUNNY_SCANS = ("bun000.ply", "bun045.ply", "bun090.ply", "bun180.ply", "bun270.ply", "bun315.ply")


def stanford_bunny(folder) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The six side scans registered into one frame (about 200k points, no normals; the top, chin
    and ear scans are not in the copy, so the bottom and top have holes) and the zippered
    reconstruction as the truth ``(verts, faces)``.  bun.conf's lines ``bmesh FILE tx ty tz qx qy
    qz qw`` place a scan's point p at ``R(q)^T p + t`` (checked: each scan then lies within 0.6 mm
    median of the reconstruction; the other readings of the line leave 45-degree scans 2-5 cm off)."""
    from pathlib import Path

    import trimesh
    from scipy.spatial.transform import Rotation

    from fit_implicit.backend.fitting.point_files import read_points

    folder = Path(folder)
    parts = []
    for line in (folder / "bun.conf").read_text().splitlines():
        words = line.split()
        if len(words) != 9 or words[0] != "bmesh" or words[1] not in BUNNY_SCANS:
            continue
        t = np.array(words[2:5], float)
        rot = Rotation.from_quat(np.array(words[5:9], float)).as_matrix()        # (x, y, z, w) order
        parts.append(read_points(folder / words[1]).points @ rot + t)      # rows: (R^T p)^T = p^T R
    if len(parts) != len(BUNNY_SCANS):
        raise FileNotFoundError(f"{folder}: expected bun.conf and {', '.join(BUNNY_SCANS)}")
    truth = trimesh.load(folder / "bun_zipper.ply", process=False)
    return np.concatenate(parts), (np.asarray(truth.vertices, np.float64), np.asarray(truth.faces))
