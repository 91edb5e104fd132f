"""The loss / PSNR plot of the panel, drawn with numpy (no bpy, no fonts: the panel prints the numbers).

    rgba = draw_plot(steps, loss, psnr)        # (h, w, 4) uint8 sRGB, top row first

Loss is drawn on a log scale in orange, PSNR on a linear scale in blue, each over its own range;
x is the training step.  :class:`History` keeps the points of a running fit, thinned to a bounded
number so that long fits cost the same to draw.
"""
from __future__ import annotations

import numpy as np

WIDTH, HEIGHT = 256, 96
BACKGROUND = (40, 40, 40, 255)
GRID = (62, 62, 62, 255)
LOSS_COLOR = (240, 150, 50, 255)
PSNR_COLOR = (80, 170, 255, 255)


class History:
    """(step, loss, psnr) points of one fit; at most ``max_points`` (every other point is dropped when full)."""

    def __init__(self, max_points: int = 1024):
        self.max_points = max_points
        self.points: list[tuple[float, float, float]] = []
        self.version = 0

    def add(self, step: int, loss: float, psnr: float) -> None:
        if self.points and step <= self.points[-1][0]:
            return
        self.points.append((float(step), float(loss), float(psnr)))
        if len(self.points) > self.max_points:
            self.points = self.points[::2] + ([self.points[-1]] if len(self.points) % 2 == 0 else [])
        self.version += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a = np.asarray(self.points, np.float64).reshape(-1, 3)
        return a[:, 0], a[:, 1], a[:, 2]


def _rows(values: np.ndarray, height: int, log: bool = False) -> np.ndarray:
    """Values -> row positions (float, 0 = top), the range padded by 5 %; NaN where not finite."""
    v = np.asarray(values, np.float64)
    if log:
        v = np.where(v > 0, np.log10(np.where(v > 0, v, 1.0)), np.nan)
    v = np.where(np.isfinite(v), v, np.nan)
    if not np.isfinite(v).any():
        return np.full(v.shape, np.nan)
    lo, hi = np.nanmin(v), np.nanmax(v)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    lo, hi = lo - pad, hi + pad
    return (hi - v) / (hi - lo) * (height - 1)


def _draw_curve(img: np.ndarray, x: np.ndarray, rows: np.ndarray, color) -> None:
    """Draw the polyline through (x, rows) with one vertical span per pixel column."""
    h, w = img.shape[:2]
    ok = np.isfinite(rows)
    if ok.sum() == 0:
        return
    cols = np.arange(w, dtype=np.float64)
    if ok.sum() == 1:
        y = np.where(np.abs(cols - x[ok][0]) <= 1, rows[ok][0], np.nan)
    else:
        y = np.interp(cols, x[ok], rows[ok], left=np.nan, right=np.nan)
    prev = np.concatenate([y[:1], y[:-1]])
    prev = np.where(np.isfinite(prev), prev, y)
    lo = np.minimum(y, prev) - 0.75   # a line about 2 px thick
    hi = np.maximum(y, prev) + 0.75
    r = np.arange(h, dtype=np.float64)[:, None]
    mask = (r >= lo[None, :]) & (r <= hi[None, :])
    img[mask] = color


def draw_plot(steps, loss, psnr, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """The plot as (height, width, 4) uint8 sRGB RGBA, top row first.

    Args:
        steps: (K,) training steps, increasing.  loss: (K,) > 0 (log scale).  psnr: (K,) dB.
        Empty inputs give the empty grid.
    """
    img = np.empty((height, width, 4), np.uint8)
    img[:] = BACKGROUND
    img[[height // 4, height // 2, 3 * height // 4], :] = GRID
    img[:, [width // 4, width // 2, 3 * width // 4]] = GRID
    steps = np.asarray(steps, np.float64)
    if steps.size == 0:
        return img
    s0, s1 = steps.min(), steps.max()
    x = (steps - s0) / (s1 - s0) * (width - 1) if s1 > s0 else np.full(steps.shape, (width - 1) / 2)
    _draw_curve(img, x, _rows(loss, height, log=True), LOSS_COLOR)
    _draw_curve(img, x, _rows(psnr, height), PSNR_COLOR)
    return img
