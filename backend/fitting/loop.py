"""The fit loop: ``fit(data, cfg, callbacks)`` trains the field a FitConfig describes on posed
images and returns a :class:`~backend.fitting.model.FittedField`.

One loop for every method.  The trainer (:func:`make_trainer`: fitting/trainer.py,
fitting/graph_trainer.py, fitting/surface_trainer.py) owns the step and the step-dependent
schedule; the loop owns the clock (steps or a time budget), progress, previews, checkpoints
(resume from :meth:`Callbacks.on_checkpoint`'s state) and cancelling.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
import torch

from fit_implicit.backend.fitting import graph_trainer
from fit_implicit.backend.fitting.config import FitConfig
from fit_implicit.backend.fitting.data import PosedImages
from fit_implicit.backend.fitting.metrics import psnr
from fit_implicit.backend.fitting.model import FittedField, pick_device
from fit_implicit.backend.fitting.surface_trainer import SurfaceTrainer
from fit_implicit.backend.fitting.trainer import Trainer, TrainerBase
from fit_implicit.backend.render.image import to_rgba8

log = logging.getLogger(__name__)

PREVIEW_SHARE = 0.1     # most of the wall time previews may take; the interval grows to keep it


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
        when a checkpoint is due): :meth:`TrainerBase.state_dict` plus ``step`` and ``elapsed`` (s).
        ``fit(..., resume=that dict)`` carries on from it."""


class ResumeError(ValueError):
    """A checkpoint's state does not fit the trainer this fit builds (another file's, another
    config's, or damaged inside): :func:`fit` starts over instead."""


class Cancelled(Exception):
    """The fit was stopped by ``Callbacks.should_stop``; ``model`` holds the partial field."""

    def __init__(self, step: int, model: FittedField | None = None):
        super().__init__(f"fit cancelled at step {step}")
        self.step, self.model = step, model


def make_trainer(data: PosedImages, cfg: FitConfig, group=None) -> TrainerBase:
    """The trainer for ``cfg``: surface fields train with :class:`SurfaceTrainer`; radiance
    fields with steps replayed from CUDA graphs where they can run, else eagerly.  In a
    data-parallel fit (``group``, fitting/distributed.py) always eagerly, and the trainer holds
    and draws from only its rank's share of the photos."""
    views = None if group is None else group.share(len(data))
    if cfg.method != "nerf":
        return SurfaceTrainer(data, cfg, views=views)
    if group is None and graph_trainer.available(cfg, pick_device(cfg.device)):
        return graph_trainer.GraphTrainer(data, cfg)
    return Trainer(data, cfg, views=views)


def fit(data: PosedImages, cfg: FitConfig, callbacks: Callbacks | None = None,
        resume: dict | None = None, group=None) -> FittedField:
    """Train a field on ``data`` until ``cfg.steps`` steps or ``cfg.seconds`` seconds.

    One loop for every method: the trainer (:func:`make_trainer`) owns the step, the loop owns
    the clock, progress, previews, checkpoints and cancelling.
    ``resume``: a state from ``Callbacks.on_checkpoint`` (same data and config) to carry on from.
    Raises :class:`Cancelled` when ``callbacks.should_stop()`` turns True.
    ``group``: this process's distributed.Group in a data-parallel fit (fitting/distributed.py).
    """
    cfg.validate()
    if group is not None and resume is not None:
        raise ValueError("a data-parallel fit starts fresh: it does not resume a checkpoint")

    def build() -> TrainerBase:
        trainer = make_trainer(data, cfg, group=group)
        if group is not None:
            trainer.join(group, cfg.seed)
        return trainer

    return train_fresh(build, data, cfg, callbacks, resume)


def train_fresh(build: Callable[[], TrainerBase], data: PosedImages | None, cfg: FitConfig,
                callbacks: Callbacks | None, resume: dict | None) -> FittedField:
    """:func:`train` a trainer ``build()`` makes after seeding torch with ``cfg.seed``; a
    checkpoint that reads but does not fit (:class:`ResumeError`) starts over with a new one."""
    cb = callbacks or Callbacks()
    torch.manual_seed(cfg.seed)
    try:
        return train(build(), data, cfg, cb, resume)
    except ResumeError as exc:     # a checkpoint that reads but does not fit: start over, fresh
        log.warning("starting over: %s", exc)
        torch.manual_seed(cfg.seed)
        return train(build(), data, cfg, cb, None)


def train(trainer: TrainerBase, data: PosedImages | None, cfg: FitConfig, cb: Callbacks, resume: dict | None
          ) -> FittedField:
    """The fit loop of :func:`fit` (and of fits to points, fitting/points_trainer.py: ``data``
    None, no previews), for any trainer with TrainerBase's hooks: ``model``, ``device``,
    ``rays``, ``update_step``, ``step``, ``preview_ready``, ``finish`` and the state dicts."""
    model = trainer.model
    group = getattr(trainer, "group", None)     # a data-parallel fit's (fitting/distributed.py)
    checkpoint = getattr(cb, "on_checkpoint", None)
    preview_cam = _preview_camera(data, cfg.preview_size)
    first, offset = 0, 0.0
    if resume is not None:
        try:
            trainer.load_state_dict(resume)
            first, offset = int(resume["step"]), float(resume["elapsed"])
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
            raise ResumeError(f"the checkpoint does not fit this fit ({type(exc).__name__}: {exc})") from exc
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
        stop = fraction < 1.0 and cb.should_stop()
        if group is not None:      # the ranks share one clock (the furthest) and rank 0's cancel
            fraction, stop = group.agree(fraction, stop)
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
        if stop:
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
                       "train_psnr": round(train_psnr(mse_last), 3) if mse_last is not None else None})
    trainer.finish()
    if getattr(trainer, "appearance", None) is not None:      # each photo's exposure and white balance
        model.meta["appearance"] = trainer.appearance.summary()
    if getattr(trainer, "cameras", None) is not None:         # how far each photo's camera moved
        model.meta["camera_refine"] = {**trainer.cameras.summary(trainer.poses),
                                       # where every hash level was in, and the cameras' largest move a window
                                       "levels_in_at": trainer.fade.done_at, "window_moves": trainer.fade.moves}
        if hasattr(model.field, "set_level_weights"):
            model.field.set_level_weights(None)                # every hash level in full from here on
    model.field.eval()
    return model


def train_psnr(mse: float) -> float:
    """PSNR (dB) of a training batch's colour MSE, at most 100 dB (progress travels as a finite number)."""
    return psnr(max(mse, 1e-10))


LONG_FIT_SECONDS = 600.0     # a fit expected to run longer than this is announced (long_fit_text)


def long_fit_text(info: dict, preset: str, after: float = 5.0, longer_than: float = LONG_FIT_SECONDS,
                  since: dict | None = None) -> str:
    """One sentence for the user once a fit has run ``after`` seconds (the step rate has settled)
    when it will run ``longer_than`` more seconds; "" otherwise.  ``info``: an on_progress dict;
    ``since``: an earlier one of the same fit, from which the rate is measured (the fit's first
    steps pay its set-up and first compilation: measured from the start, a 100 s draft fit whose
    first progress came after 5.5 s was announced as 33 minutes)."""
    elapsed = float(info.get("elapsed", 0.0))
    start = since or {}
    window = elapsed - float(start.get("elapsed", 0.0))
    fraction, done = float(info.get("fraction", 0.0)), float(start.get("fraction", 0.0))
    eta = window * (1.0 - fraction) / (fraction - done) if since is not None and fraction > done \
        else float(info.get("eta", 0.0))
    if window < after or eta <= longer_than:
        return ""
    rate = (info.get("step", 0) - start.get("step", 0)) / max(window, 1e-9)
    return (f"at {rate:.0f} steps/s this fit takes about {(elapsed + eta) / 60:.0f} minutes in all "
            f"({eta / 60:.0f} more); a time budget or {'the draft preset' if preset != 'draft' else 'fewer steps'} "
            "shortens it")


class LongFitNotice:
    """:func:`long_fit_text` said at most once per fit: the rate measured from the fit's first
    progress on, decided at the first progress ``after`` seconds later (the CLI prints it, the
    backend sends it as Progress.note)."""

    def __init__(self, preset: str, after: float = 5.0):
        self.preset, self.after, self.decided = preset, after, False
        self.first: dict | None = None

    def __call__(self, info: dict) -> str:
        if self.decided:
            return ""
        if self.first is None:
            self.first = dict(info)
            return ""
        text = long_fit_text(info, self.preset, self.after, since=self.first)
        self.decided = bool(text) or float(info.get("elapsed", 0.0)) - float(self.first.get("elapsed", 0.0)) >= self.after
        return text


def _progress(step: int, cfg: FitConfig, trainer: TrainerBase, loss: float, mse: float, elapsed: float,
              fraction: float) -> dict:
    eta = elapsed * (1.0 - fraction) / fraction if fraction > 0 else 0.0
    return {"step": step, "total_steps": cfg.steps, "loss": loss, "psnr": train_psnr(mse), "elapsed": elapsed,
            "eta": eta, "fraction": fraction, "rays": trainer.rays,
            "occupied": trainer.model.occupancy.occupied_fraction}


def _preview_camera(data: PosedImages | None, size: int):
    """(intrinsics, c2w, width, height) of the first camera scaled to longest side ``size``."""
    if size <= 0 or data is None:
        return None
    width, height = data.size(0)
    s = size / max(width, height)
    w, h = max(1, round(width * s)), max(1, round(height * s))
    k = data.intrinsics[0] * np.array([w / width, h / height, w / width, h / height])
    return k, data.poses[0], w, h
