"""Camera conventions: the one place where they are converted.

Conventions used everywhere in this project:

* **Pixel frame** (OpenCV): u to the right, v down, origin at the top-left corner of the
  top-left pixel, so the centre of pixel (i, j) is (j + 0.5, i + 0.5).
* **Intrinsics** ``(fx, fy, cx, cy)`` in pixels in that frame.
* **Poses** are camera-to-world 4x4 matrices in Blender's camera convention, which is also
  the NeRF / instant-ngp / nerfstudio one: the camera looks down its -Z axis, +Y is up, +X right.
  To get OpenCV's camera frame (+Z forward, +Y down) right-multiply by ``diag(1, -1, -1, 1)``.

Only numpy here: the add-on and the backend both use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BLENDER_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass(frozen=True)
class BlenderCamera:
    """The numbers Blender uses to project, read off ``camera.data`` and ``scene.render``."""

    lens: float                 # focal length, mm
    sensor_width: float         # mm
    sensor_height: float        # mm
    sensor_fit: str             # 'AUTO' | 'HORIZONTAL' | 'VERTICAL'
    shift_x: float = 0.0
    shift_y: float = 0.0
    resolution_x: int = 1920
    resolution_y: int = 1080
    resolution_percentage: int = 100
    pixel_aspect_x: float = 1.0
    pixel_aspect_y: float = 1.0


def image_size(cam: BlenderCamera) -> tuple[int, int]:
    """Rendered image size (width, height) in pixels, after the resolution percentage."""
    s = cam.resolution_percentage / 100.0
    return int(cam.resolution_x * s), int(cam.resolution_y * s)


def blender_intrinsics(cam: BlenderCamera) -> np.ndarray:
    """Pinhole intrinsics ``(fx, fy, cx, cy)`` of a perspective Blender camera.

    Matches ``bpy_extras.object_utils.world_to_camera_view`` for every sensor fit, lens shift,
    pixel aspect and resolution percentage (see ``tests/shared/test_cameras_bpy.py``).
    """
    w, h = image_size(cam)
    pax, pay = cam.pixel_aspect_x, cam.pixel_aspect_y
    par = pay / pax
    fit = cam.sensor_fit
    if fit == "AUTO":
        fit = "HORIZONTAL" if w * pax >= h * pay else "VERTICAL"
        sensor = cam.sensor_width
    else:
        sensor = cam.sensor_width if fit == "HORIZONTAL" else cam.sensor_height
    view = w if fit == "HORIZONTAL" else par * h
    fx = cam.lens * view / sensor
    fy = fx / par
    cx = w / 2.0 - cam.shift_x * view
    cy = h / 2.0 + cam.shift_y * view / par
    return np.array([fx, fy, cx, cy], dtype=np.float64)


def intrinsics_from_fov(camera_angle_x: float, width: int, height: int) -> np.ndarray:
    """The NeRF-synthetic convention: square pixels, principal point at the image centre."""
    fx = 0.5 * width / math.tan(0.5 * camera_angle_x)
    return np.array([fx, fx, width / 2.0, height / 2.0], dtype=np.float64)


def rigid(matrix: np.ndarray) -> np.ndarray:
    """Remove scale (and shear) from a 4x4 camera-to-world matrix, keeping its orientation."""
    m = np.asarray(matrix, dtype=np.float64).copy()
    u, _, vt = np.linalg.svd(m[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:  # a mirrored camera: flip one axis to stay right-handed
        u[:, -1] *= -1
        r = u @ vt
    m[:3, :3] = r
    m[3] = (0.0, 0.0, 0.0, 1.0)
    return m


def pixel_rays(intrinsics: np.ndarray, c2w: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """World-space rays through every pixel centre.

    Returns:
        origins (H, W, 3) float64 and unit directions (H, W, 3) float64.
    """
    fx, fy, cx, cy = intrinsics
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    # OpenCV camera frame direction, then to Blender's (flip y and z).
    d_cam = np.stack([(u - cx) / fx, -(v - cy) / fy, -np.ones_like(u)], axis=-1)
    d = d_cam @ c2w[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    o = np.broadcast_to(c2w[:3, 3], d.shape).copy()
    return o, d


def project(points: np.ndarray, intrinsics: np.ndarray, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project world points (P, 3) to pixels (P, 2) in the OpenCV pixel frame; also depth (P,)
    along the viewing axis (positive in front of the camera)."""
    fx, fy, cx, cy = intrinsics
    w2c = np.linalg.inv(c2w)
    pc = points @ w2c[:3, :3].T + w2c[:3, 3]
    depth = -pc[:, 2]
    u = fx * pc[:, 0] / depth + cx
    v = -fy * pc[:, 1] / depth + cy
    return np.stack([u, v], axis=-1), depth


class NoBoxError(ValueError):
    """:func:`looked_at_aabb` found no box.  ``code``: "axes_apart" (one camera, or optical axes
    that do not meet) or "no_extent" (the views have no size at the point they look at), for
    callers that word it their own way."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


def looked_at_aabb(intrinsics, poses, width: int, height: int) -> np.ndarray:
    """A cube around what the cameras look at (the box of a fit when none is given).

    Centre: the least-squares point nearest to every optical axis.  Half-size: over the cameras,
    the smallest half-width of the view at the centre (distance times the tangent of the
    narrower half field of view).  About +-1.45 for the NeRF lego scene.
    Args:
        intrinsics: (N, 4) fx, fy, cx, cy of ``width`` x ``height`` images; poses: (N, 4, 4) c2w.
    Returns:
        (2, 3) float64 world min / max.
    Raises:
        NoBoxError (a ValueError) when the axes do not meet (one camera, parallel axes) or the
        views have no extent there.
    """
    k = np.asarray(intrinsics, dtype=np.float64).reshape(-1, 4)
    p = np.asarray(poses, dtype=np.float64).reshape(-1, 4, 4)
    origins = p[:, :3, 3]
    axes = -p[:, :3, 2]                                   # cameras look down their -Z
    axes = axes / np.linalg.norm(axes, axis=1, keepdims=True)
    off_axis = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]   # (N, 3, 3) projectors
    lhs, rhs = off_axis.sum(0), np.einsum("nij,nj->i", off_axis, origins)
    if len(p) < 2 or np.linalg.cond(lhs) > 1e8:
        raise NoBoxError("the cameras' optical axes do not meet", "axes_apart")
    centre = np.linalg.solve(lhs, rhs)
    reach = np.linalg.norm(origins - centre, axis=1) * 0.5 * np.minimum(width / k[:, 0], height / k[:, 1])
    half = float(reach.min())
    if not half > 0:
        raise NoBoxError("the cameras' views have no extent at the point they look at", "no_extent")
    return np.stack([centre - half, centre + half])


def look_at(eye: np.ndarray, target: np.ndarray, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world matrix (Blender convention) of a camera at ``eye`` looking at ``target``."""
    eye, target, up = (np.asarray(a, dtype=np.float64) for a in (eye, target, up))
    back = eye - target
    back /= np.linalg.norm(back)
    if abs(float(np.dot(back, up))) > 0.999:
        up = np.array([0.0, 1.0, 0.0])
    right = np.cross(up, back)
    right /= np.linalg.norm(right)
    true_up = np.cross(back, right)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, true_up, back, eye
    return m


def ring_positions(center, radius: float, count: int, elevations_deg=(20.0, 45.0)) -> np.ndarray:
    """``count`` camera positions on rings around ``center`` at the given elevations (Z up)."""
    center = np.asarray(center, dtype=np.float64)
    out = []
    for i in range(count):
        elev = math.radians(elevations_deg[i % len(elevations_deg)])
        azim = 2.0 * math.pi * i / count
        out.append(center + radius * np.array([
            math.cos(elev) * math.cos(azim), math.cos(elev) * math.sin(azim), math.sin(elev)]))
    return np.array(out)


# --------------------------------------------------------------------------------------------
# Camera rigs
# --------------------------------------------------------------------------------------------
GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


def fibonacci_directions(count: int, hemisphere: bool = False) -> np.ndarray:
    """``count`` unit vectors spread evenly (Fibonacci lattice) over the sphere, or over the
    upper (+Z) hemisphere.  Equal-area bands in z, golden-angle steps in azimuth; ordered from
    the top down.  The smallest angle between two of them is at least 0.85 * sqrt(4*pi / n_sphere)
    (``n_sphere`` = count, or 2 * count for a hemisphere; measured 0.87-0.92 for 8-500 views) and
    nearest-neighbour angles vary by less than 1.2x.

    Returns:
        (count, 3) float64.
    """
    if count < 1:
        return np.zeros((0, 3))
    i = np.arange(count, dtype=np.float64)
    if hemisphere:
        z = 1.0 - (i + 0.5) / count          # (0, 1): equal-area bands of the upper half
    else:
        z = 1.0 - 2.0 * (i + 0.5) / count    # (-1, 1)
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, 1.0))
    phi = GOLDEN_ANGLE * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=-1)


def spread_indices(count: int, chosen: int) -> np.ndarray:
    """``chosen`` indices out of ``range(count)``, spread evenly (e.g. the held-out views)."""
    chosen = max(0, min(int(chosen), count))
    if chosen == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.floor((np.arange(chosen) + 0.5) * count / chosen).astype(np.int64))


# --------------------------------------------------------------------------------------------
# Intrinsics <-> Blender camera (the inverse of blender_intrinsics) and NeRF fields
# --------------------------------------------------------------------------------------------
def blender_camera_from_intrinsics(intrinsics, width: int, height: int, *, sensor_width: float = 36.0,
                                   sensor_height: float = 24.0, sensor_fit: str | None = None
                                   ) -> BlenderCamera:
    """A Blender camera + render settings whose :func:`blender_intrinsics` are ``intrinsics``.

    Resolution ``width`` x ``height`` at 100 %; pixel aspect from ``fx / fy`` (Blender wants both
    aspects >= 1, so the larger one is set); lens and shift from the focal length and principal
    point.  ``sensor_fit`` None: HORIZONTAL for landscape (displayed) images, VERTICAL for
    portrait ones, so the shift is in units of the longer side, as in Blender's AUTO.  Exact up to
    floating point for any fit (AUTO uses ``sensor_width`` on the longer side).
    """
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    w, h = int(width), int(height)
    if not (fx > 0 and fy > 0 and w > 0 and h > 0):
        raise ValueError(f"need positive focal lengths and size, got fx={fx}, fy={fy}, {w}x{h}")
    par = fx / fy                                   # pixel_aspect_y / pixel_aspect_x
    pax, pay = (1.0, par) if par >= 1.0 else (1.0 / par, 1.0)
    fit = sensor_fit or ("HORIZONTAL" if w * pax >= h * pay else "VERTICAL")
    if fit == "AUTO":
        effective = "HORIZONTAL" if w * pax >= h * pay else "VERTICAL"
        sensor = sensor_width
    else:
        effective = fit
        sensor = sensor_width if fit == "HORIZONTAL" else sensor_height
    view = w if effective == "HORIZONTAL" else par * h
    return BlenderCamera(
        lens=fx * sensor / view, sensor_width=sensor_width, sensor_height=sensor_height, sensor_fit=fit,
        shift_x=(w / 2.0 - cx) / view, shift_y=(cy - h / 2.0) * par / view,
        resolution_x=w, resolution_y=h, resolution_percentage=100,
        pixel_aspect_x=pax, pixel_aspect_y=pay)


def fov_angles(intrinsics, width: int, height: int) -> tuple[float, float]:
    """(camera_angle_x, camera_angle_y) in radians: full fields of view of a centred camera with
    these focal lengths (the NeRF fields; they do not carry the principal point)."""
    fx, fy = float(intrinsics[0]), float(intrinsics[1])
    return 2.0 * math.atan(0.5 * width / fx), 2.0 * math.atan(0.5 * height / fy)


# --------------------------------------------------------------------------------------------
# Lens distortion (OpenCV radial-tangential and fisheye, in COLMAP / nerfstudio conventions)
# --------------------------------------------------------------------------------------------
#: Lens model codes, as carried on the wire (``Submit.lens_models``) and in PosedImages.
PINHOLE, OPENCV, OPENCV_FISHEYE = 0, 1, 2
LENS_MODELS = ("PINHOLE", "OPENCV", "OPENCV_FISHEYE")
#: Column order of a distortion row (N, 6); unused coefficients are 0.
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
#: Largest angle from the optical axis a fisheye ray may have (rays stay in front of the camera).
MAX_FISHEYE_THETA = 0.5 * math.pi - 1e-3


def lens_model_code(name: str | None) -> int:
    """Code of a camera model name (transforms.json's ``camera_model``); None/"" is PINHOLE."""
    key = (name or "PINHOLE").strip().upper()
    if key not in LENS_MODELS:
        raise ValueError(f"camera model {name!r} is not supported (use one of {', '.join(LENS_MODELS)})")
    return LENS_MODELS.index(key)


def distort(x: np.ndarray, y: np.ndarray, model: int, coeffs) -> tuple[np.ndarray, np.ndarray]:
    """Ideal normalised image coordinates -> distorted ones.

    ``x = X / Z``, ``y = Y / Z`` in OpenCV's camera frame (y down); pixels are then
    ``u = fx * xd + cx``, ``v = fy * yd + cy``.

    * OPENCV: ``r^2 = x^2 + y^2``, ``radial = 1 + k1 r^2 + k2 r^4 + k3 r^6 + k4 r^8``,
      ``xd = x radial + 2 p1 x y + p2 (r^2 + 2 x^2)``, ``yd = y radial + p1 (r^2 + 2 y^2) + 2 p2 x y``
      (k4 as in nerfstudio; COLMAP's OPENCV has k3 = k4 = 0).
    * OPENCV_FISHEYE: ``theta = atan(r)``, ``theta_d = theta (1 + k1 t^2 + k2 t^4 + k3 t^6 + k4 t^8)``,
      ``xd = x theta_d / r`` (equidistant with polynomial, as OpenCV's fisheye module).

    Args:
        x, y: float64 arrays of one shape.  coeffs: (6,) in :data:`DISTORTION_KEYS` order.
    """
    k1, k2, k3, k4, p1, p2 = (float(c) for c in coeffs)
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if model == PINHOLE:
        return x.copy(), y.copy()
    r2 = x * x + y * y
    if model == OPENCV:
        radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * (k3 + r2 * k4)))
        return (x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x),
                y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y)
    if model == OPENCV_FISHEYE:
        r = np.sqrt(r2)
        theta = np.arctan(r)
        t2 = theta * theta
        theta_d = theta * (1.0 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))
        scale = np.where(r > 1e-12, theta_d / np.maximum(r, 1e-12), 1.0)
        return x * scale, y * scale
    raise ValueError(f"unknown lens model code {model}")


def undistort(xd: np.ndarray, yd: np.ndarray, model: int, coeffs, iterations: int = 20
              ) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`distort`, by Newton's method (float64).

    OPENCV: 2-D Newton on ``distort(x, y) - (xd, yd)`` from ``(xd, yd)``, with the analytic
    Jacobian.  OPENCV_FISHEYE: 1-D Newton on ``theta_d(theta) = r_d`` for theta in
    [0, MAX_FISHEYE_THETA], then ``r = tan(theta)``.  Converges to ~1e-12 for the distortion of
    real lenses (|k1| < 0.5); points outside the region where the model is invertible come back
    as the best Newton estimate.
    """
    k1, k2, k3, k4, p1, p2 = (float(c) for c in coeffs)
    xd, yd = np.asarray(xd, np.float64), np.asarray(yd, np.float64)
    if model == PINHOLE:
        return xd.copy(), yd.copy()
    if model == OPENCV:
        x, y = xd.copy(), yd.copy()
        for _ in range(iterations):
            r2 = x * x + y * y
            radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * (k3 + r2 * k4)))
            d_radial = k1 + r2 * (2.0 * k2 + r2 * (3.0 * k3 + r2 * 4.0 * k4))   # d radial / d r2
            fx_ = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x) - xd
            fy_ = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y - yd
            a = radial + 2.0 * x * x * d_radial + 2.0 * p1 * y + 6.0 * p2 * x      # d fx / d x
            b = 2.0 * x * y * d_radial + 2.0 * p1 * x + 2.0 * p2 * y               # d fx / d y
            c = 2.0 * x * y * d_radial + 2.0 * p1 * x + 2.0 * p2 * y               # d fy / d x
            d = radial + 2.0 * y * y * d_radial + 6.0 * p1 * y + 2.0 * p2 * x      # d fy / d y
            det = a * d - b * c
            det = np.where(np.abs(det) < 1e-12, 1e-12, det)
            x = x - (d * fx_ - b * fy_) / det
            y = y - (a * fy_ - c * fx_) / det
        return x, y
    if model == OPENCV_FISHEYE:
        rd = np.sqrt(xd * xd + yd * yd)
        theta = np.clip(rd, 0.0, MAX_FISHEYE_THETA)
        for _ in range(iterations):
            t2 = theta * theta
            f = theta * (1.0 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4)))) - rd
            df = 1.0 + t2 * (3.0 * k1 + t2 * (5.0 * k2 + t2 * (7.0 * k3 + t2 * 9.0 * k4)))
            theta = np.clip(theta - f / np.where(np.abs(df) < 1e-12, 1e-12, df), 0.0, MAX_FISHEYE_THETA)
        scale = np.where(rd > 1e-12, np.tan(theta) / np.maximum(rd, 1e-12), 1.0)
        return xd * scale, yd * scale
    raise ValueError(f"unknown lens model code {model}")


def distort_pixels(uv: np.ndarray, intrinsics, model: int, coeffs) -> np.ndarray:
    """Pixels of an ideal pinhole camera (P, 2) -> where the distorting lens puts them (P, 2)."""
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    uv = np.asarray(uv, np.float64)
    xd, yd = distort((uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy, model, coeffs)
    return np.stack([fx * xd + cx, fy * yd + cy], axis=-1)


def undistort_pixels(uv: np.ndarray, intrinsics, model: int, coeffs) -> np.ndarray:
    """Pixels of the distorted image (P, 2) -> pixels of the ideal pinhole camera (P, 2)."""
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    uv = np.asarray(uv, np.float64)
    x, y = undistort((uv[:, 0] - cx) / fx, (uv[:, 1] - cy) / fy, model, coeffs)
    return np.stack([fx * x + cx, fy * y + cy], axis=-1)


def distorted_pixel_rays(intrinsics, c2w: np.ndarray, width: int, height: int, model: int = PINHOLE,
                         coeffs=(0.0,) * 6) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`pixel_rays`, for a camera with lens distortion: the ray of each pixel centre
    goes through its undistorted position.

    Returns:
        origins (H, W, 3) float64 and unit directions (H, W, 3) float64.
    """
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x, y = undistort((u - cx) / fx, (v - cy) / fy, model, coeffs)
    d_cam = np.stack([x, -y, -np.ones_like(x)], axis=-1)        # OpenCV -> Blender camera axes
    d = d_cam @ np.asarray(c2w, np.float64)[:3, :3].T
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    o = np.broadcast_to(np.asarray(c2w, np.float64)[:3, 3], d.shape).copy()
    return o, d


def opencv_w2c_to_c2w(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """COLMAP / OpenCV world-to-camera (R (3, 3), t (3,)) -> camera-to-world (4, 4) float64 in
    this project's (Blender) camera convention."""
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = rotation, translation
    return np.linalg.inv(w2c) @ BLENDER_TO_OPENCV


def quaternion_to_matrix(qw: float, qx: float, qy: float, qz: float) -> np.ndarray:
    """Rotation matrix (3, 3) of a quaternion (Hamilton convention, as COLMAP), normalised first."""
    q = np.array([qw, qx, qy, qz], dtype=np.float64)
    n = np.linalg.norm(q)
    if not n > 0 or not np.isfinite(n):
        raise ValueError(f"quaternion {q.tolist()} has no direction")
    w, x, y, z = q / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])
