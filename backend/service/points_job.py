"""The job runner of a fit to points: PointsJob -> checked cloud -> signed distance field ->
MeshResult in the points' frame (issue 16; the fit itself: backend/fitting/points_trainer.py).

Run by the server's one runner (render_job.py ``with_render_jobs``), so these jobs queue with the
fits from photos on one worker and one GPU; they keep their model and training
checkpoints in the job folder like any fit (a killed backend resumes them; RenderJob, MeshJob and
FetchModel find the model).  Bad clouds (all NaN, too few points, a mesh of no area) fail with
the reason as the Failed message.
"""
from __future__ import annotations

import time

from fit_implicit.shared import protocol

from fit_implicit.backend.service.fit_job import (TrainCallbacks, cancellable, configure_torch, send_mesh_assets,
                                                 trained_model)
from fit_implicit.backend.service.jobs import JobContext


def cloud_of(job: protocol.PointsJob, samples: int, seed: int = 0):
    """The job's points (or its mesh's surface, sampled) as a checked PointCloud."""
    from fit_implicit.backend.fitting.point_cloud import make_cloud
    from fit_implicit.backend.fitting.point_files import mesh_cloud

    if len(job.vertices):
        return mesh_cloud(job.vertices, job.faces, samples, seed, {"source": "mesh"})
    return make_cloud(job.points, job.normals if len(job.normals) else None,
                      job.colors if len(job.colors) else None, {"source": "points"})


def run_points_job(job: protocol.PointsJob, ctx: JobContext) -> dict:
    """Fit ``job`` and send its mesh; returns the Done summary.  See jobs.JobRunner."""
    configure_torch()
    with cancellable(ctx):
        return _run_points_job(job, ctx)


def _run_points_job(job: protocol.PointsJob, ctx: JobContext) -> dict:
    from fit_implicit.backend.export.mesh import extract_mesh, voxel_resolution
    from fit_implicit.backend.fitting.points_fit import fit_points, points_config
    from fit_implicit.backend.fitting.points_trainer import cloud_box

    overrides = {"points_detail": job.detail, "points_orientation": job.orientation, "encoding": job.encoding}
    if job.mesh_samples > 0:
        overrides["points_mesh_samples"] = job.mesh_samples
    if job.mesh_resolution > 0:
        overrides["mesh_resolution"] = job.mesh_resolution
    cfg = points_config(job.preset, device=ctx.device, steps=job.steps, seconds=job.seconds, **overrides)
    cloud = None
    if job.voxel_size > 0:      # refused now, not after the fit (the fit's box, outliers gone, is no larger)
        cloud = cloud_of(job, cfg.points.points_mesh_samples)
        voxel_resolution(cloud_box(cloud, cfg.points.points_padding), job.voxel_size)
    ctx.progress("train", force=True)
    start = time.monotonic()
    callbacks = TrainCallbacks(ctx, previews=False)
    model = trained_model(ctx, str(cfg.device), lambda resume: fit_points(   # the cloud only when it trains
        cloud if cloud is not None else cloud_of(job, cfg.points.points_mesh_samples), cfg, callbacks, resume=resume))
    fit_seconds = time.monotonic() - start
    ctx.check_cancelled()
    ctx.progress("mesh", force=True)
    resolution = voxel_resolution(model.aabb, job.voxel_size) if job.voxel_size > 0 else cfg.mesh.mesh_resolution
    verts, faces, colors = extract_mesh(model, resolution, decimate_to=job.max_faces or None)
    if not len(faces):
        raise ValueError("the field fitted to the points has no surface: nothing to send back")
    assets = send_mesh_assets(model, verts, faces, colors, 0, ctx)
    facts = model.meta.get("points", {})
    return {"steps": int(model.meta.get("steps", 0)), "seconds": round(fit_seconds, 3), "method": "points",
            "preset": job.preset, "device": str(cfg.device), "mesh_resolution": int(resolution),
            "resumed_from_step": int(model.meta.get("resumed_from_step", 0)),
            **{k: facts[k] for k in ("points_in", "points_used", "outliers_removed", "non_finite_dropped",
                                     "oriented", "mean_distance") if k in facts},
            **assets}
