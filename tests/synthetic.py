"""A tiny analytic scene for tests (no bpy): two shaded spheres, ray-traced with numpy.

The scene sits at a non-trivial world offset and scale so that any leak of the trainer's
normalised frame into rendered images or meshes shows up as a large error.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fit_implicit.shared import cameras

CENTER = np.array([3.0, -2.0, 5.0])
SCALE = 2.5
# (centre offset in scene units, radius in scene units, base colour)
SPHERES = [
    (np.array([0.0, 0.0, 0.0]), 0.6, np.array([0.9, 0.25, 0.15])),
    (np.array([0.55, 0.45, 0.35]), 0.3, np.array([0.15, 0.45, 0.9])),
]
LIGHT = np.array([0.4, -0.5, 0.77]) / np.linalg.norm([0.4, -0.5, 0.77])


@dataclass
class Sphere:
    center: np.ndarray  # (3,) world
    radius: float       # world
    color: np.ndarray   # (3,) sRGB


def spheres() -> list[Sphere]:
    return [Sphere(CENTER + SCALE * o, SCALE * r, c) for o, r, c in SPHERES]


def aabb() -> np.ndarray:
    """(2, 3) world box with some margin around the spheres."""
    return np.stack([CENTER - 1.15 * SCALE, CENTER + 1.15 * SCALE])


def trace(origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hard-edged shading of rays: rgb (..., 3) and hit (...,) bool."""
    best = np.full(origins.shape[:-1], np.inf)
    rgb = np.zeros(origins.shape)
    for s in spheres():
        oc = origins - s.center
        b = np.sum(oc * dirs, -1)
        c = np.sum(oc * oc, -1) - s.radius ** 2
        disc = b * b - c
        t = -b - np.sqrt(np.maximum(disc, 0.0))
        ok = (disc > 0) & (t > 0) & (t < best)
        n = (origins + t[..., None] * dirs - s.center) / s.radius
        shade = 0.35 + 0.65 * np.clip(np.sum(n * LIGHT, -1), 0.0, 1.0)
        # a little texture so colours vary over the surface
        stripes = 0.85 + 0.15 * np.sin(6.0 * n[..., 2])
        rgb = np.where(ok[..., None], s.color * (shade * stripes)[..., None], rgb)
        best = np.where(ok, t, best)
    return rgb, np.isfinite(best)


ROOM_RADIUS = 9.0 * SCALE     # the walls of the room of render(..., room=True)


def room_colour(origins: np.ndarray, dirs: np.ndarray) -> np.ndarray:
    """The colour (..., 3) where rays meet the inside of a patterned sphere of radius
    ROOM_RADIUS around the scene (a room far behind the object: parallax, no alpha)."""
    oc = origins - CENTER
    b = np.sum(oc * dirs, -1)
    c = np.sum(oc * oc, -1) - ROOM_RADIUS ** 2
    p = (origins + (-b + np.sqrt(np.maximum(b * b - c, 0.0)))[..., None] * dirs - CENTER) / ROOM_RADIUS
    lon, lat = np.arctan2(p[..., 1], p[..., 0]), np.arcsin(np.clip(p[..., 2], -1.0, 1.0))
    checks = (np.floor(lon * 4.0 / np.pi) + np.floor(lat * 4.0 / np.pi)) % 2
    base = np.stack([0.3 + 0.3 * np.cos(lon), 0.5 + 0.2 * np.sin(2.0 * lat), np.full_like(lat, 0.55)], -1)
    return base * (0.6 + 0.4 * checks[..., None])


def render(intrinsics: np.ndarray, c2w: np.ndarray, width: int, height: int, ss: int = 3,
           room: bool = False) -> np.ndarray:
    """(H, W, 4) uint8 straight-alpha RGBA, ``ss`` x ``ss`` supersampled; ``room``: the
    room of :func:`room_colour` behind the spheres (every pixel opaque)."""
    k = intrinsics * np.array([ss, ss, ss, ss])
    o, d = cameras.pixel_rays(k, c2w, width * ss, height * ss)
    rgb, hit = trace(o, d)
    if room:
        rgb, hit = np.where(hit[..., None], rgb, room_colour(o, d)), np.ones_like(hit)
    a = hit.astype(np.float64)
    prem = (rgb * a[..., None]).reshape(height, ss, width, ss, 3).mean((1, 3))
    alpha = a.reshape(height, ss, width, ss).mean((1, 3))
    straight = np.where(alpha[..., None] > 0, prem / np.maximum(alpha[..., None], 1e-9), 0.0)
    out = np.concatenate([straight, alpha[..., None]], -1)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def camera_rig(count: int, size: int, fov: float = 0.7):
    """(intrinsics (N, 4), poses (N, 4, 4)) of cameras around the scene."""
    pos = cameras.ring_positions(CENTER, 4.2 * SCALE, count, elevations_deg=(-20.0, 15.0, 50.0))
    poses = np.stack([cameras.look_at(p, CENTER) for p in pos])
    k = cameras.intrinsics_from_fov(fov, size, size)
    return np.repeat(k[None], count, 0), poses


def make_scene(count: int = 20, size: int = 48):
    """(images (N, S, S, 4) uint8, intrinsics, poses, aabb)."""
    ks, poses = camera_rig(count, size)
    images = np.stack([render(k, p, size, size) for k, p in zip(ks, poses)])
    return images, ks, poses, aabb()


def write_transforms(folder: Path, count: int = 12, size: int = 32, fov: float = 0.7,
                     with_aabb: bool = True, sizes: list | None = None) -> Path:
    """A NeRF-style dataset on disk: PNGs + transforms.json (camera_angle_x, no extensions).
    ``sizes``: (width, height) of each photo, cycled over the frames (default: size x size)."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    _, poses = camera_rig(count, size, fov)
    frames = []
    for i, p in enumerate(poses):
        w, h = sizes[i % len(sizes)] if sizes else (size, size)
        k = cameras.intrinsics_from_fov(fov, w, h)       # camera_angle_x is across the width
        Image.fromarray(render(k, p, w, h)).save(folder / "images" / f"r_{i}.png")
        frames.append({"file_path": f"./images/r_{i}", "transform_matrix": p.tolist()})
    doc = {"camera_angle_x": fov, "frames": frames}
    if with_aabb:
        doc["aabb"] = aabb().tolist()
    path = folder / "transforms.json"
    path.write_text(json.dumps(doc))
    return path
