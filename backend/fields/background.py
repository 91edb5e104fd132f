"""The background model: what lies outside the scene box, for photos whose background is not
transparent (a wall, a room, the sky).  Without it rays that leave the box are empty, so the
field paints the background onto the box's walls and the object's mesh is buried in it.

As NeRF++ splits a scene into an inner sphere and an inverted-sphere outside, and mip-NeRF 360
contracts unbounded space, the background is a second radiance field (a smaller hash grid and
MLPs: :class:`~fit_implicit.backend.fields.nerf.NerfField`) over CONTRACTED space: in the trainer's
normalised frame (the box inside [-1, 1]^3) a point x with m = max|x_i| > 1 maps to
(2 - 1/m) x / m, so all of space fits in [-2, 2]^3 and distant things get coarser cells.

Each ray is sampled only beyond the box, from where it leaves it (rays that miss the box: from
their point nearest the box's centre), at t = t_start + u / (1 - u) normalised units for u
spread evenly over [0, 1) (even in inverse distance, as NeRF++), and composited BEHIND the
foreground: rgb = rgb_fg + (1 - opacity_fg) * rgb_bg.  Segment lengths are taken in contracted
space (the whole way to infinity is one unit or so there); the last sample reaches infinity,
so an opaque background (the sky) is one sample's business.  The foreground box is all that is
meshed; the background can be rendered as an environment image (:meth:`environment`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fit_implicit.backend.fields.hashgrid import HashGridConfig
from fit_implicit.backend.fields.nerf import NerfField, NerfFieldConfig
from fit_implicit.backend.render.volume import composite, ray_aabb
from fit_implicit.shared.methods import BACKGROUND_MODES

DEPTH_CAP = 100.0          # normalised units: the depth a background sample at infinity counts as
OPAQUE_ALPHA = 250         # photos whose every pixel has at least this alpha (of 255) have no alpha


@dataclass
class BackgroundConfig:
    """Whether a fit models the background, and how finely."""

    background: str = "auto"        # auto | on | off; auto: on for photos without alpha or with cameras in the box
    background_samples: int = 32    # samples a ray beyond the box (training and rendering)
    background_log2_table: int = 17  # rows per level of the background's hash grid: 2**this

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.background not in BACKGROUND_MODES:
            raise ValueError(f"background {self.background!r} is not one of {', '.join(BACKGROUND_MODES)}")
        if not 1 <= int(self.background_samples) <= 256:
            raise ValueError(f"background_samples must be in [1, 256], got {self.background_samples}")
        if not 10 <= int(self.background_log2_table) <= 24:
            raise ValueError(f"background_log2_table must be in [10, 24], got {self.background_log2_table}")

    def build(self) -> "BackgroundField":
        grid = HashGridConfig(levels=12, features=2, log2_table=int(self.background_log2_table),
                              base_res=16, max_res=1024)
        return BackgroundField(NerfFieldConfig(grid=grid, hidden=64, geo_features=15, color_layers=1),
                               int(self.background_samples))


def contract(x: torch.Tensor) -> torch.Tensor:
    """(..., 3) normalised points -> (..., 3) in [-2, 2]^3: unchanged inside [-1, 1]^3, else
    (2 - 1/m) x / m with m the largest |coordinate| (mip-NeRF 360's contraction, max-norm)."""
    m = x.abs().amax(-1, keepdim=True).clamp_min(1e-9)
    return torch.where(m <= 1.0, x, (2.0 - 1.0 / m) * x / m)


def start_distances(origins: torch.Tensor, dirs: torch.Tensor, t_far: torch.Tensor, hit: torch.Tensor
                    ) -> torch.Tensor:
    """(R,) where each ray's background begins: where it leaves the box, or for rays that miss
    it, its point nearest the box's centre (the origin of the normalised frame), never behind
    the camera."""
    nearest = (-(origins * dirs).sum(-1) / (dirs * dirs).sum(-1).clamp_min(1e-12)).clamp_min(0.0)
    return torch.where(hit, t_far.clamp_min(0.0), nearest)


class BackgroundField(nn.Module):
    """A radiance field over contracted space and its renderer behind the box.

    ``render(origins, dirs, t_start, jitter)`` -> (rgb (R, 3) premultiplied, opacity (R,),
    depth (R,) normalised units, samples); origins (R, 3) normalised, dirs (R, 3) unit.
    """

    def __init__(self, cfg: NerfFieldConfig, samples: int = 32):
        super().__init__()
        self.field = NerfField(cfg)
        self.samples = int(samples)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return self.field.param_groups()

    def render(self, origins: torch.Tensor, dirs: torch.Tensor, t_start: torch.Tensor,
               jitter: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        r, n = origins.shape[0], self.samples
        k = torch.arange(n, device=origins.device, dtype=origins.dtype)
        offset = torch.full((r, n), 0.5, device=origins.device) if jitter is None else jitter.expand(r, n)
        u = (k[None, :] + offset) / n                                          # (R, N) in (0, 1)
        t = t_start[:, None] + u / (1.0 - u).clamp_min(1e-6)
        x = origins[:, None, :] + t[..., None] * dirs[:, None, :]             # (R, N, 3)
        c = contract(x)
        limit = 2.0 * dirs / dirs.abs().amax(-1, keepdim=True).clamp_min(1e-9)   # contract(x) as t -> inf
        ends = torch.cat([c[:, 1:], limit[:, None, :]], dim=1)
        deltas = (ends - c).norm(dim=-1)                                       # (R, N) contracted lengths
        sigma, rgb = self.field(0.5 * c.reshape(-1, 3), dirs[:, None, :].expand(r, n, 3).reshape(-1, 3))
        w, _ = composite(sigma.reshape(r, n), deltas)                          # (R, N)
        out_rgb = (w[..., None] * rgb.reshape(r, n, 3)).sum(1)
        depth = (w * t.clamp_max(DEPTH_CAP)).sum(1)
        return out_rgb, w.sum(1), depth, r * n

    @torch.no_grad()
    def environment(self, height: int, box: torch.Tensor) -> torch.Tensor:
        """An equirectangular image of the background seen from the box's centre: (height,
        2 height, 3) float32 sRGB, composited on black where the background is not opaque, top
        row first.  Columns follow Blender's World mapping (an Environment Texture node):
        azimuth atan2(y, x) = pi - 2 pi u, so the left edge looks down -X, a quarter across +Y,
        the middle +X; ``box`` (2, 3) normalised."""
        h, w = int(height), 2 * int(height)
        dev = box.device
        lat = (0.5 - (torch.arange(h, device=dev) + 0.5) / h) * math.pi          # +pi/2 at the top row
        azimuth = math.pi - 2.0 * math.pi * (torch.arange(w, device=dev) + 0.5) / w
        lat, azimuth = torch.meshgrid(lat, azimuth, indexing="ij")
        dirs = torch.stack([torch.cos(lat) * torch.cos(azimuth), torch.cos(lat) * torch.sin(azimuth),
                            torch.sin(lat)], dim=-1).reshape(-1, 3)
        centre = 0.5 * (box[0] + box[1])
        out = []
        for d in dirs.split(1 << 14):
            o = centre.expand(d.shape[0], 3)
            _, t_far, hit = ray_aabb(o, d, box)
            out.append(self.render(o, d, start_distances(o, d, t_far, hit))[0])
        return torch.cat(out).clamp(0.0, 1.0).reshape(h, w, 3)
