"""The fits of this .blend (``scene.implicit.results``), newest last, and what can be done with
one later: render it (Render with Field), mesh it again with the panel's mesh settings (a
MeshJob on the backend), keep its field beside the .blend (Save Field), use the background it
modelled as the World (world.py), forget it.

An entry is written when a fit ends well (:func:`record`, called by fit_session.py).  A fit the
backend no longer has (its cache expired, another backend) comes back from its saved field:
Re-mesh and Render give it back first (saved_fields.py).
"""
from __future__ import annotations

import shutil
import time

import bpy
import numpy as np

from . import modal, ownership, saved_fields
from ._shared import protocol

MESH_TIMEOUT = 1800.0       # seconds a re-mesh may take


def _failures() -> tuple:
    """What starting or running a re-mesh may raise, each with a text for the user."""
    from .client import BackendError
    from .preferences import KeyProblem

    return BackendError, KeyProblem, RuntimeError, OSError, protocol.ProtocolError


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
    environment: bpy.props.PointerProperty(type=bpy.types.Image, name="Background",
                                           description="The background it modelled, as an equirectangular image "
                                                       "(world.py); none when it modelled none")
    light: bpy.props.PointerProperty(type=bpy.types.Image, name="Light",
                                     description="The light estimated with the materials, an equirectangular HDR "
                                                 "image (world.py); none when materials were not estimated")
    albedo_check: bpy.props.PointerProperty(type=bpy.types.Image, name="Albedo beside Photo",
                                            description="A photo and the estimated base colour as its camera sees it, "
                                                        "side by side (estimated materials only)")
    material: bpy.props.StringProperty(
        name="Material", description="Where the asset's colours come from: passes (Blender's), estimated (from the "
                                     "photos, with the light), points (their own colours) or baked (the light stays in)")
    time_first: bpy.props.IntProperty(name="First Frame", description="A fit over time: the frame of its instant 0")
    time_last: bpy.props.IntProperty(name="Last Frame", description="A fit over time: the frame of its instant 1 "
                                                                    "(equal to First Frame: a still fit)")


def record(scene, job_id: str, label: str, method: str, preset: str, psnr: float | None, asset=None,
           environment=None, time_range: tuple = (), light=None, material: str = "", albedo_check=None) -> None:
    """Add a finished fit to the scene's list (one entry per job id) and select it.  ``asset``:
    the Object it imported; ``environment``: the Image of its background (world.py); ``time_range``:
    a fit over time's first and last frames (its instants 0 and 1); ``light``: the Image of the
    light estimated with its materials (world.py); ``material``: Done's "material" (baked, passes,
    estimated); ``albedo_check``: the Image of a photo beside the estimated base colour."""
    results = scene.implicit.results
    entry = next((r for r in results if r.job_id == job_id), None) or results.add()
    entry.job_id, entry.label, entry.method, entry.preset = job_id, label[:200], method, preset
    entry.psnr = float(psnr or 0.0)
    entry.created = time.strftime("%Y-%m-%d %H:%M")
    entry.asset = asset
    entry.environment = environment
    entry.light = light
    entry.material = material or ""
    entry.albedo_check = albedo_check
    entry.time_first, entry.time_last = (int(time_range[0]), int(time_range[1])) if time_range else (0, 0)
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


def mesh_job(entry: ImplicitResult, props, name: str, **extra) -> protocol.MeshJob:
    """A MeshJob for the fit ``entry`` with the panel's mesh settings (``props``: scene.implicit);
    ``extra``: its time and track times for a fit over time."""
    return protocol.MeshJob(fit_job_id=entry.job_id, mesh_resolution=props.mesh_resolution,
                            mesh_opacity=round(float(props.mesh_opacity), 4), texture_size=int(props.texture_size),
                            max_faces=max(props.max_faces, protocol.MIN_FACES) if props.max_faces else 0,
                            name=name[: protocol.MAX_NAME], **extra)


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
    surface level, textures, max faces) and import the new mesh beside the old one; Blender stays
    responsive meanwhile (Esc cancels)"""

    bl_idname = "implicit.result_remesh"
    bl_label = "Re-mesh"
    bl_options = {"REGISTER", "UNDO"}

    timeout: bpy.props.FloatProperty(name="Timeout", default=MESH_TIMEOUT, min=1.0, options={"SKIP_SAVE"},
                                     description="Give up after this many seconds")

    _session = None
    _timer = None

    def _new_session(self, context) -> "RemeshSession":
        scene, entry, props = context.scene, selected(context.scene), context.scene.implicit
        address, keys = _backend(self, context)
        job = mesh_job(entry, props, entry.label or "remesh")
        session = RemeshSession(scene, address, keys, entry, job, self.timeout)
        session.start()
        return session

    def _report(self, session: "RemeshSession") -> set:
        if session.object is not None:
            self.report({"INFO"}, f"Imported {session.object.name}: {len(session.object.data.polygons)} faces")
            return {"FINISHED"}
        self.report({"WARNING"} if session.cancelled else {"ERROR"}, f"Re-mesh failed: {session.error}")
        return {"CANCELLED"}

    def execute(self, context):     # scripts and background mode: wait here
        try:
            session = self._new_session(context)
            session.run()
        except _failures() as exc:
            self.report({"ERROR"}, f"Re-mesh failed: {exc}")
            return {"CANCELLED"}
        return self._report(session)

    def invoke(self, context, event):
        try:
            self._session = self._new_session(context)
        except _failures() as exc:
            self.report({"ERROR"}, f"Re-mesh failed: {exc}")
            return {"CANCELLED"}
        return modal.start(self, context, "Re-meshing on the backend (Esc cancels)")

    def modal(self, context, event):
        if event.type == "ESC" and event.value == "PRESS":
            self._session.cancel()
            return {"RUNNING_MODAL"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        try:
            if not self._session.tick():
                return {"PASS_THROUGH"}
        except _failures() as exc:
            self._session.error = str(exc)
        modal.stop(self, context)
        return self._report(self._session)

    def cancel(self, context):
        modal.stop(self, context)


MESH_OVER_TIME_KINDS = (
    ("SEQUENCE", "Mesh a Frame",
     "Mesh every frame on its own (textures a frame): any motion, parts that split, merge or appear included"),
    ("SHAPE_KEYS", "One Moving Mesh",
     "Mesh the current frame once (one set of textures) and follow each vertex through the frames by the "
     "field's motion, as shape keys keyed a frame each (smooth in between): light, and modifiers and materials "
     "apply once, but parts that split, merge or appear cannot be followed"),
)


class IMPLICIT_OT_result_mesh_over_time(_ResultOperator, bpy.types.Operator):
    """Mesh the selected fit over time at every frame of its range (every Step frames) with the Mesh
    & Textures settings, as one animated object: an Empty holding a mesh per frame, each shown only
    from its frame to the next one (keyframed visibility), or one mesh whose shape keys follow the
    motion (As).  Scrubbing the timeline and renders show the right frame, without the add-on"""

    bl_idname = "implicit.result_mesh_over_time"
    bl_label = "Mesh Over Time"
    bl_options = {"REGISTER", "UNDO"}

    kind: bpy.props.EnumProperty(name="As", items=MESH_OVER_TIME_KINDS, default="SEQUENCE", options={"SKIP_SAVE"})
    step: bpy.props.IntProperty(name="Step", default=0, min=0, options={"SKIP_SAVE"},
                                description="Frames between two meshes; 0: the scene's frame step")
    timeout: bpy.props.FloatProperty(name="Timeout", default=MESH_TIMEOUT, min=1.0, options={"SKIP_SAVE"},
                                     description="Give up after this many seconds a frame")

    @classmethod
    def poll(cls, context):
        entry = selected(context.scene) if context.scene is not None else None
        return entry is not None and entry.time_last > entry.time_first

    def execute(self, context):     # one MeshJob a frame, one after the other (each as Re-mesh's)
        scene, entry, props = context.scene, selected(context.scene), context.scene.implicit
        if entry.time_last <= entry.time_first:
            self.report({"ERROR"}, "The selected fit is of one instant: fit with Over Time to mesh a frame range")
            return {"CANCELLED"}
        first, last = entry.time_first, entry.time_last
        frames = list(range(first, last + 1, self.step or max(1, scene.frame_step)))
        address, keys = _backend(self, context)
        if self.kind == "SHAPE_KEYS":
            return self._follow(scene, entry, props, frames, address, keys)
        objects = []
        try:
            for frame in frames:
                job = mesh_job(entry, props, f"{entry.label or 'clip'} {frame}", time=(frame - first) / (last - first))
                session = RemeshSession(scene, address, keys, entry, job, self.timeout)
                session.start()
                session.run()
                if session.object is None:
                    raise RuntimeError(f"frame {frame}: {session.error}")
                session.object.name = f"{entry.label or 'Implicit'} {frame:04d}"
                session.object["implicit_time"] = job.time
                objects.append((frame, session.object))
        except _failures() as exc:
            for _, ob in objects:
                bpy.data.objects.remove(ob)
            self.report({"ERROR"}, f"Mesh Over Time failed: {exc}")
            return {"CANCELLED"}
        holder = animate_sequence(scene, f"{entry.label or 'Implicit'} Over Time", objects)
        self.report({"INFO"}, f"Imported {len(objects)} meshes (frames {frames[0]}-{frames[-1]}) under {holder.name}")
        return {"FINISHED"}

    def _follow(self, scene, entry, props, frames: list, address: str, keys: dict):
        """One MeshJob at the current frame (clamped to the range) whose vertices the backend
        follows through ``frames`` (MeshJob.track_times): imported with a shape key a frame."""
        first, last = entry.time_first, entry.time_last
        now = min(max(scene.frame_current, first), last)
        job = mesh_job(entry, props, f"{entry.label or 'clip'} {now}", time=(now - first) / (last - first),
                       track_times=np.array([(f - first) / (last - first) for f in frames]))
        session = RemeshSession(scene, address, keys, entry, job, self.timeout,
                                key_names=[f"Frame {f:04d}" for f in frames])
        try:
            session.start()
            session.run()
            if session.object is None:
                raise RuntimeError(session.error)
        except _failures() as exc:
            self.report({"ERROR"}, f"Mesh Over Time failed: {exc}")
            return {"CANCELLED"}
        ob = session.object
        ob.name = f"{entry.label or 'Implicit'} Moving"
        ob["implicit_time"] = job.time
        animate_shape_keys(scene, ob, frames)
        lost = float(ob.get("implicit_track_lost", 0.0))
        if lost > 0.01:
            self.report({"WARNING"}, f"{100 * lost:.1f}% of the vertex positions could not be followed (parts that "
                                     "split, merge or appear): Mesh a Frame shows those parts right")
        else:
            self.report({"INFO"}, f"Imported {ob.name}: one mesh of frame {now} with a shape key for each of "
                                  f"{len(frames)} frames ({frames[0]}-{frames[-1]})")
        return {"FINISHED"}


def animate_sequence(scene, name: str, objects: list):
    """One Empty parenting ``objects`` ((frame, Object), in frame order), each visible in the
    viewport and in renders from its frame until the next one's (before the first: the first;
    after the last: the last), by keyframes with constant interpolation."""
    holder = bpy.data.objects.new(name, None)
    (objects[0][1].users_collection[0] if objects[0][1].users_collection else scene.collection).objects.link(holder)
    for i, (frame, ob) in enumerate(objects):
        parent_keep = ob.matrix_world.copy()
        ob.parent = holder
        ob.matrix_world = parent_keep
        for prop in ("hide_viewport", "hide_render"):
            marks = [(frame, False)]
            if i > 0:
                marks.insert(0, (frame - 1, True))
            if i + 1 < len(objects):
                marks.append((objects[i + 1][0], True))
            for at, hidden in marks:
                setattr(ob, prop, hidden)
                ob.keyframe_insert(prop, frame=at)
        for fc in fcurves(ob):
            for kp in fc.keyframe_points:
                kp.interpolation = "CONSTANT"
    scene.frame_set(scene.frame_current)        # show the current frame's mesh
    return holder


def animate_shape_keys(scene, ob, frames: list) -> None:
    """Key ``ob``'s shape keys after the Basis (one a frame of ``frames``, in order) so that each
    is in full at its frame and none at its neighbours', linearly in between (positions blend from
    one frame's to the next); before the first frame the first holds, after the last the last."""
    blocks = ob.data.shape_keys.key_blocks[1:]
    for i, (frame, key) in enumerate(zip(frames, blocks)):
        key.slider_max = 1.0
        marks = [(frame, 1.0)]
        if i > 0:
            marks.insert(0, (frames[i - 1], 0.0))
        if i + 1 < len(frames):
            marks.append((frames[i + 1], 0.0))
        for at, value in marks:
            key.value = value
            key.keyframe_insert("value", frame=at)
    for fc in fcurves(ob.data.shape_keys):
        for kp in fc.keyframe_points:
            kp.interpolation = "LINEAR"
    scene.frame_set(scene.frame_current)


def fcurves(idblock) -> list:
    """The F-curves of an ID's action (Blender 5.0 keeps them in layered channelbags)."""
    action = idblock.animation_data.action
    if hasattr(action, "fcurves") and len(getattr(action, "fcurves", ())):
        return list(action.fcurves)
    from bpy_extras import anim_utils
    return list(anim_utils.action_get_channelbag_for_slot(action, idblock.animation_data.action_slot).fcurves)


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


class RemeshSession:
    """One MeshJob of a listed fit, polled without blocking (:meth:`tick`), its mesh imported and
    placed and tagged like the fit's own asset.  A backend that no longer has the fit gets its
    saved field back first (once).  After the end: ``object`` (the import) or ``error``."""

    def __init__(self, scene, address: str, keys: dict, entry: ImplicitResult, job: protocol.MeshJob,
                 timeout: float, key_names: list | None = None):
        self.scene, self.address, self.keys, self.entry, self.job = scene, address, keys, entry, job
        self.timeout = timeout
        self.key_names = key_names      # names of the shape keys a job with track_times brings
        self.client = None
        self.messages: list = []
        self.object = None
        self.error = ""
        self.cancelled = False
        self._restored = False
        self._deadline = 0.0

    def start(self) -> None:
        from .client import JobClient

        self.client = JobClient(self.address, token=ownership.scene_token(self.scene), dead_after=30.0, **self.keys)
        self.client.start(self.job)
        self.messages = []
        self._deadline = time.monotonic() + self.timeout

    def tick(self) -> bool:
        """Take what arrived; True once the job ended (then ``object`` or ``error`` says how)."""
        from .client import BackendError

        self.messages += self.client.poll()
        if not self.client.finished:
            if time.monotonic() > self._deadline:
                self.client.cancel()
                self.error = f"no answer within {self.timeout:g} s"
                return True
            return False
        self.client.close()
        if self.client.error_code == "unknown_job" and self.entry.field_folder and not self._restored:
            self._restored = True
            self.job.fit_job_id = self.entry.job_id = saved_fields.restore_field(
                self.scene, self.address, bpy.path.abspath(self.entry.field_folder), self.keys)
            self.start()
            return False
        if any(isinstance(m, protocol.Cancelled) for m in self.messages):
            self.cancelled, self.error = True, "cancelled"
            return True
        if self.client.error is not None:
            self.error = self.client.error
            return True
        if not any(isinstance(m, protocol.MeshResult) for m in self.messages):
            raise BackendError("the backend ended the job without a mesh", "no_mesh")
        self.object = self._import()
        return True

    def run(self) -> None:
        while not self.tick():
            time.sleep(0.05)

    def cancel(self) -> None:
        if self.client is not None:
            self.client.cancel()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def _import(self):
        from . import importer

        entry, job, messages = self.entry, self.job, self.messages
        textures = {m.kind: m.image for m in messages if isinstance(m, protocol.TextureResult)}
        mesh = next(m for m in messages if isinstance(m, protocol.MeshResult))
        names = self.key_names or [f"t={t:.4f}" for t in mesh.track_times]
        ob = importer.import_mesh(self.scene, mesh.vertices, mesh.faces, mesh.colors,
                                  name=f"{entry.label or 'Implicit'} Remesh", uvs=mesh.uvs, textures=textures,
                                  shape_keys=list(zip(names, mesh.tracks)) if len(mesh.track_times) else None)
        if entry.asset is not None:
            importer.place_origin(ob, entry.asset.matrix_world.translation)
        done = next((m for m in messages if isinstance(m, protocol.Done)), None)
        summary = done.summary if done is not None else {}
        importer.tag_asset(ob, {"job_id": entry.job_id, "method": entry.method, "preset": entry.preset,
                                "remeshed_from": entry.job_id, "faces": len(mesh.faces),
                                "mesh_resolution": job.mesh_resolution, "textures": summary.get("textures"),
                                "track_lost": summary.get("track_lost"), "fitted_at": entry.created})
        return ob


CLASSES = (ImplicitResult, IMPLICIT_UL_results, IMPLICIT_OT_result_render, IMPLICIT_OT_result_remesh,
           IMPLICIT_OT_result_mesh_over_time, IMPLICIT_OT_result_forget)
