"""Error-weighted choice of training pixels (instant-ngp's error map).

The photos are cut into square cells of ``tile`` pixels a side; each cell keeps a running mean of
the squared colour error of the rays recently drawn in it (sums and counts that decay a little at
every step).  A share of each step's rays is drawn cell by cell in proportion to that mean error
times the cell's pixels, then at a uniform pixel of the cell; the rest are drawn uniformly, so
every pixel keeps being visited and every cell's mean keeps being refreshed.  The effect: more of
each batch goes where the field is still wrong (edges, fine texture, thin parts), less where it
is already right (the white background, flat colour).

Everything stays on the device with fixed shapes and no host synchronisation, so the draw and the
update run inside the graph trainer's captured step (fitting/graph_trainer.py).
"""
from __future__ import annotations

import torch

DECAY = 0.99        # a step's decay of the sums and counts (half-life ~70 steps)
PRIOR = 1.0         # rays' worth of the mean error over all cells that each cell's mean starts from


class ErrorMap:
    """Cells of ``tile`` x ``tile`` pixels over every photo (the last row and column of cells of a
    photo may be partial; cells in a photo's padding have no pixels and are never drawn).

    Args:
        widths, heights: (N,) int64 each photo's size in pixels, on the device.
        width, height: the largest (the photos' padded size).
    """

    def __init__(self, widths: torch.Tensor, heights: torch.Tensor, width: int, height: int, tile: int):
        if tile < 1:
            raise ValueError(f"error_tile must be at least 1 pixel, got {tile}")
        dev = widths.device
        self.tile = int(tile)
        self.tx, self.ty = -(-int(width) // self.tile), -(-int(height) // self.tile)
        cy, cx = torch.meshgrid(torch.arange(self.ty, device=dev), torch.arange(self.tx, device=dev), indexing="ij")
        x0, y0 = cx.reshape(1, -1) * self.tile, cy.reshape(1, -1) * self.tile
        # pixels of each cell inside its photo: (N, cells) -> (N * cells,)
        self.cell_w = (widths[:, None] - x0).clamp(0, self.tile).reshape(-1)
        self.cell_h = (heights[:, None] - y0).clamp(0, self.tile).reshape(-1)
        self.area = (self.cell_w * self.cell_h).float()
        self.sums = torch.zeros(self.area.shape[0], device=dev)
        self.counts = torch.zeros_like(self.sums)

    @property
    def cells(self) -> int:
        return int(self.area.shape[0])

    def cell_of(self, img: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(R,) int64 cell of each pixel."""
        return (img * self.ty + y // self.tile) * self.tx + x // self.tile

    def mean_error(self) -> torch.Tensor:
        """(cells,) each cell's running mean squared error (the mean over all cells where it has none)."""
        overall = self.sums.sum() / self.counts.sum().clamp_min(1e-6)
        return (self.sums + PRIOR * overall) / (self.counts + PRIOR)

    def draw(self, count: int, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``count`` pixels (image, row, column; (count,) int64 each), cells drawn in proportion to
        their mean error times their pixels, then a uniform pixel of the cell."""
        dev = self.sums.device
        weight = self.mean_error().clamp_min(1e-12) * self.area
        cdf = torch.cumsum(weight.double(), 0)
        u = torch.rand(count, device=dev, generator=generator, dtype=torch.float64) * cdf[-1]
        cell = torch.searchsorted(cdf, u, right=True).clamp_max(self.cells - 1)
        img, rest = cell // (self.ty * self.tx), cell % (self.ty * self.tx)
        y0, x0 = (rest // self.tx) * self.tile, (rest % self.tx) * self.tile
        fy = torch.rand(count, device=dev, generator=generator)
        fx = torch.rand(count, device=dev, generator=generator)
        y = y0 + (fy * self.cell_h[cell]).long().clamp_max(self.cell_h[cell] - 1)
        x = x0 + (fx * self.cell_w[cell]).long().clamp_max(self.cell_w[cell] - 1)
        return img, y, x

    def record(self, cells: torch.Tensor, errors: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """Decay, then add one step's rays: ``errors`` (R,) squared colour errors of the rays in
        ``cells`` (R,); ``weights`` (R,) 1 for a ray that was trained, 0 for one that was not."""
        w = torch.ones_like(errors) if weights is None else weights.to(errors.dtype)
        self.sums.mul_(DECAY).index_add_(0, cells, (errors * w).float())
        self.counts.mul_(DECAY).index_add_(0, cells, w.float())

    def state_dict(self) -> dict:
        return {"sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state: dict) -> None:
        if state["sums"].shape != self.sums.shape:
            raise ValueError("the error map's cells do not match these photos")
        self.sums.copy_(state["sums"])
        self.counts.copy_(state["counts"])
