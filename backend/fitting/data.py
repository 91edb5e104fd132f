"""Posed-image datasets: from ``transforms.json`` files or from a wire ``Submit``; ray batches.

Camera conventions are those of :mod:`shared.cameras` (OpenCV pixel frame for intrinsics,
Blender / NeRF camera-to-world poses).  Everything here is in WORLD units; the trainer
normalises internally.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from fit_implicit.shared import cameras, transforms
from fit_implicit.shared.protocol import NO_ROUGHNESS, PASS_DTYPES, PASS_NAMES, pad_images

from fit_implicit.backend.fitting import lens
from fit_implicit.backend.fitting.error_map import ErrorMap

TRANSFORMS_NAMES = ("transforms_train.json", "transforms.json")

#: Channels of each optional per-pixel pass (shared/protocol.py PASS_DTYPES says what they hold).
PASS_CHANNELS = {"albedo": 3, "normal": 3, "depth": None, "roughness": None}


@dataclass
class PosedImages:
    """Images with their cameras, all in one world frame.

    Attributes:
        images: (N, H, W, 4) uint8 sRGB RGBA, straight alpha, top row first.  Photos of different
            sizes are stored top-left in one (N, H, W) block of the largest size (see ``sizes``).
        intrinsics: (N, 4) float64 ``fx, fy, cx, cy`` in pixels (OpenCV pixel frame).
        poses: (N, 4, 4) float64 camera-to-world, Blender camera convention.
        aabb: (2, 3) float64 world box (min row, max row) holding the object.
        names: one file stem per image, used to name rendered outputs.
        passes: optional per-pixel supervision, keys of :data:`PASS_DTYPES` (see there):
            "albedo" (N, H, W, 3) uint8, "normal" (N, H, W, 3) float32, "depth" (N, H, W)
            float32, "roughness" (N, H, W) float32.  Masks are the images' alpha channel.
        lens_models: None (pinhole cameras) or (N,) int64 shared.cameras lens model codes, with
        distortion: (N, 6) float64 k1 k2 k3 k4 p1 p2; rays are bent through it (backend.fitting.lens).
        sizes: (N, 2) int64 ``width, height`` of each image (None: all are W x H); the pixels
            beyond an image's own size are padding that nothing samples or scores.
        times: (N,) float64 instant of each image in [0, 1] (D-NeRF's ``time``: a scene that
            moves; fields/motion.py), or None: one instant.
    """

    images: np.ndarray
    intrinsics: np.ndarray
    poses: np.ndarray
    aabb: np.ndarray
    names: list[str]
    passes: dict[str, np.ndarray] = field(default_factory=dict)
    lens_models: np.ndarray | None = None
    distortion: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)     # what the reader could not use, said once
    sizes: np.ndarray | None = None
    times: np.ndarray | None = None

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
        self.lens_models, self.distortion = _check_lenses(self.lens_models, self.distortion, n)
        self.passes = {k: _check_pass(k, v, images.shape[:3]) for k, v in dict(self.passes).items()}
        full = np.array([images.shape[2], images.shape[1]], np.int64)
        sizes = np.tile(full, (n, 1)) if self.sizes is None else np.asarray(self.sizes, dtype=np.int64)
        if sizes.shape != (n, 2) or (sizes < 1).any() or (sizes > full).any():
            raise ValueError(f"sizes must be ({n}, 2) widths and heights within {full[0]}x{full[1]}, "
                             f"got {sizes.tolist() if sizes.size <= 8 else sizes.shape}")
        self.sizes = sizes
        if self.times is not None:
            times = np.asarray(self.times, dtype=np.float64)
            if times.shape != (n,) or not (np.isfinite(times).all() and (times >= 0).all() and (times <= 1).all()):
                raise ValueError(f"times must be {n} numbers in [0, 1], one per image")
            self.times = times

    def __len__(self) -> int:
        return self.images.shape[0]

    def time(self, i: int) -> float | None:
        """The instant of image ``i`` (None when the images have no times)."""
        return None if self.times is None else float(self.times[i])

    @property
    def uniform(self) -> bool:
        """True when every image has the full W x H."""
        return bool((self.sizes == [self.width, self.height]).all())

    def size(self, i: int) -> tuple[int, int]:
        """``(width, height)`` of image ``i``."""
        return int(self.sizes[i, 0]), int(self.sizes[i, 1])

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` at its own size, (h, w, 4) uint8 (a view)."""
        w, h = self.size(i)
        return self.images[i, :h, :w]

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def width(self) -> int:
        return self.images.shape[2]

    def subset(self, indices: Sequence[int]) -> "PosedImages":
        idx = np.asarray(indices, dtype=np.int64)
        return PosedImages(self.images[idx], self.intrinsics[idx], self.poses[idx], self.aabb.copy(),
                           [self.names[i] for i in idx], {k: v[idx] for k, v in self.passes.items()},
                           **({} if self.lens_models is None else
                              {"lens_models": self.lens_models[idx], "distortion": self.distortion[idx]}),
                           sizes=self.sizes[idx], times=None if self.times is None else self.times[idx])


def _check_lenses(models, distortion, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(N,) int64 codes and (N, 6) float64 rows, or (None, None) when every camera is a pinhole."""
    if models is None and distortion is None:
        return None, None
    models = np.asarray(models, dtype=np.int64).reshape(-1)
    distortion = np.asarray(distortion, dtype=np.float64)
    if models.shape != (n,) or distortion.shape != (n, 6):
        raise ValueError(f"lens_models must be ({n},) and distortion ({n}, 6), got {models.shape} and {distortion.shape}")
    if not np.isfinite(distortion).all() or models.min(initial=0) < 0 or models.max(initial=0) > 2:
        raise ValueError("lens models must be codes 0..2 with finite distortion coefficients")
    # OPENCV with every coefficient zero is a pinhole (what Blender's datasets write: nothing to
    # undistort, and the mesh refinement's pinhole rasteriser may use those views)
    models = np.where((models == cameras.OPENCV) & ~distortion.any(axis=1), cameras.PINHOLE, models)
    if not models.any():
        return None, None
    return models, distortion


def _check_pass(name: str, value, nhw: tuple) -> np.ndarray:
    """A pass as its documented dtype, or ValueError naming what is wrong."""
    if name not in PASS_DTYPES:
        raise ValueError(f"unknown pass {name!r} (known: {', '.join(PASS_DTYPES)})")
    value = np.asarray(value)
    c = PASS_CHANNELS[name]
    want = tuple(nhw) + ((c,) if c else ())
    if value.shape != want:
        raise ValueError(f"pass {name!r} must have shape {want}, got {value.shape}")
    if PASS_DTYPES[name] is np.uint8:
        if value.dtype != np.uint8:
            raise ValueError(f"pass {name!r} must be uint8, got {value.dtype}")
        return value
    value = value.astype(np.float32, copy=False)
    if not np.isfinite(value).all():
        raise ValueError(f"pass {name!r} has NaN or infinite values")
    if name == "depth" and value.min(initial=0.0) < 0:
        raise ValueError("pass 'depth' must be >= 0 (0 where there is no surface)")
    if name == "roughness" and (((value < 0) | (value > 1)) & (value != NO_ROUGHNESS)).any():
        raise ValueError(f"pass 'roughness' must be in [0, 1], or {NO_ROUGHNESS} where it has no value")
    return value


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
        return transforms.declared_size(self.meta)

    def intrinsics(self, width: int, height: int) -> np.ndarray:
        """(4,) float64 ``fx, fy, cx, cy`` for an image of ``width`` x ``height`` pixels
        (shared/transforms.py frame_intrinsics: values written for the file's w/h are rescaled)."""
        k = transforms.frame_intrinsics(self.meta, width, height)
        if k is None:
            raise ValueError(f"frame {self.name!r}: no intrinsics (need camera_angle_x or fl_x)")
        return k


_INTRINSIC_KEYS = (*transforms.INTRINSIC_KEYS, "mask_path", *transforms.LENS_KEYS)
#: Optional per-frame pass files (top-level "depth_scale" may be overridden per frame):
#:   "albedo_path": 8-bit PNG, RGB or RGBA (alpha ignored), sRGB-encoded diffuse base colour.
#:   "normal_path": 8-bit RGB PNG, world normal n = 2 * v / 255 - 1 (renormalised); (0, 0, 0) = no surface.
#:   "depth_path":  16-bit single-channel PNG, z-depth = value * "depth_scale" (world units per
#:                  count); 0 = no surface.  Or a .npz holding a float array "depth" (H, W).
#:   "roughness_path": a .npz holding a float array "roughness" (H, W) in [0, 1], -1 = no value.
PASS_FILE_KEYS = {"albedo": "albedo_path", "normal": "normal_path", "depth": "depth_path",
                  "roughness": "roughness_path"}
_PASS_META_KEYS = (*PASS_FILE_KEYS.values(), "depth_scale")


def find_transforms(path: str | Path) -> Path:
    """The transforms file itself, or the first of TRANSFORMS_NAMES inside a folder."""
    return transforms.find(path, TRANSFORMS_NAMES)


def read_frames(path: str | Path) -> tuple[Path, list[Frame], dict]:
    """Parse a transforms file.  Returns (file path, frames, top-level dict)."""
    file, raw, doc = transforms.read(path, TRANSFORMS_NAMES, (*_INTRINSIC_KEYS, *_PASS_META_KEYS, transforms.TIME_KEY))
    frames = []
    for f in raw:
        frames.append(Frame(name=f.name, image_path=f.image, c2w=f.c2w, meta=f.meta))
    return file, frames, doc


def read_image(path: Path, downscale: int = 1) -> np.ndarray:
    """(H, W, 4) uint8 RGBA; 3-channel images get alpha 255.  ``downscale`` box-filters.  An
    .exr (linear light, premultiplied) is box-filtered in linear light, then encoded as sRGB with
    straight alpha (backend/render/image.py)."""
    from PIL import Image

    if Path(path).suffix.lower() == ".exr":
        from fit_implicit.backend.render.image import exr_to_rgba8, read_exr

        px = read_exr(path)
        d = int(downscale)
        if px.shape[0] < d or px.shape[1] < d:
            raise ValueError(f"{path}: {px.shape[1]}x{px.shape[0]} pixels cannot be shrunk {d} times")
        if d > 1:
            h, w = px.shape[0] // d * d, px.shape[1] // d * d
            px = px[:h, :w].reshape(h // d, d, w // d, d, 4).mean((1, 3))
        return exr_to_rgba8(px)
    with Image.open(path) as im:
        im = im.convert("RGBA")
        if downscale > 1:
            im = im.resize((im.width // downscale, im.height // downscale), Image.Resampling.BOX)
        return np.asarray(im, dtype=np.uint8).copy()


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file, reading only its header."""
    from PIL import Image

    if Path(path).suffix.lower() == ".exr":
        from fit_implicit.backend.render.image import exr_size

        return exr_size(path)
    with Image.open(path) as im:
        return im.width, im.height


def read_pass(kind: str, path: Path, meta: dict, size: tuple[int, int], downscale: int = 1) -> np.ndarray:
    """One pass file (encodings: see PASS_FILE_KEYS) as a PASS_DTYPES array of ``size`` (w, h)
    after ``downscale``: albedo is box-filtered; normals, depth and roughness take the pixel at
    the middle of each block (averaging would mix surface and background)."""
    from PIL import Image

    d = int(downscale)
    if kind == "roughness" and path.suffix.lower() != ".npz":
        raise ValueError(f"{path}: a roughness pass must be a .npz holding a float array 'roughness'")
    if kind in ("depth", "roughness") and path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if kind not in z:
                raise ValueError(f"{path}: no array {kind!r} in it")
            arr = np.asarray(z[kind], dtype=np.float32)
            if arr.ndim != 2:
                raise ValueError(f"{path}: {kind!r} must be a 2-D (H, W) array, got shape {arr.shape}")
    else:
        with Image.open(path) as im:
            if kind == "albedo":
                im = im.convert("RGB")
                if d > 1:
                    im = im.resize((im.width // d, im.height // d), Image.Resampling.BOX)
                    d = 1
                arr = np.asarray(im, dtype=np.uint8)
            elif kind == "normal":
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
            else:
                if im.mode not in ("I;16", "I;16B", "I", "L"):
                    raise ValueError(f"{path}: depth must be a 16-bit single-channel PNG, got mode {im.mode}")
                if "depth_scale" not in meta:
                    raise ValueError(f"{path}: a depth PNG needs a 'depth_scale' key (world units per count)")
                arr = np.asarray(im, dtype=np.float64) * float(meta["depth_scale"])
    if d > 1:
        arr = arr[d // 2::d, d // 2::d][: size[1], : size[0]]
    if arr.shape[:2] != (size[1], size[0]):
        raise ValueError(f"{path}: {kind} of {arr.shape[1]}x{arr.shape[0]} pixels does not match its image "
                         f"({size[0]}x{size[1]})")
    if kind == "normal":
        empty = ~arr.any(axis=-1)
        n = arr.astype(np.float32) * (2.0 / 255.0) - 1.0
        n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6)
        n[empty] = 0.0
        return n.astype(np.float32)
    if kind in ("depth", "roughness"):
        return np.ascontiguousarray(arr, dtype=np.float32)
    return np.ascontiguousarray(arr)


def write_pass_files(folder: str | Path, stem: str, passes: dict[str, np.ndarray], depth_scale: float
                     ) -> dict[str, str]:
    """Write one view's passes ("albedo" (H,W,3) u8, "normal" (H,W,3) f32, "depth" (H,W) f32,
    "roughness" (H,W) f32) as the files :func:`read_pass` reads: ``<stem>_albedo.png``,
    ``<stem>_normal.png``, ``<stem>_depth.png``, ``<stem>_roughness.npz`` under ``folder``.
    Returns the frame keys (paths relative to ``folder``).
    ``depth_scale``: world units per 16-bit count (depths above 65535 * scale are an error)."""
    from PIL import Image

    folder = Path(folder)
    keys = {}
    if "albedo" in passes:
        Image.fromarray(np.ascontiguousarray(passes["albedo"], dtype=np.uint8), "RGB").save(folder / f"{stem}_albedo.png")
        keys["albedo_path"] = f"{stem}_albedo.png"
    if "normal" in passes:
        n = np.asarray(passes["normal"], dtype=np.float32)
        v = np.clip(np.round((n + 1.0) * 127.5), 1, 255).astype(np.uint8)   # 0 is kept for "no surface"
        v[~n.any(axis=-1)] = 0
        Image.fromarray(v, "RGB").save(folder / f"{stem}_normal.png")
        keys["normal_path"] = f"{stem}_normal.png"
    if "depth" in passes:
        counts = np.round(np.asarray(passes["depth"], dtype=np.float64) / depth_scale)
        if counts.max(initial=0) > 65535:
            raise ValueError(f"depth {counts.max() * depth_scale:g} does not fit 16 bits at scale {depth_scale:g}")
        Image.fromarray(counts.astype(np.uint16)).save(folder / f"{stem}_depth.png")
        keys["depth_path"] = f"{stem}_depth.png"
    if "roughness" in passes:
        np.savez_compressed(folder / f"{stem}_roughness.npz",
                            roughness=np.asarray(passes["roughness"], dtype=np.float32))
        keys["roughness_path"] = f"{stem}_roughness.npz"
    return keys


def _frame_passes(file: Path, frames: list, images: list, downscale: int) -> dict[str, np.ndarray]:
    """Passes named by every frame (a pass only some frames name is an error)."""
    out = {}
    for kind, key in PASS_FILE_KEYS.items():
        have = [key in f.meta for f in frames]
        if not any(have):
            continue
        if not all(have):
            raise ValueError(f"{file}: '{key}' is given for {sum(have)} of {len(frames)} frames; give it for all or none")
        arrays = []
        for f, img in zip(frames, images):
            path = transforms.resolve_image(file.parent, str(f.meta[key]))
            if path is None:
                raise ValueError(f"{file}: {kind} pass file {f.meta[key]!r} of frame {f.name!r} not found")
            arrays.append(read_pass(kind, path, f.meta, (img.shape[1], img.shape[0]), downscale))
        out[kind] = pad_images(arrays)[0]
    return out


def load_transforms(path: str | Path, downscale: int = 1) -> PosedImages:
    """Load a NeRF-style dataset: a folder holding transforms_train.json / transforms.json, or the
    file itself.  Intrinsics may be global or per frame (camera_angle_x, or fl_x/fl_y/cx/cy with
    w/h); ``file_path`` may omit the extension.  The box is the file's "aabb" key
    ([[min], [max]]), else instant-ngp's box where there is "aabb_scale" (:func:`ngp_box`), else
    :func:`estimate_aabb`.  Keys of other tools that a fit does not use are listed in ``notes``.
    ``downscale`` (integer) shrinks the images.
    Optional per-frame pass files (albedo_path, normal_path, depth_path: encodings at
    PASS_FILE_KEYS) fill ``passes``.  Frames of a scene that moves carry D-NeRF's ``time`` (every
    frame, in [0, 1]: ``times``).
    """
    if int(downscale) != downscale or downscale < 1:
        raise ValueError(f"downscale must be a positive integer, got {downscale}")
    file, frames, doc = read_frames(path)
    times = transforms.frame_times([f.meta for f in frames], file)
    images, intrinsics, lenses = [], [], []
    for f in frames:
        if f.image_path is None:
            raise ValueError(f"{file}: image for frame {f.name!r} not found")
        img = read_image(f.image_path, int(downscale))
        lenses.append(transforms.frame_lens(f.meta))        # camera_model, k1..k4, p1, p2
        if f.meta.get("mask_path"):                           # the mask becomes the image's alpha
            mask = transforms.resolve_image(file.parent, str(f.meta["mask_path"]))
            if mask is None:
                raise ValueError(f"{file}: mask {f.meta['mask_path']!r} of frame {f.name!r} not found")
            img[..., 3] = transforms.read_mask(mask, image_size(f.image_path), int(downscale))
        images.append(img)
        h, w = img.shape[:2]
        full = image_size(f.image_path)
        k = f.intrinsics(*full)
        k *= np.array([w / full[0], h / full[1], w / full[0], h / full[1]])
        intrinsics.append(k)
    intrinsics = np.stack(intrinsics)
    poses = np.stack([f.c2w for f in frames])
    stacked, sizes = pad_images(images)
    w, h = sizes.max(0)
    if "aabb" in doc:
        aabb = np.asarray(doc["aabb"], dtype=np.float64)
        if aabb.shape != (2, 3):
            raise ValueError(f"{file}: 'aabb' must be [[xmin, ymin, zmin], [xmax, ymax, zmax]]")
    elif "aabb_scale" in doc:
        aabb = ngp_box(doc, file)
    else:
        aabb = estimate_aabb(intrinsics, poses, w, h)
    return PosedImages(stacked, intrinsics, poses, aabb, [f.name for f in frames],
                       passes=_frame_passes(file, frames, images, int(downscale)),
                       lens_models=np.array([m for m, _ in lenses]), distortion=np.stack([c for _, c in lenses]),
                       notes=_unused_keys(doc, file), sizes=sizes, times=times)


def ngp_box(doc: dict, file: Path) -> np.ndarray:
    """The world box instant-ngp renders for a transforms file with ``aabb_scale``: ngp maps a
    world point p to ``p * scale + offset`` (defaults 0.33 and 0.5 on each axis) and renders the
    cube of side ``aabb_scale`` centred on (0.5, 0.5, 0.5) there; this is that cube mapped back."""
    try:
        side = float(doc["aabb_scale"])
        scale = float(doc.get("scale", 0.33))
        offset = np.broadcast_to(np.asarray(doc.get("offset", 0.5), dtype=np.float64), (3,))
    except (TypeError, ValueError):
        raise ValueError(f"{file}: 'aabb_scale', 'scale' and 'offset' must be numbers (offset: 3 of them)") from None
    if not (side > 0 and scale > 0 and np.isfinite([side, scale]).all() and np.isfinite(offset).all()):
        raise ValueError(f"{file}: 'aabb_scale' and 'scale' must be positive, got {side} and {scale}")
    return np.stack([(0.5 - side / 2 - offset) / scale, (0.5 + side / 2 - offset) / scale])


#: transforms.json keys (top level or per frame) other tools write that a fit does not use.
UNUSED_KEYS = {
    "applied_transform": "nerfstudio's record of how it moved the poses from COLMAP's frame: the fit and its "
                         "mesh stay in this file's frame",
    "applied_scale": "nerfstudio's record of how it scaled the poses: the fit and its mesh stay in this file's units",
    "depth_file_path": "nerfstudio's depth maps are not read (a depth pass is 'depth_path' with 'depth_scale': "
                       "backend/fitting/data.py PASS_FILE_KEYS)",
    "sharp_file_path": "not used",
}


def _unused_keys(doc: dict, file: Path) -> list[str]:
    """One line per key of UNUSED_KEYS the file has (top level or in any frame)."""
    found = [k for k in UNUSED_KEYS if k in doc or any(isinstance(f, dict) and k in f for f in doc["frames"])]
    return [f"{file.name}: '{k}' {UNUSED_KEYS[k]}" for k in found]


def load_colmap(path: str | Path, downscale: int = 1, image_dir: str | Path | None = None) -> PosedImages:
    """Load a COLMAP reconstruction (text or binary model: shared/colmap.py) with its photos
    (``image_dir``, or images/ next to the model).  Lens distortion is kept; the box is
    :func:`estimate_aabb`'s.  Photos may differ in size (each camera's own)."""
    from fit_implicit.shared import colmap

    if int(downscale) != downscale or downscale < 1:
        raise ValueError(f"downscale must be a positive integer, got {downscale}")
    folder, cams, views = colmap.read_model(path)
    images, intrinsics, lens_models, distortion = [], [], [], []
    for view in views:
        file = colmap.find_image(folder, view.name, image_dir)
        if file is None:
            raise ValueError(f"{folder}: photo {view.name!r} not found (looked in images/ next to the model"
                             + (f" and in {image_dir}" if image_dir else "") + ")")
        cam = cams[view.camera_id]
        img = read_image(file, int(downscale))
        h, w = img.shape[:2]
        images.append(img)
        intrinsics.append(cam.intrinsics * np.array([w / cam.width, h / cam.height] * 2))
        lens_models.append(cam.lens_model)
        distortion.append(cam.distortion)
    intrinsics, poses = np.stack(intrinsics), np.stack([v.c2w for v in views])
    stacked, sizes = pad_images(images)
    w, h = sizes.max(0)
    return PosedImages(stacked, intrinsics, poses, estimate_aabb(intrinsics, poses, int(w), int(h)),
                       [Path(v.name).stem for v in views], lens_models=np.array(lens_models),
                       distortion=np.stack(distortion), sizes=sizes)


def load_dataset(path: str | Path, downscale: int = 1) -> PosedImages:
    """A transforms.json dataset (:func:`load_transforms`), a COLMAP reconstruction
    (:func:`load_colmap`), or an LLFF or IDR/NeuS capture (shared/layouts.py,
    :func:`load_layout`): what the command line's ``fit`` and ``eval`` read."""
    from fit_implicit.shared import layouts

    if Path(path).is_file() and Path(path).suffix.lower() in (".txt", ".bin"):    # cameras.bin, images.txt, ...
        return load_colmap(path, downscale)
    layout = layouts.read(path)
    if layout is not None:
        return load_layout(layout, downscale)
    try:
        transforms.find(path, TRANSFORMS_NAMES)
    except ValueError as missing:
        from fit_implicit.shared import colmap

        try:
            colmap.find_model(path)
        except ValueError:
            raise ValueError(f"{missing} (nor a COLMAP model, LLFF's {layouts.LLFF_FILE} or IDR's "
                             f"{layouts.IDR_FILE})") from None
        return load_colmap(path, downscale)
    return load_transforms(path, downscale)


def load_layout(layout, downscale: int = 1) -> PosedImages:
    """PosedImages of an LLFF or IDR/NeuS capture read by shared/layouts.py (masks become alpha)."""
    if int(downscale) != downscale or downscale < 1:
        raise ValueError(f"downscale must be a positive integer, got {downscale}")
    images, ks = [], []
    for v in layout.views:
        img = read_image(v.image, int(downscale))
        if v.mask is not None:
            img[..., 3] = transforms.read_mask(v.mask, image_size(v.image), int(downscale))
        base = v.size or image_size(v.image)        # the size the layout's intrinsics are for
        h, w = img.shape[:2]
        images.append(img)
        ks.append(v.intrinsics * np.array([w / base[0], h / base[1], w / base[0], h / base[1]]))
    stacked, sizes = pad_images(images)
    return PosedImages(stacked, np.stack(ks), np.stack([v.c2w for v in layout.views]), layout.aabb,
                       [v.name for v in layout.views], sizes=sizes, notes=list(layout.notes))


def estimate_aabb(intrinsics: np.ndarray, poses: np.ndarray, width: int, height: int) -> np.ndarray:
    """A cube around what the cameras look at: shared/cameras.py looked_at_aabb (the rule the
    add-on's photo fits use too), with this reader's advice to give an 'aabb'.

    Args:
        intrinsics: (N, 4) float64.  poses: (N, 4, 4) float64.
    Returns:
        (2, 3) float64.
    """
    try:
        return cameras.looked_at_aabb(intrinsics, poses, width, height)
    except cameras.NoBoxError as exc:
        if exc.code == "axes_apart":   # one camera, or parallel optical axes
            raise ValueError("cannot estimate a bounding box: the cameras' optical axes do not converge; "
                             "give an 'aabb'") from None
        raise ValueError("cannot estimate a bounding box from these cameras; give an 'aabb'") from None


def from_submit(msg: Any) -> PosedImages:
    """PosedImages from a validated :class:`shared.protocol.Submit`."""
    n = msg.images.shape[0]
    stem = msg.name or "view"
    # A copy: the received arrays are read-only views of ZeroMQ frames, which then need not
    # stay alive for the whole job.
    lens_rows = {"lens_models": np.asarray(msg.lens_models), "distortion": np.asarray(msg.distortion)} \
        if len(getattr(msg, "lens_models", ())) else {}
    passes = {}
    for kind in PASS_NAMES:
        value = getattr(msg, kind)
        if value.shape[0]:
            passes[kind] = np.array(value, dtype=PASS_DTYPES[kind], copy=True)
    sizes = np.asarray(msg.image_sizes, np.int64) if len(getattr(msg, "image_sizes", ())) else None
    times = np.asarray(msg.times, np.float64) if len(getattr(msg, "times", ())) else None
    return PosedImages(np.array(msg.images, copy=True), msg.intrinsics, msg.poses, msg.aabb,
                       [f"{stem}_{i:04d}" for i in range(n)], passes, **lens_rows, sizes=sizes, times=times)


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
    ``views`` (indices into ``data``): only those photos go to the device and rays come from them
    alone (a data-parallel fit's share, fitting/distributed.py); the photo index a draw returns is
    still the photo's index in ``data``.
    """

    def __init__(self, data: PosedImages, device: torch.device | str, jitter: bool = False,
                 views: np.ndarray | None = None, error_sampling: float = 0.0, error_tile: int = 16):
        """``error_sampling``: the share of each draw's rays chosen where the recorded error is large
        (:meth:`record_errors`; fitting/error_map.py), over cells of ``error_tile`` pixels a side."""
        self.device = torch.device(device)
        self.jitter = bool(jitter)      # rays through a random point of their pixel (else its centre)
        self.photo_ids = None           # (n,) i64 each held photo's index in data (None: all, in order)
        if views is not None:
            views = np.asarray(views, np.int64).reshape(-1)
            if len(views) == 0 or views.min() < 0 or views.max() >= len(data) or len(np.unique(views)) != len(views):
                raise ValueError(f"a sampler's views must be distinct photo indices below {len(data)}, got {views.tolist()}")
            self.photo_ids = torch.as_tensor(views, device=self.device)
            data = data.subset(views)
        self.images = torch.from_numpy(data.images).to(self.device)                      # (N,H,W,4) u8
        # (copies: arrays from the wire are read-only views of the received frames)
        self.intrinsics = torch.tensor(data.intrinsics, dtype=torch.float32, device=self.device)  # (N,4)
        self.poses = torch.tensor(data.poses, dtype=torch.float32, device=self.device)            # (N,4,4)
        self.n, self.h, self.w = data.images.shape[:3]
        # Photos of different sizes: each pixel of each photo equally likely, none of the padding.
        self.uniform = data.uniform
        sizes = torch.as_tensor(data.sizes, device=self.device)
        self.widths = sizes[:, 0]
        counts = sizes[:, 0] * sizes[:, 1]
        self.ends = torch.cumsum(counts, 0)          # (N,) pixels up to each image's end
        self.starts = self.ends - counts
        self.pixels = int(data.sizes.prod(1).sum())
        if not 0.0 <= error_sampling <= 1.0:
            raise ValueError(f"error_sampling must be in [0, 1], got {error_sampling}")
        self.error_share, self.error_map, self.last_cells = float(error_sampling), None, None
        if error_sampling > 0:
            self.error_map = ErrorMap(self.widths, sizes[:, 1], self.w, self.h, error_tile)
        self.lens_models = self.distortion = None                                         # pinholes
        if data.lens_models is not None:
            self.lens_models = torch.from_numpy(data.lens_models).to(self.device)         # (N,) i64
            self.distortion = torch.from_numpy(data.distortion).float().to(self.device)   # (N,6)
        # Passes on the device: albedo (N,H,W,3) u8, normal (N,H,W,3) f16 (unit to ~1e-3),
        # depth (N,H,W) f32, roughness (N,H,W) f16 (to ~5e-4; -1 stays exact).
        self.passes: dict[str, torch.Tensor] = {}
        for kind, value in data.passes.items():
            t = torch.from_numpy(np.ascontiguousarray(value))
            self.passes[kind] = (t.half() if kind in ("normal", "roughness") else t).to(self.device)

    def _photo(self, img: torch.Tensor) -> torch.Tensor:
        """Held photos' indices (draws) -> their indices in the data."""
        return img if self.photo_ids is None else self.photo_ids[img]

    def sample(self, count: int, generator: torch.Generator | None = None, with_photo: bool = False) -> tuple:
        """``count`` rays through random pixels (their centres, or random points of them with ``jitter``).

        Returns:
            origins (count, 3) float32 world, directions (count, 3) float32 unit,
            rgba (count, 4) float32 in [0, 1] (sRGB, straight alpha); with ``with_photo``, also
            the index (count,) int64 of each ray's photo.
        """
        img, _, _, o, d, rgba = self._draw(count, generator)
        return (o, d, rgba, self._photo(img)) if with_photo else (o, d, rgba)

    def sample_passes(self, count: int, generator: torch.Generator | None = None, with_photo: bool = False
                      ) -> tuple:
        """Like :meth:`sample`, plus the passes the data has at the same pixels.

        Returns:
            origins, directions, rgba as :meth:`sample`, and a dict with (only) the passes of
            the data: "albedo" (count, 3) float32 in [0, 1], sRGB-encoded (the same encoding
            as rgba); "normal" (count, 3) float32 world unit normals (0: no surface);
            "depth" (count, 1) float32 distance along the returned unit direction to the
            surface (origin + depth * direction is the surface point; 0: no surface);
            "roughness" (count, 1) float32 in [0, 1], NO_ROUGHNESS where the pixel has none.
        """
        img, y, x, o, d, rgba = self._draw(count, generator)
        out: dict[str, torch.Tensor] = {}
        if "albedo" in self.passes:
            out["albedo"] = self.passes["albedo"][img, y, x].float() / 255.0
        if "normal" in self.passes:
            out["normal"] = self.passes["normal"][img, y, x].float()
        if "depth" in self.passes:
            z = self.passes["depth"][img, y, x]                       # along the camera's axis
            forward = -self.poses[img, :3, 2]                         # (count, 3) unit viewing axis
            cos = (d * forward).sum(-1).clamp_min(1e-6)
            out["depth"] = (z / cos).unsqueeze(-1)
        if "roughness" in self.passes:
            out["roughness"] = self.passes["roughness"][img, y, x].float().unsqueeze(-1)
        return (o, d, rgba, out, self._photo(img)) if with_photo else (o, d, rgba, out)

    def record_errors(self, errors: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """The last draw's rays' squared colour errors (R,) (``weights`` (R,): 0 for a ray not
        trained), for the error-weighted share of the next draws; nothing without one."""
        if self.error_map is not None:
            self.error_map.record(self.last_cells, errors.detach(), weights)

    def _uniform(self, count: int, generator: torch.Generator | None):
        """Uniformly random pixels: image index, row, column (count,) int64."""
        if self.uniform:
            flat = torch.randint(0, self.n * self.h * self.w, (count,), device=self.device, generator=generator)
            img = flat // (self.h * self.w)
            pix = flat % (self.h * self.w)
            return img, pix // self.w, pix % self.w
        flat = torch.randint(0, self.pixels, (count,), device=self.device, generator=generator)
        img = torch.searchsorted(self.ends, flat, right=True)
        pix = flat - self.starts[img]
        return img, pix // self.widths[img], pix % self.widths[img]

    def _draw(self, count: int, generator: torch.Generator | None):
        """Random pixels: image index, row, column (count,) int64, then origins, dirs, rgba."""
        by_error = int(count * self.error_share) if self.error_map is not None else 0
        img, y, x = self._uniform(count - by_error, generator)
        if by_error:
            # interleaved evenly with the uniform draws: the graph trainer drops a batch's last rays when
            # its sample slots run out, which must not be the error-drawn ones (all on the device: no copy)
            drawn = self.error_map.draw(by_error, generator)
            dev, rest = self.device, count - by_error
            place = torch.cat([(torch.arange(rest, device=dev) + 0.5) / max(rest, 1),
                               (torch.arange(by_error, device=dev) + 0.25) / by_error])
            order = torch.argsort(place)
            img, y, x = (torch.cat([a, b])[order] for a, b in zip((img, y, x), drawn))
        if self.error_map is not None:
            self.last_cells = self.error_map.cell_of(img, y, x)
        if self.jitter:     # a photo's pixel is an average over its area: any point of it
            u = x.float() + torch.rand(count, device=self.device, generator=generator)
            v = y.float() + torch.rand(count, device=self.device, generator=generator)
        else:
            u, v = x.float() + 0.5, y.float() + 0.5
        if self.lens_models is not None:   # distorted photos: each pixel's ray bends through the lens
            u, v = lens.undistort_pixels(self.intrinsics[img], u, v, self.lens_models[img], self.distortion[img])
        o, d = camera_rays(self.intrinsics[img], self.poses[img], u, v)
        rgba = self.images[img, y, x].float() / 255.0
        return img, y, x, o, d, rgba
