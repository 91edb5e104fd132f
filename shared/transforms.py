"""Reading ``transforms.json`` datasets (NeRF / instant-ngp / nerfstudio): numpy only, so the
add-on (camera import) and the backend (training data) share one parser.

A frame's keys override the file's top-level ones.  Poses come back rigid (scale removed), in
the Blender / NeRF camera convention (see :mod:`cameras`).  Errors raise ``ValueError`` whose
text names the file and the frame.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import cameras

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".exr")


@dataclass
class RawFrame:
    """One frame: ``name`` (file stem), ``c2w`` (4, 4) float64 rigid camera-to-world,
    ``meta`` (the requested keys, top level merged with the frame's), ``file_path`` as written,
    ``image`` the image file found for it (None if missing)."""

    name: str
    c2w: np.ndarray
    meta: dict = field(default_factory=dict)
    file_path: str = ""
    image: Path | None = None


def find(path: str | Path, names: Sequence[str]) -> Path:
    """The transforms file itself, or the first of ``names`` inside a folder."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in names:
            if (p / name).is_file():
                return p / name
        raise ValueError(f"{p}: no {' or '.join(names)} in this folder")
    raise ValueError(f"{p}: no such file or folder")


def resolve_image(root: Path, file_path: str | None) -> Path | None:
    """The file ``file_path`` names (relative to ``root``), trying image suffixes if it has none."""
    if not file_path:
        return None
    p = Path(file_path)
    p = p if p.is_absolute() else root / p
    if p.is_file():
        return p
    for suffix in IMAGE_SUFFIXES:
        q = p.with_name(p.name + suffix)
        if q.is_file():
            return q
    return None


def read(path: str | Path, names: Sequence[str], keys: Sequence[str]) -> tuple[Path, list[RawFrame], dict]:
    """Parse a transforms file (or the first of ``names`` in a folder).

    Returns (file, frames, the whole top-level dict).
    """
    file = find(path, names)
    try:
        doc = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: cannot read it as JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("frames"), list) or not doc["frames"]:
        raise ValueError(f"{file}: expected an object with a non-empty 'frames' list")
    top = {k: doc[k] for k in keys if k in doc}
    frames = []
    for i, f in enumerate(doc["frames"]):
        if not isinstance(f, dict) or "transform_matrix" not in f:
            raise ValueError(f"{file}: frame {i} has no transform_matrix")
        try:
            c2w = np.asarray(f["transform_matrix"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{file}: frame {i}: transform_matrix must be a 4x4 matrix of numbers") from None
        if c2w.shape == (3, 4):
            c2w = np.vstack([c2w, [0.0, 0.0, 0.0, 1.0]])
        if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
            raise ValueError(f"{file}: frame {i}: transform_matrix must be a finite 4x4 matrix")
        file_path = str(f.get("file_path", ""))
        fp = Path(file_path)
        name = (fp.stem if fp.suffix.lower() in IMAGE_SUFFIXES else fp.name) or f"frame_{i:04d}"
        frames.append(RawFrame(name=name, c2w=cameras.rigid(c2w),
                               meta={**top, **{k: f[k] for k in keys if k in f}},
                               file_path=file_path, image=resolve_image(file.parent, file_path)))
    return file, frames, doc


TIME_KEY = "time"      # D-NeRF's per-frame instant, in [0, 1] (a fit over time: backend/fields/motion.py)


def frame_times(frames: Sequence[RawFrame | dict], file: str | Path) -> np.ndarray | None:
    """(N,) float64 times of the frames (their merged ``time`` keys), or None when none has one.

    Raises ValueError naming the file and the first frame at fault when only some frames have a
    time, or a time is not a number in [0, 1].
    """
    metas = [f.meta if isinstance(f, RawFrame) else f for f in frames]
    have = [TIME_KEY in m for m in metas]
    if not any(have):
        return None
    if not all(have):
        missing = have.index(False)
        raise ValueError(f"{file}: frame {missing} has no '{TIME_KEY}' while other frames have one "
                         f"(give every frame a time in [0, 1], or none)")
    out = np.empty(len(metas), np.float64)
    for i, m in enumerate(metas):
        value = m[TIME_KEY]
        try:
            t = float(value)
        except (TypeError, ValueError):
            t = math.nan
        if isinstance(value, bool) or not 0.0 <= t <= 1.0:      # (NaN fails the comparison too)
            raise ValueError(f"{file}: frame {i}: '{TIME_KEY}' must be a number in [0, 1], got {value!r}")
        out[i] = t
    return out


#: Keys of a frame (or the file's top level) that give its intrinsics; see :func:`frame_intrinsics`.
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h", "camera_angle_x", "camera_angle_y")


def declared_size(meta: dict) -> tuple[int, int] | None:
    """(width, height) written in a frame's merged keys (``w`` and ``h``), if both are there."""
    if "w" in meta and "h" in meta:
        return int(meta["w"]), int(meta["h"])
    return None


def frame_intrinsics(meta: dict, width: int, height: int) -> np.ndarray | None:
    """(4,) float64 ``fx, fy, cx, cy`` for an image of ``width`` x ``height`` pixels from a frame's
    merged keys; None when they give no focal length (neither fl_x / fl_y nor camera_angle_x).

    ``fl_x`` / ``fl_y`` (either stands for both) and ``cx`` / ``cy`` written for another size (the
    frame's w / h) are rescaled to this one; ``camera_angle_x`` (and ``camera_angle_y``, else square
    pixels) are fields of view; without ``cx`` / ``cy`` the principal point is the image centre.
    """
    declared = declared_size(meta)
    sx, sy = (width / declared[0], height / declared[1]) if declared else (1.0, 1.0)
    if "fl_x" in meta or "fl_y" in meta:
        fx = float(meta.get("fl_x", meta.get("fl_y"))) * sx
        fy = float(meta.get("fl_y", meta.get("fl_x"))) * sy
    elif "camera_angle_x" in meta:
        fx = 0.5 * width / math.tan(0.5 * float(meta["camera_angle_x"]))
        fy = 0.5 * height / math.tan(0.5 * float(meta["camera_angle_y"])) if "camera_angle_y" in meta else fx
    else:
        return None
    cx = float(meta["cx"]) * sx if "cx" in meta else width / 2.0
    cy = float(meta["cy"]) * sy if "cy" in meta else height / 2.0
    return np.array([fx, fy, cx, cy], dtype=np.float64)


#: Keys of a frame (or the file's top level) that describe its lens; see :func:`frame_lens`.
LENS_KEYS = ("camera_model", "is_fisheye", "k1", "k2", "k3", "k4", "p1", "p2")


def frame_lens(meta: dict) -> tuple[int, np.ndarray]:
    """(lens model code, (6,) float64 k1 k2 k3 k4 p1 p2) of a frame's merged keys.

    ``camera_model`` is nerfstudio's ("OPENCV", "OPENCV_FISHEYE", "PINHOLE"); instant-ngp
    writes ``is_fisheye: true`` instead.  Without either, any nonzero coefficient means OPENCV.
    Raises ValueError for another model (e.g. EQUIRECTANGULAR) or non-numeric coefficients.
    """
    try:
        coeffs = np.array([float(meta.get(k, 0.0) or 0.0) for k in cameras.DISTORTION_KEYS])
    except (TypeError, ValueError):
        raise ValueError("distortion coefficients k1..k4, p1, p2 must be numbers") from None
    if not np.isfinite(coeffs).all():
        raise ValueError("distortion coefficients must be finite")
    if "camera_model" in meta:
        code = cameras.lens_model_code(str(meta["camera_model"]))
    elif meta.get("is_fisheye"):
        code = cameras.OPENCV_FISHEYE
    else:
        code = cameras.OPENCV if coeffs.any() else cameras.PINHOLE
    if code == cameras.PINHOLE:
        coeffs[:] = 0.0
    elif code == cameras.OPENCV_FISHEYE:
        coeffs[4:] = 0.0              # no tangential terms (a file's top-level p1/p2 may be inherited)
    return code, coeffs


def read_mask(path: Path, size: tuple[int, int], downscale: int = 1) -> np.ndarray:
    """A mask image as (H, W) uint8 alpha (its own alpha if it has one, else its luminance).

    ``size`` = (width, height) of its photo (ValueError if the mask has another); ``downscale``
    box-filters it like the photo (backend.fitting.data.read_image).
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.size != tuple(size):
            raise ValueError(f"{path}: mask of {im.size[0]} x {im.size[1]} pixels does not match its "
                             f"image's {size[0]} x {size[1]}")
        alpha = im.getchannel("A") if im.mode in ("RGBA", "LA", "PA") else im.convert("L")
        if downscale > 1:
            alpha = alpha.resize((im.width // downscale, im.height // downscale), Image.Resampling.BOX)
        return np.asarray(alpha, dtype=np.uint8).copy()
