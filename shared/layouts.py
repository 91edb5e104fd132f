"""Two more photo-dataset layouts, read with numpy only (the backend and the add-on share them):

* **LLFF** (``poses_bounds.npy``, the NeRF authors' forward-facing captures): per image a 3 x 5
  matrix, flattened row-major, whose columns are the camera's axes in LLFF's [down, right, back]
  order, its position, and [height, width, focal] of the full-resolution photos; then the near
  and far depth bounds.  Photos in ``images/`` (full size) or ``images_N/`` (shrunk N times: the
  focal length scales with the photo's width), sorted by name, one per row.
* **IDR / NeuS** (``cameras_sphere.npz``, DTU and BlendedMVS as those papers ship them): per view
  ``world_mat_i``, a projection K [R|t] at the original resolution, and ``scale_mat_i``, which
  maps the unit sphere around the object to world units.  Photos in ``image/`` or
  ``images_N/``, masks in ``mask/`` or ``mask_N/`` (same N: intrinsics scale by 1/N).

Both give cameras in this project's convention (shared/cameras.py: Blender camera axes,
camera-to-world, intrinsics fx, fy, cx, cy in the photo's pixels) in the dataset's own world
frame and units, and a box: LLFF's, the cameras' frusta between the nearest near bound and the
median far bound; IDR's, the cube around its unit sphere.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import cameras

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".exr", ".tif", ".tiff", ".bmp")
MAX_VIEWS = 100_000
LLFF_FILE = "poses_bounds.npy"
IDR_FILE = "cameras_sphere.npz"


@dataclass
class LayoutView:
    name: str
    image: Path
    c2w: np.ndarray                   # (4, 4) float64, Blender convention
    intrinsics: np.ndarray            # (4,) fx, fy, cx, cy in pixels of an image of ``size``
    mask: Path | None = None
    size: tuple[int, int] | None = None   # (width, height) the intrinsics are for; None: the photo as stored


@dataclass
class Layout:
    folder: Path
    views: list[LayoutView]
    aabb: np.ndarray                  # (2, 3) float64 world box
    notes: list[str] = field(default_factory=list)


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _image_folder(root: Path, names: tuple[str, ...], chosen: Path | None) -> tuple[Path, int]:
    """(folder of photos, its shrink factor N): ``chosen`` if given, else the first of
    ``names`` found, else the ``<name>_N`` folder with the smallest N (the most detail)."""
    if chosen is not None:
        match = re.fullmatch(r".*_(\d+)", chosen.name)
        return chosen, int(match.group(1)) if match else 1
    for name in names:
        if (root / name).is_dir():
            return root / name, 1
    found = sorted((int(m.group(2)), p) for p in root.iterdir() if p.is_dir()
                   for m in [re.fullmatch(rf"({'|'.join(names)})_(\d+)", p.name)] if m)
    if not found:
        raise ValueError(f"{root}: no photo folder ({', '.join(names)} or {names[0]}_N)")
    return found[0][1], found[0][0]


def _locate(path: str | Path, marker: str) -> tuple[Path, Path | None]:
    """(dataset folder holding ``marker``, a photo folder the path named or None)."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    if (p / marker).is_file():
        return p, None
    if (p.parent / marker).is_file():          # a photo folder given directly (images_8/)
        return p.parent, p
    raise ValueError(f"{path}: no {marker} here")


def read(path: str | Path) -> Layout | None:
    """The LLFF or IDR/NeuS capture at ``path`` (:func:`read_llff`, :func:`read_idr`), or None
    when it is neither.  Raises ValueError when it is one but cannot be read."""
    for marker, reader in ((LLFF_FILE, read_llff), (IDR_FILE, read_idr)):
        try:
            _locate(path, marker)
        except ValueError:
            continue
        return reader(path)
    return None


def read_llff(path: str | Path) -> Layout:
    """An LLFF capture: the folder of ``poses_bounds.npy`` (its photos: see the module text) or
    one of its ``images_N`` folders.  Raises ValueError naming what is wrong."""
    root, chosen = _locate(path, LLFF_FILE)
    try:
        table = np.load(root / LLFF_FILE, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{root / LLFF_FILE}: cannot read it ({exc})") from None
    if table.ndim != 2 or table.shape[1] != 17 or not 1 <= len(table) <= MAX_VIEWS:
        raise ValueError(f"{root / LLFF_FILE}: expected N x 17 numbers (a 3 x 5 camera and two bounds a view), "
                         f"got shape {table.shape}")
    if not np.isfinite(table).all():
        raise ValueError(f"{root / LLFF_FILE}: NaN or infinite values")
    folder, _ = _image_folder(root, ("images",), chosen)     # any shrink: intrinsics scale with the width
    photos = _photos(folder)
    if len(photos) != len(table):
        raise ValueError(f"{folder}: {len(photos)} photos for the {len(table)} cameras of {LLFF_FILE}")
    views = []
    for row, photo in zip(table, photos):
        m = row[:15].reshape(3, 5)
        h_full, w_full, focal = m[:, 4]
        if not (h_full > 0 and w_full > 0 and focal > 0):
            raise ValueError(f"{root / LLFF_FILE}: view {len(views)} has height, width, focal {m[:, 4].tolist()}")
        c2w = np.eye(4)
        c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = m[:, 1], -m[:, 0], m[:, 2], m[:, 3]   # right, up, back
        c2w[:3, :3] = _orthonormal(c2w[:3, :3], f"{root / LLFF_FILE}: view {len(views)}")
        views.append(LayoutView(photo.stem, photo, c2w, np.array([focal, focal, w_full / 2.0, h_full / 2.0]),
                                size=(int(round(w_full)), int(round(h_full)))))
    near, far = float(table[:, 15].min()), float(np.median(table[:, 16]))
    if not 0 < near < far:
        raise ValueError(f"{root / LLFF_FILE}: depth bounds near {near}, far {far}")
    aabb = _frusta_box([v.intrinsics for v in views], [v.c2w for v in views], *views[0].size, near, far)
    return Layout(root, views, aabb, [f"{LLFF_FILE}: photos from {folder.name}/, box from the "
                                      f"cameras' frusta between depths {near:.3g} and {far:.3g}"])


def read_idr(path: str | Path) -> Layout:
    """An IDR / NeuS capture: the folder of ``cameras_sphere.npz`` (or one of its photo folders)."""
    root, chosen = _locate(path, IDR_FILE)
    try:
        with np.load(root / IDR_FILE, allow_pickle=False) as npz:
            mats = {k: np.asarray(npz[k], np.float64) for k in npz.files
                    if re.fullmatch(r"(world|scale)_mat_\d+", k)}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{root / IDR_FILE}: cannot read it ({exc})") from None
    count = len([k for k in mats if k.startswith("world_mat_")])
    if not 1 <= count <= MAX_VIEWS:
        raise ValueError(f"{root / IDR_FILE}: no world_mat_i entries")
    folder, factor = _image_folder(root, ("image", "images"), chosen)
    photos = _photos(folder)
    if len(photos) != count:
        raise ValueError(f"{folder}: {len(photos)} photos for the {count} cameras of {IDR_FILE}")
    mask_folder = next((root / n for n in (f"mask_{factor}", "mask") if (root / n).is_dir()), None)
    masks = _photos(mask_folder) if mask_folder is not None else []
    if masks and len(masks) != count:
        raise ValueError(f"{mask_folder}: {len(masks)} masks for {count} photos")
    views = []
    for i, photo in enumerate(photos):
        name = f"world_mat_{i}"
        if name not in mats or mats[name].shape not in ((3, 4), (4, 4)) or not np.isfinite(mats[name]).all():
            raise ValueError(f"{root / IDR_FILE}: {name} is missing or not a finite 3 x 4 / 4 x 4 matrix")
        k, c2w = projection_to_camera(mats[name][:3, :4], f"{root / IDR_FILE}: {name}")
        views.append(LayoutView(photo.stem, photo, c2w, k / factor, masks[i] if masks else None))
    scale = mats.get("scale_mat_0")
    if scale is None or scale.shape != (4, 4) or not np.isfinite(scale).all() or not scale[0, 0] > 0:
        raise ValueError(f"{root / IDR_FILE}: scale_mat_0 (the unit sphere around the object) is missing or invalid")
    centre, radius = scale[:3, 3], scale[0, 0]
    notes = [f"{IDR_FILE}: photos from {folder.name}/ (intrinsics / {factor})"
             + (f", masks from {mask_folder.name}/" if masks else ", no masks") + ", box: the cube around its unit sphere"]
    return Layout(root, views, np.stack([centre - radius, centre + radius]), notes)


def projection_to_camera(p: np.ndarray, what: str = "projection") -> tuple[np.ndarray, np.ndarray]:
    """A 3 x 4 projection K [R | t] -> (fx, fy, cx, cy) and a camera-to-world (4, 4) in Blender's
    convention (an RQ decomposition with a positive diagonal; skew must be ~0)."""
    m = np.asarray(p, np.float64)[:3, :3]
    flip = np.eye(3)[::-1]
    q, r = np.linalg.qr((flip @ m).T)
    k, rot = flip @ r.T @ flip, flip @ q.T
    sign = np.diag(np.sign(np.diag(k)))
    k, rot = k @ sign, sign @ rot
    if np.linalg.det(rot) < 0:
        rot = -rot
        scale_t = -1.0
    else:
        scale_t = 1.0
    t = np.linalg.solve(k, np.asarray(p, np.float64)[:3, 3]) * scale_t
    k = k / k[2, 2]
    if abs(k[0, 1]) > 1e-3 * abs(k[0, 0]):
        raise ValueError(f"{what}: skewed pixels (K[0,1] = {k[0, 1]:.3g}) are not supported")
    if not (k[0, 0] > 0 and k[1, 1] > 0):
        raise ValueError(f"{what}: focal lengths {k[0, 0]:.3g}, {k[1, 1]:.3g}")
    return np.array([k[0, 0], k[1, 1], k[0, 2], k[1, 2]]), cameras.opencv_w2c_to_c2w(rot, t)


def _orthonormal(r: np.ndarray, what: str) -> np.ndarray:
    u, s, vt = np.linalg.svd(r)
    if not np.allclose(s, 1.0, atol=1e-2) or np.linalg.det(u @ vt) < 0:
        raise ValueError(f"{what}: the camera axes are not a rotation (singular values {np.round(s, 4).tolist()})")
    return u @ vt


def _frusta_box(ks, poses, width: int, height: int, near: float, far: float) -> np.ndarray:
    corners = []
    for k, c2w in zip(ks, poses):
        for u, v in ((0, 0), (width, 0), (0, height), (width, height)):
            ray = np.array([(u - k[2]) / k[0], -(v - k[3]) / k[1], -1.0])      # Blender camera axes
            for depth in (near, far):
                corners.append(c2w[:3, :3] @ (ray * depth) + c2w[:3, 3])
    pts = np.array(corners)
    return np.stack([pts.min(0), pts.max(0)])
