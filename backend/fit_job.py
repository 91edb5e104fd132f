"""The real job runner: Submit -> fit -> mesh -> eval renders, reported through a JobContext.

This is the one place where the wire protocol meets the trainer (backend.data / train / model /
export.mesh, see CONTRACTS.md).  Torch and the trainer are imported on first use, so the server
starts fast and tests can run it with a fake runner and no torch at all.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from shared import protocol

from .jobs import JobCancelled, JobContext

log = logging.getLogger(__name__)

_torch_configured = False


def configure_torch() -> None:
    """Use every core: the server loop mostly sleeps in poll() (set once per process)."""
    global _torch_configured
    if _torch_configured:
        return
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    _torch_configured = True


class _TrainCallbacks:
    """backend.train.Callbacks that forward to the job context (worker thread)."""

    def __init__(self, ctx: JobContext, previews: bool):
        self._ctx = ctx
        self._previews = previews
        self.last: dict[str, Any] = {}

    def on_progress(self, info: dict) -> None:
        self.last = dict(info)
        self._ctx.progress("train", **{k: info[k] for k in
                                       ("step", "total_steps", "loss", "psnr", "elapsed", "eta", "fraction")
                                       if k in info})

    def on_preview(self, step: int, image: np.ndarray) -> None:
        if self._previews:
            self._ctx.preview(image, step)

    def should_stop(self) -> bool:
        return self._ctx.should_stop()


def run_fit_job(submit: protocol.Submit, ctx: JobContext) -> dict:
    """Fit ``submit`` and send its results; returns the Done summary.  See jobs.JobRunner."""
    configure_torch()
    from . import data, train
    from .export.mesh import extract_mesh

    posed = data.from_submit(submit)
    overrides: dict[str, Any] = {"preview_size": submit.preview_size, "preview_interval": submit.preview_interval}
    if submit.mesh_resolution > 0:
        overrides["mesh_resolution"] = submit.mesh_resolution
    cfg = train.make_config(method=submit.method, preset=submit.preset, device=ctx.device,
                            steps=submit.steps, seconds=submit.seconds, **overrides)
    callbacks = _TrainCallbacks(ctx, previews=submit.preview_size > 0)
    ctx.progress("train", force=True)
    start = time.monotonic()
    try:
        model = train.fit(posed, cfg, callbacks)
    except train.Cancelled as exc:
        raise JobCancelled() from exc
    fit_seconds = time.monotonic() - start
    del posed

    ctx.check_cancelled()
    ctx.progress("mesh", force=True)
    verts, faces, colors = extract_mesh(model, cfg.mesh_resolution)
    ctx.send(protocol.MeshResult(
        job_id=ctx.job_id,
        vertices=np.ascontiguousarray(verts, dtype=np.float32),
        faces=np.ascontiguousarray(faces, dtype=np.int32),
        colors=np.ascontiguousarray(np.clip(colors, 0.0, 1.0), dtype=np.float32),
    ))

    count = len(submit.eval_poses)
    for i in range(count):
        ctx.check_cancelled()
        ctx.progress("render", step=i, total_steps=count, fraction=i / count, force=True)
        width, height = (int(s) for s in submit.eval_sizes[i])
        rgba = model.render(np.asarray(submit.eval_intrinsics[i], np.float64),
                            np.asarray(submit.eval_poses[i], np.float64), width, height)
        ctx.send(protocol.RenderResult(job_id=ctx.job_id, index=i, image=train.to_rgba8(rgba)))

    meta = getattr(model, "meta", {})
    return {
        "steps": int(meta.get("steps", callbacks.last.get("step", 0))),
        "seconds": round(fit_seconds, 3),
        "psnr": meta.get("train_psnr", callbacks.last.get("psnr")),   # training batches, dB
        "vertices": int(len(verts)),
        "faces": int(len(faces)),
        "device": str(cfg.device),
        "method": submit.method,
        "preset": submit.preset,
    }

