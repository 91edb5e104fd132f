"""A fitted field with everything needed to use it in WORLD coordinates: render, save, load.

Internally the field lives in a normalised frame: ``x_n = (x_world - center) / scale`` with
``center`` the middle of the scene box and ``scale`` half its longest side, so the box fits in
[-1, 1]^3 and keeps its proportions.  Only this class converts; callers see world units.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fit_implicit.shared import cameras

from fit_implicit.backend.fields.background import BackgroundField, start_distances
from fit_implicit.backend.fields.motion import Deformation
from fit_implicit.backend.fields.nerf import NerfField
from fit_implicit.backend.fields.occfield import OccField
from fit_implicit.backend.fields.sdf import SdfField, SurfaceField
from fit_implicit.backend.fields.warm_start import warm_start
from fit_implicit.backend.render.occupancy_grid import OccupancyGrid
from fit_implicit.backend.render.volume import RayOutput, ray_aabb, render_rays, render_rays_segmented
from fit_implicit.backend.render.surface import SurfaceOutput, render_surface

#: The field class of each method (its config class is in fitting/config.py, METHOD_CONFIGS).
FIELDS = {"nerf": NerfField, "sdf": SdfField, "occupancy": OccField}
ATTRIBUTE_CHUNK = 1 << 16      # points per chunk in surface_attributes
ALBEDO_RAY_START = 0.04        # radiance fields: colour rays start this far out along the normal (normalised units)
# Surface fields: cells whose raw value (signed distance for SDFs) is below this many cell
# diagonals of the occupancy grid stay occupied (interior included: rays are cut once opaque).
SURFACE_BAND_CELLS = 2.0
# Occupied cells get this multiple of the grid's density threshold as pseudo-density: with the
# surface presets' decay of 0.5 a cell the surface left is dropped after 2-4 updates.
SURFACE_OCCUPIED_FACTOR = 4.0


def build_field(cfg: Any, time_resolution: int = 0, fresh: bool = False) -> NerfField | SurfaceField:
    """The untrained field a FitConfig describes (``cfg.method``, ``cfg.field``); with
    ``time_resolution`` > 0 a dynamic one: its deformation (fields/motion.py, ``cfg.motion``) has
    that many cells along time.  ``fresh`` (a field about to be trained, not one whose weights are
    about to be loaded): its MLPs start from the shipped warm start where ``cfg.field.warm_start``
    (fields/warm_start.py); ``field.warm_start`` names the file, or is None."""
    if cfg.method not in FIELDS:
        raise ValueError(f"unknown method {cfg.method!r} (known: {', '.join(FIELDS)})")
    field = FIELDS[cfg.method](cfg.field)
    field.warm_start = warm_start(field) if fresh and cfg.field.warm_start else None
    if time_resolution:
        field.deformation = Deformation(cfg.motion, int(time_resolution))
    return field


def starts_warm(meta: dict, refining_cameras: bool) -> bool:
    """Whether a fit may start from the shipped warm start: a still field of an object in empty
    space, as the warm starts were meta-learned on (benchmarks/random_scenes.py).  Not with a
    background model, over time or while refining cameras: there the warm MLPs explain the photos
    before the background, the motion or the poses settle (CPU tests, 2026-12-06, 300 draft steps:
    the room's object mesh 1.9 -> 3.0 % of the diagonal, camera rotation error 2.3 -> 2.9 degrees,
    an object's centre at an unseen instant 0.46 units off against the test's 0.4; docs/benchmarks.md
    "Warm starts")."""
    return not (meta.get("background") or meta.get("time_resolution") or refining_cameras)


def mps_available() -> bool:
    """True on Apple silicon with a PyTorch that drives its GPU (MPS).  Operations MPS lacks run on
    the CPU where ``PYTORCH_ENABLE_MPS_FALLBACK=1`` is set before torch loads (the command line
    sets it on macOS: backend/cli.py)."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(device: str | torch.device | None) -> torch.device:
    """The given device, or CUDA if available, else Apple's GPU (MPS) if available, else the CPU."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but PyTorch sees no CUDA device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' was asked for but PyTorch sees no Apple GPU (macOS 12.3+ on Apple silicon)")
    return dev


class FittedField:
    """A fitted field, its occupancy grid and its scene box (world units).

    Args:
        field: the network, in normalised coordinates: a NerfField (method "nerf") or a
            SurfaceField (SdfField "sdf", OccField "occupancy").  occupancy: its occupancy grid.
        aabb: (2, 3) float64 world box.  config: the FitConfig it was trained with.
        meta: JSON-able facts about the run (training size, steps, time, PSNR, ...);
            ``meta["lighting_baked"]`` is True unless an albedo pass supervised the albedo;
            ``meta["roughness"]`` is True when a roughness pass supervised the roughness head;
            ``meta["background"]`` is True when the fit modelled what lies outside the box;
            ``meta["time_resolution"]`` (> 0) when the field is dynamic (fields/motion.py), with
            ``meta["times"]`` the training photos' times.
        background: that model (fields/background.py), or None: rays leaving the box are empty.

    A dynamic field renders, meshes and textures the instant ``time`` (in [0, 1]) unless rays
    carry their own times (training).
    """

    def __init__(self, field: NerfField | SurfaceField, occupancy: OccupancyGrid, aabb: np.ndarray,
                 config: Any, meta: dict | None = None, background: BackgroundField | None = None):
        self.field, self.occupancy, self.config, self.background = field, occupancy, config, background
        self.meta = dict(meta or {})
        self.meta.setdefault("lighting_baked", True)
        self.aabb = np.asarray(aabb, dtype=np.float64)
        self.center = 0.5 * (self.aabb[0] + self.aabb[1])
        self.scale = float(0.5 * np.max(self.aabb[1] - self.aabb[0]))
        self.device = next(field.parameters()).device
        box = (self.aabb - self.center) / self.scale
        self.box = torch.tensor(box, dtype=torch.float32, device=self.device)       # (2, 3) normalised
        march = config.march
        self.step_size, self.max_steps = march.step_size(), march.max_steps()       # normalised units
        # Rendering without gradients may integrate more finely than training did.
        self.render_step_size, self.render_max_steps = march.step_size(True), march.max_steps(True)

    @classmethod
    def build(cls, cfg: Any, aabb: np.ndarray, meta: dict | None = None,
              device: str | torch.device | None = None, refining_cameras: bool = False) -> "FittedField":
        """The untrained model a FitConfig describes (field and occupancy grid, and a background
        model where ``meta["background"]``) over the world box ``aabb``, on ``device`` (default:
        ``cfg.device``).  Its MLPs start warm (fields/warm_start.py) where :func:`starts_warm`."""
        dev = pick_device(cfg.device if device is None else device)
        meta = dict(meta or {})
        background = cfg.outside.build().to(dev) if meta.get("background") else None
        field = build_field(cfg, int(meta.get("time_resolution") or 0),
                            fresh=starts_warm(meta, refining_cameras)).to(dev)
        meta["warm_start"] = field.warm_start
        return cls(field, cfg.occupancy.build().to(dev), aabb, cfg, meta, background)

    @property
    def method(self) -> str:
        """"nerf" | "sdf" | "occupancy"."""
        return self.config.method

    @property
    def is_surface(self) -> bool:
        return isinstance(self.field, SurfaceField)

    @property
    def dynamic(self) -> bool:
        """True for a field over time (fields/motion.py)."""
        return self.field.deformation is not None

    @property
    def time(self) -> float:
        """The instant (in [0, 1]) that renders, meshes and textures show; 0 for a still field."""
        return float(self.field.deformation.time) if self.dynamic else 0.0

    @time.setter
    def time(self, value: float) -> None:
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"time must be in [0, 1], got {value}")
        if self.dynamic:
            self.field.deformation.time = value

    def random_times(self, n: int) -> torch.Tensor | None:
        """(n,) uniform times for a dynamic field's grid updates and regularisers (None if still)."""
        return torch.rand(n, device=self.device) if self.dynamic else None

    # ---- frames --------------------------------------------------------------------------
    def to_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3) world positions -> normalised (same dtype/device)."""
        c = torch.as_tensor(self.center, dtype=x.dtype, device=x.device)
        return (x - c) / self.scale

    # ---- rendering -------------------------------------------------------------------------
    def trace(self, origins: torch.Tensor, dirs: torch.Tensor, jitter: torch.Tensor | None = None,
              differentiable: bool = True, background: bool = True, times: torch.Tensor | None = None,
              with_distortion: bool = False) -> RayOutput:
        """Render world rays; origins (R, 3), dirs (R, 3) unit, float32 on the model's device.

        ``depth`` comes back in world units.  ``differentiable=False`` renders without
        gradients (radiance fields: in segments with early ray termination).  ``background``:
        the background model's light behind the box is added (where the fit has one).
        ``times``: (R,) each ray's time (a dynamic field; None: ``self.time``).  ``with_distortion``
        (radiance fields, differentiable): each ray's distortion too (render/volume.py), in normalised units.
        """
        if self.is_surface:
            with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
                out = self.trace_surface(origins, dirs, jitter, background=background, times=times)
            return RayOutput(out.rgb, out.opacity, out.depth, out.samples)
        o = self.to_normalised(origins)
        if times is not None and not self.dynamic:
            times = None
        if differentiable or times is not None:
            with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
                out = render_rays(self.field, self.occupancy.occupied, o, dirs, self.box, self.step_size,
                                  self.max_steps, jitter, times=times, with_distortion=with_distortion)
        else:
            split = (self.field.geometry, self.field.color) if hasattr(self.field, "color") else None
            out = render_rays_segmented(self.field, self.occupancy.occupied, o, dirs, self.box,
                                        self.render_step_size, self.render_max_steps, split=split)
        if background:
            self.composite_background(o, dirs, out, jitter)
        out.depth = out.depth * self.scale
        return out

    def composite_background(self, o: torch.Tensor, dirs: torch.Tensor, out, jitter: torch.Tensor | None) -> None:
        """Composite the background model's light behind ``out`` (a RayOutput or SurfaceOutput,
        depth still normalised), in place; nothing without a background model.  ``o``
        normalised origins.  (The surface's normals, albedo and roughness stay the foreground's.)"""
        if self.background is None:
            return
        _, t_far, hit = ray_aabb(o, dirs, self.box)
        rgb, opacity, depth, samples = self.background.render(o, dirs, start_distances(o, dirs, t_far, hit), jitter)
        rest = 1.0 - out.opacity
        if hasattr(out, "extras"):      # a surface's masks judge the object alone (surface_trainer.py)
            out.extras["foreground_opacity"] = out.opacity
        out.rgb = out.rgb + rest[:, None] * rgb
        out.depth = out.depth + rest * depth
        out.opacity = out.opacity + rest * opacity
        out.samples = out.samples + samples

    def trace_surface(self, origins: torch.Tensor, dirs: torch.Tensor, jitter: torch.Tensor | None = None,
                      normals: bool = False, albedo: bool = False, roughness: bool = False,
                      background: bool = True, times: torch.Tensor | None = None) -> SurfaceOutput:
        """Render world rays through a surface field (see :func:`render_surface`), with the
        background model's light behind the box where the fit has one and ``background``.

        ``normals``/``albedo``/``roughness`` add composited world normals, albedo and roughness;
        ``extras`` carries the per-sample "grad" (M, 3) and "laplacian" (M,) of the raw value
        (normalised units) for the regularisers.  ``depth`` in world units.  ``times``: (R,)
        each ray's time (a dynamic field; None: ``self.time``).
        """
        field, step = self.field, self.step_size
        if not self.dynamic:
            times = None

        def sample_fn(x, d, t=None):
            v, feat, grad, lap = field.geometry_with_derivatives(x, field.fd_step, t)
            n = field.outward_normals(grad)
            soft = field.softness(feat)         # the SDF's local sharpness, or None
            out = {"tau": field.optical_depth(v, grad, d, step, soft), "rgb": field.radiance(feat, n, d),
                   "grad": grad, "laplacian": lap}
            if soft is not None:        # for its regulariser (surface_trainer.py)
                out["softness"] = soft
            if normals:
                out["normal"] = n
            if albedo:
                out["albedo"] = field.albedo(feat)
            if roughness:       # appearance only: its loss does not move the geometry (see render_surface)
                out["roughness"] = field.roughness(feat, x)
            return out

        def stop_fn(x, t=None):
            value, features = field.geometry(x, t)
            return field.deep_inside(value, step, field.softness(features))

        o = self.to_normalised(origins)
        out = render_surface(sample_fn, self.occupancy.occupied, o, dirs, self.box, step, self.max_steps, jitter,
                             stop_fn=stop_fn, times=times)
        if background:
            self.composite_background(o, dirs, out, jitter)
        out.depth = out.depth * self.scale
        return out

    def environment(self, height: int = 512) -> torch.Tensor:
        """The background model seen from the box's centre as an equirectangular image for
        Blender's World: (height, 2 height, 3) float32 sRGB (fields/background.py).  Raises
        ValueError when the fit has no background model."""
        if self.background is None:
            raise ValueError("this fit has no background model (setting background: auto, on or off)")
        if not 1 <= int(height) <= 8192:
            raise ValueError(f"environment height must be in [1, 8192], got {height}")
        return self.background.environment(int(height), self.box)

    def _over_time(self, fn, n: int) -> torch.Tensor:
        """``fn(times)`` for n points: one random time each (None for a still field), or for a
        field over time the largest of ``motion_occupancy_times`` draws, so that a cell a moving
        part fills only now and then is not decayed away between the updates that happen to see it."""
        draws = int(self.config.motion.motion_occupancy_times) if self.dynamic else 1
        out = fn(self.random_times(n))
        for _ in range(draws - 1):
            out = torch.maximum(out, fn(self.random_times(n)))
        return out

    @torch.no_grad()
    def update_occupancy(self, fraction: float) -> None:
        """Refresh the occupancy grid from the field (surface fields: the band around the
        surface and the inside; radiance fields: the density)."""
        if not self.is_surface:     # a dynamic field: each point at random times (the grid keeps the union)
            self.occupancy.update(lambda x: self._over_time(lambda t: self.field.density(x, t), x.shape[0]),
                                  self.step_size, fraction=fraction)
            return
        field = self.field
        band = SURFACE_BAND_CELLS * 2.0 * math.sqrt(3.0) / self.occupancy.resolution
        occupied = SURFACE_OCCUPIED_FACTOR * -math.log1p(-self.occupancy.threshold) / self.step_size

        def near(x, t):         # inside, or within the band; for the SDF also where NeuS's density is above
            value, features = field.geometry(x, t)          # ~2% of its peak
            reach = field.reach(field.softness(features)) if isinstance(field, SdfField) else 0.0
            limit = torch.clamp(reach, min=band) if torch.is_tensor(reach) else max(band, reach)
            return (value < limit).float() * occupied

        def pseudo_density(x):
            return self._over_time(lambda t: near(x, t), x.shape[0])

        self.occupancy.update(pseudo_density, self.step_size, fraction=fraction)

    @torch.no_grad()
    def render(self, intrinsics, c2w, width: int, height: int, supersample: int = 1,
               time: float | None = None) -> np.ndarray:
        """Render a view.

        Args:
            intrinsics: (4,) fx, fy, cx, cy in pixels (OpenCV pixel frame).
            c2w: (4, 4) camera-to-world, Blender convention.
            supersample: s >= 1: s x s rays a pixel, on a regular grid, averaged (a box filter:
                anti-aliased outlines, as a photo's pixel sees an area; s^2 times the work).
            time: the instant in [0, 1] a dynamic field shows (None: ``self.time``, which stays).
        Returns:
            (H, W, 4) float32: premultiplied rgb (sRGB) and alpha, in [0, 1].
        """
        if time is not None and self.dynamic:
            before = self.time
            self.time = time
            try:
                return self.render(intrinsics, c2w, width, height, supersample)
            finally:
                self.time = before
        width, height, s = int(width), int(height), int(supersample)
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        if not 1 <= s <= 16:
            raise ValueError(f"supersample must be in [1, 16], got {supersample}")
        if s > 1:       # the same camera at s times the resolution, then each s x s block averaged
            fine = self.render(np.asarray(intrinsics, np.float64) * s, c2w, width * s, height * s)
            return fine.reshape(height, s, width, s, 4).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)
        o, d = cameras.pixel_rays(np.asarray(intrinsics, np.float64), np.asarray(c2w, np.float64), width, height)
        o = torch.from_numpy(o.reshape(-1, 3)).float().to(self.device)
        d = torch.from_numpy(d.reshape(-1, 3)).float().to(self.device)
        was_training = self.field.training
        self.field.eval()
        try:
            parts = []
            chunk = self.config.march.render_chunk
            for oc, dc in zip(o.split(chunk), d.split(chunk)):
                out = self.trace(oc, dc, differentiable=False)
                parts.append(torch.cat([out.rgb, out.opacity[:, None]], dim=-1))
        finally:
            self.field.train(was_training)
        img = torch.cat(parts).clamp(0.0, 1.0).reshape(height, width, 4)
        return img.cpu().numpy().astype(np.float32)

    # ---- surfaces: what the mesher and the baker ask ------------------------------------------------------------
    @torch.no_grad()
    def inside_field(self, x_world: torch.Tensor) -> torch.Tensor:
        """(M, 3) float32 world points on ``self.device`` -> (M,) float32: positive inside the
        object, negative outside, zero on the surface.

        sdf: minus the signed distance in WORLD units; occupancy: the logit of the occupancy
        probability.  A radiance field has no surface of its own: the mesher cuts its density at
        an iso-level it chooses (backend/export/iso.py, ``nerf_inside_field``).
        """
        if not self.is_surface:
            raise ValueError("a radiance field has no inside of its own: backend/export/iso.py "
                             "(nerf_inside_field) cuts its density at an iso-level")
        x = self.to_normalised(x_world.float())
        if isinstance(self.field, SdfField):
            return self.field.inside(x) * self.scale
        return self.field.inside(x)

    def surface_attributes(self, points_world: np.ndarray, normals_world: np.ndarray | None = None
                           ) -> dict[str, np.ndarray]:
        """Appearance and orientation at surface points (e.g. mesh vertices or texels).

        Args:
            points_world: (M, 3) float32 world points on (or near) the surface.
            normals_world: (M, 3) outward unit normals to look along (e.g. the mesh's), or None
                to use the field's own.
        Returns:
            "albedo" (M, 3) float32 sRGB in [0, 1]: the learnt diffuse albedo where an albedo pass
            supervised it (``meta["lighting_baked"]`` False), else the radiance a camera sees
            looking at the point against its normal (lighting baked in);
            "normal" (M, 3) float32 unit world-space outward normals from the field's gradient;
            "roughness" (M, 1) float32 in [0, 1], only where a roughness pass supervised it
            (``meta["roughness"]``).
        """
        pts = np.asarray(points_world, dtype=np.float32)
        if pts.ndim != 2 or pts.shape[1] != 3:
            raise ValueError(f"points must be (M, 3), got {pts.shape}")
        given = None
        if normals_world is not None:
            given = np.asarray(normals_world, dtype=np.float32)
            if given.shape != pts.shape:
                raise ValueError(f"normals must match the points' shape {pts.shape}, got {given.shape}")
        with_roughness = self.is_surface and bool(self.meta.get("roughness", False))
        albedo, normal, rough = [], [], []
        was_training = self.field.training
        self.field.eval()
        try:
            for i in range(0, len(pts), ATTRIBUTE_CHUNK):
                x = torch.from_numpy(pts[i:i + ATTRIBUTE_CHUNK]).to(self.device)
                g = None if given is None else torch.from_numpy(given[i:i + ATTRIBUTE_CHUNK]).to(self.device)
                a, n, r = self._attributes(x, g, with_roughness)
                albedo.append(a.clamp(0.0, 1.0).cpu())
                normal.append(n.cpu())
                if r is not None:
                    rough.append(r.cpu())
        finally:
            self.field.train(was_training)
        def stack(parts: list, width: int) -> np.ndarray:
            return torch.cat(parts).numpy().astype(np.float32) if parts else np.zeros((0, width), np.float32)

        out = {"albedo": stack(albedo, 3), "normal": stack(normal, 3)}
        if with_roughness:
            out["roughness"] = stack(rough, 1)
        return out

    def _attributes(self, x_world: torch.Tensor, look: torch.Tensor | None, roughness: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(K, 3) world points, optional (K, 3) normals -> albedo (K, 3), unit normals (K, 3),
        roughness (K, 1) when asked for (surface fields) else None."""
        x = self.to_normalised(x_world)
        if self.is_surface:
            with torch.no_grad():
                field = self.field
                _, feat, grad, _ = field.geometry_with_derivatives(x, field.fd_step)
                n = field.outward_normals(grad)
                rough = field.roughness(feat, x) if roughness else None
                if not self.meta.get("lighting_baked", True):
                    return field.albedo(feat), n, rough
                v = n if look is None else torch.nn.functional.normalize(look, dim=-1, eps=1e-12)
                return field.radiance(feat, n, -v), n, rough
        with torch.enable_grad():       # radiance field: normal = -grad(density)
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.field.density(xg).sum(), xg)
        n = torch.nn.functional.normalize(-grad, dim=-1, eps=1e-12)
        v = n if look is None else torch.nn.functional.normalize(look, dim=-1, eps=1e-12)
        with torch.no_grad():           # a short ray from just outside, looking against the normal
            origin = x_world + v * (ALBEDO_RAY_START * self.scale)
            out = self.trace(origin, -v, differentiable=False, background=False)
            rgb = out.rgb / out.opacity.clamp_min(1e-6)[:, None]
        return rgb, n.detach(), None
