"""Everything that decides a fit: :class:`FitConfig`, the presets and :func:`make_config`.

FitConfig holds the fit loop's own settings and composes the configs of the parts a fit builds,
each defined next to the class it configures:

======================  ====================================  ===================================
``cfg.field``           NerfFieldConfig / SurfaceFieldConfig   fields/nerf.py, fields/sdf.py (its
                        (``cfg.field.grid``: HashGridConfig,   ``grid``: fields/hashgrid.py,
                        ``cfg.field.spectral``:                ``spectral``: fields/encodings.py)
                        SpectralConfig)
``cfg.train``           RadianceTrainConfig /                  fitting/trainer.py,
                        SurfaceTrainConfig                     fitting/surface_trainer.py
``cfg.occupancy``       OccupancyConfig                        render/occupancy_grid.py
``cfg.march``           MarchConfig                            render/volume.py
``cfg.mesh``            MeshConfig                             export/mesh.py
``cfg.refine``          RefineConfig                           export/refine.py
``cfg.outside``         BackgroundConfig                       fields/background.py
``cfg.motion``          MotionConfig (dynamic fits only)       fields/motion.py
``cfg.points``          PointsConfig (fits to points only)     fitting/points_trainer.py
======================  ====================================  ===================================

Which field and trainer configs a fit has depends on its method (:data:`METHOD_CONFIGS`).
Every setting has one name, unique across all the parts, used unchanged on the panel, on the
wire, on the command line (``--set NAME=VALUE``), in presets and overrides
(``make_config(..., occupancy_resolution=64)``) and in the part's config.
The method and preset names are defined once, in shared/methods.py.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fit_implicit.backend.export.mesh import MeshConfig
from fit_implicit.backend.export.refine import RefineConfig
from fit_implicit.backend.fields.background import BackgroundConfig
from fit_implicit.backend.fields.layers import FieldConfig
from fit_implicit.backend.fields.motion import MotionConfig
from fit_implicit.backend.fields.nerf import NerfFieldConfig
from fit_implicit.backend.fields.sdf import SurfaceFieldConfig
from fit_implicit.backend.fitting.model import pick_device
from fit_implicit.backend.fitting.points_trainer import PointsConfig
from fit_implicit.backend.fitting.settings import NamedSettings
from fit_implicit.backend.fitting.surface_trainer import SurfaceTrainConfig
from fit_implicit.backend.fitting.trainer import RadianceTrainConfig, TrainConfig
from fit_implicit.backend.render.occupancy_grid import OccupancyConfig
from fit_implicit.backend.render.volume import MarchConfig
from fit_implicit.shared.methods import METHODS, PRESETS

#: method -> (its field config class, its trainer config class)
METHOD_CONFIGS: dict[str, tuple[type[FieldConfig], type[TrainConfig]]] = {
    "nerf": (NerfFieldConfig, RadianceTrainConfig),
    "sdf": (SurfaceFieldConfig, SurfaceTrainConfig),
    "occupancy": (SurfaceFieldConfig, SurfaceTrainConfig),
}
GROUPS = ("field", "train", "occupancy", "march", "mesh", "refine", "outside", "points", "motion")


@dataclass
class FitConfig(NamedSettings):
    """The fit loop's settings and the parts' configs (see the module doc); settings by name
    through :class:`NamedSettings` (fitting/settings.py)."""

    method: str = "nerf"            # kind of field: nerf | sdf | occupancy (shared/methods.py)
    preset: str = "standard"        # preset the values came from (shared/methods.py)
    steps: int = 20000              # optimisation steps; the fit stops at `steps` or `seconds`
    seconds: float = 0.0            # wall-clock budget from the first step; 0 = none
    device: str = "cpu"             # torch device
    seed: int = 0                   # torch.manual_seed for initialisation and ray sampling
    preview_size: int = 128         # longest side of preview renders; 0 = no previews
    preview_interval: float = 1.0   # seconds between previews
    progress_interval: float = 0.25  # seconds between progress callbacks
    field: FieldConfig = dataclasses.field(default_factory=NerfFieldConfig)
    train: TrainConfig = dataclasses.field(default_factory=RadianceTrainConfig)
    occupancy: OccupancyConfig = dataclasses.field(default_factory=OccupancyConfig)
    march: MarchConfig = dataclasses.field(default_factory=MarchConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    refine: RefineConfig = dataclasses.field(default_factory=RefineConfig)
    outside: BackgroundConfig = dataclasses.field(default_factory=BackgroundConfig)
    points: PointsConfig = dataclasses.field(default_factory=PointsConfig)
    motion: MotionConfig = dataclasses.field(default_factory=MotionConfig)

    @classmethod
    def for_method(cls, method: str) -> "FitConfig":
        """The defaults of ``method``'s parts (no preset applied)."""
        if method not in METHOD_CONFIGS:
            raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
        field_cls, train_cls = METHOD_CONFIGS[method]
        return cls(method=method, field=field_cls(), train=train_cls())

    def owner(self) -> str:
        return f"method {self.method!r}"

    # ---- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Nested plain dict (as run.json holds it)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "FitConfig":
        """A config from :meth:`to_dict`'s output, or from a flat dict of settings by name (runs of
        format 1); unknown keys are ignored, missing ones keep the method's defaults."""
        cfg = cls.for_method(values.get("method", "nerf"))
        flat: dict[str, Any] = {}

        def gather(d: dict) -> None:
            for key, value in d.items():
                if isinstance(value, dict):
                    gather(value)
                else:
                    flat[key] = value

        gather(values)
        known = cfg.settings()
        return cfg.set(**{k: v for k, v in flat.items() if k in known and k != "method"})

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> "FitConfig":
        """Raise ValueError naming the first setting out of range; returns self."""
        if self.method not in METHOD_CONFIGS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        field_cls, train_cls = METHOD_CONFIGS[self.method]
        if type(self.field) is not field_cls or type(self.train) is not train_cls:
            raise ValueError(f"a {self.method} fit needs {field_cls.__name__} and {train_cls.__name__}, "
                             f"got {type(self.field).__name__} and {type(self.train).__name__}")
        if int(self.steps) < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        for name in ("seconds", "preview_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for group in GROUPS:
            getattr(self, group).validate()
        if isinstance(self.train, SurfaceTrainConfig):
            # (other encodings have fewer bands: they start with all of them when asked for more)
            levels = self.field.grid.levels if self.field.encoding == "hashgrid" else 1 << 30
            if not 1 <= self.train.start_levels <= levels:
                raise ValueError(f"start_levels must be in [1, levels={levels}], got {self.train.start_levels}")
        return self


# ---- presets ------------------------------------------------------------------------------------
# Settings by name for every method, then each method's changes on top.
_COMMON_PRESETS: dict[str, dict[str, Any]] = {
    # A recognisable result in about a minute on 2 CPU cores (~24 views of 128x128).
    "draft": dict(steps=400, levels=8, log2_table=16, max_res=256, march_steps=256,
                  occupancy_resolution=64, occupancy_every=16, occupancy_warmup=64, lr_final=0.1,
                  batch_rays=1024, target_samples=1 << 15, max_rays=1 << 13, mesh_resolution=128,
                  render_chunk=1 << 14),
    # instant-ngp's settings for the NeRF synthetic scenes, except (measured on lego, H100, 60 s;
    # docs/benchmarks.md): 2^20-row tables (+0.2 dB); 2^18 trained samples of up to 2^18 rays;
    # renders in chunks of 2^16 rays so that evaluating a young field (many occupied cells)
    # stays well under 4 GB.  Quadrature: 1536 steps along the box diagonal in training (+0.2 dB
    # over instant-ngp's 1024; 2048 and 1792 were no better), renders integrate twice as finely
    # (+0.05-0.1 dB, render time only).
    # The textured mesh moved against the training views after the bake (export/refine.py): lego,
    # H200, 200k triangles: 27.0 -> 29.2 dB held out in 7 s (200 steps), 29.4 dB (600 steps, 18 s).
    "standard": dict(steps=20000, log2_table=20, target_samples=1 << 18, max_rays=1 << 18,
                     render_chunk=1 << 16, march_steps=1536, render_march_steps=3072, mesh_refine_steps=400),
    "high": dict(steps=40000, log2_table=20, target_samples=1 << 18, max_rays=1 << 18, mesh_resolution=512,
                 march_steps=1536, render_march_steps=3072, mesh_refine_steps=800),
}
# Radiance fields on CUDA: graph-replayed steps with early ray termination, a density-only pass
# over 2^20 marched samples first (+0.3 dB over 2^19 samples without termination).
# Over time (issue 17's animated scene, H100, 15,000 steps ~ 180 s; docs/benchmarks.md "Fits over
# time"): a ten times heavier pull home and a third of the planes' learning rate keep the long fit's
# deformation from drifting (22.77 -> 23.63 dB held out, 12.4 -> 2.2 % of samples out of the box).
# The draft keeps the lighter ones: short CPU fits must learn the motion quickly.
_RADIANCE_OVER_TIME = dict(motion_weight=1e-3, motion_lr=3e-3)
_RADIANCE_PRESETS: dict[str, dict[str, Any]] = {
    "draft": {},
    "standard": dict(prepass_samples=1 << 20, **_RADIANCE_OVER_TIME),
    "high": dict(prepass_samples=1 << 20, **_RADIANCE_OVER_TIME),
}
# Surface fields (fitting/surface_trainer.py): surface samples cost 5 field evaluations
# (finite-difference gradients), so fewer of them.  (The surface figures of docs/benchmarks.md
# were measured with 1024 steps along the diagonal.)  Thin parts (lego, H200, 2,000 steps,
# docs/benchmarks.md "SDF on lego: the recipe for thin parts"): no curvature term (22.85 -> 25.98 dB), NeuS's
# slope annealed over the whole fit (26.65) and a lighter eikonal term (27.46); 8 of the 16 hash
# levels from the start (2,500 steps: 27.53 -> 28.20 / 28.23 dB; 120 s: 28.34 -> 28.88 dB).
_SURFACE_THIN = dict(curvature_weight=0.0, cos_anneal_share=1.0, eikonal_weight=0.02, start_levels=8)
# SDF only, then (lego, H200, 2,500 steps, variants sharing the GPU, issue 12 item 2; baseline
# 28.26 dB; docs/benchmarks.md "SDF on lego: the recipe for thin parts"): no BCE mask term (29.86;
# 0.02: 29.52; 0.5: 26.00; the colour term on random backgrounds supervises the opacity too), twice
# the samples and rays a step (29.18, at ~15% fewer steps/s), eikonal 0.005 (28.65; 0.002: 27.56),
# 12 levels from the start (28.52; all 16: 23.49); together 31.46 dB (mask weight 0.02: 31.10).
# No help: tf32 off (28.22), variance_lr 1e-2 or 3e-4 (27.35, 27.79), a sharpness floor rising to
# inv_s 2000 (27.76; learnt, it ends near 1000).  Occupancy fields keep _SURFACE_THIN (not measured).
# The mask term: auto (-1), i.e. off on photos as above, on (0.1) with Blender's passes, where the
# still life diverged without it (surface_trainer.py MASK_WEIGHT_WITH_PASSES).
_SDF_THIN = dict(_SURFACE_THIN, eikonal_weight=0.005, start_levels=12, mask_weight=-1.0,
                 target_samples=1 << 19, max_rays=1 << 16)
_SURFACE_DRAFT = dict(steps=300, target_samples=1 << 12, batch_rays=512, max_rays=1 << 11, occupancy_decay=0.5,
                      occupancy_warmup=0, occupancy_every=32, warmup_steps=50, level_every=20, eikonal_points=256)
_SURFACE_FULL = dict(target_samples=1 << 18, max_rays=1 << 15, occupancy_decay=0.5, occupancy_warmup=0,
                     march_steps=1024, render_march_steps=0)
_SURFACE_PRESETS: dict[str, dict[str, Any]] = {
    "draft": _SURFACE_DRAFT,
    "standard": dict(_SURFACE_FULL, **_SURFACE_THIN),
    "high": dict(_SURFACE_FULL, **_SURFACE_THIN),
}
_SDF_PRESETS: dict[str, dict[str, Any]] = {
    "draft": _SURFACE_DRAFT,
    "standard": dict(_SURFACE_FULL, **_SDF_THIN),
    "high": dict(_SURFACE_FULL, **_SDF_THIN),
}
METHOD_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "nerf": _RADIANCE_PRESETS, "sdf": _SDF_PRESETS, "occupancy": _SURFACE_PRESETS}


def preset_values(method: str, preset: str) -> dict[str, Any]:
    """The settings a preset gives a method, by name."""
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    if method not in METHOD_PRESETS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    return {**_COMMON_PRESETS[preset], **METHOD_PRESETS[method][preset]}


# A radiance field whose poses are refined (camera_refine "on") starts its hash grid at 4 points a
# side, not 16, unless base_res is set: BARF's coarse-to-fine needs a field smooth enough at first
# that a camera ~15 degrees off still sees a blurred version of what it should (lego at 100 px,
# BARF's sigma 0.15, 1,000 draft steps on the CPU, 2026-12-06: mean rotation error 9.3 -> 7.2 degrees
# at camera_lr 1e-3; 4.3 -> 3.5 at 3e-3 with camera_anneal_share 0.6; docs/benchmarks.md "Camera
# refinement from far").  Not with "focal": in the smoother field the shared zoom trades further
# against the cameras' distance (the test ring, tests/backend/fitting/test_camera_refine.py: focal
# error 2.0-2.4 % at 16 points, 5.8 % at 4).
CAMERA_BASE_RES = 4


def make_config(method: str = "nerf", preset: str = "standard", device: str | None = None,
                steps: int = 0, seconds: float = 0.0, **overrides) -> FitConfig:
    """A FitConfig from a preset.  ``steps`` 0 = the preset's; ``seconds`` 0 = no time budget;
    ``device`` None = CUDA if available, else the CPU; ``overrides`` set any other setting by name."""
    values = preset_values(method, preset)
    if steps < 0 or seconds < 0:
        raise ValueError("steps and seconds must not be negative")
    cfg = FitConfig.for_method(method).set(**values)
    cfg.preset, cfg.device, cfg.seconds = preset, str(pick_device(device)), float(seconds)
    cfg.set(**overrides)
    if method == "nerf" and cfg.train.camera_refine == "on" and "base_res" not in overrides:
        cfg.set(base_res=CAMERA_BASE_RES)
    if steps:
        cfg.steps = int(steps)
    return cfg.validate()
