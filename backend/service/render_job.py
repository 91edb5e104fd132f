"""Jobs on a model a fit job saved in its folder: a RenderJob renders views of it, a MeshJob
meshes it again with other settings.

The fit job saves its model as ``<runs_dir>/<fit_job_id>/`` (backend/service/paths.py,
backend/fitting/runs.py); this runner loads it (``load_run``), renders each camera and sends one RenderResult per
view, in order, with a Progress before each.  Torch is imported on first use, so the server starts
fast and tests with a fake fit runner need no torch.

:func:`with_render_jobs` wraps the server's fit runner so one job queue (and one worker, one GPU)
serves both kinds of job: renders wait behind running fits instead of competing for memory.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fit_implicit.shared import protocol

from fit_implicit.backend.service import paths
from fit_implicit.backend.service.jobs import JobContext

log = logging.getLogger(__name__)


class RenderJobError(ValueError):
    """The render or mesh job cannot run; the text tells the user why.  ``code``: the Failed's code
    (shared/protocol.py), "unknown_job" when the fit has no model here."""

    def __init__(self, message: str, code: str = "no_model"):
        super().__init__(message)
        self.code = code


def model_folder(runs_dir: str | Path | None, fit_job_id: str) -> Path:
    """The folder of a fit job's saved model, checked: a job id, inside ``runs_dir``, with a model."""
    from fit_implicit.backend.fitting.runs import is_run

    if runs_dir is None:
        raise RenderJobError("this backend keeps no job folders (started without a runs folder), so it has "
                             "no fitted models to render; start it with --runs-dir")
    try:
        folder = paths.job_folder(runs_dir, fit_job_id)
    except paths.PathError as exc:
        raise RenderJobError(f"fit job {fit_job_id[:64]!r}: {exc}") from None
    if not is_run(folder):
        raise RenderJobError(no_model_text(fit_job_id), "unknown_job")
    return folder


def no_model_text(fit_job_id: str) -> str:
    """What a client hears about a fit this backend has no model of, or one of another client's
    (the same words, so that they tell nothing apart)."""
    return (f"fit job {fit_job_id[:64]} has no fitted model on this backend: it has not finished, it failed or "
            "was cancelled, or its results expired; fit again")


def run_render_job(msg: protocol.RenderJob, ctx: JobContext, runs_dir: str | Path | None) -> dict:
    """Load the fit job's model and send its renders; returns the Done summary."""
    from fit_implicit.backend.fitting.runs import load_run
    from fit_implicit.backend.render.image import to_rgba8
    from fit_implicit.backend.service.fit_job import configure_torch

    folder = model_folder(runs_dir, msg.fit_job_id)
    configure_torch()
    ctx.progress("render", force=True)
    start = time.monotonic()
    model = load_run(folder, ctx.device)
    load_seconds = time.monotonic() - start
    count = len(msg.poses)
    for i in range(count):
        ctx.check_cancelled()
        width, height = (int(s) for s in msg.sizes[i])
        rgba = model.render(np.asarray(msg.intrinsics[i], np.float64), np.asarray(msg.poses[i], np.float64),
                            width, height, time=float(msg.times[i]) if len(msg.times) else 0.0)
        ctx.send(protocol.RenderResult(job_id=ctx.job_id, index=i, image=to_rgba8(rgba)))
        ctx.progress("render", step=i + 1, total_steps=count, fraction=(i + 1) / count,
                     elapsed=time.monotonic() - start)
    seconds = time.monotonic() - start
    log.info("job %s: rendered %d views of fit job %s in %.2f s", ctx.job_id, count, msg.fit_job_id, seconds)
    return {"views": count, "fit_job_id": msg.fit_job_id, "load_seconds": round(load_seconds, 3),
            "seconds": round(seconds, 3), "method": str(getattr(model.config, "method", ""))}


def run_mesh_job(msg: protocol.MeshJob, ctx: JobContext, runs_dir: str | Path | None) -> dict:
    """Load the fit job's model, mesh it with the job's settings (those left 0: the fit's) and
    send the assets as a fit does (backend/service/fit_job.py send_mesh_assets); returns the Done
    summary.  What no training camera saw is closed flat when the run keeps its cameras."""
    from fit_implicit.backend.export.mesh import extract_mesh
    from fit_implicit.backend.export.tracks import size_error
    from fit_implicit.backend.export.unseen import Views, summary_entries
    from fit_implicit.backend.fitting.runs import load_run
    from fit_implicit.backend.service.fit_job import configure_torch, send_mesh_assets

    folder = model_folder(runs_dir, msg.fit_job_id)
    configure_torch()
    ctx.progress("mesh", force=True)
    start = time.monotonic()
    model = load_run(folder, ctx.device)
    model.time = msg.time           # a field over time: the instant to mesh (a still one: ignored)
    if len(msg.track_times) and not model.dynamic:
        raise RenderJobError(f"fit job {msg.fit_job_id} is of one instant: it has no motion to follow its mesh "
                             "through (track_times)", code="not_dynamic")
    views = Views.of_run(model.meta)
    if msg.texture_size == protocol.TEXTURE_AUTO and views is None:
        raise RenderJobError(f"fit job {msg.fit_job_id}: its run keeps no cameras to choose a texture size "
                             "from; ask for a size")
    cfg = model.config.mesh
    facts: dict = {}
    verts, faces, colors = extract_mesh(
        model, msg.mesh_resolution or cfg.mesh_resolution, msg.mesh_opacity or None, facts=facts,
        views=views if cfg.mesh_close_unseen else None,
        decimate_to=msg.max_faces if msg.max_faces and not msg.texture_size else None)
    ctx.check_cancelled()
    if problem := size_error(len(msg.track_times), len(verts), protocol.MAX_TRACK_POINTS):
        raise RenderJobError(problem, code="too_large")              # before the textures are baked
    summary = send_mesh_assets(model, verts, faces, colors, msg.texture_size, ctx, views=views,
                               max_faces=msg.max_faces or None, track_times=msg.track_times)
    seconds = time.monotonic() - start
    log.info("job %s: meshed fit job %s again in %.2f s (%d faces)", ctx.job_id, msg.fit_job_id, seconds,
             summary.get("faces", 0))
    return {**summary, "fit_job_id": msg.fit_job_id, "seconds": round(seconds, 3),
            "method": str(getattr(model.config, "method", "")), **({"time": msg.time} if model.dynamic else {}),
            **(summary_entries(facts["unseen"]) if "unseen" in facts else {})}


Runner = Callable[[Any, JobContext], Mapping[str, Any]]


def with_render_jobs(fit_runner: Runner, runs_dir: Callable[[], str | Path | None]) -> Runner:
    """A job runner that runs RenderJob and MeshJob messages here, PointsJob in points_job.py and
    everything else (Submit) with ``fit_runner``.
    ``runs_dir()`` gives the job folders' root when a render job starts."""

    def runner(message: Any, ctx: JobContext) -> Mapping[str, Any]:
        if isinstance(message, protocol.RenderJob):
            return run_render_job(message, ctx, runs_dir())
        if isinstance(message, protocol.MeshJob):
            return run_mesh_job(message, ctx, runs_dir())
        if isinstance(message, protocol.PointsJob):    # a fit to points (points_job.py)
            from fit_implicit.backend.service.points_job import run_points_job
            return run_points_job(message, ctx)
        return fit_runner(message, ctx)

    runner.fit_runner = fit_runner     # for introspection in tests and logs
    return runner
