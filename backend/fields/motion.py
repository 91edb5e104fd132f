"""Fields over time: a deformation field that carries each point at each time into one canonical
field (D-NeRF's split of a moving scene into motion and a still shape), with the motion stored in
space-time planes (the factorisation of K-Planes / HexPlane) and decoded by a small MLP.

``warp(x, t) = x + D(x, t)``: positions (N, 3) normalised, times (N,) in [0, 1].  ``D`` reads six
feature planes at each of ``motion_scales`` resolutions: the three spatial ones (xy, xz, yz) and
three that pair an axis with time (xt, yt, zt).  Per scale the six bilinear lookups are multiplied
feature by feature (the time planes start at 1, so the product starts as a still scene's), the
scales are concatenated and an MLP whose last layer starts at zero turns them into the
displacement: a fit starts still and learns the motion.  The canonical field is any field of the
project (the radiance field or a surface field, on any encoding): the field calls ``warp`` before
its encoding, so the canonical field keeps its full detail while the motion stays smooth (its
planes are coarse), and a surface field's normals and eikonal term see the deformed space (its
finite differences are taken in the scene's frame at each time).

Regularisers (:meth:`Deformation.penalty`): K-Planes' temporal smoothness (the time planes' second
differences along time) and total variation of every plane, and a small penalty on the
displacement itself so that the canonical shape stays near the scene's mean pose; all off by
default (each slows the start of the motion: MotionConfig says what was measured).

Which fits are dynamic: ``dynamic = auto`` (on where the photos carry more than one distinct
``time``), ``on`` or ``off``.  ``time`` is D-NeRF's per-frame key in transforms.json, in [0, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fit_implicit.backend.fields import planes_triton
from fit_implicit.backend.fields.layers import mlp

DYNAMIC_MODES = ("auto", "on", "off")
# Plane pairs: three spatial, then each axis with time (index 3).
PAIRS = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))
MAX_TIME_RESOLUTION = 256


@dataclass
class MotionConfig:
    """Settings of the deformation field (module doc); used only where a fit is dynamic."""

    dynamic: str = "auto"               # auto | on | off: auto = on where the photos carry several times
    motion_resolution: int = 64         # spatial cells a side of the motion's finest planes
    motion_scales: int = 2              # plane resolutions: motion_resolution / 2^k, k < motion_scales
    motion_time_resolution: int = 0     # cells along time; 0 = auto: the distinct times, at most 16 or a quarter of them (<= 64)
    motion_features: int = 16           # features a plane
    motion_hidden: int = 64             # width of the MLP that decodes the displacement
    motion_lr: float = 1e-2             # Adam learning rate of the planes (the MLP trains at mlp_lr)
    # Coarse to fine (Nerfies' windowed encoding of the deformation, BARF's for positions): the finer
    # scales' features fade in (half-cosine) over this share of the fit; 0 = every scale from the start.
    motion_anneal_share: float = 0.0
    # The occupancy grid's updates read each cell at this many random instants and keep the
    # largest (a cell a fast part fills only now and then stays marched).  H100, the animated scene,
    # 20,000 graph steps: 1: 20.90 dB held out, 4: 19.76 (docs/benchmarks.md): 1 stays.
    motion_occupancy_times: int = 1
    # Regularisers.  The mean square displacement at random points of the box at random instants
    # (motion_weight) is on: without it the deformation drifts where no photo constrains it (Adam
    # steps of lr size on near-zero gradients) until it carries samples out of the box, where the
    # canonical field reads its border and passes no gradient back.  H100, the animated scene,
    # 20,000 graph steps without it: mean displacement 15 normalised units (the box is 2 wide), 48 % of
    # the occupied cells' samples out of the box, training batches 27.4 dB at step 2,000 falling
    # to 23.6 dB at 9,300, held out 20.90 dB.  At 6,000 steps (held out / training batches / mean
    # displacement / out of box): off 23.39 / 29.2 / 0.64 / 9.4 %; 1e-4 24.25 / 31.0 / 0.19 / 4.9 %;
    # motion_max_displacement 0.5 instead 24.12 / 30.5 / 0.14 / 1.9 %; both 23.96 / 30.3.
    # The others stay off: each slows the start of the motion (two moving spheres, 150 draft steps,
    # time-dependence of the displacement and training MSE: none 0.21 / 0.0045; smoothness 1e-3 +
    # TV 1e-4: 0.06 / 0.0062; displacement 1e-3: 0.08 / 0.0060; all three: 0.0000 / 0.0078).
    motion_smooth_weight: float = 0.0   # temporal smoothness of the time planes (second differences)
    motion_tv_weight: float = 0.0       # total variation of every plane
    motion_weight: float = 1e-4         # mean square displacement (normalised units)
    # The displacement's size, at most (normalised units, the box is [-1, 1]; 0 = unbounded):
    # D = m tanh(raw / m).  Off: it would also forbid true motions larger than m.
    motion_max_displacement: float = 0.0

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.dynamic not in DYNAMIC_MODES:
            raise ValueError(f"dynamic {self.dynamic!r} is not one of {', '.join(DYNAMIC_MODES)}")
        if not 2 <= int(self.motion_resolution) <= 1024:
            raise ValueError(f"motion_resolution must be in [2, 1024], got {self.motion_resolution}")
        if not 1 <= int(self.motion_scales) <= 6 or int(self.motion_resolution) >> (int(self.motion_scales) - 1) < 2:
            raise ValueError(f"motion_scales must be in [1, 6] and leave at least 2 cells on the coarsest "
                             f"planes (motion_resolution {self.motion_resolution}), got {self.motion_scales}")
        if not 0 <= int(self.motion_time_resolution) <= MAX_TIME_RESOLUTION or int(self.motion_time_resolution) == 1:
            raise ValueError(f"motion_time_resolution must be 0 (auto) or in [2, {MAX_TIME_RESOLUTION}], "
                             f"got {self.motion_time_resolution}")
        for name in ("motion_features", "motion_hidden", "motion_occupancy_times"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= float(self.motion_anneal_share) <= 1.0:
            raise ValueError(f"motion_anneal_share must be in [0, 1], got {self.motion_anneal_share}")
        for name in ("motion_lr", "motion_smooth_weight", "motion_tv_weight", "motion_weight", "motion_max_displacement"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")

    def time_cells(self, times) -> int:
        """The time planes' resolution for photos at ``times`` (the setting, or auto)."""
        if int(self.motion_time_resolution):
            return int(self.motion_time_resolution)
        distinct = len({round(float(t), 6) for t in times})
        return max(2, min(distinct, max(16, distinct // 4), 64))


def is_dynamic(times, cfg: MotionConfig) -> bool:
    """Whether a fit of photos at ``times`` ((N,) in [0, 1], or None: no times) is dynamic."""
    if cfg.dynamic == "on":
        if times is None:
            raise ValueError("dynamic=on needs a time for every photo (the 'time' key of each frame in "
                             "transforms.json, in [0, 1])")
        return True
    if cfg.dynamic == "off" or times is None:
        return False
    return len({round(float(t), 6) for t in times}) > 1


def plane_features_reference(xt: torch.Tensor, planes: list) -> torch.Tensor:
    """(N, C * S) features of points and times xt (N, 4) in [-1, 1] from the 6 * S planes ((1, C, H, W)
    each, PAIRS order a scale): per scale, the product of the six planes' bilinear lookups (plain
    PyTorch; the reference of fields/planes_triton.py)."""
    out = []
    for s in range(0, len(planes), len(PAIRS)):
        prod = None
        for k, (a, b) in enumerate(PAIRS):
            uv = xt[:, (a, b)].view(1, -1, 1, 2)
            f = F.grid_sample(planes[s + k], uv, mode="bilinear", padding_mode="border", align_corners=True)
            f = f[0, :, :, 0].t()                           # (N, C)
            prod = f if prod is None else prod * f
        out.append(prod)
    return torch.cat(out, dim=1)


class Deformation(nn.Module):
    """``forward(x, t) -> x + D(x, t)`` (module doc).  ``time``: the time used where ``t`` is None
    (a render, a mesh or a texture of one instant: FittedField.time)."""

    def __init__(self, cfg: MotionConfig, time_resolution: int):
        super().__init__()
        self.cfg = cfg
        self.time = 0.0
        c, planes = int(cfg.motion_features), []
        self.resolutions = [max(2, int(cfg.motion_resolution) >> k) for k in reversed(range(int(cfg.motion_scales)))]
        for res in self.resolutions:
            for _, b in PAIRS:
                # grid_sample reads (1, C, H, W) at (u, v): u along W (the pair's first axis), v along H
                h = int(time_resolution) if b == 3 else res
                planes.append(nn.Parameter(torch.ones(1, c, h, res) if b == 3 else
                                           torch.empty(1, c, h, res).uniform_(0.1, 0.5)))
        self.planes = nn.ParameterList(planes)
        self.decoder = mlp([c * len(self.resolutions), int(cfg.motion_hidden), 3])
        self.layout: torch.Tensor | None = None      # the fused lookup's plane layout, made on first use
        # each scale's weight while the finer ones fade in (updated in place: a captured step reads it)
        self.register_buffer("scale_weights", torch.ones(len(self.resolutions)), persistent=False)
        with torch.no_grad():
            self.decoder[-1].weight.zero_()
            self.decoder[-1].bias.zero_()

    #: Use the fused Triton lookup on CUDA tensors (set False to force the PyTorch path).
    use_triton: bool = True

    @property
    def time_resolution(self) -> int:
        return int(self.planes[3].shape[2])

    def times_for(self, x: torch.Tensor, t: torch.Tensor | float | None) -> torch.Tensor:
        """(N,) times of the points x (N, 3): ``t`` (N,) as given, a number for all, or ``self.time``."""
        if t is None:
            t = self.time
        if not torch.is_tensor(t):
            return x.new_full((x.shape[0],), float(t))
        if t.shape != x.shape[:1]:
            raise ValueError(f"times must be one per point: {tuple(t.shape)} for {x.shape[0]} points")
        return t.to(x.dtype)

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(N, C * scales) features of points x (N, 3) in [-1, 1] at times t (N,) in [0, 1]: per
        scale, the product of its six planes' bilinear lookups (one fused kernel on CUDA,
        fields/planes_triton.py)."""
        xt = torch.cat([x, (2.0 * t - 1.0)[:, None]], dim=1).clamp(-1.0, 1.0)
        channels = int(self.planes[0].shape[1])
        if self.use_triton and planes_triton.usable(xt, channels):
            if self.layout is None or self.layout.device != xt.device:
                self.layout = planes_triton.layout_of(self.planes)
            out = planes_triton.plane_features_triton(xt, list(self.planes), self.layout)
        else:
            out = plane_features_reference(xt, list(self.planes))
        if self.cfg.motion_anneal_share > 0:
            out = out * self.scale_weights.repeat_interleave(channels)
        return out

    def fade(self, fraction: float) -> None:
        """The scales' weights at ``fraction`` of the fit (coarse to fine, MotionConfig): the
        coarsest always 1, each finer one easing from 0 to 1 after the one before it."""
        share = float(self.cfg.motion_anneal_share)
        if share <= 0:
            return
        finer = len(self.resolutions) - 1
        alpha = finer * min(fraction / share, 1.0)
        with torch.no_grad():
            for k in range(1, finer + 1):
                ramp = min(max(alpha - (k - 1), 0.0), 1.0)
                self.scale_weights[k].fill_(0.5 * (1.0 - math.cos(math.pi * ramp)))

    def displacement(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """D(x, t) (N, 3), normalised units (at most ``motion_max_displacement`` a component where set)."""
        d = self.decoder(self.features(x, self.times_for(x, t)))
        bound = float(self.cfg.motion_max_displacement)
        return bound * torch.tanh(d / bound) if bound > 0 else d

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        if x.shape[0] == 0:
            return x
        return x + self.displacement(x, t)

    def penalty(self, x: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
        """The regularisers (module doc), weighted: temporal smoothness and total variation of the
        planes, and the mean square displacement at the points x (N, 3) at times t (N,) if given."""
        cfg, total = self.cfg, self.planes[0].new_zeros(())
        for k, plane in enumerate(self.planes):
            p = plane[0]                                        # (C, H, W); H is time on the time planes
            if cfg.motion_tv_weight:
                tv = (p[:, 1:] - p[:, :-1]).pow(2).mean() + (p[:, :, 1:] - p[:, :, :-1]).pow(2).mean()
                total = total + cfg.motion_tv_weight * tv
            if PAIRS[k % len(PAIRS)][1] == 3 and cfg.motion_smooth_weight and p.shape[1] > 2:
                total = total + cfg.motion_smooth_weight * (p[:, 2:] - 2.0 * p[:, 1:-1] + p[:, :-2]).pow(2).mean()
        if cfg.motion_weight and x is not None and x.shape[0]:
            total = total + cfg.motion_weight * self.displacement(x, t).pow(2).sum(-1).mean()
        return total

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """The planes (trained at ``motion_lr``) and the decoder (with the MLPs)."""
        return {"planes": list(self.planes), "mlp": list(self.decoder.parameters())}


def add_motion_groups(groups: dict[str, list], deformation: Deformation | None) -> dict[str, list]:
    """A field's parameter groups with its deformation's: the planes as their own group
    ("motion", trained at ``motion_lr``), the decoder with the MLPs."""
    if deformation is None:
        return groups
    parts = deformation.param_groups()
    return {**groups, "mlp": [*groups["mlp"], *parts["mlp"]], "motion": parts["planes"]}


__all__ = ["MotionConfig", "Deformation", "is_dynamic", "add_motion_groups", "plane_features_reference",
           "DYNAMIC_MODES"]
