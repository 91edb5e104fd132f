"""The fits of this .blend (``scene.implicit.results``), newest last, and what can be done with
one later: render it (Render with Field), mesh it again with the panel's mesh settings (a
MeshJob on the backend), keep its field beside the .blend (Save Field), forget it.

An entry is written when a fit ends well (:func:`record`, called by fit_session.py).  A fit the
backend no longer has (its cache expired, another backend) comes back from its saved field:
Re-mesh and Render give it back first (saved_fields.py).
"""
from __future__ import annotations

import shutil
import time

import bpy

from . import ownership, saved_fields
from ._shared import protocol

MESH_TIMEOUT = 1800.0       # seconds a blocking re-mesh may take


class ImplicitResult(bpy.types.PropertyGroup):
    """One finished fit of this scene."""

    job_id: bpy.props.StringProperty(name="Job", description="The backend's id of the fit")
    label: bpy.props.StringProperty(name="Name", description="The fit's name (its object's, when it made one)")
    method: bpy.props.StringProperty(name="Method", description="The kind of field fitted")
    preset: bpy.props.StringProperty(name="Quality", description="The preset it was fitted with")
    psnr: bpy.props.FloatProperty(name="PSNR", precision=2, description="Training PSNR at the end, dB")
    created: bpy.props.StringProperty(name="Fitted", description="When the fit ended")
    field_folder: bpy.props.StringProperty(name="Saved Field", subtype="DIR_PATH",
                                           description="Where Save Field put its field; empty: not saved")
    asset: bpy.props.PointerProperty(type=bpy.types.Object, name="Asset", description="The mesh it imported")


def record(scene, job_id: str, label: str, method: str, preset: str, psnr: float | None, asset=None) -> None:
    """Add a finished fit to the scene's list (one entry per job id) and select it."""
    results = scene.implicit.results
    entry = next((r for r in results if r.job_id == job_id), None) or results.add()
    entry.job_id, entry.label, entry.method, entry.preset = job_id, label[:200], method, preset
    entry.psnr = float(psnr or 0.0)
    entry.created = time.strftime("%Y-%m-%d %H:%M")
    entry.asset = asset
    scene.implicit.results_index = list(results).index(entry)


def selected(scene) -> ImplicitResult | None:
    results, i = scene.implicit.results, scene.implicit.results_index
    return results[i] if 0 <= i < len(results) else None


class IMPLICIT_UL_results(bpy.types.UIList):
    """The fits of this file: name, method and quality, PSNR; a disk icon when its field is saved."""

    def draw_item(self, context, layout, data, item, icon, active_data, active_propname, index=0):
        row = layout.row(align=True)
        row.label(text=item.label or item.job_id, icon="FILE_TICK" if item.field_folder else "MESH_ICOSPHERE")
        row.label(text=f"{item.method} {item.preset}")
        row.label(text=f"{item.psnr:.1f} dB" if item.psnr else "")


def _backend(op, context) -> tuple[str, dict]:
    from .preferences import backend_address, connection_kwargs

    return op.address.strip() or backend_address(context, context.scene), connection_kwargs(context)


class _ResultOperator:
    address: bpy.props.StringProperty(name="Address", default="", options={"SKIP_SAVE"},
                                      description="Backend address; empty: the scene's or the preferences'")

    @classmethod
    def poll(cls, context):
        return context.scene is not None and selected(context.scene) is not None


class IMPLICIT_OT_result_render(_ResultOperator, bpy.types.Operator):
    """Make the selected fit the one Render with Field renders (Give Field Back first if the backend
    no longer has it)"""

    bl_idname = "implicit.result_render"
    bl_label = "Use for Render with Field"
    bl_options = {"REGISTER"}

    def execute(self, context):
        scene, entry = context.scene, selected(context.scene)
        scene[saved_fields.JOB_KEY] = entry.job_id
        self.report({"INFO"}, f"Render with Field now renders {entry.label or entry.job_id}")
        return {"FINISHED"}


class IMPLICIT_OT_result_remesh(_ResultOperator, bpy.types.Operator):
    """Mesh the selected fit again on the backend with the Mesh & Textures settings (resolution,
    surface level, textures, max faces) and import the new mesh beside the old one (blocking)"""

    bl_idname = "implicit.result_remesh"
    bl_label = "Re-mesh"
    bl_options = {"REGISTER", "UNDO"}

    timeout: bpy.props.FloatProperty(name="Timeout", default=MESH_TIMEOUT, min=1.0, options={"SKIP_SAVE"},
                                     description="Give up after this many seconds")

    def execute(self, context):
        from .client import BackendError
        from .preferences import KeyProblem

        scene, entry, props = context.scene, selected(context.scene), context.scene.implicit
        try:
            address, keys = _backend(self, context)
            job = protocol.MeshJob(fit_job_id=entry.job_id, mesh_resolution=props.mesh_resolution,
                                   mesh_opacity=round(float(props.mesh_opacity), 4),
                                   texture_size=int(props.texture_size),
                                   max_faces=max(props.max_faces, protocol.MIN_FACES) if props.max_faces else 0,
                                   name=(entry.label or "remesh")[: protocol.MAX_NAME])
            ob = remesh(scene, address, keys, entry, job, self.timeout)
        except (BackendError, KeyProblem, RuntimeError, OSError, protocol.ProtocolError) as exc:
            self.report({"ERROR"}, f"Re-mesh failed: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Imported {ob.name}: {len(ob.data.polygons)} faces")
        return {"FINISHED"}


class IMPLICIT_OT_result_forget(_ResultOperator, bpy.types.Operator):
    """Forget the selected fit (its imported asset stays); with Delete Field, also delete the field
    saved beside the .blend"""

    bl_idname = "implicit.result_forget"
    bl_label = "Forget Fit"
    bl_options = {"REGISTER", "UNDO"}

    delete_field: bpy.props.BoolProperty(name="Delete Field", default=False,
                                         description="Also delete its saved field folder (run.json, model.pt)")

    def execute(self, context):
        props = context.scene.implicit
        entry = selected(context.scene)
        folder = entry.field_folder
        if self.delete_field and folder:
            shutil.rmtree(bpy.path.abspath(folder), ignore_errors=True)
        props.results.remove(props.results_index)
        props.results_index = min(props.results_index, len(props.results) - 1)
        return {"FINISHED"}


def remesh(scene, address: str, keys: dict, entry: ImplicitResult, job: protocol.MeshJob, timeout: float):
    """Run ``job`` and import its mesh (placed and tagged like the fit's own asset).  A backend
    that no longer has the fit gets its saved field back first."""
    from . import importer
    from .client import BackendError, JobClient

    def run(message):
        client = JobClient(address, token=ownership.scene_token(scene), dead_after=30.0, **keys)
        client.start(message)
        messages = client.wait(timeout)
        client.close()
        return client, messages

    client, messages = run(job)
    if client.error_code == "unknown_job" and entry.field_folder:
        job.fit_job_id = entry.job_id = saved_fields.restore_field(scene, address, bpy.path.abspath(entry.field_folder),
                                                                   keys)
        client, messages = run(job)
    if client.error is not None or not client.finished:
        raise BackendError(client.error or f"no answer within {timeout:g} s", client.error_code or "timeout")
    textures = {m.kind: m.image for m in messages if isinstance(m, protocol.TextureResult)}
    mesh = next(m for m in messages if isinstance(m, protocol.MeshResult))
    ob = importer.import_mesh(scene, mesh.vertices, mesh.faces, mesh.colors, name=f"{entry.label or 'Implicit'} Remesh",
                              uvs=mesh.uvs, textures=textures)
    if entry.asset is not None:
        importer.place_origin(ob, entry.asset.matrix_world.translation)
    done = messages[-1]
    importer.tag_asset(ob, {"job_id": entry.job_id, "method": entry.method, "preset": entry.preset,
                            "remeshed_from": entry.job_id, "faces": len(mesh.faces),
                            "mesh_resolution": job.mesh_resolution, "textures": done.summary.get("textures"),
                            "fitted_at": entry.created})
    return ob


CLASSES = (ImplicitResult, IMPLICIT_UL_results, IMPLICIT_OT_result_render, IMPLICIT_OT_result_remesh,
           IMPLICIT_OT_result_forget)
