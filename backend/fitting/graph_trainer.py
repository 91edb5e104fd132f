"""Training steps replayed from CUDA graphs: one launch a step instead of a few hundred.

A radiance-field step is a few hundred small kernels; launched one by one from Python they cost
more than they compute (8.6 ms of wall time for ~4.5 ms of kernels on an H100).  This trainer
makes every shape in the step fixed, so the whole step (ray sampling, marching, field, loss,
backward, Adam) is captured once in a CUDA graph and replayed:

* the rays of a step fill a fixed number of sample slots (``target_samples``): the ray marcher
  packs rays in order while they fit, and leaves out the rest (:func:`render.march_fixed`), so
  the sample count never travels to the host;
* the number of rays drawn (``rays``) is fixed per graph, a power of two chosen from the mean
  samples per ray, which is read back only when the occupancy grid is updated (that already
  synchronises); when it moves out of its band the graph is captured again;
* learning rates live in device tensors (capturable fused Adam), updated in place;
* a fit over time draws each ray's photo with it and gives every sample its photo's instant
  (the deformation, fields/motion.py, has no data-dependent shapes either);
* refined cameras (fitting/camera_refine.py) move each ray by its photo's correction inside the
  step; the marcher places the samples, and their positions are formed again from the moved rays
  so that the colour loss reaches the corrections; the hash levels' fade-in weights live in one
  device tensor updated in place.

The loss is the mean over the rays that were kept, so a step's gradient has the same scale as
in the eager :class:`~backend.fitting.trainer.Trainer`, which stays the reference (and the CPU path).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fit_implicit.backend.fitting.data import PosedImages
from fit_implicit.backend.fitting.trainer import Trainer
from fit_implicit.backend.render import volume
from fit_implicit.backend.render.volume import (RayOutput, composite_fixed, distortion_fixed, march_fixed, ray_aabb,
                                                scatter_index, terminate_fixed, transmittance_fixed)

MIN_RAYS = 1 << 10
WARMUP_STEPS = 3        # eager steps on a side stream before the first capture (lazy state, compilation)
MAX_AHEAD = 2           # steps the host may queue ahead of the GPU


def available(cfg, device: torch.device) -> bool:
    """Whether :class:`GraphTrainer` can run this config on ``device``."""
    return (device.type == "cuda" and cfg.method == "nerf" and cfg.train.cuda_graphs
            and volume.triton is not None and cfg.train.target_samples > 0
            and not cfg.train.appearance)      # per-photo appearance: the eager step only (not yet in the graph)


class GraphTrainer(Trainer):
    """:class:`~backend.fitting.trainer.Trainer` with fixed-shape steps replayed from a CUDA graph."""

    def __init__(self, data: PosedImages, cfg):
        super().__init__(data, cfg)
        tc, dev = cfg.train, self.device
        self.lr_tensors = [torch.tensor(tc.grid_lr, device=dev), torch.tensor(tc.mlp_lr, device=dev)]
        self.optimizer = self.adam(lrs=self.lr_tensors, fused=True, capturable=True)
        for group in self.optimizer.param_groups[2:]:      # a fit over time's motion planes: scheduled too
            group["lr"] = torch.tensor(float(group["lr"]), device=dev)
            self.lr_tensors.append(group["lr"])
        self.capacity = int(tc.target_samples)
        self.rays = _pow2_at_least(max(tc.batch_rays, MIN_RAYS))
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_rays = 0
        self.static: tuple | None = None
        self.warm = 0
        self.captures = 0
        self.pending: list[torch.cuda.Event] = []
        self.prepass = int(tc.prepass_samples)
        # summed since the last retune: samples and rays kept by the marcher, then after termination
        self.stats = torch.zeros(4, dtype=torch.float64, device=dev)
        # world -> normalised frame (no host-to-device copies may happen inside a capture)
        self.center = torch.tensor(self.model.center, dtype=torch.float32, device=dev)
        self.inv_scale = 1.0 / self.model.scale
        self.faded = False      # refined cameras: every hash level in, and so in the field's weights tensor

    def load_state_dict(self, state: dict) -> None:
        """Trainer.load_state_dict, keeping the learning rates in this trainer's device tensors
        (the captured Adam reads those)."""
        super().load_state_dict(state)
        for group, lr in zip(self.optimizer.param_groups, self.lr_tensors):
            lr.fill_(float(group["lr"]))
            group["lr"] = lr
        self.graph = self.static = None

    # -- schedule ---------------------------------------------------------------------
    def set_lr(self, factors: list[float]) -> None:
        for lr, base, factor in zip(self.lr_tensors, self.base_lrs, factors):
            lr.fill_(base * factor)

    def anneal_levels(self, step: int, fraction: float) -> None:
        """Trainer.anneal_levels into the one weights tensor the captured step reads, copied in
        place (and kept, at ones, after the fade-in ends: the step keeps the tensors it was captured
        with)."""
        field = self.model.field
        if self.faded and field.level_weights is not None:
            # every level in, and so in the tensor: nothing to copy; but the fade's clock runs on
            # (its end starts the corrections' rate decay: LevelFade.decay_start; weights are all
            # ones from (levels - 1) / levels of the fade on, before it ends)
            self.fade.advance(step, fraction, self.cameras)
            return
        weights = self.level_fade(step, fraction)
        if weights is None:
            return
        self.faded = bool((weights >= 1.0).all())
        weights = weights.to(self.device).repeat_interleave(field.encoding.level_width)
        if field.level_weights is None:
            field.level_weights = weights
            self.graph = None           # captured again with the field reading the new tensor
        else:
            field.level_weights.copy_(weights)

    def after_occupancy_update(self) -> None:
        """Pick the ray count from the mean samples per kept ray since the last update (the
        occupancy update above has just synchronised, so reading it costs nothing)."""
        marched, marched_rays, samples, kept = self.stats.tolist()
        self.stats.zero_()
        if kept < 1:
            return
        want = self.capacity / max(samples / kept, 1e-3)        # rays that fill the slots
        if self.prepass and marched_rays >= 1:                  # ... and the pre-pass's
            want = min(want, self.prepass / max(marched / marched_rays, 1e-3))
        if self.model.background is not None:                   # ... and as many background samples
            want = min(want, self.capacity / self.model.background.samples)
        cap = _pow2_at_least(max(self.cfg.train.max_rays, MIN_RAYS))
        # Hysteresis: a new ray count means a new capture (tens of ms), so only for a big change.
        if want > 1.5 * self.rays or want < self.rays / 4:
            self.rays = min(_pow2_at_least(want), cap)

    # -- one step ---------------------------------------------------------------------
    def _body(self, rays: int):
        """One step of fixed shapes: returns (loss, mse, samples used, rays kept) tensors."""
        tc, model, dev = self.cfg.train, self.model, self.device
        times = None
        if self.times is None and self.cameras is None:
            origins, dirs, rgba = self.sampler.sample(rays)
        else:
            origins, dirs, rgba, photo = self.sampler.sample(rays, with_photo=True)
            if self.times is not None:      # a fit over time: each ray at its photo's instant (+1 row for the padding slots)
                times = self.times[photo]
                times = torch.cat([times, times[:1]])
            origins, dirs = self.corrected(photo, origins, dirs)
        o = (origins - self.center) * self.inv_scale
        t_near, t_far, hit = ray_aabb(o, dirs, model.box)
        t_far = torch.where(hit, t_far, t_near)
        jitter = torch.rand(rays, device=dev)
        bits, res = model.occupancy.march_bits()
        half = torch.autocast("cuda", dtype=torch.bfloat16, enabled=tc.mlp_precision == "bfloat16")
        if self.prepass:
            # Early ray termination: densities of every candidate (no gradient), then keep each
            # ray's samples while the transmittance in front of them is above the threshold.
            first = march_fixed(o, dirs, t_near, t_far, jitter, model.step_size, model.max_steps, bits,
                                res, self.prepass)
            with torch.no_grad(), half:
                trans = transmittance_fixed(model.field.density(first.x, _at(times, first.ray)).float(),
                                            model.step_size, first)
            s = terminate_fixed(first, trans, self.capacity, tc.early_stop_transmittance)
        else:
            s = first = march_fixed(o, dirs, t_near, t_far, jitter, model.step_size, model.max_steps,
                                    bits, res, self.capacity)
        dirs_ext = torch.cat([dirs, dirs[:1]])
        x = s.x
        if self.cameras is not None:       # the positions again from the moved rays: the corrections' gradient
            x = torch.cat([o, o[:1]]).index_select(0, s.ray) + s.t[:, None] * dirs_ext.index_select(0, s.ray)
        with half:
            sigma, rgb = model.field(x, dirs_ext.index_select(0, s.ray), _at(times, s.ray))
        w = composite_fixed(sigma.float(), model.step_size, s)
        into, rows = scatter_index(s), rays + s.ray.shape[0]
        color = origins.new_zeros(rows, 3).index_add(0, into, w[:, None] * rgb.float())[:rays]
        opacity = origins.new_zeros(rows).index_add(0, into, w)[:rays]
        if model.background is not None:    # what lies outside the box, behind it (fields/background.py)
            behind = RayOutput(color, opacity, torch.zeros_like(opacity), 0)
            with half:
                model.composite_background(o, dirs, behind, jitter[:, None])
            color, opacity = behind.rgb.float(), behind.opacity.float()
        bg = torch.rand(rays, 3, device=dev)
        pred = color + (1.0 - opacity[:, None]) * bg
        alpha = rgba[:, 3:]
        target = rgba[:, :3] * alpha + (1.0 - alpha) * bg
        kept = s.kept.float()
        n = kept.sum().clamp_min(1.0)
        per_ray = ((pred - target) ** 2).mean(-1)
        mse = per_ray.mul(kept).sum() / n
        self.sampler.record_errors(per_ray, kept)
        if tc.loss == "mse":
            loss = mse
        else:
            per = F.smooth_l1_loss(pred, target, beta=0.1, reduction="none").mean(-1)
            loss = per.mul(kept).sum() / n * 10.0
        if times is not None:
            loss = loss + self.motion_penalty()
        loss = loss + self.grid_decay()
        if self.cameras is not None and tc.camera_weight > 0:
            loss = loss + tc.camera_weight * self.cameras.penalty()
        if tc.distortion_weight > 0:
            loss = loss + tc.distortion_weight * distortion_fixed(w, model.step_size, s).mul(kept).sum() / n
        loss.backward()
        self.optimizer.step()
        stats = torch.stack([first.used.double(), first.kept.sum().double(), s.used.double(),
                             kept.sum().double()])
        return loss.detach(), mse.detach(), s.used, stats

    def _eager(self, rays: int):
        self.optimizer.zero_grad(set_to_none=True)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            out = self._body(rays)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return out

    def _capture(self, rays: int) -> None:
        self.graph = self.static = None          # frees the previous graph's memory
        torch.cuda.synchronize(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static = self._body(rays)
        self.graph, self.graph_rays = graph, rays
        self.captures += 1
        self.model.meta["graph_captures"] = self.captures

    def step(self):
        """One optimisation step.  Returns (loss, mse, samples) as 0-d device tensors."""
        if self.warm < WARMUP_STEPS:
            self.warm += 1
            loss, mse, used, stats = self._eager(self.rays)
        else:
            if self.graph is None or self.graph_rays != self.rays:
                self._capture(self.rays)
            self._throttle()
            self.graph.replay()
            self._record()
            loss, mse, used, stats = self.static
        self.stats += stats
        return loss.clone(), mse.clone(), used.clone()

    def _throttle(self) -> None:
        """Let the host run at most MAX_AHEAD steps ahead of the GPU, so that wall-clock
        budgets measure work done, not work queued."""
        while len(self.pending) >= MAX_AHEAD:
            self.pending.pop(0).synchronize()

    def _record(self) -> None:
        event = torch.cuda.Event()
        event.record()
        self.pending.append(event)


def _at(times: torch.Tensor | None, ray: torch.Tensor) -> torch.Tensor | None:
    """Each slot's time from its ray's (None for a still fit)."""
    return None if times is None else times[ray]


def _pow2_at_least(x: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(x, 1.0))))
