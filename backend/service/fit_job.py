"""The real job runner: Submit -> fit -> mesh -> eval renders -> refined cameras -> the background as an environment
image (fits that modelled it), reported through a JobContext.

This is the one place where the wire protocol meets the trainer (backend.fitting.data / train / model /
export.mesh).  Torch and the trainer are imported on first use, so the server
starts fast and tests can run it with a fake runner and no torch at all.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from typing import Any, Callable

import numpy as np

from fit_implicit.shared import protocol

from fit_implicit.backend.service.jobs import JobCancelled, JobContext

log = logging.getLogger(__name__)

_torch_configured = False
ALBEDO_VIEW_SIDE = 1024     # MaterialResult.albedo_view: longest side at most
# Texture steps against Blender's albedo pass where the fit's colours hold the light (a radiance field
# in scene mode) and the preset refines nothing: the asset's base colour then comes from the pass,
# not from the light the renders saw (which Blender would shade a second time; docs/benchmarks.md
# "A radiance field in scene mode").
BASE_COLOUR_STEPS = 200


def configure_torch() -> None:
    """Use every core (the server loop mostly sleeps in poll()), or FIT_IMPLICIT_THREADS of them
    (backend/service/workers.py shares the cores between CPU worker processes); once per process."""
    global _torch_configured
    if _torch_configured:
        return
    import torch

    threads = os.environ.get("FIT_IMPLICIT_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else os.cpu_count() or 1)
    _torch_configured = True


class TrainCallbacks:
    """Fit-loop callbacks (backend/fitting/loop.py, Callbacks) that forward to the job context
    (worker thread)."""

    def __init__(self, ctx: JobContext, previews: bool, length_notice=None):
        self._ctx = ctx
        self._previews = previews
        self._length_notice = length_notice    # loop.LongFitNotice: a long fit's length, said once
        self.last: dict[str, Any] = {}
        self._last_checkpoint = time.monotonic()
        self._told_checkpoint = False      # a failed checkpoint is told to the client once

    def on_progress(self, info: dict) -> None:
        self.last = dict(info)
        note = self._length_notice(info) if self._length_notice is not None else ""
        self._ctx.progress("train", note=note, **{k: info[k] for k in
                                                  ("step", "total_steps", "loss", "psnr", "elapsed", "eta", "fraction")
                                                  if k in info})

    def on_preview(self, step: int, image: np.ndarray) -> None:
        if self._previews:
            self._ctx.preview(image, step)

    def should_stop(self) -> bool:
        return self._ctx.should_stop()

    def on_checkpoint(self, step: int, state) -> None:
        """Every ``ctx.checkpoint_interval`` seconds: write the training state into the job's folder."""
        ctx = self._ctx
        if ctx.folder is None or ctx.checkpoint_interval <= 0:
            return
        now = time.monotonic()
        if now - self._last_checkpoint < ctx.checkpoint_interval:
            return
        from fit_implicit.backend.service.checkpoint import save_checkpoint
        try:
            took = save_checkpoint(ctx.folder, state())
            log.info("job %s: checkpoint at step %d (%.2f s)", ctx.job_id, step, took)
        except Exception as exc:   # noqa: BLE001 - a full disk (torch says RuntimeError) must not fail the fit
            log.error("job %s: could not write a checkpoint: %s: %s", ctx.job_id, type(exc).__name__, exc)
            if not self._told_checkpoint:
                self._told_checkpoint = True
                ctx.note(f"could not write a training checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                         "training goes on, but a backend restart would start this fit over")
        self._last_checkpoint = time.monotonic()


def resume_state(ctx: JobContext, device: str) -> dict | None:
    """The job's last training checkpoint, if it has one that can be read."""
    from fit_implicit.backend.service.checkpoint import CheckpointError, load_checkpoint
    if ctx.folder is None:
        return None
    try:
        state = load_checkpoint(ctx.folder, device)
    except CheckpointError as exc:
        log.warning("job %s: starting over: %s", ctx.job_id, exc)
        return None
    if state is not None:
        log.info("job %s: resuming from its checkpoint at step %d (%.1f s)", ctx.job_id, state["step"], state["elapsed"])
    return state


@contextlib.contextmanager
def cancellable(ctx: JobContext):
    """While the job runs, every torch module call in its thread checks for a cancel: training
    steps, occupancy updates, previews, meshing, baking and renders all call the field in chunks,
    so a cancel stops any of them within one chunk, not one whole stage."""
    import torch

    worker = threading.get_ident()

    def check(_module, _inputs):
        if threading.get_ident() == worker:
            ctx.check_cancelled()

    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def saved_model(ctx: JobContext):
    from fit_implicit.backend.fitting.runs import RUN_FILE, load_run
    if ctx.folder is None or not (ctx.folder / RUN_FILE).is_file():
        return None
    try:
        return load_run(ctx.folder, ctx.device)
    except Exception as exc:  # noqa: BLE001 - unreadable: train again
        log.warning("job %s: its saved model cannot be loaded (%s); training again", ctx.job_id, exc)
        return None


def run_fit_job(submit: protocol.Submit, ctx: JobContext) -> dict:
    """Fit ``submit`` and send its results; returns the Done summary.  See jobs.JobRunner."""
    configure_torch()
    with cancellable(ctx):
        return _run_fit_job(submit, ctx)


def _run_fit_job(submit: protocol.Submit, ctx: JobContext) -> dict:
    from fit_implicit.backend.export.environment import environment_height
    from fit_implicit.backend.export.iso import model_opacity
    from fit_implicit.backend.export.mesh import extract_mesh
    from fit_implicit.backend.export.unseen import Views, summary_entries
    from fit_implicit.backend.fitting import data
    from fit_implicit.backend.fitting.config import make_config
    from fit_implicit.backend.fitting.loop import LongFitNotice, fit
    from fit_implicit.backend.render.image import to_rgba8

    posed = data.from_submit(submit)
    overrides: dict[str, Any] = {"preview_size": submit.preview_size, "preview_interval": submit.preview_interval,
                                 "background": submit.background, "camera_refine": submit.camera_refine,
                                 "appearance": submit.appearance, "encoding": submit.encoding}
    if submit.mesh_resolution > 0:
        overrides["mesh_resolution"] = submit.mesh_resolution
    if submit.mesh_opacity > 0:
        overrides["mesh_opacity"] = submit.mesh_opacity
    cfg = make_config(method=submit.method, preset=submit.preset, device=ctx.device, steps=submit.steps,
                      seconds=submit.seconds, **overrides)
    callbacks = TrainCallbacks(ctx, previews=submit.preview_size > 0, length_notice=LongFitNotice(cfg.preset))
    ctx.progress("train", force=True)
    start = time.monotonic()
    model = trained_model(ctx, str(cfg.device), lambda resume, data=posed: fit(data, cfg, callbacks, resume=resume))
    fit_seconds = time.monotonic() - start
    refined = (getattr(model, "meta", None) or {}).get("camera_refine")
    if refined:     # the cameras as the fit corrected them: the mesh is refined against those
        posed = dataclasses.replace(posed, poses=np.asarray(refined["poses"], np.float64))
    refine_cfg = asset_refinement(cfg.refine, model, posed)
    refining = refine_cfg.texture_refine_steps > 0 or refine_cfg.mesh_refine_steps > 0
    refine = (posed, refine_cfg) if refining and submit.texture_size > 0 else None
    materials = None
    if submit.material_steps:   # materials and light from the photos (export/materials.py)
        from fit_implicit.backend.export.materials import MaterialConfig
        materials = (posed, MaterialConfig(material_steps=int(submit.material_steps)))
    views = Views.of(posed)     # the cameras, not the images: unseen regions, texture size
    del posed   # kept in `refine` / `materials` only where the textures are refined / materials estimated

    ctx.check_cancelled()
    ctx.progress("mesh", force=True)
    model.time = submit.mesh_time       # a scene that moves: the mesh and textures of that instant
    mesh_facts: dict = {}
    verts, faces, colors = extract_mesh(model, cfg.mesh.mesh_resolution, facts=mesh_facts,
                                        views=views if cfg.mesh.mesh_close_unseen else None,
                                        decimate_to=submit.max_faces if submit.max_faces and not submit.texture_size else None)
    assets = send_mesh_assets(model, verts, faces, colors, submit.texture_size, ctx, refine=refine, views=views,
                              max_faces=submit.max_faces or None, materials=materials)
    refine = materials = None

    count = len(submit.eval_poses)
    for i in range(count):
        ctx.check_cancelled()
        ctx.progress("render", step=i, total_steps=count, fraction=i / count, force=True)
        width, height = (int(s) for s in submit.eval_sizes[i])
        rgba = model.render(np.asarray(submit.eval_intrinsics[i], np.float64),
                            np.asarray(submit.eval_poses[i], np.float64), width, height,
                            time=float(submit.eval_times[i]) if len(submit.eval_times) else submit.mesh_time)
        ctx.send(protocol.RenderResult(job_id=ctx.job_id, index=i, image=to_rgba8(rgba)))
    cameras = send_cameras(model, ctx)
    environment = send_environment(model, ctx, environment_height(submit.intrinsics, str(cfg.device)))

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
        "resumed_from_step": int(meta.get("resumed_from_step", 0)),   # 0: trained from the start
        **({"mesh_opacity": model_opacity(model)} if submit.method == "nerf" else {}),   # the iso-level used
        **({"dynamic": True, "mesh_time": submit.mesh_time} if model.dynamic else {}),     # a field over time
        **(summary_entries(mesh_facts["unseen"]) if "unseen" in mesh_facts else {}),   # export/unseen.py
        **assets,
        **cameras,
        **environment,
    }


def trained_model(ctx: JobContext, device: str, train: Callable[[dict | None], Any]):
    """The job's fitted model: the one its folder holds (a backend restarted after training
    ended need not train again), else ``train(resume)`` from the job's last checkpoint (or None),
    then kept in the folder.  A cancel during training raises JobCancelled."""
    from fit_implicit.backend.fitting.loop import Cancelled

    model = saved_model(ctx)
    if model is None:
        try:
            model = train(resume_state(ctx, device))
        except Cancelled as exc:
            raise JobCancelled() from exc
        save_model(model, ctx)
    return model


def save_model(model, ctx: JobContext) -> None:
    """Keep the fitted model in the job's folder (later jobs, renders and re-meshing, load it from
    there) and drop the training checkpoint; a failure is told to the client, not raised."""
    if ctx.folder is None:
        return
    from fit_implicit.backend.fitting.runs import save_run
    from fit_implicit.backend.service.checkpoint import remove_checkpoint
    try:
        save_run(model, ctx.folder)
        remove_checkpoint(ctx.folder)
    except Exception as exc:   # noqa: BLE001 - a full disk: the mesh and renders still come back
        log.error("job %s: could not save the fitted model: %s: %s", ctx.job_id, type(exc).__name__, exc)
        ctx.note(f"could not save the fitted field ({type(exc).__name__}: {str(exc)[:200]}); the mesh "
                 "and renders still come back, but Render with Field and Re-mesh will not find it")


def send_cameras(model, ctx: JobContext) -> dict:
    """The training cameras as the fit refined them (fitting/camera_refine.py; in the fit's meta,
    so a model loaded from its folder has them too) as a CamerasResult; returns summary entries
    (none when the fit did not refine them)."""
    moved = (getattr(model, "meta", None) or {}).get("camera_refine")
    if not moved:
        return {}
    poses = np.asarray(moved["poses"], np.float64)
    ctx.send(protocol.CamerasResult(job_id=ctx.job_id, poses=poses, moved_deg=np.asarray(moved["rotation_deg"], np.float64),
                                    moved=np.asarray(moved["shift"], np.float64),
                                    focal_scale=float(moved.get("focal_scale", 1.0))))
    return {"cameras_refined": int(len(poses)), "camera_mean_rotation_deg": moved["mean_rotation_deg"],
            "camera_max_rotation_deg": moved["max_rotation_deg"], "camera_mean_shift": moved["mean_shift"],
            "camera_max_shift": moved["max_shift"], **({"camera_focal_scale": moved["focal_scale"]}
                                                       if "focal_scale" in moved else {})}


# ---- the background as an environment image ---------------------------------------------------------
def send_environment(model, ctx: JobContext, height: int) -> dict:
    """For a model with a background (FittedField.background), render it as an equirectangular
    image ``height`` x 2 ``height`` (backend/export/environment.py) and send it as an
    EnvironmentResult; returns summary entries (none without a background)."""
    from fit_implicit.backend.export.environment import environment_image

    if getattr(model, "background", None) is None:
        return {}
    ctx.check_cancelled()
    ctx.progress("environment", force=True)
    start = time.monotonic()
    image = environment_image(model, height)
    ctx.send(protocol.EnvironmentResult(job_id=ctx.job_id, image=image))
    return {"environment_height": int(image.shape[0]), "environment_width": int(image.shape[1]),
            "environment_seconds": round(time.monotonic() - start, 3)}


# ---- post-fit assets: mesh, UV textures ---------------------------------------------------------
def asset_refinement(refine, model, posed):
    """The RefineConfig the asset is refined with: ``refine`` (the preset's), or, where the field's
    colours hold the light but ``posed`` (PosedImages) carries Blender's albedo pass and the preset
    refines nothing, BASE_COLOUR_STEPS texture steps against the pass."""
    from fit_implicit.backend.export.refine import has_albedo_pass

    lit = bool((getattr(model, "meta", None) or {}).get("lighting_baked", True))
    if lit and has_albedo_pass(posed) and refine.mesh_refine_steps == 0 and refine.texture_refine_steps == 0:
        return dataclasses.replace(refine, texture_refine_steps=BASE_COLOUR_STEPS)
    return refine


def send_mesh_assets(model, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray, texture_size: int,
                     ctx: JobContext, refine: tuple | None = None, views=None, max_faces: int | None = None,
                     track_times: np.ndarray | None = None, materials: tuple | None = None) -> dict:
    """Send the mesh; with ``texture_size`` > 0 unwrap it, bake the field into textures and send
    them (TextureResult*) before the textured MeshResult.  Returns summary entries.

    verts (V, 3) float32 world, faces (F, 3) int, colors (V, 3) sRGB: from extract_mesh.
    refine: (the fit's PosedImages, a RefineConfig) to refine the mesh and its base colour
    against the training views (backend/export/refine.py) before it is sent, or None.
    views: the training cameras (export.unseen.Views), which pick the side for TEXTURE_AUTO.
    max_faces: most triangles of the textured mesh (None: texture.py MAX_FACES).
    track_times: a field over time: also send where each vertex is at these instants
    (MeshResult.tracks; backend/export/tracks.py), or None.
    materials: (the fit's PosedImages, a MaterialConfig) to estimate base colour, roughness,
    metallic and the light from the photos (backend/export/materials.py; the light and the base
    colour as a photo's camera sees it follow the MeshResult as a MaterialResult), or None.
    The summary's "material" says where the textures' colours come from: "passes" (Blender's
    albedo pass supervised them), "estimated" (materials), "points" (a fit to coloured points), or
    "baked" (the lighting stays in).
    """
    mesh, found, summary = None, None, {"vertices": int(len(verts)), "faces": int(len(faces))}
    if texture_size > 0 and len(faces):
        from fit_implicit.backend.export.texture import texture_mesh, vertex_colors_from

        ctx.progress("texture", force=True)
        start = time.monotonic()
        mesh, baked = texture_mesh(model, verts, faces, texture_size, views=views,
                                   **({"max_faces": max_faces} if max_faces else {}))
        if refine is not None:
            from fit_implicit.backend.export.refine import refine_textures

            ctx.progress("refine", force=True)
            mesh, baked, facts = refine_textures(mesh, baked, *refine, device=getattr(model, "device", "cpu"))
            summary.update(facts)
        meta = getattr(model, "meta", {})
        # a base colour refined against Blender's albedo pass holds no light, whatever the field's did
        lit = bool(meta.get("lighting_baked", True)) and summary.get("refine_target") != "albedo"
        summary["material"] = "baked" if lit else ("points" if meta.get("source") == "points" else "passes")
        if materials is not None:
            baked, found = _estimate_materials(model, mesh, baked, *materials, ctx, summary)
            lit = False
        for kind, image in baked.items():
            ctx.check_cancelled()
            ctx.send(protocol.TextureResult(job_id=ctx.job_id, kind=kind, image=np.ascontiguousarray(image),
                                            lighting_baked=lit))
        summary.update(textures=int(baked.albedo.shape[0]), texture_seconds=round(time.monotonic() - start, 3),
                       **{f"texture_{k}_seconds": round(v, 3) for k, v in baked.timings.items()})
        verts, faces, colors = mesh.vertices, mesh.faces, vertex_colors_from(mesh, baked)
        summary.update(vertices=int(len(verts)), faces=int(len(faces)))
    tracks = np.zeros((0, 0, 3), np.float32)
    if track_times is not None and len(track_times):
        tracks = _tracks(model, verts, track_times, ctx, summary)
    ctx.send(protocol.MeshResult(
        job_id=ctx.job_id,
        vertices=np.ascontiguousarray(verts, dtype=np.float32),
        faces=np.ascontiguousarray(faces, dtype=np.int32),
        colors=np.ascontiguousarray(np.clip(colors, 0.0, 1.0), dtype=np.float32),
        uvs=np.ascontiguousarray(mesh.uvs if mesh is not None else np.zeros((0, 2)), dtype=np.float32),
        normals=np.ascontiguousarray(mesh.normals if mesh is not None else np.zeros((0, 3)), dtype=np.float32),
        track_times=np.asarray(track_times if len(tracks) else [], np.float32),
        tracks=tracks,
    ))
    if found is not None:
        ctx.send(found)
    return summary


def _estimate_materials(model, mesh, baked, posed, cfg, ctx: JobContext, summary: dict):
    """Base colour, roughness and metallic textures and the light, estimated from the photos on
    the textured mesh (export/materials.py); returns (textures, the MaterialResult to send after
    the mesh: the light and the base colour as photo 0's camera sees it) and puts its facts into
    ``summary``."""
    from fit_implicit.backend.export.materials import estimate_materials
    from fit_implicit.backend.render.raster import render_unlit
    import torch

    ctx.check_cancelled()
    ctx.progress("materials", force=True)
    start = time.monotonic()
    steps = int(cfg.material_steps)

    def tick(step: int, _loss: float) -> None:     # every 100 steps: progress, and a cancel stops it there
        ctx.check_cancelled()
        ctx.progress("materials", step=step, total_steps=steps, fraction=step / steps)

    got = estimate_materials(mesh, baked.albedo, posed, cfg, getattr(model, "device", "cpu"), log=tick)
    facts = got.facts
    summary.update(material="estimated", material_seconds=round(time.monotonic() - start, 3),
                   material_steps=int(cfg.material_steps), material_samples=int(facts["material_samples"]),
                   light_direction=json.dumps([round(float(v), 4) for v in facts["light_direction"]]),
                   light_share=round(float(facts["light_share"]), 4))
    # the base colour as photo 0's camera sees it, scaled down by a whole factor to at most ALBEDO_VIEW_SIDE
    device = getattr(model, "device", "cpu")
    w, h = posed.size(0)
    f = -(-max(w, h) // ALBEDO_VIEW_SIDE)
    k = np.asarray(posed.intrinsics[0], np.float64) / f
    view = render_unlit(torch.as_tensor(np.asarray(mesh.vertices, np.float32), device=device),
                        torch.as_tensor(np.asarray(mesh.faces, np.int64), device=device),
                        torch.as_tensor(np.asarray(mesh.uvs, np.float32), device=device), k, posed.poses[0],
                        max(1, w // f), max(1, h // f),
                        texture=torch.as_tensor(got.albedo, device=device).float() / 255.0, supersample=2)
    found = protocol.MaterialResult(job_id=ctx.job_id, light=np.ascontiguousarray(got.environment, dtype=np.float32),
                                    albedo_view=(view.clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy(),
                                    view_photo=0)
    return got.on(baked), found


def _tracks(model, verts: np.ndarray, track_times: np.ndarray, ctx: JobContext, summary: dict) -> np.ndarray:
    """(T, V, 3) where the mesh's vertices are at ``track_times`` (export/tracks.py); its facts
    go into ``summary``."""
    from fit_implicit.backend.export.tracks import follow_vertices, size_error

    if problem := size_error(len(track_times), len(verts), protocol.MAX_TRACK_POINTS):
        raise ValueError(problem)
    ctx.progress("tracks", force=True)
    start = time.monotonic()
    tracks, facts = follow_vertices(model, verts, track_times)
    summary.update(tracked_times=len(track_times), track_seconds=round(time.monotonic() - start, 3),
                   track_residual=round(facts["track_residual"], 6), track_lost=round(facts["track_lost"], 4))
    return tracks
