"""Fitted fields kept beside the .blend: the backend's model of a fit (run.json + model.pt, as
backend/fitting/runs.py writes them) fetched into a folder, and given back to a backend later
(after its cache expired, after a restart, or to another machine) for Render with Field.

A saved folder is also a run folder for the command line: ``fit-implicit render|mesh|eval``
read it as they are.
"""
from __future__ import annotations

import os
from pathlib import Path

import bpy
import numpy as np

from . import ownership
from ._shared import protocol

RUN_FILE, WEIGHTS_FILE = "run.json", "model.pt"     # the names backend/fitting/runs.py gives them
FIELD_KEY = "implicit_field"                        # on the scene: the folder of its last saved field
JOB_KEY = "implicit_fit_job"                        # on the scene: the fit Render with Field uses


def default_folder(job_id: str) -> str:
    """``//fit_implicit_fields/<job id>`` next to the saved .blend (an unsaved file has no place
    that outlives Blender: RuntimeError)."""
    if not bpy.data.filepath:
        raise RuntimeError("save the .blend first (the field is kept beside it), or choose a folder")
    return os.path.join(bpy.path.abspath("//"), "fit_implicit_fields", job_id)


def _remembered(path: Path) -> str:
    """How a folder is stored in the file: relative to the .blend where it can be (the project
    may move), else absolute."""
    try:
        return bpy.path.relpath(str(path)) if bpy.data.filepath else str(path)
    except ValueError:          # another drive (Windows)
        return str(path)


def save_field(scene, address: str, job_id: str, folder: str | os.PathLike, connection: dict,
               timeout: float = 300.0) -> Path:
    """Fetch fit job ``job_id``'s model from the backend into ``folder``; remembered on the scene."""
    from .client import exchange

    reply = exchange(address, protocol.FetchModel(fit_job_id=job_id), token=ownership.scene_token(scene),
                     timeout=timeout, **connection)
    if not isinstance(reply, protocol.ModelFile):
        raise RuntimeError(f"the backend answered {reply.TYPE!r} instead of the model")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS_FILE).write_bytes(reply.weights.tobytes())
    (out / RUN_FILE).write_bytes(reply.run_json.tobytes())
    scene[FIELD_KEY] = _remembered(out)
    for entry in scene.implicit.results:        # the fit's line in the Results list knows it is kept
        if entry.job_id == job_id:
            entry.field_folder = _remembered(out)
    return out


def restore_field(scene, address: str, folder: str | os.PathLike, connection: dict, timeout: float = 300.0) -> str:
    """Give a saved field back to the backend; its new fit job id becomes the scene's (Render
    with Field uses it).  Returns that id."""
    from .client import exchange

    src = Path(bpy.path.abspath(str(folder)))
    missing = [name for name in (RUN_FILE, WEIGHTS_FILE) if not (src / name).is_file()]
    if missing:
        raise RuntimeError(f"{src} holds no saved field ({' and '.join(missing)} missing)")
    message = protocol.StoreModel(run_json=np.frombuffer((src / RUN_FILE).read_bytes(), np.uint8),
                                  weights=np.frombuffer((src / WEIGHTS_FILE).read_bytes(), np.uint8),
                                  name=src.name[: protocol.MAX_NAME])
    reply = exchange(address, message, token=ownership.scene_token(scene), timeout=timeout, **connection)
    if not isinstance(reply, protocol.Ack) or not reply.job_id:
        raise RuntimeError(f"the backend answered {reply.TYPE!r} instead of the field's new id")
    scene[JOB_KEY] = reply.job_id
    scene[FIELD_KEY] = _remembered(src)
    for entry in scene.implicit.results:        # the backend knows that fit under its new id now
        if entry.field_folder and bpy.path.abspath(entry.field_folder) == str(src):
            entry.job_id = reply.job_id
    return reply.job_id


# --------------------------------------------------------------------------------------------
# Operators (blocking: a fetch or a give-back is one request; a model of 100-200 MB takes seconds)
# --------------------------------------------------------------------------------------------
def _address_and_keys(op, context) -> tuple[str, dict]:
    from .preferences import backend_address, connection_kwargs

    return op.address.strip() or backend_address(context, context.scene), connection_kwargs(context)


class _FieldOperator:
    """What both operators share: the backend address option, and the errors a user reads."""

    bl_options = {"REGISTER"}
    address: bpy.props.StringProperty(name="Address", default="", options={"SKIP_SAVE"},
                                      description="Backend address; empty: the scene's or the preferences'")

    @classmethod
    def poll(cls, context):
        return context.scene is not None

    def guarded(self, context, failure: str, action):
        """``action(address, keys)``, or None after reporting why it failed (``failure``: the sentence's start)."""
        from .client import BackendError
        from .preferences import KeyProblem

        try:
            return action(*_address_and_keys(self, context))
        except (BackendError, KeyProblem, RuntimeError, OSError, ValueError) as exc:
            self.report({"ERROR"}, f"{failure}: {exc}")
            return None


class IMPLICIT_OT_save_field(_FieldOperator, bpy.types.Operator):
    """Fetch the last fit's field from the backend into a folder beside the .blend, so that it can
    be rendered again after the backend's cache expired (Give Field Back), or used from the
    command line (fit-implicit render | mesh | eval read the folder)"""

    bl_idname = "implicit.save_field"
    bl_label = "Save Field"

    directory: bpy.props.StringProperty(name="Folder", subtype="DIR_PATH", default="", options={"SKIP_SAVE"},
                                        description="Where run.json and model.pt go; empty: "
                                                    "fit_implicit_fields/<job id> next to the .blend")
    fit_job: bpy.props.StringProperty(name="Fit Job", default="", options={"SKIP_SAVE"},
                                      description="Job id of the fit to save; empty: the last finished fit")

    def execute(self, context):
        scene = context.scene
        job_id = self.fit_job.strip() or str(scene.get(JOB_KEY, ""))
        if not job_id:
            self.report({"ERROR"}, "No finished fit to save: fit first (or give its job id)")
            return {"CANCELLED"}
        out = self.guarded(context, "The field was not saved", lambda address, keys: save_field(
            scene, address, job_id, bpy.path.abspath(self.directory) if self.directory else default_folder(job_id),
            keys))
        if out is None:
            return {"CANCELLED"}
        size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
        self.report({"INFO"}, f"Saved the field of fit {job_id} ({size:.1f} MB) in {out}")
        return {"FINISHED"}


class IMPLICIT_OT_restore_field(_FieldOperator, bpy.types.Operator):
    """Give a saved field back to the backend (after its cache expired, after a restart, or to
    another backend): Render with Field then renders it"""

    bl_idname = "implicit.restore_field"
    bl_label = "Give Field Back"

    directory: bpy.props.StringProperty(name="Folder", subtype="DIR_PATH", default="", options={"SKIP_SAVE"},
                                        description="Folder of a saved field (run.json, model.pt); empty: the "
                                                    "scene's last saved field")

    def execute(self, context):
        scene = context.scene
        folder = bpy.path.abspath(self.directory) if self.directory else str(scene.get(FIELD_KEY, ""))
        if not folder:
            self.report({"ERROR"}, "No saved field: save one first (Save Field), or choose its folder")
            return {"CANCELLED"}
        job_id = self.guarded(context, "The field was not given back",
                              lambda address, keys: restore_field(scene, address, folder, keys))
        if job_id is None:
            return {"CANCELLED"}
        self.report({"INFO"}, f"The backend has the field of {folder} again, as fit {job_id}")
        return {"FINISHED"}


CLASSES = (IMPLICIT_OT_save_field, IMPLICIT_OT_restore_field)
