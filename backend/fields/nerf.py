"""Radiance field: hash grid -> density MLP (+ geometry features) -> colour MLP with view direction.

Works in the trainer's NORMALISED frame: positions in [-1, 1]^3 (the scene box scaled to fit),
densities per unit of normalised length.  Directions are unit vectors (normalising by a uniform
scale and a shift leaves them unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .hashgrid import HashGrid


class _TruncExp(torch.autograd.Function):
    """exp(x) with the gradient's exponent clamped at 15, so one large step cannot blow up."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    return _TruncExp.apply(x)


def sh_encode(d: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics up to degree 4 (16 values) of unit directions.

    Args:
        d: (N, 3) float32 unit vectors.
    Returns:
        (N, 16) float32, in the order and normalisation of tiny-cuda-nn's SphericalHarmonics.
    """
    x, y, z = d.unbind(-1)
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y,
        0.48860251190291987 * z,
        -0.48860251190291987 * x,
        1.0925484305920792 * xy,
        -1.0925484305920792 * yz,
        0.94617469575755997 * zz - 0.31539156525251999,
        -1.0925484305920792 * xz,
        0.54627421529603959 * (xx - yy),
        0.59004358992664352 * y * (-3.0 * xx + yy),
        2.8906114426405538 * xy * z,
        0.45704579946446572 * y * (1.0 - 5.0 * zz),
        0.3731763325901154 * z * (5.0 * zz - 3.0),
        0.45704579946446572 * x * (1.0 - 5.0 * zz),
        1.4453057213202769 * z * (xx - yy),
        0.59004358992664352 * x * (-xx + 3.0 * yy),
    ], dim=-1)


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class NerfFieldConfig:
    levels: int = 16            # hash grid levels L
    features: int = 2           # features per level F
    log2_table: int = 19        # rows per level: 2**log2_table
    base_res: int = 16          # coarsest grid, points a side (over the [-1, 1]^3 cube)
    max_res: int = 2048         # finest grid
    hidden: int = 64            # MLP width
    geo_features: int = 15      # features passed from the density MLP to the colour MLP
    color_layers: int = 2       # hidden layers of the colour MLP
    density_bias: float = -1.0  # added before trunc_exp: initial density exp(-1) per unit length


class NerfField(nn.Module):
    """``forward(x, d) -> (sigma (N,), rgb (N, 3))`` and ``density(x) -> sigma (N,)``.

    x: (N, 3) float32 normalised positions in [-1, 1]^3; d: (N, 3) float32 unit directions;
    sigma: float32 >= 0 per unit of normalised length; rgb: float32 sRGB in [0, 1].
    """

    def __init__(self, cfg: NerfFieldConfig = NerfFieldConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoding = HashGrid(cfg.levels, cfg.features, cfg.log2_table, cfg.base_res, cfg.max_res)
        self.density_net = mlp([self.encoding.out_dim, cfg.hidden, 1 + cfg.geo_features])
        self.color_net = mlp([cfg.geo_features + 16] + [cfg.hidden] * cfg.color_layers + [3])

    def _geometry(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.density_net(self.encoding((x + 1.0) * 0.5))
        return trunc_exp(h[:, 0] + self.cfg.density_bias), h[:, 1:]

    def density(self, x: torch.Tensor) -> torch.Tensor:
        return self._geometry(x)[0]

    def forward(self, x: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, geo = self._geometry(x)
        rgb = torch.sigmoid(self.color_net(torch.cat([geo, sh_encode(d)], dim=-1)))
        return sigma, rgb

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split by optimiser treatment: hash tables vs. MLP weights."""
        return {"grid": [self.encoding.table],
                "mlp": list(self.density_net.parameters()) + list(self.color_net.parameters())}
