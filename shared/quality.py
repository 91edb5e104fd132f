"""Image quality with the conventions of docs/benchmarks.md, numpy only: PSNR on 8-bit sRGB,
prediction and target composited on white.

Used by both sides: the backend's benchmarks and metrics (backend/fitting/metrics.py) and the
add-on's check of the imported asset at the held-out cameras (blender_addon/asset_check.py).
"""
from __future__ import annotations

import math

import numpy as np


def psnr(mse: float) -> float:
    """PSNR (dB) of a mean squared error of values in [0, 1]; infinite for 0."""
    return float("inf") if mse <= 0 else -10.0 * math.log10(mse)


def on_white(rgba: np.ndarray) -> np.ndarray:
    """(H,W,4) uint8 straight-alpha RGBA -> (H,W,3) float64 in [0, 1] composited on white."""
    x = np.asarray(rgba, dtype=np.float64) / 255.0
    if x.shape[-1] == 3:
        return x
    a = x[..., 3:4]
    return x[..., :3] * a + (1.0 - a)


def psnr_white(pred: np.ndarray, target: np.ndarray) -> float:
    """PSNR (dB) of two (H,W,4|3) uint8 images over the whole image, both on white."""
    if pred.shape[:2] != target.shape[:2]:
        raise ValueError(f"image sizes differ: {pred.shape[:2]} vs {target.shape[:2]}")
    p = np.round(on_white(pred) * 255.0) / 255.0     # 8-bit, as the published figures
    t = np.round(on_white(target) * 255.0) / 255.0
    return psnr(float(np.mean((p - t) ** 2)))
