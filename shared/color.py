"""sRGB <-> linear colour values: the sRGB transfer function (IEC 61966-2-1), numpy only.

Used where colours change encoding: the backend's .glb writer (glTF vertex colours are
linear), the add-on's importer (Blender colour attributes are scene-linear) and its render
passes (Cycles' "Diffuse Color" pass is linear; the albedo supervision is sRGB).
"""
from __future__ import annotations

import numpy as np


def srgb_to_linear(c: np.ndarray) -> np.ndarray:
    """sRGB-encoded values, clipped to [0, 1] -> linear, same shape, float32 (computed in float32)."""
    c = np.clip(np.asarray(c, dtype=np.float32), 0.0, 1.0)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """Linear values, clipped to [0, 1] -> sRGB-encoded, same shape and float dtype as ``x``
    (float32 stays float32; lists and integers give float64)."""
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(x, 1.0 / 2.4) - 0.055)
