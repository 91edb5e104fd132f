"""COLMAP models, text (``cameras.txt`` + ``images.txt``) or binary (``cameras.bin`` +
``images.bin``, COLMAP's default output) -> posed cameras.  numpy only.

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

Binary files are read with :mod:`struct` after checking every count against the bytes left
(little-endian; cameras.bin: count, then camera id, model id, width, height, parameters as
doubles; images.bin: count, then image id, quaternion and translation as doubles, camera id,
a NUL-terminated name and its 2-D points, skipped).

Errors raise ``ValueError`` naming the file and the line (text) or the byte offset (binary).
Files are read with a size cap; nothing is executed or unpickled.
"""
from __future__ import annotations

import struct
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


#: COLMAP's binary model ids (its camera_models.h order) -> model name; the names MODELS lacks are refused.
MODEL_IDS = {0: "SIMPLE_PINHOLE", 1: "PINHOLE", 2: "SIMPLE_RADIAL", 3: "RADIAL", 4: "OPENCV", 5: "OPENCV_FISHEYE",
             6: "FULL_OPENCV", 7: "FOV", 8: "SIMPLE_RADIAL_FISHEYE", 9: "RADIAL_FISHEYE", 10: "THIN_PRISM_FISHEYE"}
MAX_NAME_BYTES = 4096


class _Reader:
    """Little-endian values from a bytes object, refusing to read past its end."""

    def __init__(self, path: Path):
        self.path = path
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise ValueError(f"{path}: {size} bytes is larger than the {MAX_FILE_BYTES} allowed")
            self.data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
        self.at = 0

    def take(self, fmt: str):
        n = struct.calcsize("<" + fmt)
        if self.at + n > len(self.data):
            raise ValueError(f"{self.path}: ends at byte {len(self.data)} inside a record (truncated?)")
        out = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += n
        return out

    def count(self, record_bytes: int) -> int:
        """A uint64 count of records at least ``record_bytes`` long each, checked against what is left."""
        (n,) = self.take("Q")
        if n * record_bytes > len(self.data) - self.at:
            raise ValueError(f"{self.path}: byte {self.at - 8} says {n} records, more than the file holds")
        return n

    def name(self) -> str:
        end = self.data.find(b"\0", self.at, self.at + MAX_NAME_BYTES)
        if end < 0:
            raise ValueError(f"{self.path}: byte {self.at}: no NUL-terminated name within {MAX_NAME_BYTES} bytes")
        raw, self.at = self.data[self.at:end], end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: byte {self.at}: an image name that is not UTF-8") from None


def read_cameras_bin(path: str | Path) -> dict[int, ColmapCamera]:
    """cameras.bin (COLMAP's binary model)."""
    r = _Reader(Path(path))
    out: dict[int, ColmapCamera] = {}
    for _ in range(r.count(24)):
        at = r.at
        cam_id, model_id, width, height = r.take("iiQQ")
        model = MODEL_IDS.get(model_id)
        if model not in MODELS:
            raise ValueError(f"{r.path}: byte {at}: camera {cam_id} has model "
                             f"{model or model_id} (supported: {', '.join(MODELS)})")
        params = r.take("d" * MODELS[model][0])
        if not all(np.isfinite(params)):
            raise ValueError(f"{r.path}: byte {at}: camera {cam_id} has a NaN or infinite parameter")
        try:
            out[cam_id] = camera_from_params(model, width, height, params, cam_id)
        except ValueError as exc:
            raise ValueError(f"{r.path}: byte {at}: {exc}") from None
    if not out:
        raise ValueError(f"{r.path}: no cameras in this file")
    return out


def read_images_bin(path: str | Path) -> list[ColmapImage]:
    """images.bin (COLMAP's binary model); sorted by name like :func:`read_images`."""
    r = _Reader(Path(path))
    out = []
    for _ in range(r.count(64 + 4 + 1 + 8)):
        at = r.at
        image_id, qw, qx, qy, qz, tx, ty, tz, camera_id = r.take("idddddddi")
        if not all(np.isfinite([qw, qx, qy, qz, tx, ty, tz])):
            raise ValueError(f"{r.path}: byte {at}: image {image_id} has a NaN or infinite pose")
        name = r.name()
        points = r.count(24)
        r.at += 24 * points                  # x, y, point3D id: not needed for the cameras
        try:
            rot = cameras.quaternion_to_matrix(qw, qx, qy, qz)
        except ValueError as exc:
            raise ValueError(f"{r.path}: byte {at}: {exc}") from None
        out.append(ColmapImage(image_id, camera_id, name, cameras.opencv_w2c_to_c2w(rot, np.array([tx, ty, tz]))))
    if not out:
        raise ValueError(f"{r.path}: no images in this file")
    return sorted(out, key=lambda im: im.name)


MAX_POINTS = 50_000_000     # points3D of a large reconstruction stay below


def read_points(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The sparse points of a model folder (points3D.txt or .bin; None if it has none):
    ``(xyz (P, 3) float64 in the model's world frame, rgb (P, 3) uint8, error (P,) float64)``,
    the reprojection error in pixels.  Raises ValueError naming the file and what is wrong."""
    folder = Path(folder)
    if (folder / "points3D.txt").is_file():
        return _points_txt(folder / "points3D.txt")
    if (folder / "points3D.bin").is_file():
        return _points_bin(folder / "points3D.bin")
    return None


def _points_txt(path: Path):
    xyz, rgb, err = [], [], []
    for number, line in _lines(path):
        if not line:
            continue
        tokens = line.split()
        if len(tokens) < 8 or (len(tokens) - 8) % 2:
            raise ValueError(f"{path}:{number}: expected POINT3D_ID X Y Z R G B ERROR and (IMAGE_ID, POINT2D_IDX) "
                             f"pairs, got {len(tokens)} values")
        try:
            x, y, z, e = float(tokens[1]), float(tokens[2]), float(tokens[3]), float(tokens[7])
            r, g, b = (int(t) for t in tokens[4:7])
        except ValueError:
            raise ValueError(f"{path}:{number}: not numbers") from None
        if not all(np.isfinite([x, y, z])) or not all(0 <= c <= 255 for c in (r, g, b)):
            raise ValueError(f"{path}:{number}: a NaN or infinite position, or a colour outside 0-255")
        if len(xyz) >= MAX_POINTS:
            raise ValueError(f"{path}: more than {MAX_POINTS} points")
        xyz.append((x, y, z))
        rgb.append((r, g, b))
        err.append(e)
    return (np.array(xyz, np.float64).reshape(-1, 3), np.array(rgb, np.uint8).reshape(-1, 3),
            np.array(err, np.float64))


def _points_bin(path: Path):
    r = _Reader(path)
    n = r.count(8 + 24 + 3 + 8 + 8)
    if n > MAX_POINTS:
        raise ValueError(f"{path}: {n} points, more than the {MAX_POINTS} allowed")
    xyz, rgb, err = np.empty((n, 3)), np.empty((n, 3), np.uint8), np.empty(n)
    for i in range(n):
        values = r.take("Q3d3BdQ")
        xyz[i], rgb[i], err[i] = values[1:4], values[4:7], values[7]
        track = values[8]
        if track * 8 > len(r.data) - r.at:
            raise ValueError(f"{path}: point {values[0]} says a track of {track}, more than the file holds")
        r.at += 8 * track                    # (image id, point2D index) pairs: not needed
    if not np.isfinite(xyz).all():
        raise ValueError(f"{path}: a point with a NaN or infinite position")
    return xyz, rgb, err


def find_model(path: str | Path) -> Path:
    """The folder holding cameras.txt and images.txt: ``path`` itself, the folder of a file given,
    or COLMAP's usual ``sparse/0`` / ``sparse`` / ``colmap/sparse/0`` below it."""
    p = Path(path)
    if p.is_file():
        p = p.parent
    for cand in (p, p / "sparse" / "0", p / "sparse", p / "colmap" / "sparse" / "0"):
        for ext in (".txt", ".bin"):
            if (cand / f"cameras{ext}").is_file() and (cand / f"images{ext}").is_file():
                return cand
    raise ValueError(f"{p}: no COLMAP model here (cameras and images .txt or .bin, nor in sparse/0)")


def read_model(path: str | Path) -> tuple[Path, dict[int, ColmapCamera], list[ColmapImage]]:
    """(model folder, cameras by id, images sorted by name).  Every image's camera must exist."""
    folder = find_model(path)
    ext = ".txt" if (folder / "cameras.txt").is_file() and (folder / "images.txt").is_file() else ".bin"
    if ext == ".txt":
        cams, images = read_cameras(folder / "cameras.txt"), read_images(folder / "images.txt")
    else:
        cams, images = read_cameras_bin(folder / "cameras.bin"), read_images_bin(folder / "images.bin")
    for im in images:
        if im.camera_id not in cams:
            raise ValueError(f"{folder / ('images' + ext)}: image {im.name!r} uses camera {im.camera_id}, "
                             f"which cameras{ext} does not list")
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
