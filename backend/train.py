"""Training: configuration, presets and the fit loop.

``fit(data, cfg, callbacks)`` trains a radiance field on posed RGBA images and returns a
:class:`~backend.model.FittedField`.  Step-dependent behaviour (learning rate, occupancy grid,
batch size) lives in :meth:`Trainer.update_step`; one optimisation step in :meth:`Trainer.step`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .data import PosedImages, RaySampler
from .model import FittedField, build_field, build_occupancy, pick_device

METHODS = ("nerf", "sdf", "occupancy")
PRESETS = ("draft", "standard", "high")
LOSSES = ("mse", "smooth_l1")
PREVIEW_SHARE = 0.1     # most of the wall time previews may take; the interval grows to keep it


@dataclass
class FitConfig:
    """Everything that decides a fit.  Units: normalised scene box [-1, 1]^3 where noted."""

    method: str = "nerf"            # kind of field (only "nerf" so far)
    preset: str = "standard"        # preset the values came from: draft | standard | high
    steps: int = 20000              # optimisation steps; the fit stops at `steps` or `seconds`
    seconds: float = 0.0            # wall-clock budget from the first step; 0 = none
    preview_size: int = 128         # longest side of preview renders; 0 = no previews
    preview_interval: float = 1.0   # seconds between previews
    mesh_resolution: int = 256      # marching-cubes grid along the box's longest side
    mesh_opacity: float = 0.0       # radiance fields: iso-level as the opacity of a 1/100-box slab
                                    # (export/mesh.py); 0 = chosen to match the renders (export/iso.py)
    device: str = "cpu"             # torch device
    seed: int = 0                   # torch.manual_seed for initialisation and ray sampling
    # field
    levels: int = 16                # hash grid levels
    features: int = 2               # features per level
    log2_table: int = 19            # log2 of the rows per level
    base_res: int = 16              # coarsest hash grid resolution over the normalised cube
    max_res: int = 2048             # finest hash grid resolution
    hidden: int = 64                # MLP width
    geo_features: int = 15          # geometry features from the density MLP to the colour MLP
    color_layers: int = 2           # hidden layers of the colour MLP
    # sampling
    march_steps: int = 1024         # samples along the normalised cube's diagonal (sets the step)
    render_march_steps: int = 0     # the same when rendering (previews, evaluation, renders); 0 = march_steps
    occupancy_resolution: int = 128  # occupancy grid cells a side
    occupancy_threshold: float = 0.01  # opacity of one step below which a cell is empty
    occupancy_decay: float = 0.95   # decay of the cells' density estimates at each update
    occupancy_every: int = 16       # steps between occupancy updates
    occupancy_warmup: int = 256     # steps during which every cell counts as occupied
    occupancy_fraction: float = 0.25  # share of cells re-sampled at each update after the first
    # batches
    batch_rays: int = 4096          # rays in the first step
    target_samples: int = 1 << 18   # field queries per step the ray count adapts to; 0 = fixed
    max_rays: int = 1 << 16         # cap on rays per step
    # optimiser
    grid_lr: float = 1e-2           # Adam learning rate of the hash tables
    grid_eps: float = 1e-15         # Adam epsilon of the hash tables
    mlp_lr: float = 1e-2            # Adam learning rate of the MLPs
    mlp_eps: float = 1e-15          # Adam epsilon of the MLPs
    mlp_weight_decay: float = 1e-6  # L2 regularisation of the MLP weights
    warmup_steps: int = 100         # linear learning-rate warm-up
    lr_decay_start: float = 0.5     # fraction of the fit after which the learning rate decays
    lr_final: float = 0.03          # learning rate factor reached at the end (exponential decay)
    loss: str = "mse"               # mse | smooth_l1 (on sRGB colour)
    # misc
    render_chunk: int = 1 << 18     # rays per chunk when rendering
    fused_adam: bool = True         # one fused Adam kernel on CUDA (fewer launches than foreach)
    cuda_graphs: bool = True        # replay fixed-shape steps from a CUDA graph (backend/graph_step.py)
    mlp_precision: str = "float32"  # float32 | bfloat16: autocast of the MLPs in graph-replayed steps
    prepass_samples: int = 0        # graph steps: slots of a density-only pass for early ray termination (0 = off)
    early_stop_transmittance: float = 1e-4  # ... samples behind this transmittance are not trained
    tf32: bool = True               # TensorFloat-32 matrix products on CUDA (MLPs; ~1e-3 relative precision)
    progress_interval: float = 0.25  # seconds between progress callbacks
    # surfaces (method "sdf" / "occupancy"; backend/train_surface.py)
    init_radius: float = 0.5        # geometric initialisation: a sphere of this radius (normalised)
    init_variance: float = 0.3      # sdf: NeuS sharpness inv_s = exp(10 * variance) at the start
    variance_lr: float = 1e-3       # sdf: Adam learning rate of the NeuS variance
    start_levels: int = 4           # hash levels active at the start (coarse to fine)
    level_every: int = 0            # steps between activating one more level; 0 = all by mid-fit
    cos_anneal_steps: int = 0       # sdf: steps over which NeuS's slope anneals; 0 = 10% of the fit
    eikonal_weight: float = 0.1     # sdf: (|grad f| - 1)^2 on samples and random points
    eikonal_points: int = 1024      # random points in the box per step for the eikonal term
    curvature_weight: float = 5e-4  # mean |laplacian| (finite differences) on the samples
    mask_weight: float = 0.1        # BCE of opacity against alpha, where the images have masks
    albedo_weight: float = 1.0      # albedo head vs the "albedo" pass, where given
    normal_weight: float = 0.05     # 1 - cos of rendered vs the "normal" pass, where given
    depth_weight: float = 0.1       # L1 of rendered vs the "depth" pass (normalised units), where given
    roughness_weight: float = 1.0   # roughness head vs the "roughness" pass, where it has a value

    @classmethod
    def from_dict(cls, values: dict) -> "FitConfig":
        """A config from a dict (e.g. run.json); unknown keys are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def validate(self) -> "FitConfig":
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        for name in ("steps", "levels", "features", "log2_table", "hidden", "march_steps", "batch_rays",
                     "max_rays", "occupancy_resolution", "occupancy_every", "render_chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("seconds", "preview_size", "mesh_resolution", "target_samples", "warmup_steps",
                     "render_march_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.mesh_opacity < 1:
            raise ValueError(f"mesh_opacity must be in (0, 1), or 0 to choose it from the renders, "
                             f"got {self.mesh_opacity}")
        if not 0 < self.lr_final <= 1 or not 0 <= self.lr_decay_start < 1:
            raise ValueError(f"need 0 < lr_final <= 1 and 0 <= lr_decay_start < 1, got {self.lr_final} "
                             f"and {self.lr_decay_start}")
        return self


# Per-method changes on top of _PRESETS (surface fields; see backend/train_surface.py).
_SURFACE_PRESETS: dict[str, dict[str, Any]] = {
    # surface samples cost 5 field evaluations (finite-difference gradients): fewer of them
    "draft": dict(steps=300, target_samples=1 << 12, batch_rays=512, max_rays=1 << 11, occupancy_decay=0.5,
                  occupancy_warmup=0, occupancy_every=32, warmup_steps=50, level_every=20, eikonal_points=256),
    # (the surface figures of docs/benchmarks.md were measured with 1024 steps along the diagonal)
    "standard": dict(target_samples=1 << 18, max_rays=1 << 15, occupancy_decay=0.5, occupancy_warmup=0,
                     march_steps=1024, render_march_steps=0),
    "high": dict(target_samples=1 << 18, max_rays=1 << 15, occupancy_decay=0.5, occupancy_warmup=0,
                 march_steps=1024, render_march_steps=0),
}
_METHOD_PRESETS: dict[str, dict[str, dict[str, Any]]] = {"sdf": _SURFACE_PRESETS, "occupancy": _SURFACE_PRESETS}

_PRESETS: dict[str, dict[str, Any]] = {
    # A recognisable result in about a minute on 2 CPU cores (~24 views of 128x128).
    "draft": dict(steps=400, levels=8, log2_table=16, max_res=256, march_steps=256,
                  occupancy_resolution=64, occupancy_every=16, occupancy_warmup=64, lr_final=0.1,
                  batch_rays=1024, target_samples=1 << 15, max_rays=1 << 13, mesh_resolution=128,
                  render_chunk=1 << 14),
    # instant-ngp's settings for the NeRF synthetic scenes, except (measured on lego, H100, 60 s;
    # docs/benchmarks.md): 2^20-row tables (+0.2 dB); on CUDA, graph-replayed steps with early
    # ray termination: a density-only pass over 2^20 marched samples, then 2^18 trained samples
    # of up to 2^18 rays (+0.3 dB over 2^19 samples without termination); renders in chunks of
    # 2^16 rays so that evaluating a young field (many occupied cells) stays well under 4 GB.
    # Quadrature: 1536 steps along the box diagonal in training (+0.2 dB over instant-ngp's 1024;
    # 2048 and 1792 were no better), renders integrate twice as finely (+0.05-0.1 dB, render time only).
    "standard": dict(steps=20000, log2_table=20, target_samples=1 << 18, prepass_samples=1 << 20,
                     max_rays=1 << 18, render_chunk=1 << 16, march_steps=1536, render_march_steps=3072),
    "high": dict(steps=40000, log2_table=20, target_samples=1 << 18, prepass_samples=1 << 20,
                 max_rays=1 << 18, mesh_resolution=512, march_steps=1536, render_march_steps=3072),
}


def make_config(method: str = "nerf", preset: str = "standard", device: str | None = None,
                steps: int = 0, seconds: float = 0.0, **overrides) -> FitConfig:
    """A FitConfig from a preset.  ``steps`` 0 = the preset's; ``seconds`` 0 = no time budget;
    ``device`` None = CUDA if available, else the CPU; ``overrides`` set any other field."""
    if preset not in _PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    if steps < 0 or seconds < 0:
        raise ValueError("steps and seconds must not be negative")
    names = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}")
    values = {**_PRESETS[preset], **_METHOD_PRESETS.get(method, {}).get(preset, {}),
              "method": method, "preset": preset, "device": str(pick_device(device)),
              "seconds": float(seconds), **overrides}
    if steps:
        values["steps"] = int(steps)
    return FitConfig(**values).validate()


class Callbacks:
    """Hooks called by :func:`fit`.  Subclass and override; the defaults do nothing."""

    def on_progress(self, info: dict) -> None:
        """info: step, total_steps, loss and psnr (means over the steps since the last call; psnr
        from the colour MSE on random backgrounds), elapsed and eta (s), fraction in [0, 1];
        diagnostics: rays (per step), occupied (share of occupancy cells)."""

    def on_preview(self, step: int, image: np.ndarray) -> None:
        """image: (h, w, 4) uint8 sRGB, straight alpha."""

    def should_stop(self) -> bool:
        """Polled every step; True stops the fit with :class:`Cancelled`."""
        return False

    def on_checkpoint(self, step: int, state: Callable[[], dict]) -> None:
        """Called after every step; ``state()`` returns the training state to save (only call it
        when a checkpoint is due): :meth:`Trainer.state_dict` plus ``step`` and ``elapsed`` (s).
        ``fit(..., resume=that dict)`` carries on from it."""


class Cancelled(Exception):
    """The fit was stopped by ``Callbacks.should_stop``; ``model`` holds the partial field."""

    def __init__(self, step: int, model: FittedField | None = None):
        super().__init__(f"fit cancelled at step {step}")
        self.step, self.model = step, model


def to_rgba8(image: np.ndarray) -> np.ndarray:
    """(H, W, 4) float premultiplied RGBA in [0, 1] -> (H, W, 4) uint8 straight alpha."""
    alpha = np.clip(image[..., 3:4], 0.0, 1.0)
    rgb = np.where(alpha > 1e-6, image[..., :3] / np.maximum(alpha, 1e-6), 0.0)
    out = np.concatenate([np.clip(rgb, 0.0, 1.0), alpha], axis=-1)
    return (out * 255.0 + 0.5).astype(np.uint8)


def psnr(mse: float) -> float:
    return -10.0 * math.log10(max(mse, 1e-10))


class Resumable:
    """Checkpoint state of a trainer with ``model`` (field + occupancy grid), ``optimizer``,
    ``rays`` and ``device``; every other setting follows from the step (``update_step``)."""

    def state_dict(self) -> dict:
        """Everything a resumed fit needs besides the step and the clock: field weights,
        occupancy grid, optimiser state, ray count and RNG states (tensors, for torch.save)."""
        state = {"field": self.model.field.state_dict(), "occupancy": self.model.occupancy.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "rays": int(self.rays),
                 "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (before the first step)."""
        self.model.field.load_state_dict(state["field"])
        self.model.occupancy.load_state_dict(state["occupancy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rays = int(state["rays"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)


class Trainer(Resumable):
    """One fit's state: model, optimiser, ray sampler and the step-dependent schedule."""

    def __init__(self, data: PosedImages, cfg: FitConfig):
        self.cfg, self.device = cfg, pick_device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
        field = build_field(cfg).to(self.device)
        occupancy = build_occupancy(cfg).to(self.device)
        meta = {"width": data.width, "height": data.height, "views": len(data)}
        self.model = FittedField(field, occupancy, data.aabb, cfg, meta)
        self.sampler = RaySampler(data, self.device)
        groups = field.param_groups()
        self.optimizer = torch.optim.Adam([
            {"params": groups["grid"], "lr": cfg.grid_lr, "eps": cfg.grid_eps, "weight_decay": 0.0},
            {"params": groups["mlp"], "lr": cfg.mlp_lr, "eps": cfg.mlp_eps, "weight_decay": cfg.mlp_weight_decay},
        ], betas=(0.9, 0.99), fused=self.device.type == "cuda" and cfg.fused_adam)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.rays = cfg.batch_rays

    def update_step(self, step: int, fraction: float) -> None:
        """Step-dependent settings before step ``step`` (0-based) at training ``fraction`` in [0, 1]."""
        cfg = self.cfg
        warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
        decay = (fraction - cfg.lr_decay_start) / max(1.0 - cfg.lr_decay_start, 1e-9)
        self.set_lr(warm * cfg.lr_final ** min(max(decay, 0.0), 1.0))
        since = step - cfg.occupancy_warmup
        if since >= 0 and since % cfg.occupancy_every == 0:
            self.model.field.eval()
            self.model.occupancy.update(self.model.field.density, self.model.step_size,
                                        fraction=1.0 if since == 0 else cfg.occupancy_fraction)
            self.model.field.train()
            self.after_occupancy_update()

    def set_lr(self, factor: float) -> None:
        """Learning rates = the base rates times ``factor``."""
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * factor

    def after_occupancy_update(self) -> None:
        """Hook: the occupancy grid has just been refreshed (and the device synchronised)."""

    def step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimisation step.  Returns (loss, mse) as 0-d tensors (not synchronised) and
        the number of field samples it took."""
        cfg = self.cfg
        origins, dirs, rgba = self.sampler.sample(self.rays)
        jitter = torch.rand(origins.shape[0], 1, device=self.device)
        out = self.model.trace(origins, dirs, jitter)
        bg = torch.rand(origins.shape[0], 3, device=self.device)
        pred = out.rgb + (1.0 - out.opacity[:, None]) * bg
        alpha = rgba[:, 3:]
        target = rgba[:, :3] * alpha + (1.0 - alpha) * bg
        mse = F.mse_loss(pred, target)
        loss = mse if cfg.loss == "mse" else F.smooth_l1_loss(pred, target, beta=0.1) * 10.0
        if loss.requires_grad:
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        if cfg.target_samples:
            ratio = cfg.target_samples / max(out.samples, 1)
            self.rays = int(min(max(self.rays * min(max(ratio, 0.5), 2.0), 256), cfg.max_rays))
        return loss.detach(), mse.detach(), out.samples

    def preview_ready(self, step: int) -> bool:
        """Previews wait for the occupancy grid's first update: before it every cell counts as
        occupied, so a render costs the whole box (tens of seconds on a CPU) to show fog.  (On a
        GPU a render costs little either way: no need to wait.)"""
        return step > self.cfg.occupancy_warmup or self.device.type == "cuda"

    def finish(self) -> None:
        """After the last step: the field's settings for use (the fit loop then calls eval())."""


def make_trainer(data: PosedImages, cfg: FitConfig) -> Trainer:
    """The trainer for ``cfg``: steps replayed from CUDA graphs where they can run, else eager."""
    from . import graph_step

    if graph_step.available(cfg, pick_device(cfg.device)):
        return graph_step.make_graph_trainer(data, cfg)
    return Trainer(data, cfg)


def fit(data: PosedImages, cfg: FitConfig, callbacks: Callbacks | None = None,
        resume: dict | None = None) -> FittedField:
    """Train a field on ``data`` until ``cfg.steps`` steps or ``cfg.seconds`` seconds.

    One loop for every method: the trainer (radiance fields: :func:`make_trainer`; surface
    fields: backend/train_surface.py) owns the step, the loop owns the clock, progress, previews,
    checkpoints and cancelling.
    ``resume``: a state from ``Callbacks.on_checkpoint`` (same data and config) to carry on from.
    Raises :class:`Cancelled` when ``callbacks.should_stop()`` turns True.
    """
    cb = callbacks or Callbacks()
    cfg.validate()
    if cfg.method != "nerf":    # surface fields have their own trainer (it imports this module)
        from .train_surface import SurfaceTrainer, check_surface_config
        check_surface_config(cfg)
    torch.manual_seed(cfg.seed)
    trainer = make_trainer(data, cfg) if cfg.method == "nerf" else SurfaceTrainer(data, cfg)
    return _train(trainer, data, cfg, cb, resume)


def _train(trainer: Resumable, data: PosedImages, cfg: FitConfig, cb: Callbacks, resume: dict | None
           ) -> FittedField:
    """The fit loop of :func:`fit`."""
    model = trainer.model
    checkpoint = getattr(cb, "on_checkpoint", None)
    preview_cam = _preview_camera(data, cfg.preview_size)
    first, offset = 0, 0.0
    if resume is not None:
        trainer.load_state_dict(resume)
        first, offset = int(resume["step"]), float(resume["elapsed"])
        model.meta["resumed_from_step"] = first

    start = time.perf_counter() - offset
    last_progress = -math.inf
    last_preview = -math.inf
    preview_every = cfg.preview_interval
    sums, count, mse_last, step = None, 0, None, first  # (loss, mse) summed on the device
    samples, first_step_s = 0, None
    while True:
        elapsed = time.perf_counter() - start
        fraction = step / cfg.steps
        if cfg.seconds > 0:
            fraction = max(fraction, elapsed / cfg.seconds)
        done = fraction >= 1.0
        if count and (done or elapsed - last_progress >= cfg.progress_interval):
            loss, mse_last = (sums / count).tolist()
            sums, count, last_progress = None, 0, elapsed
            cb.on_progress(_progress(step, cfg, trainer, loss, mse_last, elapsed, min(fraction, 1.0)))
        if preview_cam is not None and (done or (trainer.preview_ready(step) and elapsed - last_preview >= preview_every)):
            cb.on_preview(step, to_rgba8(model.render(*preview_cam)))
            last_preview = time.perf_counter() - start
            # Previews may take at most PREVIEW_SHARE of the wall time (slow devices: CPUs).
            preview_every = max(cfg.preview_interval, (last_preview - elapsed) / PREVIEW_SHARE)
        if done:
            break
        if cb.should_stop():
            raise Cancelled(step, model)
        trainer.update_step(step, fraction)
        loss, mse, n = trainer.step()
        samples = samples + n       # an int, or a device tensor (not synchronised here)
        if first_step_s is None:  # includes one-time costs: kernel compilation, allocator warm-up
            first_step_s = time.perf_counter() - start
        sums = torch.stack([loss, mse]) if sums is None else sums + torch.stack([loss, mse])
        count += 1
        step += 1
        if checkpoint is not None:
            checkpoint(step, lambda: {**trainer.state_dict(), "step": step, "elapsed": time.perf_counter() - start})
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)      # the budget counts work done, not work queued
    model.meta.update({"steps": step, "seconds": round(time.perf_counter() - start, 3), "samples": int(samples),
                       "first_step_s": round(first_step_s or 0.0, 3),
                       "train_psnr": round(psnr(mse_last), 3) if mse_last is not None else None})
    trainer.finish()
    model.field.eval()
    return model


def _progress(step: int, cfg: FitConfig, trainer: Trainer, loss: float, mse: float, elapsed: float,
              fraction: float) -> dict:
    eta = elapsed * (1.0 - fraction) / fraction if fraction > 0 else 0.0
    return {"step": step, "total_steps": cfg.steps, "loss": loss, "psnr": psnr(mse), "elapsed": elapsed,
            "eta": eta, "fraction": fraction, "rays": trainer.rays,
            "occupied": trainer.model.occupancy.occupied_fraction}


def _preview_camera(data: PosedImages, size: int):
    """(intrinsics, c2w, width, height) of the first camera scaled to longest side ``size``."""
    if size <= 0:
        return None
    s = size / max(data.width, data.height)
    w, h = max(1, round(data.width * s)), max(1, round(data.height * s))
    k = data.intrinsics[0] * np.array([w / data.width, h / data.height, w / data.width, h / data.height])
    return k, data.poses[0], w, h


def evaluate(model: FittedField, data: PosedImages) -> list[float]:
    """PSNR (dB) of each view of ``data``: 8-bit sRGB, both composited on white (BENCHMARKS.md)."""
    scores = []
    for i in range(len(data)):
        img = model.render(data.intrinsics[i], data.poses[i], data.width, data.height)
        pred = np.round(np.clip(img[..., :3] + (1.0 - img[..., 3:]), 0, 1) * 255.0) / 255.0
        gt = data.images[i].astype(np.float64) / 255.0
        target = gt[..., :3] * gt[..., 3:] + (1.0 - gt[..., 3:])
        scores.append(psnr(float(np.mean((pred - target) ** 2))))
    return scores
