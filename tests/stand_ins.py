"""Stand-ins shared by the export and importer tests: a UV-sphere mesh and an analytic fitted
field with ``surface_attributes`` (as FittedField, backend/fitting/model.py), numpy only."""
from __future__ import annotations

import numpy as np
import torch


def sphere_mesh(radius: float = 0.7, n: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A closed triangulated sphere (UV-sphere topology, poles merged), CCW from outside."""
    rings, segs = n // 2, n
    theta = np.linspace(0, np.pi, rings + 1)[1:-1]
    phi = np.linspace(0, 2 * np.pi, segs, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    body = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 0, 1]], body, [[0, 0, -1]]]) * radius
    idx = lambda r, s: 1 + r * segs + s % segs     # noqa: E731
    faces = [(0, idx(0, s), idx(0, s + 1)) for s in range(segs)]
    for r in range(rings - 2):
        for s in range(segs):
            a, b, c, d = idx(r, s), idx(r, s + 1), idx(r + 1, s), idx(r + 1, s + 1)
            faces += [(a, c, b), (b, c, d)]
    last = len(verts) - 1
    faces += [(last, idx(rings - 2, s + 1), idx(rings - 2, s)) for s in range(segs)]
    return verts.astype(np.float32), np.array(faces, np.int32)


class HalvesBall:
    """Stand-in for a fitted SDF: a ball, red where x > 0 and blue elsewhere, its
    true normals optionally tilted by ``tilt`` (a bumpy surface), roughness 0.2 / 0.8 by half."""

    method = "sdf"
    device = torch.device("cpu")

    def __init__(self, tilt: float = 0.0, roughness: bool = False):
        self.tilt, self.roughness = tilt, roughness
        self.meta = {"lighting_baked": False}
        self.calls = 0

    def true_normal(self, p: np.ndarray) -> np.ndarray:
        n = p / np.linalg.norm(p, axis=1, keepdims=True)
        n = n + self.tilt * np.stack([np.sin(8 * p[:, 2]), np.cos(8 * p[:, 0]), np.zeros(len(p))], -1)
        return (n / np.linalg.norm(n, axis=1, keepdims=True)).astype(np.float32)

    def surface_attributes(self, points, normals=None):
        self.calls += 1
        p = np.asarray(points, np.float32)
        red = p[:, :1] > 0
        out = {"albedo": np.where(red, [[1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]]).astype(np.float32),
               "normal": self.true_normal(p)}
        if self.roughness:
            out["roughness"] = np.where(red[:, 0], 0.2, 0.8).astype(np.float32)
        return out
