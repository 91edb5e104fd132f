"""A radiance field's iso-level: where the mesher cuts its density, and how that level is chosen.

A radiance field has no surface of its own; the mesher (export/mesh.py) cuts its density at a
level given as an opacity: the surface is where the density makes a slab of ``REFERENCE_LENGTH``
= 1/100 of the normalised cube's side (0.02 normalised units) ``mesh_opacity`` opaque, i.e.
``sigma_iso = -ln(1 - mesh_opacity) / 0.02`` per normalised unit (:func:`iso_level`): 2.56 at
0.05 (close to instant-ngp's customary level), 34.7 at 0.5.  Being defined in the trainer's
normalised frame, the level, and so the mesh, does not change when the world is scaled or moved.
  No one level suits
every field: a short fit keeps single-digit densities, a long one builds a haze of low density in
front of hard surfaces (lego after 60 s: at opacity 0.05 the mesh sits in that haze and the
textured mesh loses 4 dB against opacity 0.5, docs/benchmarks.md).

:func:`choose_opacity` asks the field itself.  Parallel rays cross the scene box from 14
directions (the 6 axes and the 8 corner diagonals); along each ray the density is sampled at a
fixed step.  A render covers a ray when the ray's accumulated opacity passes 0.5; a mesh cut at
level L covers it when the density passes L somewhere along it.  The chosen level is the one whose
coverage matches the renders' best (intersection over union; the lowest level within PLATEAU of
the best: a long fit's coverage is flat over a range of levels): too low
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

import logging

import numpy as np
import torch

log = logging.getLogger(__name__)

REFERENCE_LENGTH = 0.02   # normalised units: 1/100 of the normalised cube's side
DEFAULT_OPACITY = 0.05    # the level of models that cannot choose one (stand-ins without renders)

#: Coverage IoUs this close to the best are a tie, won by the lowest level.  A long fit's coverage is
#: flat over a plateau (lego after 60 s: 0.4 to 0.8 within 0.0015), where which level is highest is
#: noise: 0.8 came out once (its asset 27.4 dB against the photos, 30.2 at 0.4; docs/benchmarks.md
#: "Lego textured mesh refined"); the plateau's lowest level gave the best asset in both runs measured.
PLATEAU = 0.002

#: Candidate opacities, from a faint shell to the hard core.
CANDIDATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def iso_level(opacity: float = DEFAULT_OPACITY) -> float:
    """Density (per normalised unit) at which a slab of REFERENCE_LENGTH is ``opacity`` opaque."""
    if not 0.0 < opacity < 1.0:
        raise ValueError(f"opacity must be in (0, 1), got {opacity}")
    return -math.log1p(-opacity) / REFERENCE_LENGTH


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


def _march(model, rays: int, step: float, chunk: int):
    """Densities along parallel rays crossing the scene box from the 14 :func:`_directions`:
    yields (r, S) float32 batches, sampled every ``step`` normalised units (clamped at zero)."""
    device = torch.device(model.device)
    box = model.box.float().to(device)
    centre = 0.5 * (box[0] + box[1])
    radius = 0.5 * float(torch.linalg.norm(box[1] - box[0]))
    n_samples = int(math.ceil(2.0 * radius / step))
    t = (torch.arange(n_samples, dtype=torch.float32, device=device) + 0.5) * step     # (S,)
    grid = torch.linspace(-radius, radius, rays, device=device)
    a, b = (g.reshape(-1, 1) for g in torch.meshgrid(grid, grid, indexing="ij"))
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
            yield sigma.reshape(len(o), n_samples)


def _levels(opacities, device) -> torch.Tensor:
    return torch.tensor([iso_level(o) for o in opacities], dtype=torch.float32, device=torch.device(device))


@torch.no_grad()
def agreement(model, opacities=CANDIDATES, rays: int = 48, step: float = 2.0 / 256,
              chunk: int = 1 << 20) -> np.ndarray:
    """For each opacity, the intersection over union of the rays a mesh cut there covers and the
    rays the field's renders cover (accumulated opacity above 0.5).

    Args:
        model: a radiance-field :class:`backend.fitting.model.FittedField` (``field.density``,
            ``occupancy``, normalised ``box``).
        opacities: candidate iso-level opacities, each in (0, 1).
        rays: rays per side of each direction's square grid (14 directions).
        step: sample spacing along the rays, normalised units (the cube is [-1, 1]^3).
        chunk: samples per batch of density queries.
    Returns:
        (len(opacities),) float64 in [0, 1]; zeros where neither covers any ray.
    """
    levels = _levels(opacities, model.device)
    both = torch.zeros(len(levels), dtype=torch.float64, device=levels.device)
    either = torch.zeros_like(both)
    for sigma in _march(model, rays, step, chunk):
        rendered = (sigma.sum(1) * step > math.log(2.0))[:, None]                      # opacity > 0.5
        meshed = sigma.amax(1)[:, None] > levels[None, :]                               # (r, L)
        both += (meshed & rendered).sum(0).double()
        either += (meshed | rendered).sum(0).double()
    return (both / either.clamp_min(1.0)).cpu().numpy()


def _first_crossing(values: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row of ``values`` (r, S) first exceeds ``level`` ((r, 1) or scalar), in samples
    with linear interpolation between neighbours, and whether it does at all."""
    above = values > level
    hit = above.any(1)
    k = above.float().argmax(1)                                                          # first index above
    prev = values.gather(1, (k - 1).clamp_min(0)[:, None]).squeeze(1)
    here = values.gather(1, k[:, None]).squeeze(1)
    lev = level.squeeze(1) if torch.is_tensor(level) and level.dim() else level
    frac = ((lev - prev) / (here - prev).clamp_min(1e-12)).clamp(0.0, 1.0)
    return torch.where(k > 0, k.float() - 1.0 + frac, k.float()), hit


@torch.no_grad()
def surface_offset(model, opacities=CANDIDATES, rays: int = 48, step: float = 2.0 / 256,
                   chunk: int = 1 << 20) -> np.ndarray:
    """For each opacity, how far (normalised units, mean over the rays both cover) the mesh cut
    there sits from where the renders put the surface: the depth at which a ray's accumulated
    opacity passes 0.5 against the first point whose density passes the level (both
    interpolated between samples).  Arguments as :func:`agreement`; NaN where no ray is covered
    by both."""
    levels = _levels(opacities, model.device)
    total = torch.zeros(len(levels), dtype=torch.float64, device=levels.device)
    count = torch.zeros_like(total)
    for sigma in _march(model, rays, step, chunk):
        depth, rendered = _first_crossing(torch.cumsum(sigma, 1) * step, math.log(2.0))
        for j, level in enumerate(levels):
            meshed_at, meshed = _first_crossing(sigma, level)
            both = rendered & meshed
            total[j] += ((meshed_at - depth).abs() * step)[both].sum().double()
            count[j] += both.sum().double()
    out = (total / count.clamp_min(1.0)).cpu().numpy()
    out[count.cpu().numpy() == 0] = np.nan
    return out


def choose_opacity(model, opacities=CANDIDATES, **kwargs) -> float:
    """The lowest candidate opacity whose mesh covers the rays the renders cover within
    PLATEAU of the best (see :func:`agreement`)."""
    scores = agreement(model, opacities, **kwargs)
    return float(opacities[int(np.argmax(scores >= scores.max() - PLATEAU))])


@torch.no_grad()
def auto_opacity(model) -> float:
    """The opacity whose mesh agrees best with the field's renders (:func:`choose_opacity`),
    chosen once per model and kept on it."""
    chosen = getattr(model, "auto_mesh_opacity", None)
    if chosen is None:
        chosen = choose_opacity(model)
        model.auto_mesh_opacity = chosen
        log.info("mesh iso-level: opacity %.2f (chosen to match the renders)", chosen)
    return chosen


def model_opacity(model) -> float:
    """The iso-level opacity a radiance field is meshed at: its config's ``mesh_opacity`` where the
    fit set one, else (0) :func:`auto_opacity`.  Stand-in models without an occupancy grid or a
    normalised box: DEFAULT_OPACITY."""
    mesh = getattr(getattr(model, "config", None), "mesh", None)
    fixed = float(getattr(mesh, "mesh_opacity", 0.0) or 0.0)
    if fixed > 0.0:
        return fixed
    if not hasattr(model, "occupancy") or not hasattr(model, "box"):
        return DEFAULT_OPACITY
    return auto_opacity(model)


def resolve_opacity(model, mesh_opacity: float | str | None) -> float:
    """None: :func:`model_opacity`; "auto": :func:`auto_opacity`; else the number, in (0, 1)."""
    if mesh_opacity is None:
        return model_opacity(model)
    if mesh_opacity == "auto":
        return auto_opacity(model)
    mesh_opacity = float(mesh_opacity)
    if not 0.0 < mesh_opacity < 1.0:
        raise ValueError(f"mesh_opacity must be in (0, 1) or 'auto', got {mesh_opacity}")
    return mesh_opacity


def nerf_inside_field(model, x_world: torch.Tensor, mesh_opacity: float | str | None = None) -> torch.Tensor:
    """Radiance fields' inside test: density (per normalised unit) minus :func:`iso_level` of
    ``mesh_opacity`` (see :func:`resolve_opacity`: None is the fit's setting, "auto" matches the
    renders).

    Args:
        x_world: (M, 3) float32 on the model's device.
    Returns:
        (M,) float32; points the occupancy grid marks empty read ``-iso_level`` (their density is
        below the occupancy threshold, itself below any iso-level used here).
    """
    level = iso_level(resolve_opacity(model, mesh_opacity))
    x = model.to_normalised(x_world)
    keep = model.occupancy.occupied(x)
    sigma = torch.zeros(x.shape[0], device=x.device)
    if keep.any():
        sigma[keep] = model.field.density(x[keep]).float()
    return sigma - level
