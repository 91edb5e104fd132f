"""COLMAP text models (``cameras.txt`` + ``images.txt``) -> posed cameras.  numpy only.

COLMAP stores, per image, the world-to-camera rotation (quaternion QW QX QY QZ) and translation
(TX TY TZ) in OpenCV's camera frame (x right, y down, z forward), and per camera a model with its
parameters in pixels; its pixel frame is ours (top-left corner at (0, 0), first pixel centre at
(0.5, 0.5)).  Poses come back as camera-to-world in this project's (Blender) convention via
:func:`cameras.opencv_w2c_to_c2w`; intrinsics as ``(fx, fy, cx, cy)``; distortion as a
:data:`cameras.DISTORTION_KEYS` row with a :data:`cameras.LENS_MODELS` code.

Supported models (parameters in COLMAP's order):

=================  ==============================  ===================================
SIMPLE_PINHOLE     f, cx, cy                       PINHOLE
PINHOLE            fx, fy, cx, cy                  PINHOLE
SIMPLE_RADIAL      f, cx, cy, k                    OPENCV (k1 = k)
RADIAL             f, cx, cy, k1, k2               OPENCV
OPENCV             fx, fy, cx, cy, k1, k2, p1, p2  OPENCV
OPENCV_FISHEYE     fx, fy, cx, cy, k1, k2, k3, k4  OPENCV_FISHEYE
=================  ==============================  ===================================

Errors raise ``ValueError`` naming the file and the line.  Files are read as text, with a size
cap; nothing is executed or unpickled.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import cameras

MAX_FILE_BYTES = 512 << 20           # images.txt of big reconstructions (points2D lines) stay below
MAX_IMAGE_SIDE = 65536

#: model name -> (parameter count, lens model code)
MODELS = {
    "SIMPLE_PINHOLE": (3, cameras.PINHOLE),
    "PINHOLE": (4, cameras.PINHOLE),
    "SIMPLE_RADIAL": (4, cameras.OPENCV),
    "RADIAL": (5, cameras.OPENCV),
    "OPENCV": (8, cameras.OPENCV),
    "OPENCV_FISHEYE": (8, cameras.OPENCV_FISHEYE),
}


@dataclass
class ColmapCamera:
    """One entry of cameras.txt.  ``intrinsics`` (4,) fx, fy, cx, cy; ``distortion`` (6,) in
    DISTORTION_KEYS order; ``lens_model`` a cameras.LENS_MODELS code."""

    camera_id: int
    model: str
    width: int
    height: int
    intrinsics: np.ndarray
    distortion: np.ndarray
    lens_model: int


@dataclass
class ColmapImage:
    """One entry of images.txt.  ``c2w`` (4, 4) float64 camera-to-world, Blender convention."""

    image_id: int
    camera_id: int
    name: str
    c2w: np.ndarray


def _lines(path: Path):
    """(line number, stripped line) of every line that is not a comment; empty lines included
    (images.txt writes one for an image without 2-D points)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ValueError(f"{path}: {size} bytes is larger than the {MAX_FILE_BYTES} allowed")
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a COLMAP text file (binary? export it with "
                         "'colmap model_converter --output_type TXT')") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.lstrip().startswith("#"):
            yield number, line.strip()


def _numbers(path: Path, number: int, tokens: list[str], kind=float) -> list:
    try:
        values = [kind(t) for t in tokens]
    except ValueError:
        raise ValueError(f"{path}:{number}: expected numbers, got {' '.join(tokens)[:120]!r}") from None
    if kind is float and not all(np.isfinite(values)):
        raise ValueError(f"{path}:{number}: NaN or infinite value")
    return values


def camera_from_params(model: str, width: int, height: int, params, camera_id: int = 0) -> ColmapCamera:
    """A ColmapCamera from a model name and its COLMAP parameters."""
    if model not in MODELS:
        raise ValueError(f"camera model {model!r} is not supported (supported: {', '.join(MODELS)})")
    count, code = MODELS[model]
    p = [float(v) for v in params]
    if len(p) != count:
        raise ValueError(f"camera model {model} needs {count} parameters, got {len(p)}")
    dist = np.zeros(6)
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        k = np.array([p[0], p[0], p[1], p[2]])
        dist[:len(p) - 3] = p[3:]                      # k1 (, k2)
    else:
        k = np.array(p[:4])
        if model == "OPENCV":
            dist[[0, 1, 4, 5]] = p[4:]                  # k1, k2, p1, p2
        elif model == "OPENCV_FISHEYE":
            dist[:4] = p[4:]                            # k1..k4
    if not (k[0] > 0 and k[1] > 0):
        raise ValueError(f"camera {camera_id}: focal lengths must be positive, got {k[:2].tolist()}")
    if not (0 < width <= MAX_IMAGE_SIDE and 0 < height <= MAX_IMAGE_SIDE):
        raise ValueError(f"camera {camera_id}: image size {width} x {height} is out of range")
    return ColmapCamera(camera_id, model, int(width), int(height), k.astype(np.float64), dist, code)


def read_cameras(path: str | Path) -> dict[int, ColmapCamera]:
    """cameras.txt: ``CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]`` per line."""
    path = Path(path)
    out: dict[int, ColmapCamera] = {}
    for number, line in _lines(path):
        if not line:
            continue
        tokens = line.split()
        if len(tokens) < 4:
            raise ValueError(f"{path}:{number}: expected CAMERA_ID MODEL WIDTH HEIGHT PARAMS...")
        cam_id, width, height = _numbers(path, number, [tokens[0], tokens[2], tokens[3]], int)
        try:
            out[cam_id] = camera_from_params(tokens[1], width, height,
                                             _numbers(path, number, tokens[4:]), cam_id)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
    if not out:
        raise ValueError(f"{path}: no cameras in this file")
    return out


def read_images(path: str | Path) -> list[ColmapImage]:
    """images.txt: two lines per image, ``IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME`` then the
    2-D points (ignored; the line may be empty).  Sorted by name, as COLMAP's own tools list them."""
    path = Path(path)
    out = []
    expect_points = False
    for number, line in _lines(path):
        if expect_points:           # the POINTS2D line that follows every image line
            expect_points = False
            continue
        if not line:
            continue
        tokens = line.split(maxsplit=9)
        if len(tokens) < 10:
            raise ValueError(f"{path}:{number}: expected IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME")
        image_id = _numbers(path, number, tokens[:1], int)[0]
        q = _numbers(path, number, tokens[1:5])
        t = np.array(_numbers(path, number, tokens[5:8]))
        camera_id = _numbers(path, number, tokens[8:9], int)[0]
        try:
            r = cameras.quaternion_to_matrix(*q)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: {exc}") from None
        out.append(ColmapImage(image_id, camera_id, tokens[9].strip(), cameras.opencv_w2c_to_c2w(r, t)))
        expect_points = True
    if not out:
        raise ValueError(f"{path}: no images in this file")
    return sorted(out, key=lambda im: im.name)


def find_model(path: str | Path) -> Path:
    """The folder holding cameras.txt and images.txt: ``path`` itself, the folder of a file given,
    or COLMAP's usual ``sparse/0`` / ``sparse`` / ``colmap/sparse/0`` below it."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    for cand in (p, p / "sparse" / "0", p / "sparse", p / "colmap" / "sparse" / "0"):
        if (cand / "cameras.txt").is_file() and (cand / "images.txt").is_file():
            return cand
    if (p / "cameras.bin").is_file() or (p / "sparse" / "0" / "cameras.bin").is_file():
        raise ValueError(f"{p}: only a binary COLMAP model is there; convert it to text with "
                         "'colmap model_converter --input_path ... --output_path ... --output_type TXT'")
    raise ValueError(f"{p}: no cameras.txt and images.txt here (nor in sparse/0)")


def read_model(path: str | Path) -> tuple[Path, dict[int, ColmapCamera], list[ColmapImage]]:
    """(model folder, cameras by id, images sorted by name).  Every image's camera must exist."""
    folder = find_model(path)
    cams = read_cameras(folder / "cameras.txt")
    images = read_images(folder / "images.txt")
    for im in images:
        if im.camera_id not in cams:
            raise ValueError(f"{folder / 'images.txt'}: image {im.name!r} uses camera {im.camera_id}, "
                             "which cameras.txt does not list")
    return folder, cams, images


def find_image(model_folder: Path, name: str, image_dir: str | Path | None = None) -> Path | None:
    """The image file of ``name``: in ``image_dir`` if given, else in ``images/`` next to the
    model (searching up to three folders up, as in ``project/sparse/0`` -> ``project/images``)."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        return None                      # never leave the dataset's folders
    roots = [Path(image_dir)] if image_dir else []
    base = model_folder
    for _ in range(4):
        roots += [base / "images", base]
        base = base.parent
    for root in roots:
        if (root / rel).is_file():
            return root / rel
    return None
