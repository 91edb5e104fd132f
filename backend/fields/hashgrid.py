"""Multiresolution hash-grid encoding (Mueller et al. 2022, instant-ngp), plain PyTorch.

Level ``l`` has ``res_l = floor(base * b**l)`` grid points a side, ``b`` the geometric growth
that takes ``base`` to ``max_res`` in ``levels`` steps.  Coarse levels whose ``res_l**3`` points
fit in the table size are indexed densely (no collisions); the others use instant-ngp's
spatial hash ``(x*1) ^ (y*2654435761) ^ (z*805459861) mod T``.  All levels live in one
parameter table and are looked up with one gather that also blends the 8 corners trilinearly
(``embedding_bag`` forward, ``index_add_`` backward).

Gradients with respect to the points (camera refinement moves them, fitting/camera_refine.py)
jump at every cell face with trilinear weights: the derivative of a level's feature is the
difference of its corners' features, which changes from one cell to the next.  With
``smooth_grad`` the weights keep their trilinear values but their derivative is that of the
half-cosine ``(1 - cos(pi t)) / 2`` of the fraction ``t`` (a straight-through estimator, after
Heo et al. 2023's smooth interpolation weighting): it falls to zero at the faces, so the points'
gradient is continuous across cells, with the same mean over a cell as the trilinear one.

:func:`hashgrid_encode_reference` is the plain-indexing reference.  A fused kernel (Triton) can
replace :func:`hashgrid_encode` behind :class:`HashGrid` as long as it keeps the signature and
a test shows that it agrees with the reference (fields/hashgrid_triton.py does, with the points'
gradient too: benchmarks/check_kernels.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

PRIMES = (1, 2654435761, 805459861)

# On the CPU, points are encoded in chunks of this many: the (N, L, 8) temporaries then stay
# small enough for the allocator to reuse heap memory instead of page-faulting fresh mappings.
CPU_CHUNK = 1 << 14


def level_layout(levels: int, log2_table: int, base_res: int, max_res: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-level resolution (geometric growth from base_res to max_res) and table layout.

    Returns:
        resolutions (L,) int64 grid points a side; offsets (L+1,) int64 first row of each level
        in the shared table (offsets[-1] = total rows); dense (L,) bool, True where the level is
        indexed densely.  Resolution grows with the level, so dense levels are a prefix; hashed
        levels all have 2**log2_table rows.
    """
    if levels < 1 or not 1 <= log2_table <= 30 or base_res < 2 or max_res < base_res:
        raise ValueError(f"bad hash grid layout: levels={levels} log2_table={log2_table} "
                         f"base_res={base_res} max_res={max_res}")
    growth = math.exp((math.log(max_res) - math.log(base_res)) / max(levels - 1, 1))
    table = 2 ** log2_table
    res = [int(math.floor(base_res * growth ** lv + 1e-6)) for lv in range(levels)]
    offsets = torch.tensor([0] + [min(r ** 3, table) for r in res], dtype=torch.int64).cumsum(0)
    return torch.tensor(res, dtype=torch.int64), offsets, torch.tensor([r ** 3 <= table for r in res])


def corner_lookup(x: torch.Tensor, resolutions: torch.Tensor, offsets: torch.Tensor, n_dense: int,
                  smooth_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows and trilinear weights of the 8 cell corners around each point, at every level.

    Level l has grid points 0..res_l-1 a side at ``x * (res_l - 1)``; the cell is clamped so that
    x = 1 falls in the last cell.  Dense levels index ``x + res*(y + res*z)``; hashed levels
    ``(x*1 ^ y*2654435761 ^ z*805459861) mod T`` (T a power of two).

    Args:
        x: (N, 3) float32 points in [0, 1]^3 (clamped).
        resolutions: (L,) int64 and offsets: (L+1,) int64 from :func:`level_layout`, on x's device.
        n_dense: number of densely indexed levels (a prefix).
        smooth_grad: the weights' gradient with respect to x is the half-cosine's (module doc).
    Returns:
        rows (N, L, 8) int64 into the shared table, weights (N, L, 8) float32 (summing to 1),
        both non-contiguous views.  Corner c is (c & 1, (c >> 1) & 1, (c >> 2) & 1) cells along
        (x, y, z) from the cell's lower corner.
    """
    n, levels, nd = x.shape[0], resolutions.shape[0], n_dense
    res = resolutions
    # Points innermost, so that every broadcast below runs over long contiguous rows.
    pos = x.clamp(0.0, 1.0).t()[:, None, :] * (res - 1).to(x.dtype)[None, :, None]  # (3, L, N)
    cell = torch.minimum(pos.floor().long(), (res - 2)[None, :, None])              # (3, L, N)
    frac = pos - cell.to(x.dtype)
    if smooth_grad and frac.requires_grad:
        eased = 0.5 * (1.0 - torch.cos(math.pi * frac))
        frac = frac.detach() + (eased - eased.detach())      # trilinear values, half-cosine slope
    wa = torch.stack([1.0 - frac, frac], dim=1)                                     # (3, 2, L, N)
    ends = cell[:, None] + torch.arange(2, device=x.device)[None, :, None, None]    # (3, 2, L, N)
    # Per-axis terms broadcast to (z, y, x, L, N): corner c = 4z + 2y + x.
    weights = wa[2][:, None, None] * wa[1][None, :, None] * wa[0][None, None, :]
    parts = []
    if nd:
        e, r = ends[:, :, :nd], res[:nd, None]
        parts.append(e[2][:, None, None] * (r * r) + e[1][None, :, None] * r + e[0][None, None, :])
    if nd < levels:
        h = ends[:, :, nd:] * torch.tensor(PRIMES, device=x.device)[:, None, None, None]
        mask = (offsets[nd + 1:] - offsets[nd:-1] - 1)[:, None]                     # (Lh, 1) = T - 1
        parts.append((h[2][:, None, None] ^ h[1][None, :, None] ^ h[0][None, None, :]) & mask)
    rows = torch.cat(parts, dim=3) + offsets[:-1, None]                             # (2, 2, 2, L, N)
    return rows.reshape(8, levels, n).permute(2, 1, 0), weights.reshape(8, levels, n).permute(2, 1, 0)


class _GatherBlend(torch.autograd.Function):
    """sum_k w[b, k] * table[rows[b, k]] with a gradient for the table only (not for w)."""

    @staticmethod
    def forward(ctx, table, rows, weights):
        ctx.save_for_backward(rows, weights)
        ctx.table_shape = table.shape
        return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        rows, weights = ctx.saved_tensors
        contrib = (grad[:, None, :] * weights[..., None]).reshape(-1, grad.shape[-1])
        g = torch.zeros(ctx.table_shape, dtype=grad.dtype, device=grad.device)
        return g.index_add_(0, rows.reshape(-1), contrib), None, None


def hashgrid_encode(x: torch.Tensor, table: torch.Tensor, resolutions: torch.Tensor,
                    offsets: torch.Tensor, dense: torch.Tensor, n_dense: int | None = None,
                    smooth_grad: bool = False) -> torch.Tensor:
    """Encode points with all levels at once (one fused gather-and-blend).

    Args:
        x: (N, 3) float32 points in [0, 1]^3 (clamped).
        table: (offsets[-1], F) float32 feature table of all levels.
        resolutions: (L,) int64, offsets: (L+1,) int64, dense: (L,) bool from
            :func:`level_layout`, on x's device.
        n_dense: ``int(dense.sum())`` if the caller knows it (saves a device sync).
        smooth_grad: x's gradient through half-cosine weights (module doc).
    Returns:
        (N, L*F) float32 features, level-major (level 0's F features first).

    Differentiable with respect to ``table``; if ``x`` requires a gradient, the autograd-only
    :func:`hashgrid_encode_reference` is used instead.
    """
    nd = int(dense.sum()) if n_dense is None else n_dense
    if x.requires_grad:
        return hashgrid_encode_reference(x, table, resolutions, offsets, dense, nd, smooth_grad)
    if x.device.type == "cpu" and x.shape[0] > CPU_CHUNK:
        return torch.cat([hashgrid_encode(p, table, resolutions, offsets, dense, nd) for p in x.split(CPU_CHUNK)])
    rows, weights = corner_lookup(x, resolutions, offsets, nd)
    n, levels = rows.shape[:2]
    out = _GatherBlend.apply(table, rows.reshape(n * levels, 8), weights.reshape(n * levels, 8))
    return out.reshape(n, levels * table.shape[1])


def hashgrid_encode_reference(x: torch.Tensor, table: torch.Tensor, resolutions: torch.Tensor,
                              offsets: torch.Tensor, dense: torch.Tensor, n_dense: int | None = None,
                              smooth_grad: bool = False) -> torch.Tensor:
    """Same as :func:`hashgrid_encode`, written with plain indexing (autograd for x and table)."""
    nd = int(dense.sum()) if n_dense is None else n_dense
    rows, weights = corner_lookup(x, resolutions, offsets, nd, smooth_grad)
    return (weights[..., None] * table[rows]).sum(2).reshape(x.shape[0], -1)


@dataclass
class HashGridConfig:
    """The settings of a :class:`HashGrid` (instant-ngp's defaults)."""

    levels: int = 16            # hash grid levels L
    features: int = 2           # features per level F
    log2_table: int = 19        # rows per level: 2**log2_table (dense levels use fewer)
    base_res: int = 16          # coarsest grid, points a side (over the normalised cube)
    max_res: int = 2048         # finest grid

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        for name in ("levels", "features", "log2_table"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    def build(self) -> "HashGrid":
        return HashGrid(self.levels, self.features, self.log2_table, self.base_res, self.max_res)


class HashGrid(nn.Module):
    """Trainable multiresolution hash-grid encoding of points in [0, 1]^3.

    Args:
        levels: number of levels L.  features: features per level F.
        log2_table: table size per level is 2**log2_table rows (dense levels use fewer).
        base_res, max_res: grid points a side of the coarsest and finest levels.
    ``forward(x)``: x (N, 3) float32 in [0, 1]^3 -> (N, L*F) float32.
    """

    def __init__(self, levels: int = 16, features: int = 2, log2_table: int = 19,
                 base_res: int = 16, max_res: int = 2048, init_scale: float = 1e-4):
        super().__init__()
        resolutions, offsets, dense = level_layout(levels, log2_table, base_res, max_res)
        self.register_buffer("resolutions", resolutions, persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("dense", dense, persistent=False)
        self.n_dense = int(dense.sum())
        self.table = nn.Parameter(torch.empty(int(offsets[-1]), features).uniform_(-init_scale, init_scale))
        self.levels, self.features = levels, features
        self.bounds = tuple(int(v) for v in offsets)      # each level's rows, as numbers (no device reads)

    def level_mean_square(self) -> torch.Tensor:
        """The sum over levels of each level's mean squared feature (mip-NeRF 360 / Zip-NeRF's weight
        decay normalised by level): a penalty that lets features no ray needs fade to zero."""
        rows = zip(self.bounds[:-1], self.bounds[1:])
        return torch.stack([self.table[a:b].square().mean() for a, b in rows]).sum()

    @property
    def out_dim(self) -> int:
        return self.levels * self.features

    @property
    def level_width(self) -> int:
        """Features per level (the encodings' common interface, fields/encodings.py)."""
        return self.features

    def detail(self, level: int) -> float:
        """The cell size of ``level`` (0-based) in units of [0, 1]."""
        return 1.0 / (int(self.resolutions[level]) - 1)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The table trains with the grid's optimiser treatment; there is no MLP here."""
        return {"grid": [self.table], "mlp": []}

    #: Use the fused Triton kernels on CUDA tensors (set False to force the PyTorch path).
    use_triton: bool = True
    #: Points' gradients through half-cosine weights (module doc; set while cameras are refined).
    smooth_grad: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton and x.is_cuda and self.features <= 2:
            from fit_implicit.backend.fields import hashgrid_triton
            if hashgrid_triton.AVAILABLE:     # the points' gradient too, where they need one
                return hashgrid_triton.hashgrid_encode_triton(x, self.table, self.resolutions,
                                                              self.offsets, self.dense, self.smooth_grad)
        return hashgrid_encode(x, self.table, self.resolutions, self.offsets, self.dense, self.n_dense,
                               self.smooth_grad)
