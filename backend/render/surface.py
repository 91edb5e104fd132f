"""Volume rendering of surface fields (NeuS SDFs, UNISURF occupancies): pure functions, shapes
documented, the field passed in as callbacks.

Samples are packed: those of each ray contiguous and in order of distance, with ``ray`` (M,)
the ray id of each and ``counts`` (R,) the samples per ray.  A field turns its samples into
optical depths ``tau_i`` (opacity ``alpha_i = 1 - exp(-tau_i)``), composited as usual:
``w_i = T_i * alpha_i`` with ``T_i = exp(-sum_{j<i} tau_j)``.

* NeuS (Wang et al. 2021): ``alpha_i = max(0, 1 - Phi(s * f_next) / Phi(s * f_prev))``, Phi the
  logistic sigmoid and ``f_prev, f_next`` the SDF extrapolated half a step either side of the
  sample along the ray; here as ``tau_i = max(0, logsig(s f_prev) - logsig(s f_next))``, which
  is the same and stays finite deep inside.
* UNISURF (Oechsle et al. 2021): ``alpha_i = p_i``, the occupancy probability, i.e.
  ``tau_i = softplus(logit_i)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fit_implicit.backend.render import volume as render
from fit_implicit.backend.render.volume import composite_packed, ray_aabb, sample_grid

SampleFn = Callable[[torch.Tensor, torch.Tensor], dict]
OccupiedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Samples:
    """Packed samples: t (M,) float32 distances, x (M, 3) float32 positions, ray (M,) int64 ray
    ids (non-decreasing), counts (R,) int64 samples per ray."""

    t: torch.Tensor
    x: torch.Tensor
    ray: torch.Tensor
    counts: torch.Tensor

    def select(self, keep: torch.Tensor) -> "Samples":
        """The samples where ``keep`` (M,) bool, order kept."""
        ray = self.ray[keep]
        counts = torch.bincount(ray, minlength=self.counts.shape[0])
        return Samples(self.t[keep], self.x[keep], ray, counts)


@dataclass
class SurfaceOutput:
    """Per-ray results (R rays): rgb (R, 3) premultiplied sRGB, opacity (R,), depth (R,)
    (expected distance, not divided by opacity), normal (R, 3), albedo (R, 3) and roughness
    (R, 1) weighted sums where the field gave them (else None); ``samples`` the number of samples
    shaded; ``extras`` per-sample tensors the field returned for losses (e.g. "grad" (M, 3),
    "laplacian" (M,))."""

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    normal: torch.Tensor | None = None
    albedo: torch.Tensor | None = None
    samples: int = 0
    extras: dict = field(default_factory=dict)
    roughness: torch.Tensor | None = None


def neus_optical_depth(sdf: torch.Tensor, cos: torch.Tensor, delta: float, inv_s: torch.Tensor,
                       cos_anneal: float = 1.0) -> torch.Tensor:
    """NeuS's discrete opacity of one segment, as an optical depth.

    Args:
        sdf: (M,) float32 signed distance at the sample (positive outside).
        cos: (M,) float32 dot(ray direction, SDF gradient).
        delta: segment length (same units as sdf).  inv_s: 0-d sharpness (per unit length).
        cos_anneal: 0 -> NeuS's relaxed slope (half the true one, never positive), 1 -> true slope.
    Returns:
        tau (M,) float32 >= 0.
    """
    slope = -(F.relu(-cos * 0.5 + 0.5) * (1.0 - cos_anneal) + F.relu(-cos) * cos_anneal)
    prev = sdf - slope * (0.5 * delta)
    nxt = sdf + slope * (0.5 * delta)
    return F.relu(F.logsigmoid(prev * inv_s) - F.logsigmoid(nxt * inv_s))


def occupancy_optical_depth(logit: torch.Tensor) -> torch.Tensor:
    """UNISURF: a sample's opacity is its occupancy probability.  (M,) -> (M,) tau >= 0."""
    return F.softplus(logit)


def march(origins: torch.Tensor, dirs: torch.Tensor, aabb: torch.Tensor, step: float, max_steps: int,
          occupied_fn: OccupiedFn, jitter: torch.Tensor | None = None) -> Samples:
    """Samples at a uniform ``step`` from where each ray enters ``aabb``, kept in occupied cells.

    Args:
        origins, dirs: (R, 3) float32 (dirs unit).  aabb: (2, 3) float32.
        occupied_fn: (..., 3) -> (...,) bool (an OccupancyGrid's ``occupied``; on CUDA its bits
            are marched by the packed Triton kernel of :mod:`backend.render.volume`).
        jitter: (R, 1) float32 in [0, 1), or None for sample centres (0.5).
    """
    r = origins.shape[0]
    t_near, t_far, hit = ray_aabb(origins, dirs, aabb)
    t_far = torch.where(hit, t_far, t_near)
    span = float((t_far - t_near).max()) if r else 0.0
    empty = Samples(origins.new_zeros(0), origins.new_zeros(0, 3), torch.zeros(0, dtype=torch.long,
                    device=origins.device), torch.zeros(r, dtype=torch.long, device=origins.device))
    if r == 0 or span <= 0.0:
        return empty
    count = min(max_steps, int(span / step) + 1)
    offset = jitter if jitter is not None else origins.new_full((r, 1), 0.5)
    bits = render._march_bits(occupied_fn) if render.triton is not None and origins.is_cuda else None
    if bits is not None:
        t, x, ray, counts = render.march_packed(origins, dirs, t_near, t_far, offset, step, count, *bits)
        return Samples(t, x, ray, counts)
    t = sample_grid(t_near, step, 0, count, offset)                              # (R, K)
    x = origins[:, None, :] + t[..., None] * dirs[:, None, :]                     # (R, K, 3)
    mask = (t < t_far[:, None]) & occupied_fn(x)
    ray = mask.nonzero()[:, 0]
    return Samples(t[mask], x[mask], ray, mask.sum(1))


def keep_until(samples: Samples, stop: torch.Tensor) -> Samples:
    """Drop every sample of a ray after its first ``stop`` (M,) bool sample (that one is kept)."""
    if samples.t.shape[0] == 0:
        return samples
    s = stop.long()
    before = s.cumsum(0) - s                                                       # exclusive
    starts = (samples.counts.cumsum(0) - samples.counts).clamp(max=s.shape[0] - 1)
    before = before - before[starts][samples.ray]
    return samples.select(before == 0)


def accumulate(weights: torch.Tensor, ray: torch.Tensor, values: torch.Tensor, rays: int) -> torch.Tensor:
    """Per-ray weighted sums: weights (M,), ray (M,), values (M, C) -> (rays, C)."""
    out = values.new_zeros(rays, values.shape[1])
    return out.index_add(0, ray, weights[:, None] * values)


def render_surface(sample_fn: SampleFn, occupied_fn: OccupiedFn, origins: torch.Tensor, dirs: torch.Tensor,
                   aabb: torch.Tensor, step: float, max_steps: int, jitter: torch.Tensor | None = None,
                   stop_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   times: torch.Tensor | None = None) -> SurfaceOutput:
    """Render rays through a surface field.

    Args:
        sample_fn: ``(x (M, 3), d (M, 3)) -> dict`` with "tau" (M,) optical depth and "rgb"
            (M, 3) sRGB; optional "normal" (M, 3), "albedo" (M, 3) and "roughness" (M, 1) are
            composited too (roughness with the weights detached); any
            other entries are handed back in ``extras``.
        occupied_fn: see :func:`march`.  origins, dirs: (R, 3) float32.  aabb: (2, 3) float32.
        step, max_steps, jitter: see :func:`march`.
        stop_fn: ``x (M, 3) -> (M,) bool``, evaluated without gradients before shading: True
            where a ray reaching the sample is surely opaque, so that later samples are dropped.
        times: (R,) float32 time of each ray, or None; given, ``sample_fn`` and ``stop_fn`` take
            the samples' times (M,) as their last argument (a dynamic field).
    """
    r = origins.shape[0]
    s = march(origins, dirs, aabb, step, max_steps, occupied_fn, jitter)
    if stop_fn is not None and s.t.shape[0]:
        with torch.no_grad():
            s = keep_until(s, stop_fn(s.x, *(() if times is None else (times[s.ray],))))
    zeros3 = origins.new_zeros(r, 3)
    if s.t.shape[0] == 0:
        return SurfaceOutput(zeros3, origins.new_zeros(r), origins.new_zeros(r), samples=0)
    out = dict(sample_fn(s.x, dirs.index_select(0, s.ray), *(() if times is None else (times[s.ray],))))
    w = composite_packed(out.pop("tau"), 1.0, s.ray, s.counts)
    rgb = accumulate(w, s.ray, out.pop("rgb"), r)
    opacity = origins.new_zeros(r).index_add(0, s.ray, w)
    depth = origins.new_zeros(r).index_add(0, s.ray, w * s.t)
    normal = accumulate(w, s.ray, out.pop("normal"), r) if "normal" in out else None
    albedo = accumulate(w, s.ray, out.pop("albedo"), r) if "albedo" in out else None
    # roughness is composited with detached weights: its supervision trains the roughness head
    # only, never the geometry (a material property must not reshape the surface)
    roughness = accumulate(w.detach(), s.ray, out.pop("roughness"), r) if "roughness" in out else None
    out["weights"], out["ray"] = w, s.ray
    return SurfaceOutput(rgb, opacity, depth, normal, albedo, int(s.t.shape[0]), out, roughness)
