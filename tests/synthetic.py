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


def moving_spheres(t: float) -> list[Sphere]:
    """The scene of a fit over time at instant ``t`` in [0, 1]: the big sphere travels along x from
    MOVE_FROM to MOVE_TO (scene units; no ease), the small one circles it once."""
    big, small = spheres()
    big.center = CENTER + SCALE * np.array([MOVE_FROM + (MOVE_TO - MOVE_FROM) * t, 0.0, 0.0])
    angle = 2.0 * np.pi * t
    small.center = big.center + SCALE * 0.75 * np.array([np.cos(angle), np.sin(angle), 0.3])
    return [big, small]


MOVE_FROM, MOVE_TO = -0.45, 0.45


def trace(origins: np.ndarray, dirs: np.ndarray, scene: list[Sphere] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hard-edged shading of rays: rgb (..., 3) and hit (...,) bool (``scene``: default :func:`spheres`)."""
    best = np.full(origins.shape[:-1], np.inf)
    rgb = np.zeros(origins.shape)
    for s in scene or spheres():
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
           room: bool = False, time: float | None = None) -> np.ndarray:
    """(H, W, 4) uint8 straight-alpha RGBA, ``ss`` x ``ss`` supersampled; ``room``: the
    room of :func:`room_colour` behind the spheres (every pixel opaque); ``time``: the moving
    scene (:func:`moving_spheres`) at that instant."""
    k = intrinsics * np.array([ss, ss, ss, ss])
    o, d = cameras.pixel_rays(k, c2w, width * ss, height * ss)
    rgb, hit = trace(o, d, None if time is None else moving_spheres(time))
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


def moving_scene(count: int = 24, size: int = 32):
    """A monocular capture of the moving scene, as D-NeRF's: frame i at time i / (count - 1), seen
    by one camera of a ring (in turn).  Returns PosedImages with times."""
    from fit_implicit.backend.fitting.data import PosedImages

    ks, poses = camera_rig(count, size)
    order = np.arange(count) * 7 % count              # consecutive frames from cameras far apart
    times = np.linspace(0.0, 1.0, count)
    images = np.stack([render(ks[j], poses[j], size, size, time=t) for j, t in zip(order, times)])
    return PosedImages(images, ks[order], poses[order], aabb(), [f"f_{i:03d}" for i in range(count)], times=times)


def moving_views(times, cameras_each: int, size: int = 24, offset: int = 0):
    """Every camera of a ring of ``cameras_each`` (turned by ``offset`` / 2 of a step) at each of
    ``times``: a multi-view capture of the moving scene, as PosedImages with times."""
    from fit_implicit.backend.fitting.data import PosedImages

    pos = cameras.ring_positions(CENTER, 4.2 * SCALE, 2 * cameras_each, elevations_deg=(10.0, 10.0, 40.0, 40.0))
    poses = np.stack([cameras.look_at(p, CENTER) for p in pos])[offset % 2::2]
    k = cameras.intrinsics_from_fov(0.7, size, size)
    rows = [(j, float(t)) for t in times for j in range(len(poses))]
    images = np.stack([render(k, poses[j], size, size, time=t) for j, t in rows])
    return PosedImages(images, np.repeat(k[None], len(rows), 0), poses[[j for j, _ in rows]], aabb(),
                       [f"t{t:.3f}_c{j}" for j, t in rows], times=np.array([t for _, t in rows]))


def write_moving_dataset(folder: Path, train_times=(0.0, 0.25, 0.5, 0.75, 1.0), test_times=(0.125, 0.875),
                         cameras_each: int = 8, size: int = 24) -> Path:
    """The moving scene as D-NeRF's datasets are laid out: transforms_train.json (every camera of a
    ring at each of ``train_times``) and transforms_test.json (cameras between those, at
    ``test_times``: instants no training photo shows), PNGs, a ``time`` per frame and the box."""
    from PIL import Image

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for split, times, offset, count in (("train", train_times, 0, cameras_each), ("test", test_times, 1, 2)):
        views = moving_views(times, count, size, offset)
        frames = []
        for i in range(len(views)):
            Image.fromarray(views.images[i]).save(folder / "images" / f"{split}_{i:03d}.png")
            frames.append({"file_path": f"./images/{split}_{i:03d}", "transform_matrix": views.poses[i].tolist(),
                           "time": float(views.times[i])})
        (folder / f"transforms_{split}.json").write_text(json.dumps(
            {"camera_angle_x": 0.7, "aabb": aabb().tolist(), "frames": frames}))
    return folder


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
