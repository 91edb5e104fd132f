"""Choosing a radiance field's iso-level: the level whose surface is where the renders show it.

A radiance field has no surface of its own; the mesher cuts its density at a level
(export/mesh.py: an opacity of a slab 1/100 of the normalised cube thick).  No one level suits
every field: a short fit keeps single-digit densities, a long one builds a haze of low density in
front of hard surfaces (lego after 60 s: at opacity 0.05 the mesh sits in that haze and the
textured mesh loses 4 dB against opacity 0.5, docs/benchmarks.md).

:func:`choose_opacity` asks the field itself.  Parallel rays cross the scene box from 14
directions (the 6 axes and the 8 corner diagonals); along each ray the density is sampled at a
fixed step.  A render covers a ray when the ray's accumulated opacity passes 0.5; a mesh cut at
level L covers it when the density passes L somewhere along it.  The chosen level is the one whose
coverage matches the renders' best (intersection over union, the lowest level on a tie): too low
and the mesh takes in the haze and floaters the renders see through, too high and it loses thin
parts and opens holes.

What it does not see: surfaces inside the object that no render shows (a faint field's
low-density pockets open to the outside at high levels); the mesher fills space no direction
can see (export/cleanup.py).  Measured on three fields (docs/benchmarks.md, "Iso-level"): lego
draft -> 0.3 (textured mesh +3.8 dB over the old fixed 0.05, the best level 0.4 gives +4.2),
Suzanne (the demo) -> 0.2, the 250-step test fit -> 0.05.
It is computed once per field (a few million density queries: well under a second on a GPU,
seconds on a CPU) and never changes the field.
"""
from __future__ import annotations

import math

import numpy as np
import torch

#: Candidate opacities, from a faint shell to the hard core.
CANDIDATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _directions() -> torch.Tensor:
    """(14, 3) unit directions: the 6 axes and the 8 corner diagonals."""
    axes = torch.cat([torch.eye(3), -torch.eye(3)])
    signs = torch.tensor([[sx, sy, sz] for sx in (-1.0, 1.0) for sy in (-1.0, 1.0) for sz in (-1.0, 1.0)])
    return torch.cat([axes, signs / math.sqrt(3.0)])


def _basis(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit vectors perpendicular to ``d`` and to each other."""
    helper = torch.tensor([0.0, 0.0, 1.0]) if abs(float(d[2])) < 0.9 else torch.tensor([1.0, 0.0, 0.0])
    u = torch.nn.functional.normalize(torch.linalg.cross(d, helper), dim=0)
    return u, torch.linalg.cross(d, u)


@torch.no_grad()
def agreement(model, opacities=CANDIDATES, rays: int = 48, step: float = 2.0 / 256,
              chunk: int = 1 << 20) -> np.ndarray:
    """For each opacity, the intersection over union of the rays a mesh cut there covers and the
    rays the field's renders cover (accumulated opacity above 0.5).

    Args:
        model: a radiance-field :class:`backend.model.FittedField` (``field.density``,
            ``occupancy``, normalised ``box``).
        opacities: candidate iso-level opacities, each in (0, 1).
        rays: rays per side of each direction's square grid (14 directions).
        step: sample spacing along the rays, normalised units (the cube is [-1, 1]^3).
        chunk: samples per batch of density queries.
    Returns:
        (len(opacities),) float64 in [0, 1]; zeros where neither covers any ray.
    """
    from .mesh import iso_level

    device = torch.device(model.device)
    box = model.box.float().to(device)
    centre = 0.5 * (box[0] + box[1])
    radius = 0.5 * float(torch.linalg.norm(box[1] - box[0]))
    levels = torch.tensor([iso_level(o) for o in opacities], dtype=torch.float32, device=device)
    n_samples = int(math.ceil(2.0 * radius / step))
    t = (torch.arange(n_samples, dtype=torch.float32, device=device) + 0.5) * step     # (S,)
    grid = torch.linspace(-radius, radius, rays, device=device)
    a, b = (g.reshape(-1, 1) for g in torch.meshgrid(grid, grid, indexing="ij"))
    both = torch.zeros(len(levels), dtype=torch.float64, device=device)
    either = torch.zeros(len(levels), dtype=torch.float64, device=device)
    for d in _directions():
        u, v = (w.to(device) for w in _basis(d))
        d = d.to(device)
        origins = centre - radius * d + a * u + b * v                                   # (R, 3)
        for o in origins.split(max(1, chunk // n_samples)):
            x = (o[:, None, :] + t[None, :, None] * d).reshape(-1, 3)                  # (r * S, 3)
            keep = ((x >= box[0]) & (x <= box[1])).all(-1)
            keep[keep.clone()] = model.occupancy.occupied(x[keep])
            sigma = torch.zeros(len(x), device=device)
            if keep.any():
                sigma[keep] = model.field.density(x[keep]).float().clamp_min(0.0)
            sigma = sigma.reshape(len(o), n_samples)
            rendered = (sigma.sum(1) * step > math.log(2.0))[:, None]                  # opacity > 0.5
            meshed = sigma.amax(1)[:, None] > levels[None, :]                           # (r, L)
            both += (meshed & rendered).sum(0).double()
            either += (meshed | rendered).sum(0).double()
    return (both / either.clamp_min(1.0)).cpu().numpy()


def choose_opacity(model, opacities=CANDIDATES, **kwargs) -> float:
    """The candidate opacity whose mesh covers the rays the renders cover, best (see
    :func:`agreement`); the lowest such candidate on a tie."""
    scores = agreement(model, opacities, **kwargs)
    return float(opacities[int(np.argmax(scores))])
