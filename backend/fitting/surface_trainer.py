"""Training of surface fields (``method`` "sdf" or "occupancy") on posed RGBA images.

:class:`SurfaceTrainer` is the trainer the fit loop (fitting/loop.py) runs for those methods (one
fit loop for every method: same callbacks, cancel and result).  Step-dependent behaviour (learning
rate, hash levels, NeuS slope annealing, occupancy grid) lives in
:meth:`SurfaceTrainer.update_step`; one optimisation step in :meth:`SurfaceTrainer.step`.

Losses (weights in :class:`SurfaceTrainConfig`):

* colour: MSE (or smooth L1) against the image composited on a random background;
* mask: BCE of the rendered opacity against alpha, when some alpha is below 1;
* eikonal: ``(|grad v| - 1)^2`` on the samples and on random points of the box (v the raw value:
  the SDF; for occupancy fields it keeps the logit proportional to the distance, so the
  occupancy's transition keeps the width its annealed ``logit_scale`` sets);
* curvature: mean ``|laplacian v|`` on the samples (finite differences, Neuralangelo);
* sharpness (SDF with ``local_sharpness``, fields/sdf.py): the samples' softness, weighted by their
  compositing weights (held fixed): the density softens only where the colour loss pays for it;
* passes (shared/protocol.py, PASS_DTYPES), where the data has them: albedo head vs "albedo", rendered normals vs
  "normal" (1 - cos), rendered depth vs "depth" (L1 in normalised units), the field's |value| at the
  surface points "depth" gives (the zero level through them), roughness head vs "roughness" (MSE,
  premultiplied like the albedo, on the pixels that have a value).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fit_implicit.backend.fitting.data import PosedImages
from fit_implicit.backend.fitting.trainer import TrainConfig, TrainerBase, colour_loss
from fit_implicit.shared.protocol import PASS_NAMES, SOLID_ALPHA

if TYPE_CHECKING:   # annotations only: fitting/config.py imports this module
    from fit_implicit.backend.fitting.config import FitConfig

MIN_RAYS = 64           # floor of the adaptive ray count
# mask_weight -1 (the sdf presets): the BCE mask term on with Blender's passes, off without.  Measured
# (H200, docs/benchmarks.md "Own scene"): on the still life (scene mode, passes) the preset without it
# diverged in one of two runs (held out 10.9 dB at 120 s) and 0.1 gave 36.3 dB at 1,500 steps (0: 35.0)
# and 37.1 dB at 120 s; on lego (photos only) any mask term costs (0.02: -0.4 dB).
MASK_WEIGHT_WITH_PASSES = 0.1


@dataclass
class SurfaceTrainConfig(TrainConfig):
    """A surface field's training: :class:`TrainConfig`, the schedules and the loss weights."""

    variance_lr: float = 1e-3       # sdf: Adam learning rate of the NeuS variance
    start_levels: int = 4           # hash levels active at the start (coarse to fine)
    level_every: int = 0            # steps between activating one more level; 0 = all by level_share of the fit
    level_share: float = 0.5        # share of the fit by which every level is active (level_every 0)
    cos_anneal_steps: int = 0       # sdf: steps over which NeuS's slope anneals; 0 = cos_anneal_share of the fit
    cos_anneal_share: float = 0.1   # sdf: share of the fit over which the slope anneals (cos_anneal_steps 0)
    eikonal_weight: float = 0.1     # sdf: (|grad f| - 1)^2 on samples and random points
    eikonal_points: int = 1024      # random points in the box per step for the eikonal term
    curvature_weight: float = 5e-4  # mean |laplacian| (finite differences) on the samples
    sharpness_weight: float = 1e-3  # sdf with local_sharpness: weighted mean softness of the visible samples
    mask_weight: float = 0.1        # BCE of opacity against alpha, where the images have masks; -1: auto
    #                                 (MASK_WEIGHT_WITH_PASSES with Blender's passes, else 0)
    albedo_weight: float = 1.0      # albedo head vs the "albedo" pass, where given
    normal_weight: float = 0.05     # 1 - cos of rendered vs the "normal" pass, where given
    depth_weight: float = 0.1       # L1 of rendered vs the "depth" pass (normalised units), where given
    depth_surface_weight: float = 1.0   # mean |value| at the "depth" pass's surface points (normalised units)
    roughness_weight: float = 1.0   # roughness head vs the "roughness" pass, where it has a value

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.level_share <= 1.0:
            raise ValueError(f"level_share must be in (0, 1], got {self.level_share}")
        if not 0.0 < self.cos_anneal_share <= 1.0:
            raise ValueError(f"cos_anneal_share must be in (0, 1], got {self.cos_anneal_share}")
        if not (self.mask_weight >= 0 or self.mask_weight == -1):
            raise ValueError(f"mask_weight must not be negative (or -1: auto), got {self.mask_weight}")
        for name in ("level_every", "cos_anneal_steps", "eikonal_points", "eikonal_weight", "curvature_weight",
                     "albedo_weight", "normal_weight", "depth_weight", "depth_surface_weight", "roughness_weight",
                     "variance_lr", "sharpness_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


def data_passes(data: PosedImages) -> list[str]:
    """The supervision passes ``data`` carries (non-empty), among PASS_NAMES."""
    passes = getattr(data, "passes", None) or {}
    return [k for k in PASS_NAMES if k in passes and len(passes[k])]


class SurfaceTrainer(TrainerBase):
    """One surface fit's state: model, optimiser, ray sampler and the step-dependent schedule.

    Attributes read by the fit loop: ``model``, ``rays`` (rays per step, adapted so that the
    shaded samples approach ``cfg.train.target_samples``).
    """

    def __init__(self, data: PosedImages, cfg: FitConfig, views=None):
        self.passes = data_passes(data)
        self.masks = any(bool((data.image(i)[..., 3] < 255).any()) for i in range(len(data)))
        super().__init__(data, cfg, {"lighting_baked": "albedo" not in self.passes,
                                     "roughness": "roughness" in self.passes,
                                     "passes": list(self.passes), "masks": self.masks}, views=views)
        if self.passes and not hasattr(self.sampler, "sample_passes"):
            raise ValueError("the data has supervision passes but RaySampler cannot sample them")
        variance = {"params": self.model.field.param_groups()["extra"], "lr": cfg.train.variance_lr, "eps": 1e-15,
                    "weight_decay": 0.0}
        self.optimizer = self.adam([variance])
        self.model.field.set_active_levels(cfg.train.start_levels)
        weight = cfg.train.mask_weight
        self.mask_weight = weight if weight >= 0 else (MASK_WEIGHT_WITH_PASSES if self.passes else 0.0)

    # ---- the fit loop's hooks (fitting/loop.py) -----------------------------------------------------
    def preview_ready(self, step: int) -> bool:
        """Previews from the first step on (no occupancy warm-up to wait for)."""
        return step > 0

    def finish(self) -> None:
        """After the last step: the NeuS cosine annealing at its end; the sharpness in the meta."""
        field = self.model.field
        if hasattr(field, "cos_anneal"):
            field.cos_anneal = 1.0
        if hasattr(field, "inv_s"):
            self.model.meta["inv_s"] = round(float(field.inv_s().detach()), 3)

    # ---- schedule ----------------------------------------------------------------------------
    def update_step(self, step: int, fraction: float) -> None:
        """Step-dependent settings before step ``step`` (0-based) at training ``fraction`` in [0, 1]:
        learning rates (warm-up, then exponential decay; the NeuS variance keeps its rate),
        active hash levels, NeuS slope annealing, occupancy grid refresh."""
        cfg, tc, field = self.cfg, self.cfg.train, self.model.field
        factors = self.lr_factors(step, fraction)
        keep = set(range(2, len(factors))) - {self.camera_group}     # e.g. the NeuS variance keeps its rate
        for i, (group, lr) in enumerate(zip(self.optimizer.param_groups, self.base_lrs)):
            if i not in keep:
                group["lr"] = lr * factors[i]
        # Schedules in steps where set, else in fractions of the fit (which may be timed): every
        # level active by level_share of the fit, NeuS's slope annealed over cos_anneal_share of it.
        all_levels = cfg.field.all_levels
        new_levels = max(all_levels - tc.start_levels, 0)
        added = step // tc.level_every if tc.level_every else int(new_levels * min(fraction / tc.level_share, 1.0))
        levels = min(all_levels, tc.start_levels + added)
        if levels != field.active_levels:
            field.set_active_levels(levels)
        if hasattr(field, "cos_anneal"):
            anneal = step / tc.cos_anneal_steps if tc.cos_anneal_steps else fraction / tc.cos_anneal_share
            field.cos_anneal = min(1.0, anneal)
        if hasattr(field, "anneal"):        # occupancy: sharper transitions as the fit goes on
            field.anneal(fraction)
        self.anneal_motion(fraction)
        share = cfg.occupancy.update_due(step)
        if share is not None:
            self.model.update_occupancy(share)
            self.share_occupancy()

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimisation step.  Returns (loss, colour mse) as 0-d tensors and the number of
        samples shaded."""
        tc, model = self.cfg.train, self.model
        if self.passes:
            origins, dirs, rgba, passes, photo = self.sampler.sample_passes(self.rays, with_photo=True)
            origins, dirs = self.corrected(photo, origins, dirs)
        else:
            (origins, dirs, rgba, photo), passes = self.sample(), {}
        jitter = torch.rand(origins.shape[0], 1, device=self.device)
        out = model.trace_surface(origins, dirs, jitter, normals="normal" in passes, albedo="albedo" in passes,
                                  roughness="roughness" in passes, times=self.ray_times(photo))
        rgb, penalty = self.as_photographed(out.rgb, out.opacity, photo)
        loss, mse, alpha, errors = colour_loss(rgb, out.opacity, rgba, tc.loss)
        self.sampler.record_errors(errors)
        loss = loss + penalty + self.motion_penalty()
        if self.masks and self.mask_weight > 0:
            opacity = out.extras.get("foreground_opacity", out.opacity).clamp(1e-3, 1.0 - 1e-3)
            loss = loss + self.mask_weight * F.binary_cross_entropy(opacity, alpha[:, 0])
        loss = loss + self._regularisers(out) + self._pass_losses(out, passes, alpha[:, 0], (origins, dirs, photo))
        self.apply_gradients(loss)
        self.rays = tc.adapt_rays(self.rays, out.samples, MIN_RAYS)
        return loss.detach(), mse.detach(), out.samples

    def _regularisers(self, out) -> torch.Tensor:
        cfg, field, model = self.cfg.train, self.model.field, self.model
        loss = torch.zeros((), device=self.device)
        grads = [out.extras["grad"]] if out.samples else []
        if cfg.eikonal_weight > 0 and cfg.eikonal_points > 0:
            lo, hi = model.box[0], model.box[1]
            x = lo + (hi - lo) * torch.rand(cfg.eikonal_points, 3, device=self.device)
            grads.append(field.geometry_with_derivatives(x, field.fd_step, model.random_times(x.shape[0]))[2])
        if cfg.eikonal_weight > 0 and grads:
            g = torch.cat(grads)
            loss = loss + cfg.eikonal_weight * ((g.norm(dim=-1) - 1.0) ** 2).mean()
        if cfg.curvature_weight > 0 and out.samples:
            loss = loss + cfg.curvature_weight * out.extras["laplacian"].abs().mean()
        if cfg.sharpness_weight > 0 and "softness" in out.extras:
            w = out.extras["weights"].detach()
            loss = loss + cfg.sharpness_weight * (w * out.extras["softness"]).sum() / w.sum().clamp(min=1e-6)
        return loss

    def _depth_surface_loss(self, origins: torch.Tensor, dirs: torch.Tensor, depth: torch.Tensor,
                            photo: torch.Tensor) -> torch.Tensor:
        """Mean |value| of the field at the surface points the depth pass gives (origin + depth x
        direction; the rays given are those whose pixel is all surface): the zero level asked to
        pass through them.  Unlike the rendered depth (the weights' mean along the ray, which sits
        where the weights' spread puts it while the field is soft), this holds the surface itself
        where the pass puts it, as a point cloud's fit does (fitting/points_trainer.py)."""
        x = self.model.to_normalised(origins + depth[:, None] * dirs)
        times = self.ray_times(photo)
        return self.model.field.value(x, times).abs().mean()

    def _pass_losses(self, out, passes: dict, alpha: torch.Tensor, rays: tuple | None = None) -> torch.Tensor:
        """Albedo, normal, depth and roughness supervision on the rays whose pixel
        has it; ``rays``: (origins, dirs, photo) of the batch, for the depth pass's surface points
        (None: without them)."""
        cfg = self.cfg.train
        loss = torch.zeros((), device=self.device)
        if "albedo" in passes and out.albedo is not None:
            # premultiplied: the rendered albedo sum against albedo * alpha
            target = passes["albedo"] * alpha[:, None]
            loss = loss + cfg.albedo_weight * F.mse_loss(out.albedo, target)
        if "normal" in passes and out.normal is not None:
            n = passes["normal"]
            has = n.norm(dim=-1) > 0.5
            if bool(has.any()):
                cos = F.cosine_similarity(out.normal[has], n[has], dim=-1, eps=1e-6)
                loss = loss + cfg.normal_weight * (1.0 - cos).mean()
        if "depth" in passes:
            # Only where the pixel is all surface: the pass is one sample's, so an outline pixel
            # holds the surface's depth whenever that sample hit it, while the ray through the
            # pixel's centre may pass beside it; asked for that depth there, the field grew
            # outwards (a test sphere's surface 0.22 pixel outside the truth; the still life's
            # asset 0.1 pixel fat on every outline: docs/benchmarks.md).
            z = passes["depth"][:, 0]
            has = (z > 0) & (alpha >= SOLID_ALPHA / 255.0)
            if bool(has.any()):
                loss = loss + cfg.depth_weight * (out.depth[has] - z[has]).abs().mean() / self.model.scale
                if cfg.depth_surface_weight > 0 and rays is not None:
                    origins, dirs, photo = (r[has] for r in rays)
                    loss = loss + cfg.depth_surface_weight * self._depth_surface_loss(origins, dirs, z[has], photo)
        if "roughness" in passes and out.roughness is not None:
            r = passes["roughness"][:, 0]
            has = r >= 0                    # NO_ROUGHNESS (-1): background, or a material without one
            if bool(has.any()):
                target = r[has] * alpha[has]
                loss = loss + cfg.roughness_weight * F.mse_loss(out.roughness[has, 0], target)
        return loss


__all__ = ["SurfaceTrainConfig", "SurfaceTrainer", "data_passes"]
