"""Sampling and volume rendering: pure functions of tensors, shapes documented.

The radiance field and the occupancy test come in as callbacks, so nothing here knows a model:

* ``field_fn(x (M, 3), d (M, 3)) -> (sigma (M,), rgb (M, 3))``
* ``occupied_fn(x (..., 3)) -> (...,) bool``

Samples are taken at a uniform step along each ray, from where the ray enters the box: a fixed
grid of candidate positions per ray, of which those outside the box or in empty cells are
masked out before the field is queried.  Compositing is the usual quadrature

    tau_i = sigma_i * delta_i,   T_i = exp(-sum_{j<i} tau_j),   w_i = T_i * (1 - exp(-tau_i)),

with ``rgb = sum w_i c_i`` (premultiplied), ``opacity = sum w_i`` and ``depth = sum w_i t_i``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

FieldFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
OccupiedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class RayOutput:
    """Per-ray results.  rgb (R, 3) premultiplied; opacity (R,); depth (R,) expected distance
    along the ray (not divided by opacity); samples: number of field queries made."""

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    samples: int


def ray_aabb(origins: torch.Tensor, dirs: torch.Tensor, aabb: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test of rays against an axis-aligned box.

    Args:
        origins: (R, 3) float32.  dirs: (R, 3) float32 (need not be unit; t is in its units).
        aabb: (2, 3) float32, min row then max row.
    Returns:
        t_near (R,) float32 clamped at 0 (rays starting inside begin at their origin),
        t_far (R,) float32, hit (R,) bool (the box is ahead of the origin and met with t_far > t_near).
    """
    tiny = 1e-12
    safe = torch.where(dirs.abs() < tiny, torch.full_like(dirs, tiny), dirs)
    inv = 1.0 / safe
    t0 = (aabb[0] - origins) * inv
    t1 = (aabb[1] - origins) * inv
    t_near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(-1)
    return t_near, t_far, t_far > t_near


def composite(sigmas: torch.Tensor, deltas: torch.Tensor, t_prior: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Compositing weights along rays.

    Args:
        sigmas: (R, K) float32 densities (0 where there is no sample).
        deltas: (R, K) or broadcastable float32 segment lengths.
        t_prior: (R,) float32 optical depth already accumulated before the first sample, or None.
    Returns:
        weights (R, K) float32, and the optical depth (R,) float32 accumulated after the last
        sample (transmittance = exp(-that)).
    """
    tau = sigmas * deltas
    total = tau.cumsum(-1)
    before = total - tau                                        # exclusive cumulative sum
    if t_prior is not None:
        before = before + t_prior[:, None]
        total = total + t_prior[:, None]
    weights = torch.exp(-before) * (1.0 - torch.exp(-tau))      # T_i * alpha_i
    return weights, total[:, -1]


def sample_grid(t_near: torch.Tensor, step: float, first: int, count: int,
                offset: torch.Tensor | float = 0.5) -> torch.Tensor:
    """Candidate distances ``t_near + (k + offset) * step`` for k in [first, first + count).

    Args:
        t_near: (R,) float32.  offset: (R, 1) float32 in [0, 1) (jitter) or a number.
    Returns:
        (R, count) float32.
    """
    k = torch.arange(first, first + count, device=t_near.device, dtype=t_near.dtype)
    return t_near[:, None] + (k[None, :] + offset) * step


def _query(field_fn: FieldFn, occupied_fn: OccupiedFn, origins, dirs, t, t_far):
    """Mask candidates (beyond t_far or in empty cells), query the field on the rest.

    Returns sigma (R, K) dense with zeros, rgb (M, 3) of the valid ones, mask (R, K), ray id (M,).
    """
    x = origins[:, None, :] + t[..., None] * dirs[:, None, :]                 # (R, K, 3)
    mask = (t < t_far[:, None]) & occupied_fn(x)
    ray = mask.nonzero()[:, 0]
    sig, rgb = field_fn(x[mask], dirs[ray])
    dense = torch.zeros_like(t).masked_scatter(mask, sig.to(t.dtype))
    return dense, rgb, mask, ray


def render_rays(field_fn: FieldFn, occupied_fn: OccupiedFn, origins: torch.Tensor, dirs: torch.Tensor,
                aabb: torch.Tensor, step: float, max_steps: int,
                jitter: torch.Tensor | None = None) -> RayOutput:
    """Render rays in one pass, differentiably (training).

    Args:
        origins, dirs: (R, 3) float32, dirs unit.  aabb: (2, 3) float32.
        step: distance between samples.  max_steps: most samples a ray can take.
        jitter: (R, 1) float32 in [0, 1): random shift of every ray's sample grid, or None (0.5).
    """
    r = origins.shape[0]
    t_near, t_far, hit = ray_aabb(origins, dirs, aabb)
    t_far = torch.where(hit, t_far, t_near)
    span = float((t_far - t_near).max()) if r else 0.0
    count = min(max_steps, int(span / step) + 1)
    zeros = origins.new_zeros(r)
    if r == 0 or span <= 0.0:
        return RayOutput(origins.new_zeros(r, 3), zeros, zeros, 0)
    t = sample_grid(t_near, step, 0, count, 0.5 if jitter is None else jitter)
    sigma, rgb, mask, ray = _query(field_fn, occupied_fn, origins, dirs, t, t_far)
    weights, _ = composite(sigma, step)
    w = weights[mask]
    color = origins.new_zeros(r, 3).index_add(0, ray, w[:, None] * rgb.to(w.dtype))
    return RayOutput(color, weights.sum(-1), (weights * t).sum(-1), int(ray.shape[0]))


@torch.no_grad()
def render_rays_segmented(field_fn: FieldFn, occupied_fn: OccupiedFn, origins: torch.Tensor,
                          dirs: torch.Tensor, aabb: torch.Tensor, step: float, max_steps: int,
                          segment: int = 64, min_transmittance: float = 1e-4) -> RayOutput:
    """Render rays ``segment`` samples at a time, dropping rays once they are opaque (inference).

    Same arguments and result as :func:`render_rays` (no jitter); gives the same values up to
    the contribution of samples behind ``min_transmittance``.
    """
    r = origins.shape[0]
    t_near, t_far, hit = ray_aabb(origins, dirs, aabb)
    color, opacity, depth = origins.new_zeros(r, 3), origins.new_zeros(r), origins.new_zeros(r)
    optical = origins.new_zeros(r)
    active = hit.nonzero()[:, 0]
    first, samples = 0, 0
    max_optical = -math.log(min_transmittance) if min_transmittance > 0 else math.inf
    while active.numel() and first < max_steps:
        count = min(segment, max_steps - first)
        o, d, tn, tf = origins[active], dirs[active], t_near[active], t_far[active]
        t = sample_grid(tn, step, first, count)
        sigma, rgb, mask, ray = _query(field_fn, occupied_fn, o, d, t, tf)
        if ray.numel():
            weights, after = composite(sigma, step, optical[active])
            w = weights[mask]
            color.index_add_(0, active, torch.zeros_like(o).index_add_(0, ray, w[:, None] * rgb.to(w.dtype)))
            opacity.index_add_(0, active, weights.sum(-1))
            depth.index_add_(0, active, (weights * t).sum(-1))
            optical[active] = after
            samples += int(ray.shape[0])
        first += count
        alive = (t[:, -1] + step < tf) & (optical[active] < max_optical)
        active = active[alive]
    return RayOutput(color, opacity, depth, samples)
