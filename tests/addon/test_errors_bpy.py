"""Every error of issue 5 §8 reaches the user as the Fit operator's report (bpy.ops raises
RuntimeError with the report's text in background mode), within seconds, and leaves no fit
running.  Real parts: bpy 5.0.1 with the add-on enabled, real backend processes (the real server
with tests/helpers.fake_runner, whose job name "oom" raises torch's real OutOfMemoryError and
"fail" a RuntimeError), and a real ZeroMQ socket that answers in another protocol version.
"""
import json
import threading
import time

import pytest
import zmq

from bpy_helpers import requires_bpy
from fit_implicit.shared import protocol

pytestmark = [requires_bpy, pytest.mark.blender, pytest.mark.timeout(180)]

DEAD_ADDRESS = "tcp://127.0.0.1:9"     # the discard port: nothing listens there


@pytest.fixture(scope="module")
def addon():
    import bpy
    import addon_utils
    mod = addon_utils.enable("fit_implicit.blender_addon", default_set=True)
    assert mod is not None
    bpy.context.preferences.addons["fit_implicit.blender_addon"].preferences.auto_start = False
    yield mod
    addon_utils.disable("fit_implicit.blender_addon")


def _scene(name="Scene", cube=True):
    import bpy
    scene = bpy.context.scene
    for ob in list(bpy.data.objects):
        bpy.data.objects.remove(ob, do_unlink=True)
    scene.name = name
    scene.render.engine = "CYCLES"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 32, 24, 100
    scene.cycles.device, scene.cycles.samples = "CPU", 1
    scene.implicit.ring_count, scene.implicit.preset = 4, "draft"
    if cube:
        bpy.ops.mesh.primitive_cube_add(size=1.0)
    return scene


def fit_error(address, seconds_max=30.0) -> str:
    """Run the Fit operator; return its error report (fails if it succeeds or takes too long)."""
    import bpy
    from fit_implicit.blender_addon import running
    t = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        bpy.ops.implicit.fit(address=address)
    assert time.monotonic() - t < seconds_max
    scene = bpy.context.scene
    assert running.active_session(scene) is None and not scene.implicit.running
    return str(info.value)


def test_backend_not_running(addon):
    _scene()
    text = fit_error(DEAD_ADDRESS)
    assert "No backend answered at tcp://127.0.0.1:9" in text and "fit-implicit serve" in text, text


@pytest.fixture
def other_version_backend():
    """A ROUTER that answers everything as a backend of the next protocol version would."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    address = f"tcp://127.0.0.1:{sock.bind_to_random_port('tcp://127.0.0.1')}"
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if sock.poll(50):
                identity = sock.recv_multipart()[0]
                newer = protocol.PROTOCOL_VERSION + 1
                header = {"v": newer, "type": "welcome", "protocol": newer, "server": "fit-implicit backend 9.0"}
                sock.send_multipart([identity, json.dumps(header).encode()])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield address
    stop.set()
    t.join(2)
    sock.close()


def test_version_mismatch(addon, other_version_backend):
    _scene()
    text = fit_error(other_version_backend)
    assert "version mismatch" in text and "install the same version of the add-on and the backend" in text, text


def test_no_cameras(addon, fake_backend):
    import bpy
    _scene()
    bpy.context.object.select_set(False)
    text = fit_error(fake_backend.address)
    assert "no cameras and nothing is selected" in text, text


def test_camera_without_image(addon, fake_backend, tmp_path):
    """A camera of an imported photo dataset whose photo is gone."""
    import bpy
    scene = _scene()
    data = bpy.data.cameras.new("Photo 0")
    data["implicit_image"] = str(tmp_path / "images" / "r_0.png")
    cam = bpy.data.objects.new("Photo 0", data)
    cam.location = (0, -4, 0)
    scene.collection.objects.link(cam)
    text = fit_error(fake_backend.address)
    assert text.startswith("Error: Camera 'Photo 0' has no image") and "Background Images" in text, text
    img = bpy.data.images.new("r_0", 4, 4)
    img.source, img.filepath = "FILE", str(tmp_path / "images" / "r_0.png")
    bg = data.background_images.new()
    bg.image = img
    text = fit_error(fake_backend.address)
    assert "background image file" in text and "was not found" in text and "r_0.png" in text, text


def test_gpu_out_of_memory(addon, fake_backend):
    _scene(name="oom")       # the job is named after the scene: the fake runner raises CUDA OOM
    text = fit_error(fake_backend.address, seconds_max=60)
    assert "The fit failed" in text and "out of memory" in text and "lower the preset" in text, text


def test_job_failed(addon, fake_backend):
    _scene(name="fail")
    text = fit_error(fake_backend.address)
    assert "The fit failed: " in text and "fake failure" in text, text
