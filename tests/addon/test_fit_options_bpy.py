"""The panel's Max Faces reaching the job, and undo: the imported mesh is one undo step, and the
operators that change the scene at once carry Blender's UNDO option.

The backend is a scripted client (the real JobClient and server are exercised in
tests/system/test_packaging.py); the views are real Cycles renders of a tiny scene.
"""
import dataclasses

import numpy as np
import pytest

from bpy_helpers import add_camera, add_plane, emission_material, fresh_scene, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender]


class ScriptedClient:
    """JobClient's API (start, poll, cancel, close, finished, error, job_id): a job that is
    accepted, sends a one-triangle mesh and ends."""

    def __init__(self, address):
        from fit_implicit.shared import protocol
        self.submit, self.finished, self.error, self.job_id = None, False, None, "j1"
        v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
        self.batches = [[protocol.Accepted(job_id="j1")],
                        [protocol.MeshResult(job_id="j1", vertices=v, faces=np.array([[0, 1, 2]], np.int32),
                                             colors=np.full((3, 3), 0.5, np.float32))],
                        [protocol.Done(job_id="j1", summary={"steps": 1})]]

    def start(self, submit):
        self.submit = submit

    def poll(self):
        out = self.batches.pop(0) if self.batches else []
        self.finished = not self.batches
        return out

    def cancel(self):
        self.finished = True

    def close(self):
        pass


def _welcome(address):
    from fit_implicit.shared import protocol
    return protocol.Welcome()


def _scene():
    scene = fresh_scene(width=32, height=24, samples=1)
    add_plane(scene, "Object", material=emission_material("Grey", (0.5, 0.5, 0.5)))
    add_camera(scene, "Cam", location=(0, 0, 4))
    return scene


def test_max_faces_goes_from_the_panel_into_the_submit(addon):
    from fit_implicit.blender_addon import fit_session, operators
    from fit_implicit.shared import protocol
    scene = _scene()
    assert operators._settings_from_scene(scene).max_faces == 0            # Auto: the backend's default
    scene.implicit.max_faces = 50_000
    assert operators._settings_from_scene(scene).max_faces == 50_000
    for below in (1, protocol.MIN_FACES - 1):       # the Submit refuses these: raised to its minimum
        scene.implicit.max_faces = below
        assert operators._settings_from_scene(scene).max_faces == protocol.MIN_FACES
    scene.implicit.max_faces = 12
    clients = []
    settings = dataclasses.replace(operators._settings_from_scene(scene), preview_size=0, cache_dir=None,
                                   eval_reference=False, check_asset=False)
    session = fit_session.FitSession(scene, "tcp://127.0.0.1:1", settings, probe=_welcome,
                                     client_factory=lambda a: clients.append(ScriptedClient(a)) or clients[-1])
    session.begin()
    result = session.run()
    assert result.status == "done", result.message
    assert clients[0].submit.max_faces == protocol.MIN_FACES


def test_the_imported_mesh_is_one_undo_step(addon):
    import bpy
    from fit_implicit.blender_addon import fit_session
    scene = _scene()
    bpy.ops.ed.undo_push(message="Scene before the fit")
    settings = fit_session.FitSettings(preview_size=0, cache_dir=None, eval_reference=False, check_asset=False)
    session = fit_session.FitSession(scene, "tcp://127.0.0.1:1", settings, probe=_welcome,
                                     client_factory=ScriptedClient)
    session.begin()
    result = session.run()
    assert result.status == "done" and result.object.name == "Implicit Mesh"

    assert bpy.ops.ed.undo() == {"FINISHED"}           # Ctrl+Z: the mesh goes, the scene stays
    assert "Implicit Mesh" not in bpy.data.objects and "Object" in bpy.data.objects
    assert bpy.ops.ed.redo() == {"FINISHED"}           # Ctrl+Shift+Z: back, placed and tagged
    ob = bpy.data.objects["Implicit Mesh"]
    assert ob["implicit_job_id"] == "j1" and len(ob.data.polygons) == 1

    with bpy.context.temp_override(window=None):      # no window (blender --background): no push
        assert fit_session.push_undo_step("Fit Implicit import") is False


def test_operators_that_change_the_scene_at_once_can_be_undone(addon):
    import bpy
    for name in ("add_camera_rig", "import_transforms", "import_colmap"):
        assert {"REGISTER", "UNDO"} <= getattr(bpy.ops.implicit, name).bl_options, name
