"""Occupancy field (Occupancy Networks), rendered as in UNISURF: each sample's opacity is the
occupancy probability at that point.

The geometry network of :class:`~backend.fields.sdf.SurfaceField` gives a raw value ``v``
(initialised to ``|x| - init_radius``, kept distance-like by the eikonal term); the occupancy
logit is ``-logit_scale * v``, so the field starts as a sphere whose probability crosses 0.5 on
its surface.  The surface is the 0.5 level set (logit 0).  ``logit_scale`` (a saved buffer) is
annealed by the trainer from SCALE_START to SCALE_END per normalised unit: a soft transition
first, which gives gradients far from the surface, then a sharp one, so that the rendered
silhouette and the 0.5 level agree (a transition of width w shrinks the 0.5 level by about w
against the silhouette).  Works in the trainer's normalised frame.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fit_implicit.backend.render.surface import occupancy_optical_depth
from fit_implicit.backend.fields.sdf import SurfaceField, SurfaceFieldConfig

SCALE_START = 50.0      # logit per normalised unit at the start: p = 0.01 at 0.09 outside
SCALE_END = 800.0       # at mid-fit and after: p = 0.01 at 0.006 outside
ANNEAL_UNTIL = 0.5      # fraction of the fit at which SCALE_END is reached (geometric growth)


class OccField(SurfaceField):
    """``logit(x) = -logit_scale * value(x)``; occupancy ``p = sigmoid(logit)``.

    A sample's opacity is ``p`` itself, independent of the step (UNISURF): the optical depth of
    a sample is ``-log(1 - p) = softplus(logit)``.
    """

    kind = "occupancy"

    def __init__(self, cfg: SurfaceFieldConfig | None = None):
        super().__init__(cfg)
        self.register_buffer("logit_scale", torch.tensor(SCALE_START))

    @torch.no_grad()
    def anneal(self, fraction: float) -> None:
        """Set ``logit_scale`` for training ``fraction`` in [0, 1]."""
        t = min(max(fraction / ANNEAL_UNTIL, 0.0), 1.0)
        self.logit_scale.fill_(SCALE_START * (SCALE_END / SCALE_START) ** t)

    def logit(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """(N, 3) -> (N,) occupancy logit (t: see SurfaceField.geometry)."""
        return -self.logit_scale * self.value(x, t)

    def inside(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return self.logit(x, t)

    def outward_normals(self, grad: torch.Tensor) -> torch.Tensor:
        # the raw value grows outwards (the logit falls)
        return F.normalize(grad, dim=-1, eps=1e-12)

    def optical_depth(self, value, grad, dirs, delta, softness=None):
        return occupancy_optical_depth(-self.logit_scale * value)

    def deep_inside(self, value, delta, softness=None):
        # p > 0.9975: that one sample makes the ray opaque
        return -self.logit_scale * value > 6.0


__all__ = ["OccField", "SurfaceFieldConfig", "SCALE_START", "SCALE_END"]
