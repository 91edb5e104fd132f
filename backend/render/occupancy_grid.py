"""Occupancy grid over the normalised cube [-1, 1]^3, used to skip empty space while marching.

Each cell keeps a running estimate of the density in it (an exponential moving maximum, as in
instant-ngp): every update decays all cells by ``decay`` and takes the max with fresh samples of
the field at random points in a subset of cells.  A cell is occupied when the opacity of one
marching step through it, ``1 - exp(-sigma * step)``, is above ``threshold`` (or the mean
density, if that is lower, so that early fields are not culled away).  Until the first update
every cell counts as occupied: the trainer's warm-up is simply the steps before that update,
which samples every cell.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class OccupancyConfig:
    """The occupancy grid (:meth:`build`) and its update schedule (the trainers' ``update_step``)."""

    occupancy_resolution: int = 128    # cells a side
    occupancy_threshold: float = 0.01  # opacity of one step below which a cell is empty
    occupancy_decay: float = 0.95      # decay of the cells' density estimates at each update
    occupancy_every: int = 16          # steps between updates
    occupancy_warmup: int = 256        # steps during which every cell counts as occupied
    occupancy_fraction: float = 0.25   # share of cells re-sampled at each update after the first

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        for name in ("occupancy_resolution", "occupancy_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def build(self) -> "OccupancyGrid":
        return OccupancyGrid(self.occupancy_resolution, self.occupancy_threshold, self.occupancy_decay)

    def update_due(self, step: int) -> float | None:
        """The share of cells to re-sample before step ``step`` (0-based), or None: no update."""
        since = step - self.occupancy_warmup
        if since < 0 or since % self.occupancy_every:
            return None
        return 1.0 if since == 0 else self.occupancy_fraction


class OccupancyGrid(nn.Module):
    """``resolution``^3 cells over [-1, 1]^3.

    Buffers (saved with the model): ``density`` (R^3,) float32 running estimate, ``mask``
    (R^3,) bool occupancy bits, cells in x-fastest order.
    """

    def __init__(self, resolution: int = 128, threshold: float = 0.01, decay: float = 0.95):
        super().__init__()
        if resolution < 2:
            raise ValueError(f"occupancy grid resolution must be at least 2, got {resolution}")
        self.resolution, self.threshold, self.decay = resolution, threshold, decay
        self.register_buffer("density", torch.zeros(resolution ** 3))
        self.register_buffer("mask", torch.ones(resolution ** 3, dtype=torch.bool))

    @property
    def occupied_fraction(self) -> float:
        return float(self.mask.float().mean())

    def march_bits(self) -> tuple[torch.Tensor, int]:
        """(R^3,) uint8 view of the occupancy bits and the resolution, for fused ray marchers."""
        return self.mask.view(torch.uint8), self.resolution

    def cell_index(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat cell index of points, and whether they are inside the cube.

        Args:
            x: (..., 3) float32 normalised positions.
        Returns:
            index (...,) int64 (clamped into the grid), inside (...,) bool.
        """
        r = self.resolution
        g = ((x + 1.0) * (0.5 * r)).floor().long()
        inside = ((g >= 0) & (g < r)).all(-1)
        g = g.clamp(0, r - 1)
        return g[..., 0] + r * (g[..., 1] + r * g[..., 2]), inside

    def occupied(self, x: torch.Tensor) -> torch.Tensor:
        """(...,) bool: the point is inside the cube and its cell is occupied."""
        idx, inside = self.cell_index(x)
        return self.mask[idx] & inside

    def cell_centers(self, idx: torch.Tensor) -> torch.Tensor:
        """(K,) int64 flat indices -> (K, 3) float32 normalised cell centres."""
        r = self.resolution
        g = torch.stack([idx % r, (idx // r) % r, idx // (r * r)], dim=-1).float()
        return (g + 0.5) * (2.0 / r) - 1.0

    @torch.no_grad()
    def update(self, density_fn: Callable[[torch.Tensor], torch.Tensor], step_size: float,
               fraction: float = 0.25, chunk: int = 1 << 18,
               generator: torch.Generator | None = None) -> None:
        """Refresh the estimates from the field, then the occupancy bits.

        Args:
            density_fn: (K, 3) float32 normalised points -> (K,) float32 density.
            step_size: marching step in normalised units (sets the occupancy threshold).
            fraction: share of cells to sample, at one random point each: that many random
                cells plus as many random occupied ones; 1 samples every cell once.
        """
        n, dev = self.density.numel(), self.density.device
        if fraction >= 1.0:
            cells = torch.arange(n, device=dev)
        else:
            k = max(1, int(n * fraction))
            cells = torch.randint(0, n, (k,), device=dev, generator=generator)
            occ = self.mask.nonzero().squeeze(1)
            if occ.numel():
                pick = torch.randint(0, occ.numel(), (min(k, occ.numel()),), device=dev, generator=generator)
                cells = torch.cat([cells, occ[pick]])
        jitter = torch.rand(cells.shape[0], 3, device=dev, generator=generator) - 0.5
        pts = self.cell_centers(cells) + jitter * (2.0 / self.resolution)
        fresh = torch.cat([density_fn(p).float() for p in pts.split(chunk)])
        self.density.mul_(self.decay)
        self.density.scatter_reduce_(0, cells, fresh, reduce="amax")
        sigma_min = -math.log1p(-self.threshold) / step_size
        self.mask.copy_(self.density > min(sigma_min, float(self.density.mean())))
