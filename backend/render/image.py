"""Renders as images: premultiplied float RGBA (what FittedField.render gives) to 8-bit."""
from __future__ import annotations

import numpy as np


def to_rgba8(image: np.ndarray) -> np.ndarray:
    """(H, W, 4) float premultiplied RGBA in [0, 1] -> (H, W, 4) uint8 straight alpha."""
    alpha = np.clip(image[..., 3:4], 0.0, 1.0)
    rgb = np.where(alpha > 1e-6, image[..., :3] / np.maximum(alpha, 1e-6), 0.0)
    out = np.concatenate([np.clip(rgb, 0.0, 1.0), alpha], axis=-1)
    return (out * 255.0 + 0.5).astype(np.uint8)
