"""Radiance field: encoding (hash grid by default) -> density MLP (+ geometry features) -> colour MLP with view direction.

Works in the trainer's NORMALISED frame: positions in [-1, 1]^3 (the scene box scaled to fit),
densities per unit of normalised length.  Directions are unit vectors (normalising by a uniform
scale and a shift leaves them unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fit_implicit.backend.fields.layers import FieldConfig, mlp, sh_encode
from fit_implicit.backend.fields.motion import Deformation, add_motion_groups


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


@dataclass
class NerfFieldConfig(FieldConfig):
    """A radiance field's settings: :class:`FieldConfig` and the density's starting point."""

    density_bias: float = -1.0  # added before trunc_exp: initial density exp(-1) per unit length


class NerfField(nn.Module):
    """``forward(x, d, t) -> (sigma (N,), rgb (N, 3))`` and ``density(x, t) -> sigma (N,)``.

    x: (N, 3) float32 normalised positions in [-1, 1]^3; d: (N, 3) float32 unit directions;
    t: (N,) times in [0, 1] of a dynamic field (``deformation``; fields/motion.py), or None: its
    current ``time`` (a still field ignores t); sigma: float32 >= 0 per unit of normalised length;
    rgb: float32 sRGB in [0, 1].
    """

    kind = "nerf"
    warm_parts = ("density_net", "color_net")     # what a warm start holds (fields/warm_start.py)

    def __init__(self, cfg: NerfFieldConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or NerfFieldConfig()
        self.encoding = cfg.build_encoding()
        self.density_net = mlp([self.encoding.out_dim, cfg.hidden, 1 + cfg.geo_features])
        self.color_net = mlp([cfg.geo_features + 16] + [cfg.hidden] * cfg.color_layers + [3])
        self.level_weights: torch.Tensor | None = None      # (L*F,) while levels fade in; None = all in
        self.deformation: Deformation | None = None         # a dynamic fit's motion (fields/motion.py)

    def set_level_weights(self, weights: torch.Tensor | None) -> None:
        """Scale each encoding level's features ((L,) weights in [0, 1], coarse first), or None:
        every level in full.  Camera refinement fades the levels in (fitting/camera_refine.py)."""
        if weights is None or bool((weights >= 1.0).all()):
            self.level_weights = None
            return
        device = self.density_net[0].weight.device
        self.level_weights = weights.to(device).repeat_interleave(self.encoding.level_width)

    def _geometry(self, x: torch.Tensor, t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.deformation is not None:
            x = self.deformation(x, t)
        enc = self.encoding((x + 1.0) * 0.5)
        if self.level_weights is not None:
            enc = enc * self.level_weights
        h = self.density_net(enc)
        return trunc_exp(h[:, 0] + self.cfg.density_bias), h[:, 1:]

    def density(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self._geometry(x, t)[0]

    def geometry(self, x: torch.Tensor, t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigma (N,), features (N, geo_features))``: the first half of :meth:`forward`."""
        return self._geometry(x, t)

    def color(self, geo: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """rgb (N, 3) from :meth:`geometry`'s features and directions: the second half."""
        return torch.sigmoid(self.color_net(torch.cat([geo, sh_encode(d)], dim=-1)))

    def forward(self, x: torch.Tensor, d: torch.Tensor, t: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        sigma, geo = self._geometry(x, t)
        return sigma, self.color(geo, d)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters split by optimiser treatment: hash tables vs. MLP weights."""
        enc = self.encoding.param_groups()
        groups = {"grid": enc["grid"],
                  "mlp": enc["mlp"] + list(self.density_net.parameters()) + list(self.color_net.parameters())}
        return add_motion_groups(groups, self.deformation)
