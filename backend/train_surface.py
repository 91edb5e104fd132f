"""Training of surface fields (``method`` "sdf" or "occupancy") on posed RGBA images.

:class:`SurfaceTrainer` is the trainer :func:`backend.train.fit` runs for those methods (one fit
loop for every method: same callbacks, cancel and result).  Step-dependent behaviour (learning
rate, hash levels, NeuS slope annealing, occupancy grid) lives in
:meth:`SurfaceTrainer.update_step`; one optimisation step in :meth:`SurfaceTrainer.step`.

Losses (weights in :class:`~backend.train.FitConfig` under "surfaces"):

* colour: MSE (or smooth L1) against the image composited on a random background;
* mask: BCE of the rendered opacity against alpha, when some alpha is below 1;
* eikonal: ``(|grad v| - 1)^2`` on the samples and on random points of the box (v the raw value:
  the SDF; for occupancy fields it keeps the logit proportional to the distance, so the
  occupancy's transition keeps the width its annealed ``logit_scale`` sets);
* curvature: mean ``|laplacian v|`` on the samples (finite differences, Neuralangelo);
* passes (contract C1), where the data has them: albedo head vs "albedo", rendered normals vs
  "normal" (1 - cos), rendered depth vs "depth" (L1 in normalised units), roughness head vs
  "roughness" (MSE, premultiplied like the albedo, on the pixels that have a value).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import PosedImages, RaySampler
from .model import FittedField, build_field, build_occupancy, pick_device
from .train import FitConfig, Resumable

PASS_KEYS = ("albedo", "normal", "depth", "roughness")
MIN_RAYS = 64           # floor of the adaptive ray count


def data_passes(data: PosedImages) -> list[str]:
    """The supervision passes ``data`` carries (non-empty), among PASS_KEYS."""
    passes = getattr(data, "passes", None) or {}
    return [k for k in PASS_KEYS if k in passes and len(passes[k])]


class SurfaceTrainer(Resumable):
    """One surface fit's state: model, optimiser, ray sampler and the step-dependent schedule.

    Attributes read by the fit loop: ``model``, ``rays`` (rays per step, adapted so that the
    shaded samples approach ``cfg.target_samples``).
    """

    def __init__(self, data: PosedImages, cfg: FitConfig):
        self.cfg, self.device = cfg, pick_device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
        field = build_field(cfg).to(self.device)
        occupancy = build_occupancy(cfg).to(self.device)
        self.passes = data_passes(data)
        self.masks = bool((data.images[..., 3] < 255).any())
        meta = {"width": data.width, "height": data.height, "views": len(data),
                "lighting_baked": "albedo" not in self.passes, "roughness": "roughness" in self.passes,
                "passes": list(self.passes), "masks": self.masks}
        self.model = FittedField(field, occupancy, data.aabb, cfg, meta)
        self.sampler = RaySampler(data, self.device)
        if self.passes and not hasattr(self.sampler, "sample_passes"):
            raise ValueError("the data has supervision passes but RaySampler cannot sample them")
        groups = field.param_groups()
        self.optimizer = torch.optim.Adam([
            {"params": groups["grid"], "lr": cfg.grid_lr, "eps": cfg.grid_eps, "weight_decay": 0.0},
            {"params": groups["mlp"], "lr": cfg.mlp_lr, "eps": cfg.mlp_eps, "weight_decay": cfg.mlp_weight_decay},
            {"params": groups["extra"], "lr": cfg.variance_lr, "eps": 1e-15, "weight_decay": 0.0},
        ], betas=(0.9, 0.99), fused=self.device.type == "cuda" and cfg.fused_adam)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.rays = cfg.batch_rays
        field.set_active_levels(cfg.start_levels)

    # ---- the fit loop's hooks (backend.train.fit) ------------------------------------------
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
        cfg, field = self.cfg, self.model.field
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        decay = (fraction - cfg.lr_decay_start) / max(1.0 - cfg.lr_decay_start, 1e-9)
        factor = warm * cfg.lr_final ** min(max(decay, 0.0), 1.0)
        for group, lr in zip(self.optimizer.param_groups[:2], self.base_lrs[:2]):
            group["lr"] = lr * factor
        # Schedules in steps where set, else in fractions of the fit (which may be timed): every
        # level active by mid-fit, NeuS's slope annealed over the first tenth.
        new_levels = max(cfg.levels - cfg.start_levels, 0)
        added = step // cfg.level_every if cfg.level_every else int(new_levels * min(2.0 * fraction, 1.0))
        levels = min(cfg.levels, cfg.start_levels + added)
        if levels != field.active_levels:
            field.set_active_levels(levels)
        if hasattr(field, "cos_anneal"):
            anneal = step / cfg.cos_anneal_steps if cfg.cos_anneal_steps else fraction * 10.0
            field.cos_anneal = min(1.0, anneal)
        if hasattr(field, "anneal"):        # occupancy: sharper transitions as the fit goes on
            field.anneal(fraction)
        since = step - cfg.occupancy_warmup
        if since >= 0 and since % cfg.occupancy_every == 0:
            self.model.update_occupancy(1.0 if since == 0 else cfg.occupancy_fraction)

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimisation step.  Returns (loss, colour mse) as 0-d tensors and the number of
        samples shaded."""
        cfg, model = self.cfg, self.model
        if self.passes:
            origins, dirs, rgba, passes = self.sampler.sample_passes(self.rays)
        else:
            (origins, dirs, rgba), passes = self.sampler.sample(self.rays), {}
        jitter = torch.rand(origins.shape[0], 1, device=self.device)
        out = model.trace_surface(origins, dirs, jitter, normals="normal" in passes, albedo="albedo" in passes,
                                  roughness="roughness" in passes)
        bg = torch.rand(origins.shape[0], 3, device=self.device)
        alpha = rgba[:, 3:]
        pred = out.rgb + (1.0 - out.opacity[:, None]) * bg
        target = rgba[:, :3] * alpha + (1.0 - alpha) * bg
        mse = F.mse_loss(pred, target)
        loss = mse if cfg.loss == "mse" else F.smooth_l1_loss(pred, target, beta=0.1) * 10.0
        if self.masks and cfg.mask_weight > 0:
            opacity = out.opacity.clamp(1e-3, 1.0 - 1e-3)
            loss = loss + cfg.mask_weight * F.binary_cross_entropy(opacity, alpha[:, 0])
        loss = loss + self._regularisers(out) + self._pass_losses(out, passes, alpha[:, 0])
        if loss.requires_grad:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        if cfg.target_samples:
            ratio = cfg.target_samples / max(out.samples, 1)
            self.rays = int(min(max(self.rays * min(max(ratio, 0.5), 2.0), MIN_RAYS), cfg.max_rays))
        return loss.detach(), mse.detach(), out.samples

    def _regularisers(self, out) -> torch.Tensor:
        cfg, field, model = self.cfg, self.model.field, self.model
        loss = torch.zeros((), device=self.device)
        grads = [out.extras["grad"]] if out.samples else []
        if cfg.eikonal_weight > 0 and cfg.eikonal_points > 0:
            lo, hi = model.box[0], model.box[1]
            x = lo + (hi - lo) * torch.rand(cfg.eikonal_points, 3, device=self.device)
            grads.append(field.geometry_with_derivatives(x, field.fd_step)[2])
        if cfg.eikonal_weight > 0 and grads:
            g = torch.cat(grads)
            loss = loss + cfg.eikonal_weight * ((g.norm(dim=-1) - 1.0) ** 2).mean()
        if cfg.curvature_weight > 0 and out.samples:
            loss = loss + cfg.curvature_weight * out.extras["laplacian"].abs().mean()
        return loss

    def _pass_losses(self, out, passes: dict, alpha: torch.Tensor) -> torch.Tensor:
        """Albedo, normal, depth and roughness supervision (contract C1) on the rays whose pixel
        has it."""
        cfg = self.cfg
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
            z = passes["depth"][:, 0]
            has = z > 0
            if bool(has.any()):
                loss = loss + cfg.depth_weight * (out.depth[has] - z[has]).abs().mean() / self.model.scale
        if "roughness" in passes and out.roughness is not None:
            r = passes["roughness"][:, 0]
            has = r >= 0                    # NO_ROUGHNESS (-1): background, or a material without one
            if bool(has.any()):
                target = r[has] * alpha[has]
                loss = loss + cfg.roughness_weight * F.mse_loss(out.roughness[has, 0], target)
        return loss


def check_surface_config(cfg: FitConfig) -> None:
    """Raise ValueError naming the first surface setting out of range."""
    if cfg.method not in ("sdf", "occupancy"):
        raise ValueError(f"surface fits train 'sdf' or 'occupancy' fields, not {cfg.method!r}")
    if not 1 <= cfg.start_levels <= cfg.levels:
        raise ValueError(f"start_levels must be in [1, levels={cfg.levels}], got {cfg.start_levels}")
    for name in ("level_every", "cos_anneal_steps", "eikonal_points", "eikonal_weight", "curvature_weight",
                 "mask_weight", "albedo_weight", "normal_weight", "depth_weight", "roughness_weight",
                 "variance_lr"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"{name} must not be negative, got {getattr(cfg, name)}")
    if not 0.0 < cfg.init_radius < 1.0:
        raise ValueError(f"init_radius must be in (0, 1) (normalised units), got {cfg.init_radius}")


__all__ = ["SurfaceTrainer", "check_surface_config", "data_passes"]
