"""Trainers: what every trainer shares (:class:`TrainerBase`, :class:`TrainConfig`), and the eager
radiance-field trainer (:class:`Trainer`, :class:`RadianceTrainConfig`).

A trainer owns one fit's state (model, optimiser, ray sampler) and its step; the fit loop
(fitting/loop.py) owns the clock, progress, previews, checkpoints and cancelling.
Step-dependent behaviour (learning rate, occupancy grid) lives in ``update_step``; one
optimisation step in ``step``.  The CUDA-graph trainer (fitting/graph_trainer.py) and the
surface trainer (fitting/surface_trainer.py) build on :class:`TrainerBase`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from fit_implicit.backend.fields.background import OPAQUE_ALPHA
from fit_implicit.backend.fields.hashgrid import HashGrid
from fit_implicit.backend.fields.motion import is_dynamic
from fit_implicit.backend.fitting.data import PosedImages, RaySampler
from fit_implicit.backend.fitting.model import FittedField, pick_device
from fit_implicit.shared.methods import CAMERA_REFINE_MODES

if TYPE_CHECKING:   # annotations only: fitting/config.py imports this module
    from fit_implicit.backend.fitting.config import FitConfig

LOSSES = ("mse", "smooth_l1")
MLP_PRECISIONS = ("float32", "bfloat16")


@dataclass
class TrainConfig:
    """Batches and the optimiser: the settings every trainer reads."""

    batch_rays: int = 4096          # rays in the first step
    target_samples: int = 1 << 18   # field queries per step the ray count adapts to; 0 = fixed
    max_rays: int = 1 << 16         # cap on rays per step
    grid_lr: float = 1e-2           # Adam learning rate of the hash tables
    grid_eps: float = 1e-15         # Adam epsilon of the hash tables
    mlp_lr: float = 1e-2            # Adam learning rate of the MLPs
    mlp_eps: float = 1e-15          # Adam epsilon of the MLPs
    mlp_weight_decay: float = 1e-6  # L2 regularisation of the MLP weights
    warmup_steps: int = 100         # linear learning-rate warm-up
    lr_decay_start: float = 0.5     # fraction of the fit after which the learning rate decays
    lr_final: float = 0.03          # learning rate factor reached at the end (exponential decay)
    loss: str = "mse"               # mse | smooth_l1 (on sRGB colour)
    distortion_weight: float = 0.0  # radiance fields: weight of mip-NeRF 360's distortion loss, which gathers each
                                    # ray's weight into one stretch (fewer floaters; render/volume.py); 0 = off
    grid_decay_weight: float = 0.0  # radiance fields: weight of the hash tables' mean square feature, level by
                                    # level (Zip-NeRF's weight decay: what no ray needs fades; fields/hashgrid.py)
    fused_adam: bool = True         # one fused Adam kernel on CUDA (fewer launches than foreach)
    tf32: bool = True               # TensorFloat-32 matrix products on CUDA (MLPs; ~1e-3 relative precision)
    pixel_jitter: bool = False      # training rays through a random point of their pixel, not its centre
    error_sampling: float = 0.0     # share of each step's rays drawn where the recent colour error is large
                                    # (instant-ngp's error map; fitting/error_map.py); 0 = every pixel alike
    error_tile: int = 16            # pixels a side of the error map's cells
    appearance: bool = False        # learn each photo's exposure and white balance (fitting/appearance.py)
    appearance_lr: float = 1e-2     # Adam learning rate of those
    appearance_weight: float = 1e-3 # their penalty (mean square of log gains and biases)
    camera_refine: str = "off"      # off | on | focal: correct each photo's pose while fitting (focal: and the
                                    # focal length, one factor for all photos; fitting/camera_refine.py; "on" starts
                                    # a radiance field's grid coarser: config.py CAMERA_BASE_RES)
    camera_lr: float = 3e-3         # Adam learning rate of the corrections (radians; box half-sizes)
    camera_lr_final: float = 0.01   # ... decaying exponentially after the levels' fade-in to this share of it (at a
                                    # steady rate Adam's steps keep the cameras wandering: 0.35 degrees on lego from
                                    # exact poses; docs/benchmarks.md "Camera refinement from far")
    camera_weight: float = 0.0      # penalty on the corrections' mean square (a prior that the poses are close)
    camera_anneal_share: float = 0.3  # radiance fields: share of the fit over which hash levels fade in while poses are refined
    camera_settle: float = 0.0      # ... 5x faster while no camera turned by more than this share of what camera_lr
                                    # allows in 100 steps (Adam's steps when the gradient keeps its sign); 0 = off
                                    # (camera_refine.py LevelFade)
    camera_smooth_grad: bool = True   # while poses are refined: the points' gradients through half-cosine
                                      # hash weights (fields/hashgrid.py)

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.camera_refine not in CAMERA_REFINE_MODES:
            raise ValueError(f"camera_refine {self.camera_refine!r} is not one of {', '.join(CAMERA_REFINE_MODES)}")
        if not 0 < self.camera_anneal_share <= 1:
            raise ValueError(f"camera_anneal_share must be in (0, 1], got {self.camera_anneal_share}")
        if not 0 <= self.camera_settle <= 1:
            raise ValueError(f"camera_settle must be in [0, 1], got {self.camera_settle}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        if not 0.0 <= self.error_sampling <= 1.0:
            raise ValueError(f"error_sampling must be in [0, 1], got {self.error_sampling}")
        for name in ("batch_rays", "max_rays", "error_tile"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("target_samples", "warmup_steps", "appearance_lr", "appearance_weight", "camera_lr",
                     "camera_weight", "distortion_weight", "grid_decay_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 < self.camera_lr_final <= 1:
            raise ValueError(f"camera_lr_final must be in (0, 1], got {self.camera_lr_final}")
        if not 0 < self.lr_final <= 1 or not 0 <= self.lr_decay_start < 1:
            raise ValueError(f"need 0 < lr_final <= 1 and 0 <= lr_decay_start < 1, got {self.lr_final} "
                             f"and {self.lr_decay_start}")

    def lr_factor(self, step: int, fraction: float) -> float:
        """Learning-rate factor before step ``step`` (0-based) at training ``fraction`` in [0, 1]:
        linear warm-up, then exponential decay to ``lr_final`` after ``lr_decay_start``."""
        return self._warm_then_decay(step, fraction, self.lr_decay_start, self.lr_final)

    def camera_lr_factor(self, step: int, fraction: float, start: float | None = None) -> float:
        """The pose corrections' learning-rate factor: the same warm-up, the full rate while the
        hash levels fade in (until ``start``, by default ``camera_anneal_share``: cameras far off need
        it to come back), then exponential decay to ``camera_lr_final`` at the end (at a steady rate
        they keep wandering)."""
        start = self.camera_anneal_share if start is None else start
        return self._warm_then_decay(step, fraction, start, self.camera_lr_final)

    def _warm_then_decay(self, step: int, fraction: float, start: float, final: float) -> float:
        """Linear warm-up over ``warmup_steps``, then exponential decay from ``start`` of the fit to ``final``."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay = (fraction - start) / max(1.0 - start, 1e-9)
        return warm * final ** min(max(decay, 0.0), 1.0)

    def adapt_rays(self, rays: int, samples: int, floor: int) -> int:
        """The next step's ray count: moved (at most 2x either way) so that the field queries
        approach ``target_samples``, kept in [floor, max_rays]; unchanged without a target."""
        if not self.target_samples:
            return rays
        ratio = self.target_samples / max(samples, 1)
        return int(min(max(rays * min(max(ratio, 0.5), 2.0), floor), self.max_rays))


@dataclass
class RadianceTrainConfig(TrainConfig):
    """A radiance field's training: :class:`TrainConfig` and the CUDA-graph step's settings
    (fitting/graph_trainer.py)."""

    cuda_graphs: bool = True        # replay fixed-shape steps from a CUDA graph
    mlp_precision: str = "float32"  # float32 | bfloat16: autocast of the MLPs in graph-replayed steps
    prepass_samples: int = 0        # graph steps: slots of a density-only pass for early ray termination (0 = off)
    early_stop_transmittance: float = 1e-4  # ... samples behind this transmittance are not trained

    def validate(self) -> None:
        super().validate()
        if self.mlp_precision not in MLP_PRECISIONS:
            raise ValueError(f"mlp_precision {self.mlp_precision!r} is not one of {', '.join(MLP_PRECISIONS)}")


def colour_loss(rgb: torch.Tensor, opacity: torch.Tensor, rgba: torch.Tensor, loss: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The colour term: rendered colour against the pixel, both composited on one random
    background per ray (so that opacity is learnt without a background model).

    Args:
        rgb: (R, 3) premultiplied rendered colour.  opacity: (R,).  rgba: (R, 4) pixels in [0, 1].
        loss: "mse" or "smooth_l1" (scaled by 10 to be of MSE's size near the optimum).
    Returns:
        (loss, mse, alpha (R, 1), each ray's squared error (R,) without gradient) with loss and mse 0-d.
    """
    bg = torch.rand(rgb.shape[0], 3, device=rgb.device)
    pred = rgb + (1.0 - opacity[:, None]) * bg
    alpha = rgba[:, 3:]
    target = rgba[:, :3] * alpha + (1.0 - alpha) * bg
    per_ray = (pred - target).square().mean(-1)
    mse = per_ray.mean()
    value = mse if loss == "mse" else F.smooth_l1_loss(pred, target, beta=0.1) * 10.0
    return value, mse, alpha, per_ray.detach()


def models_background(data: PosedImages, cfg: FitConfig) -> bool:
    """Whether a fit of ``data`` models what lies outside its box (``cfg.outside``, setting
    ``background``; fields/background.py): auto = the photos have no alpha or a camera stands in the box."""
    if cfg.outside.background != "auto":
        return cfg.outside.background == "on"
    if min(int(data.image(i)[..., 3].min()) for i in range(len(data))) >= OPAQUE_ALPHA:
        return True                                         # no alpha: the background is in the photos
    lo, hi = data.aabb
    origins = data.poses[:, :3, 3]
    return bool(((origins > lo) & (origins < hi)).all(axis=1).any())


def refines_cameras(data: PosedImages, cfg: FitConfig) -> bool:
    """Whether a fit of ``data`` corrects its photos' poses (setting ``camera_refine``; never for
    fewer than 3 photos: nothing would hold the frame).  Off by default: on a forward-facing
    capture (llff_flower) the cameras drift together in ways a field of another depth explains
    as well (a growing spread, a toe-in), and held-out views fall from 17.6 to 14.8 dB (CPU,
    300 steps; docs/benchmarks.md)."""
    return bool(cfg.train.camera_refine in ("on", "focal") and len(data) >= 3)


class TrainerBase:
    """What every trainer has: ``cfg``, ``device``, ``model`` (field + occupancy grid),
    ``sampler``, ``optimizer``, ``base_lrs`` and ``rays`` (rays per step); checkpoint state
    (every other setting follows from the step, through ``update_step``)."""

    group = None        # a data-parallel fit's distributed.Group (fitting/distributed.py), else None

    def __init__(self, data: PosedImages, cfg: FitConfig, meta: dict | None = None, views=None):
        """``views``: the photos whose rays this trainer draws (None: all; a data-parallel fit's
        rank: its share, fitting/distributed.py ``Group.share``)."""
        self.cfg, self.device = cfg, pick_device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = bool(cfg.train.tf32)
        # The training cameras travel with the run: meshing closes what none of them saw (export/unseen.py).
        cameras = {"intrinsics": np.asarray(data.intrinsics).tolist(), "poses": np.asarray(data.poses).tolist()}
        if not data.uniform:
            cameras["sizes"] = np.asarray(data.sizes).tolist()
        meta = {"width": data.width, "height": data.height, "views": len(data), "cameras": cameras,
                "background": models_background(data, cfg), **(meta or {})}
        self.times = None                    # (N,) each photo's instant, on the device (a dynamic fit)
        if is_dynamic(data.times, cfg.motion):
            meta["time_resolution"] = cfg.motion.time_cells(data.times)
            meta["times"] = np.round(data.times, 6).tolist()
            self.times = torch.tensor(data.times, dtype=torch.float32, device=self.device)
        self.model = FittedField.build(cfg, data.aabb, meta, self.device, refining_cameras=refines_cameras(data, cfg))
        parts = [p for p in (self.model.field, self.model.background) if p is not None]   # the background has hash grids too
        self.grids = [m for part in parts for m in part.modules() if isinstance(m, HashGrid)]
        self.sampler = RaySampler(data, self.device, jitter=cfg.train.pixel_jitter, views=views,
                                  error_sampling=cfg.train.error_sampling, error_tile=cfg.train.error_tile)
        self.rays = cfg.train.batch_rays
        self.appearance = None               # per-photo exposure and white balance (appearance.py)
        if cfg.train.appearance:
            from fit_implicit.backend.fitting.appearance import Appearance
            self.appearance = Appearance(len(data)).to(self.device)
        self.cameras = None                  # per-photo pose corrections (camera_refine.py)
        if refines_cameras(data, cfg):
            from fit_implicit.backend.fitting.camera_refine import CameraRefiner, LevelFade
            self.cameras = CameraRefiner(len(data), data.poses[:, :3, 3], self.model.scale,
                                         np.asarray(data.poses)[:, :3, :3] if cfg.train.camera_refine == "focal" else None,
                                         centre=self.model.center).to(self.device)
            self.poses = np.asarray(data.poses)
            self.fade = LevelFade(cfg.train.camera_anneal_share, cfg.train.camera_settle, cfg.train.camera_lr)
            for grid in self.grids:
                grid.smooth_grad = bool(cfg.train.camera_smooth_grad)

    # ---- data-parallel fits (fitting/distributed.py) ------------------------------------------
    def join(self, group, seed: int) -> None:
        """Become one rank of ``group``: the weights and the grid as rank 0 has them, this rank's
        own rays from here on."""
        self.group = group
        parts = [self.model.field, self.model.occupancy] + ([self.model.background] if self.model.background else [])
        group.from_first([t for part in parts for t in (*part.parameters(), *part.buffers())])
        torch.manual_seed(group.rank_seed(seed))

    def apply_gradients(self, loss: torch.Tensor) -> None:
        """Backward and one optimiser step; in a data-parallel fit the gradients are first
        averaged over the ranks (every rank steps, even one whose batch had no sample)."""
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
        elif self.group is None:
            return
        if self.group is not None:
            self.group.average_gradients([p for g in self.optimizer.param_groups for p in g["params"]])
        self.optimizer.step()

    def share_occupancy(self) -> None:
        """After an occupancy update: a data-parallel fit's ranks all take rank 0's grid."""
        if self.group is not None:
            self.group.from_first(list(self.model.occupancy.buffers()))

    def sample(self) -> tuple:
        """(origins, dirs, rgba, photo index or None) of this step's rays (from the corrected
        cameras where poses are refined)."""
        if self.appearance is None and self.cameras is None and self.times is None:
            return (*self.sampler.sample(self.rays), None)
        o, d, rgba, photo = self.sampler.sample(self.rays, with_photo=True)
        return (*self.corrected(photo, o, d), rgba, photo)

    def grid_decay(self) -> torch.Tensor | float:
        """``grid_decay_weight`` times the hash tables' level-normalised mean square (the field's and
        the background's; fields/hashgrid.py), or 0 when off."""
        weight = self.cfg.train.grid_decay_weight
        if not weight or not self.grids:
            return 0.0
        return weight * sum(g.level_mean_square() for g in self.grids)

    def ray_times(self, photo: torch.Tensor | None) -> torch.Tensor | None:
        """(R,) the instant of each ray's photo in a dynamic fit, else None."""
        return None if self.times is None else self.times[photo]

    def motion_penalty(self, points: int = 1024) -> torch.Tensor:
        """A dynamic fit's motion regularisers (fields/motion.py) at ``points`` random points of
        the box at random times; 0 for a still fit."""
        deformation = self.model.field.deformation
        if deformation is None:
            return torch.zeros((), device=self.device)
        lo, hi = self.model.box[0], self.model.box[1]
        x = lo + (hi - lo) * torch.rand(points, 3, device=self.device)
        return deformation.penalty(x, self.model.random_times(points))

    def corrected(self, photo: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor) -> tuple:
        """The rays as the refined cameras shoot them (unchanged without refinement)."""
        return (origins, dirs) if self.cameras is None else self.cameras(photo, origins, dirs)

    def level_fade(self, step: int, fraction: float) -> torch.Tensor | None:
        """(levels,) weights of a radiance field's hash levels before step ``step`` at ``fraction``
        of the fit while poses are refined (they fade in over the first ``camera_anneal_share``,
        faster while the cameras are settled: camera_refine.py LevelFade), else None."""
        if self.cameras is None or not hasattr(self.model.field, "set_level_weights"):
            return None
        from fit_implicit.backend.fitting.camera_refine import level_fade
        levels = self.cfg.field.all_levels
        return level_fade(levels * self.fade.advance(step, fraction, self.cameras) + 1.0, levels)

    def anneal_levels(self, step: int, fraction: float) -> None:
        """While poses are refined a radiance field's hash levels fade in (:meth:`level_fade`)."""
        weights = self.level_fade(step, fraction)
        if weights is not None:
            self.model.field.set_level_weights(weights)

    def anneal_motion(self, fraction: float) -> None:
        """A fit over time's finer motion scales fade in (MotionConfig.motion_anneal_share)."""
        deformation = getattr(self.model.field, "deformation", None)
        if deformation is not None:
            deformation.fade(fraction)

    def as_photographed(self, rgb: torch.Tensor, opacity: torch.Tensor, photo) -> tuple[torch.Tensor, torch.Tensor]:
        """(rendered colour as each ray's photo saw it, the penalties of the per-photo terms:
        appearance (appearance.py) and pose corrections (camera_refine.py))."""
        tc = self.cfg.train
        penalty = torch.zeros((), device=rgb.device)
        if self.cameras is not None and tc.camera_weight > 0:
            penalty = penalty + tc.camera_weight * self.cameras.penalty()
        if self.appearance is None:
            return rgb, penalty
        return self.appearance(rgb, opacity, photo), penalty + tc.appearance_weight * self.appearance.penalty()

    def adam(self, extra: list[dict] = (), lrs: list | None = None, **kwargs) -> torch.optim.Adam:
        """Adam over the field's hash tables and MLPs (+ ``extra`` groups); ``lrs`` replace the
        two base learning rates (the graph trainer passes device tensors).  Sets ``base_lrs``."""
        tc, groups = self.cfg.train, self.model.field.param_groups()
        if self.model.background is not None:       # trained at the field's rates
            outside = self.model.background.param_groups()
            groups = {"grid": groups["grid"] + outside["grid"], "mlp": groups["mlp"] + outside["mlp"]}
        grid_lr, mlp_lr = lrs if lrs is not None else (tc.grid_lr, tc.mlp_lr)
        if self.appearance is not None:
            extra = [*extra, {"params": list(self.appearance.parameters()), "lr": tc.appearance_lr, "weight_decay": 0.0}]
        self.camera_group = None
        if self.cameras is not None:
            self.camera_group = 2 + len(extra)
            extra = [*extra, {"params": list(self.cameras.parameters()), "lr": tc.camera_lr, "weight_decay": 0.0}]
        if groups.get("motion"):           # a dynamic field's motion planes (fields/motion.py)
            extra = [*extra, {"params": groups["motion"], "lr": self.cfg.motion.motion_lr, "eps": tc.grid_eps,
                              "weight_decay": 0.0}]
        optimizer = torch.optim.Adam([
            {"params": groups["grid"], "lr": grid_lr, "eps": tc.grid_eps, "weight_decay": 0.0},
            {"params": groups["mlp"], "lr": mlp_lr, "eps": tc.mlp_eps, "weight_decay": tc.mlp_weight_decay},
            *extra,
        ], betas=(0.9, 0.99), **{"fused": self.device.type == "cuda" and tc.fused_adam, **kwargs})
        self.base_lrs = [tc.grid_lr, tc.mlp_lr] + [g["lr"] for g in extra]
        return optimizer

    def lr_factors(self, step: int, fraction: float) -> list[float]:
        """Each optimiser group's learning-rate factor before step ``step``: the schedule's
        (TrainConfig.lr_factor), and the pose corrections' own (TrainConfig.camera_lr_factor)."""
        tc = self.cfg.train
        factors = [tc.lr_factor(step, fraction)] * len(self.base_lrs)
        if self.camera_group is not None:
            factors[self.camera_group] = tc.camera_lr_factor(step, fraction, self.fade.decay_start())
        return factors

    def state_dict(self) -> dict:
        """Everything a resumed fit needs besides the step and the clock: field weights,
        occupancy grid, optimiser state, ray count and RNG states (tensors, for torch.save)."""
        state = {"field": self.model.field.state_dict(), "occupancy": self.model.occupancy.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "rays": int(self.rays),
                 "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.appearance is not None:
            state["appearance"] = self.appearance.state_dict()
        if self.model.background is not None:
            state["background"] = self.model.background.state_dict()
        if self.cameras is not None:
            state["cameras"] = self.cameras.state_dict()
            state["camera_fade"] = self.fade.state_dict()
        if self.sampler.error_map is not None:
            state["error_map"] = self.sampler.error_map.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (before the first step)."""
        self.model.field.load_state_dict(state["field"])
        self.model.occupancy.load_state_dict(state["occupancy"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.appearance is not None:
            self.appearance.load_state_dict(state["appearance"])
        if self.model.background is not None:
            self.model.background.load_state_dict(state["background"])
        if self.cameras is not None:
            self.cameras.load_state_dict(state["cameras"])
            if "camera_fade" in state:
                self.fade.load_state_dict(state["camera_fade"])
        if self.sampler.error_map is not None and "error_map" in state:
            self.sampler.error_map.load_state_dict(state["error_map"])
        self.rays = int(state["rays"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)


class Trainer(TrainerBase):
    """The eager radiance-field trainer (also the CPU path, and the reference of the graph trainer)."""

    MIN_RAYS = 256          # floor of the adaptive ray count

    def __init__(self, data: PosedImages, cfg: FitConfig, views=None):
        super().__init__(data, cfg, views=views)
        self.optimizer = self.adam()

    def update_step(self, step: int, fraction: float) -> None:
        """Step-dependent settings before step ``step`` (0-based) at training ``fraction`` in [0, 1]."""
        self.set_lr(self.lr_factors(step, fraction))
        self.anneal_levels(step, fraction)
        self.anneal_motion(fraction)
        share = self.cfg.occupancy.update_due(step)
        if share is not None:
            self.model.field.eval()
            self.model.update_occupancy(share)
            self.share_occupancy()
            self.model.field.train()
            self.after_occupancy_update()

    def set_lr(self, factors: list[float]) -> None:
        """Learning rates = the base rates times their groups' ``factors`` (:meth:`lr_factors`)."""
        for group, lr, factor in zip(self.optimizer.param_groups, self.base_lrs, factors):
            group["lr"] = lr * factor

    def after_occupancy_update(self) -> None:
        """Hook: the occupancy grid has just been refreshed (and the device synchronised)."""

    def step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimisation step.  Returns (loss, mse) as 0-d tensors (not synchronised) and
        the number of field samples it took."""
        origins, dirs, rgba, photo = self.sample()
        jitter = torch.rand(origins.shape[0], 1, device=self.device)
        spread = self.cfg.train.distortion_weight
        out = self.model.trace(origins, dirs, jitter, times=self.ray_times(photo), with_distortion=spread > 0)
        rgb, penalty = self.as_photographed(out.rgb, out.opacity, photo)
        loss, mse, _, errors = colour_loss(rgb, out.opacity, rgba, self.cfg.train.loss)
        self.sampler.record_errors(errors)
        loss = loss + penalty + self.motion_penalty() + self.grid_decay()
        if spread > 0:
            loss = loss + spread * out.distortion.mean()
        self.apply_gradients(loss)
        self.rays = self.cfg.train.adapt_rays(self.rays, out.samples, self.MIN_RAYS)
        return loss.detach(), mse.detach(), out.samples

    def preview_ready(self, step: int) -> bool:
        """Previews wait for the occupancy grid's first update: before it every cell counts as
        occupied, so a render costs the whole box (tens of seconds on a CPU) to show fog.  (On a
        GPU a render costs little either way: no need to wait.)"""
        return step > self.cfg.occupancy.occupancy_warmup or self.device.type == "cuda"

    def finish(self) -> None:
        """After the last step: the field's settings for use (the fit loop then calls eval())."""
