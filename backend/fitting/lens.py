"""Lens distortion on the device: the torch twin of ``shared.cameras.undistort`` (tests check
they agree), used to bend training and rendering rays through the undistortion.

Rays are bent rather than images resampled: every pixel of a photo keeps its own ray, nothing
is blurred by a resampling, and no image area is lost at the borders.
"""
from __future__ import annotations

import torch

from fit_implicit.shared.cameras import MAX_FISHEYE_THETA, OPENCV, OPENCV_FISHEYE

ITERATIONS = 10


def undistort(xd: torch.Tensor, yd: torch.Tensor, model: torch.Tensor, coeffs: torch.Tensor,
              iterations: int = ITERATIONS) -> tuple[torch.Tensor, torch.Tensor]:
    """Distorted normalised coordinates -> ideal ones, per ray with its own lens.

    Args:
        xd, yd: (R,) float32, ``(u - cx) / fx`` and ``(v - cy) / fy`` (OpenCV frame, y down).
        model: (R,) int64 lens model codes (shared.cameras.PINHOLE / OPENCV / OPENCV_FISHEYE).
        coeffs: (R, 6) float32, k1 k2 k3 k4 p1 p2.
    Returns:
        x, y: (R,) float32.  PINHOLE rays are returned unchanged.
    """
    k1, k2, k3, k4, p1, p2 = coeffs.unbind(-1)
    # Radial-tangential: 2-D Newton (the Jacobian as in shared.cameras.undistort).
    x, y = xd.clone(), yd.clone()
    for _ in range(iterations):
        r2 = x * x + y * y
        radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * (k3 + r2 * k4)))
        d_radial = k1 + r2 * (2.0 * k2 + r2 * (3.0 * k3 + r2 * 4.0 * k4))
        fx_ = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x) - xd
        fy_ = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y - yd
        a = radial + 2.0 * x * x * d_radial + 2.0 * p1 * y + 6.0 * p2 * x
        b = 2.0 * x * y * d_radial + 2.0 * p1 * x + 2.0 * p2 * y
        d = radial + 2.0 * y * y * d_radial + 6.0 * p1 * y + 2.0 * p2 * x
        det = a * d - b * b                       # the Jacobian is symmetric: c == b
        det = torch.where(det.abs() < 1e-12, torch.full_like(det, 1e-12), det)
        x = x - (d * fx_ - b * fy_) / det
        y = y - (a * fy_ - b * fx_) / det
    # Fisheye: 1-D Newton on theta.
    rd = torch.sqrt(xd * xd + yd * yd)
    theta = rd.clamp(0.0, MAX_FISHEYE_THETA)
    for _ in range(iterations):
        t2 = theta * theta
        f = theta * (1.0 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4)))) - rd
        df = 1.0 + t2 * (3.0 * k1 + t2 * (5.0 * k2 + t2 * (7.0 * k3 + t2 * 9.0 * k4)))
        df = torch.where(df.abs() < 1e-12, torch.full_like(df, 1e-12), df)
        theta = (theta - f / df).clamp(0.0, MAX_FISHEYE_THETA)
    scale = torch.where(rd > 1e-12, torch.tan(theta) / rd.clamp_min(1e-12), torch.ones_like(rd))
    fish = model == OPENCV_FISHEYE
    rt = model == OPENCV
    x = torch.where(fish, xd * scale, torch.where(rt, x, xd))
    y = torch.where(fish, yd * scale, torch.where(rt, y, yd))
    return x, y


def undistort_pixels(intrinsics: torch.Tensor, u: torch.Tensor, v: torch.Tensor, model: torch.Tensor,
                     coeffs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels of distorted photos -> pixels of the ideal pinhole cameras with the same
    intrinsics, so that :func:`backend.fitting.data.camera_rays` gives each pixel its true ray.

    Args:
        intrinsics: (R, 4) float32.  u, v: (R,) float32.  model: (R,) int64.  coeffs: (R, 6) float32.
    Returns:
        u, v: (R,) float32.
    """
    fx, fy, cx, cy = intrinsics.unbind(-1)
    x, y = undistort((u - cx) / fx, (v - cy) / fy, model, coeffs)
    return fx * x + cx, fy * y + cy

