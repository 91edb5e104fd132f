"""A fit to points, start to end (issue 16): its config (:func:`points_config`) and
:func:`fit_points`, which runs fitting/points_trainer.py's trainer through the fit loop
(fitting/loop.py ``train_fresh``).
"""
from __future__ import annotations

from fit_implicit.backend.fitting.config import FitConfig, make_config
from fit_implicit.backend.fitting.loop import Callbacks, train_fresh
from fit_implicit.backend.fitting.model import FittedField
from fit_implicit.backend.fitting.point_cloud import PointCloud
from fit_implicit.backend.fitting.points_trainer import PointsTrainer

# A fit to points takes the SDF presets' field sizes and mesh resolution, with its own step counts
# (a step here costs a fraction of a step against photos) and, for the draft (the CPU's preset),
# a quarter of the points a step.  The standard's 2,000 steps: docs/benchmarks.md "Surfaces from points"
# (on an H100 the scans' surfaces at 2,000 steps lie within 0.015 % of the diagonal of those at 4,000,
# in half the time).
POINTS_PRESETS = {"draft": dict(steps=600, points_batch=2048, points_space_batch=2048),
                  "standard": dict(steps=2000), "high": dict(steps=10000)}


def points_config(preset: str, device: str | None = None, steps: int = 0, seconds: float = 0.0,
                  **overrides) -> FitConfig:
    """The FitConfig of a fit to points: an "sdf" config of ``preset`` with this module's step
    counts and batches (``steps`` 0: the preset's), no previews, and any setting by name in
    ``overrides``."""
    if preset not in POINTS_PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(POINTS_PRESETS)}")
    values = {"preview_size": 0, **POINTS_PRESETS[preset], **overrides, **({"steps": steps} if steps else {})}
    return make_config("sdf", preset, device=device, seconds=seconds, **values)


def fit_points(cloud: PointCloud, cfg: FitConfig, callbacks: Callbacks | None = None,
               resume: dict | None = None) -> FittedField:
    """Fit an SDF to ``cloud`` for ``cfg.steps`` steps or ``cfg.seconds`` seconds (``cfg``: an
    "sdf" FitConfig; its ``points`` settings and the field's size decide the fit).  Returns the
    fitted model (world frame: the cloud's), with ``meta["points"]``: what was done to the cloud,
    and ``mean_distance``, how far the surface passes from its points (world units)."""
    if cfg.method != "sdf":
        raise ValueError(f"a fit to points trains a signed distance field (method sdf), not {cfg.method!r}")
    cfg.preview_size = 0
    cfg.validate()
    return train_fresh(lambda: PointsTrainer(cloud, cfg), None, cfg, callbacks, resume)
