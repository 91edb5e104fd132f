"""Posed-image datasets: from ``transforms.json`` files or from a wire ``Submit``; ray batches.

Camera conventions are those of :mod:`shared.cameras` (OpenCV pixel frame for intrinsics,
Blender / NeRF camera-to-world poses).  Everything here is in WORLD units; the trainer
normalises internally.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from shared import cameras, transforms

TRANSFORMS_NAMES = ("transforms_train.json", "transforms.json")


@dataclass
class PosedImages:
    """Images with their cameras, all in one world frame.

    Attributes:
        images: (N, H, W, 4) uint8 sRGB RGBA, straight alpha, top row first.
        intrinsics: (N, 4) float64 ``fx, fy, cx, cy`` in pixels (OpenCV pixel frame).
        poses: (N, 4, 4) float64 camera-to-world, Blender camera convention.
        aabb: (2, 3) float64 world box (min row, max row) holding the object.
        names: one file stem per image, used to name rendered outputs.
    """

    images: np.ndarray
    intrinsics: np.ndarray
    poses: np.ndarray
    aabb: np.ndarray
    names: list[str]

    def __post_init__(self):
        images = np.asarray(self.images)
        if images.ndim != 4 or images.shape[-1] not in (3, 4) or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, 3|4) uint8, got {images.shape} {images.dtype}")
        if images.shape[-1] == 3:
            images = np.concatenate([images, np.full(images.shape[:3] + (1,), 255, np.uint8)], axis=-1)
        n = images.shape[0]
        if n < 1:
            raise ValueError("at least one image is needed")
        intrinsics = np.asarray(self.intrinsics, dtype=np.float64)
        poses = np.asarray(self.poses, dtype=np.float64)
        aabb = np.asarray(self.aabb, dtype=np.float64)
        if intrinsics.shape != (n, 4):
            raise ValueError(f"intrinsics must be ({n}, 4), got {intrinsics.shape}")
        if poses.shape != (n, 4, 4):
            raise ValueError(f"poses must be ({n}, 4, 4), got {poses.shape}")
        if aabb.shape != (2, 3) or not np.all(aabb[1] > aabb[0]):
            raise ValueError(f"aabb must be (2, 3) with max > min on every axis, got {aabb.tolist()}")
        if not (np.isfinite(intrinsics).all() and np.isfinite(poses).all()) or np.any(intrinsics[:, :2] <= 0):
            raise ValueError("intrinsics and poses must be finite, with positive focal lengths")
        if len(self.names) != n:
            raise ValueError(f"{len(self.names)} names for {n} images")
        self.images, self.intrinsics, self.poses, self.aabb = images, intrinsics, poses, aabb
        self.names = [str(s) for s in self.names]

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def width(self) -> int:
        return self.images.shape[2]

    def subset(self, indices: Sequence[int]) -> "PosedImages":
        idx = np.asarray(indices, dtype=np.int64)
        return PosedImages(self.images[idx], self.intrinsics[idx], self.poses[idx], self.aabb.copy(),
                           [self.names[i] for i in idx])


def holdout_indices(n: int, every: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)``: every ``every``-th view (0, k, 2k, ...) is held out.

    Returns (train indices, held-out indices); ``every <= 1`` holds nothing out.
    """
    idx = np.arange(n)
    if every <= 1:
        return idx, idx[:0]
    held = idx % every == 0
    if held.all() or not held.any():
        raise ValueError(f"holding out every {every}-th of {n} views leaves nothing to train or test on")
    return idx[~held], idx[held]


def split_holdout(data: PosedImages, every: int) -> tuple[PosedImages, PosedImages | None]:
    """(training views, held-out views or None) with every ``every``-th view held out."""
    train, held = holdout_indices(len(data), every)
    return data.subset(train), (data.subset(held) if len(held) else None)


# --------------------------------------------------------------------------------------------
# transforms.json
# --------------------------------------------------------------------------------------------
@dataclass
class Frame:
    """One camera entry of a transforms file, before its image is read.

    ``meta`` holds the intrinsics keys (global keys overridden by per-frame ones); the size in
    pixels is whatever the caller decides (file w/h, image size, ...): see :meth:`intrinsics`.
    """

    name: str
    image_path: Path | None     # None when no image file exists for the frame
    c2w: np.ndarray             # (4, 4) float64, rigid
    meta: dict

    def declared_size(self) -> tuple[int, int] | None:
        """(width, height) written in the file, if any."""
        if "w" in self.meta and "h" in self.meta:
            return int(self.meta["w"]), int(self.meta["h"])
        return None

    def intrinsics(self, width: int, height: int) -> np.ndarray:
        """(4,) float64 ``fx, fy, cx, cy`` for an image of ``width`` x ``height`` pixels.

        Focal lengths and principal points written for another size (the file's w/h) are
        rescaled to this one.
        """
        m = self.meta
        declared = self.declared_size()
        sx, sy = (width / declared[0], height / declared[1]) if declared else (1.0, 1.0)
        if "fl_x" in m or "fl_y" in m:
            fx = float(m.get("fl_x", m.get("fl_y"))) * sx
            fy = float(m.get("fl_y", m.get("fl_x"))) * sy
        elif "camera_angle_x" in m:
            fx = 0.5 * width / math.tan(0.5 * float(m["camera_angle_x"]))
            fy = 0.5 * height / math.tan(0.5 * float(m["camera_angle_y"])) if "camera_angle_y" in m else fx
        else:
            raise ValueError(f"frame {self.name!r}: no intrinsics (need camera_angle_x or fl_x)")
        cx = float(m["cx"]) * sx if "cx" in m else width / 2.0
        cy = float(m["cy"]) * sy if "cy" in m else height / 2.0
        return np.array([fx, fy, cx, cy], dtype=np.float64)


_INTRINSIC_KEYS = ("camera_angle_x", "camera_angle_y", "fl_x", "fl_y", "cx", "cy", "w", "h",
                   "k1", "k2", "k3", "p1", "p2")


def find_transforms(path: str | Path) -> Path:
    """The transforms file itself, or the first of TRANSFORMS_NAMES inside a folder."""
    return transforms.find(path, TRANSFORMS_NAMES)


def read_frames(path: str | Path) -> tuple[Path, list[Frame], dict]:
    """Parse a transforms file.  Returns (file path, frames, top-level dict)."""
    file, raw, doc = transforms.read(path, TRANSFORMS_NAMES, _INTRINSIC_KEYS)
    frames = []
    for f in raw:
        if any(float(f.meta.get(k, 0.0)) != 0.0 for k in ("k1", "k2", "k3", "p1", "p2")):
            warnings.warn(f"{file}: lens distortion coefficients are ignored", stacklevel=2)
        frames.append(Frame(name=f.name, image_path=f.image, c2w=f.c2w, meta=f.meta))
    return file, frames, doc


def read_image(path: Path, downscale: int = 1) -> np.ndarray:
    """(H, W, 4) uint8 RGBA; 3-channel images get alpha 255.  ``downscale`` box-filters."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGBA")
        if downscale > 1:
            im = im.resize((im.width // downscale, im.height // downscale), Image.Resampling.BOX)
        return np.asarray(im, dtype=np.uint8).copy()


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, reading only its header."""
    from PIL import Image

    with Image.open(path) as im:
        return im.width, im.height


def load_transforms(path: str | Path, downscale: int = 1) -> PosedImages:
    """Load a NeRF-style dataset: a folder holding transforms_train.json / transforms.json, or the
    file itself.  Intrinsics may be global or per frame (camera_angle_x, or fl_x/fl_y/cx/cy with
    w/h); ``file_path`` may omit the extension.  The box is the file's "aabb" key
    ([[min], [max]]) or else :func:`estimate_aabb`.  ``downscale`` (integer) shrinks the images.
    """
    if int(downscale) != downscale or downscale < 1:
        raise ValueError(f"downscale must be a positive integer, got {downscale}")
    file, frames, doc = read_frames(path)
    images, intrinsics = [], []
    for f in frames:
        if f.image_path is None:
            raise ValueError(f"{file}: image for frame {f.name!r} not found")
        img = read_image(f.image_path, int(downscale))
        if images and img.shape != images[0].shape:
            raise ValueError(f"{f.image_path}: size {img.shape[1]}x{img.shape[0]} differs from the first "
                             f"image's {images[0].shape[1]}x{images[0].shape[0]}; all images must share one size")
        images.append(img)
        h, w = img.shape[:2]
        full = image_size(f.image_path)
        k = f.intrinsics(*full)
        k *= np.array([w / full[0], h / full[1], w / full[0], h / full[1]])
        intrinsics.append(k)
    intrinsics = np.stack(intrinsics)
    poses = np.stack([f.c2w for f in frames])
    h, w = images[0].shape[:2]
    if "aabb" in doc:
        aabb = np.asarray(doc["aabb"], dtype=np.float64)
        if aabb.shape != (2, 3):
            raise ValueError(f"{file}: 'aabb' must be [[xmin, ymin, zmin], [xmax, ymax, zmax]]")
    else:
        aabb = estimate_aabb(intrinsics, poses, w, h)
    return PosedImages(np.stack(images), intrinsics, poses, aabb, [f.name for f in frames])


def estimate_aabb(intrinsics: np.ndarray, poses: np.ndarray, width: int, height: int) -> np.ndarray:
    """A cube around what the cameras look at.

    Centre: the point nearest (least squares) to all optical axes.  Half-size: the smallest, over
    cameras, of the distance to the centre times the tangent of the narrower half field of view,
    i.e. the half-width of the tightest view at the centre.  About +-1.45 for the NeRF lego scene.

    Args:
        intrinsics: (N, 4) float64.  poses: (N, 4, 4) float64.
    Returns:
        (2, 3) float64.
    """
    origins = poses[:, :3, 3]
    axes = -poses[:, :3, 2]
    axes = axes / np.linalg.norm(axes, axis=1, keepdims=True)
    proj = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]        # (N, 3, 3)
    a = proj.sum(0)
    b = np.einsum("nij,nj->i", proj, origins)
    if len(poses) < 2 or np.linalg.cond(a) > 1e8:  # one camera, or parallel optical axes
        raise ValueError("cannot estimate a bounding box: the cameras' optical axes do not converge; "
                         "give an 'aabb'")
    centre = np.linalg.solve(a, b)
    dist = np.linalg.norm(origins - centre, axis=1)
    tan_half = 0.5 * np.minimum(width / intrinsics[:, 0], height / intrinsics[:, 1])
    half = float(np.min(dist * tan_half))
    if not half > 0:
        raise ValueError("cannot estimate a bounding box from these cameras; give an 'aabb'")
    return np.stack([centre - half, centre + half])


def from_submit(msg: Any) -> PosedImages:
    """PosedImages from a validated :class:`shared.protocol.Submit`."""
    n = msg.images.shape[0]
    stem = msg.name or "view"
    # A copy: the received arrays are read-only views of ZeroMQ frames, which then need not
    # stay alive for the whole job.
    return PosedImages(np.array(msg.images, copy=True), msg.intrinsics, msg.poses, msg.aabb,
                       [f"{stem}_{i:04d}" for i in range(n)])


# --------------------------------------------------------------------------------------------
# Rays
# --------------------------------------------------------------------------------------------
def camera_rays(intrinsics: torch.Tensor, c2w: torch.Tensor, u: torch.Tensor, v: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """World rays through pixel positions; the torch twin of :func:`shared.cameras.pixel_rays`
    (tests check they agree).

    Args:
        intrinsics: (R, 4) float32 ``fx, fy, cx, cy``.
        c2w: (R, 4, 4) float32 camera-to-world (Blender convention).
        u, v: (R,) float32 pixel coordinates (OpenCV frame; a pixel centre is index + 0.5).
    Returns:
        origins (R, 3) float32 and unit directions (R, 3) float32.
    """
    fx, fy, cx, cy = intrinsics.unbind(-1)
    d_cam = torch.stack([(u - cx) / fx, -(v - cy) / fy, -torch.ones_like(u)], dim=-1)
    d = torch.einsum("rij,rj->ri", c2w[:, :3, :3], d_cam)
    return c2w[:, :3, 3], d / d.norm(dim=-1, keepdim=True)


class RaySampler:
    """Random rays over all pixels of all images, drawn on ``device``.

    The images live on the device as uint8 (4 bytes a pixel); nothing per-pixel is precomputed.
    """

    def __init__(self, data: PosedImages, device: torch.device | str):
        self.device = torch.device(device)
        self.images = torch.from_numpy(data.images).to(self.device)                      # (N,H,W,4) u8
        self.intrinsics = torch.from_numpy(data.intrinsics).float().to(self.device)      # (N,4)
        self.poses = torch.from_numpy(data.poses).float().to(self.device)                # (N,4,4)
        self.n, self.h, self.w = data.images.shape[:3]

    def sample(self, count: int, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``count`` rays through random pixel centres.

        Returns:
            origins (count, 3) float32 world, directions (count, 3) float32 unit,
            rgba (count, 4) float32 in [0, 1] (sRGB, straight alpha).
        """
        flat = torch.randint(0, self.n * self.h * self.w, (count,), device=self.device, generator=generator)
        img = flat // (self.h * self.w)
        pix = flat % (self.h * self.w)
        y, x = pix // self.w, pix % self.w
        o, d = camera_rays(self.intrinsics[img], self.poses[img], x.float() + 0.5, y.float() + 0.5)
        rgba = self.images[img, y, x].float() / 255.0
        return o, d, rgba
