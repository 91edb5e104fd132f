"""Refined cameras back in Blender (blender_addon/refined_cameras.py, issue 15): the panel's photo
settings reach the Submit, and a job that sends a CamerasResult leaves copies of the training
cameras at the refined poses beside the originals, in their own collection, disabled for
rendering (the next fit trains on the originals only), each saying how far it moved; the report
says so.  The backend is replayed (the fit's own refinement is tested in
tests/backend/service/test_fit_job_photos.py)."""
import math

import numpy as np
import pytest

from bpy_helpers import add_camera, add_plane, emission_material, fresh_scene, requires_bpy
from helpers import Replay

pytestmark = [requires_bpy, pytest.mark.blender]

ADDRESS = "tcp://127.0.0.1:1"


def turned(pose: np.ndarray, degrees: float) -> np.ndarray:
    """``pose`` turned about its own centre by ``degrees`` about world Z."""
    a = math.radians(degrees)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    out = pose.copy()
    out[:3, :3] = rz @ pose[:3, :3]
    return out


def test_refined_cameras_land_beside_the_originals(addon):
    import bpy

    from fit_implicit.blender_addon import capture, fit_session, refined_cameras
    from fit_implicit.shared import protocol

    scene = fresh_scene(width=8, height=8, samples=1)
    add_plane(scene, "Object", size=1.0, material=emission_material("Grey", (0.5, 0.5, 0.5)))
    for i, name in enumerate(("A", "B", "C")):
        add_camera(scene, name, location=(4 * math.cos(i), 4 * math.sin(i), 2), lens=35.0 + i)
        cam = scene.objects[name]
        cam.rotation_euler = (1.1, 0.0, i + math.pi / 2)
    bpy.context.view_layer.update()
    names = ["A", "B", "C"]
    poses = np.array([np.array(scene.objects[n].matrix_world) for n in names])
    refined = np.stack([turned(p, d) for p, d in zip(poses, (0.5, 1.0, 2.0))])
    refined[1, :3, 3] += [0.01, 0, 0]
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    batches = [[protocol.Accepted(job_id="cam1")],
               [protocol.MeshResult(job_id="cam1", vertices=v, faces=np.array([[0, 1, 2]], np.int32),
                                    colors=np.full((3, 3), 0.5, np.float32))],
               [protocol.CamerasResult(job_id="cam1", poses=refined, moved_deg=np.array([0.5, 1.0, 2.0]),
                                       moved=np.array([0.0, 0.01, 0.0]), focal_scale=1.1)],
               [protocol.Done(job_id="cam1", summary={"steps": 10, "cameras_refined": 3})]]
    clients = []

    def client(address):
        clients.append(Replay(address, batches, "cam1"))
        return clients[-1]

    r = fit_session.fit_scene(scene, ADDRESS, client_factory=client, probe=lambda a: protocol.Welcome(),
                              name="Shot", cameras=names, check_asset=False, camera_refine="on", background="off",
                              appearance=True, encoding="fourier")
    sent = clients[0].submit
    assert (sent.camera_refine, sent.background, sent.appearance, sent.encoding) == ("on", "off", True, "fourier")

    coll = r.refined_cameras
    assert coll.name == f"Shot Mesh {refined_cameras.SUFFIX}" and coll.name in scene.collection.children
    made = sorted(coll.objects, key=lambda ob: ob.name)
    assert [ob.name for ob in made] == ["A refined", "B refined", "C refined"]
    for ob, name, pose, deg in zip(made, names, refined, (0.5, 1.0, 2.0)):
        np.testing.assert_allclose(np.array(ob.matrix_world), pose, atol=1e-5)
        assert ob.data.lens == pytest.approx(scene.objects[name].data.lens * 1.1)     # the refined focal length
        assert ob.data is not scene.objects[name].data
        assert ob.hide_render and ob["implicit_refined_from"] == name and ob["implicit_moved_deg"] == deg
    assert made[1]["implicit_moved"] == pytest.approx(0.01)
    np.testing.assert_allclose(np.array([np.array(scene.objects[n].matrix_world) for n in names]), poses, atol=1e-6)
    # The next fit trains on the originals only; the report says where the refined ones are.
    assert [ob.name for ob in capture.scene_cameras(bpy.context.view_layer)] == names
    assert "Cameras refined: turned 1.17 degrees on average (most 2.00)" in r.message and coll.name in r.message

    # The settings, as the panel holds them, reach the Submit by the same names.
    props = scene.implicit
    props.background, props.camera_refine, props.appearance, props.encoding = "on", "on", True, "positional"
    settings = capture.fit_settings_from_props(props)
    assert (settings["background"], settings["camera_refine"], settings["appearance"], settings["encoding"]) == (
        "on", "on", True, "positional")
    with pytest.raises(ValueError, match="2 refined cameras came back for 3 training cameras"):
        refined_cameras.add_refined_cameras(scene, names, refined[:2], np.zeros(2), np.zeros(2), "Wrong")
