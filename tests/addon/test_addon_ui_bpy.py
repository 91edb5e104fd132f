"""The add-on's live feedback and backend management, driven headless through real bpy.

Real parts: the bpy 5.0.1 module with the add-on enabled as an add-on (its preferences exist),
real backend processes (the real server; its jobs run tests/helpers.fake_runner where a real fit
would take too long on 2 CPU cores, the real trainer where the test says so) and real ZeroMQ.
Not exercised here: drawing (the bpy module has no windows); the icon names the panel uses are
checked against this Blender instead.
"""
import re
import socket
import sys
import time

import numpy as np
import pytest

from bpy_helpers import REPO, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def addon():
    import bpy  # noqa: F401  (first: it puts addon_utils on the path)
    import addon_utils
    mod = addon_utils.enable("fit_implicit.blender_addon", default_set=True)
    assert mod is not None and "fit_implicit.blender_addon" in bpy.context.preferences.addons
    yield mod
    from fit_implicit.blender_addon import backend_process
    backend_process.stop_all()
    addon_utils.disable("fit_implicit.blender_addon")


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _prefs(address, auto_start=False):
    import bpy
    p = bpy.context.preferences.addons["fit_implicit.blender_addon"].preferences
    p.address, p.python, p.source_dir, p.device, p.auto_start = address, sys.executable, str(REPO), "CPU", auto_start
    return p


def _cube_scene(name="Scene"):
    """An empty scene with a cube (not read_factory_settings: that would disable the add-on)."""
    import bpy
    scene = bpy.context.scene
    for ob in list(bpy.data.objects):
        bpy.data.objects.remove(ob, do_unlink=True)
    for img in [i for i in bpy.data.images if i.name != "Render Result"]:
        bpy.data.images.remove(img)
    scene.name = name
    scene.render.engine = "CYCLES"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 32, 24, 100
    scene.cycles.device, scene.cycles.samples = "CPU", 1
    scene.implicit.status, scene.implicit.step, scene.implicit.total_steps = "", 0, 0
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    scene.implicit.ring_count = 4
    scene.implicit.preset = "draft"
    return scene


class Recorder:
    """The real JobClient, keeping the Submit it sent and the wall time of every poll."""

    def __init__(self, address):
        from fit_implicit.blender_addon.client import JobClient
        self.client = JobClient(address)
        self.submit = None

    def start(self, submit):
        self.submit = submit
        self.client.start(submit)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_previews_reach_the_image_at_least_once_a_second_without_stalling(addon, fake_backend):
    import bpy
    from fit_implicit.blender_addon import fit_session
    scene = _cube_scene()
    scene.implicit.preview_size = 48
    made = []

    def factory(address):
        made.append(Recorder(address))
        return made[-1]

    settings = fit_session.FitSettings(preset="draft", steps=300, ring_count=4, preview_size=48,
                                       preview_interval=0.2)
    session = fit_session.FitSession(scene, fake_backend.address, settings, client_factory=factory)
    session.begin()
    ticks, updates, last = [], [], 0
    while True:
        t, stage = time.monotonic(), session.stage
        done = session.tick()
        if stage == "running":     # render and checking ticks each render one view in Blender
            ticks.append(time.monotonic() - t)
        if session.result.previews != last:
            last = session.result.previews
            updates.append(time.monotonic())
        if done:
            break
        time.sleep(0.1)    # the modal timer's interval (operators.TIMER_INTERVAL)
    session.close()
    assert session.result.status == "done", session.result.message
    assert made[0].submit.preview_size == 48        # the add-on chose the preview size
    # The fake job runs 300 steps of 10 ms with a preview every 5 steps: 3 s of previews.
    gaps = np.diff(updates)
    assert len(updates) >= 3 and gaps.max() < 1.0, updates
    assert len(ticks) >= 10 and max(ticks) < 0.1, max(ticks)   # draining never stalls the UI
    img = bpy.data.images["Implicit Preview"]
    px = np.empty(len(img.pixels), np.float32)
    img.pixels.foreach_get(px)
    expected = session.result.last_preview[::-1].astype(np.float32).ravel() / 255
    assert tuple(img.size) == (8, 8) and np.abs(px - expected).max() < 1e-6


def test_plot_shows_loss_falling_and_psnr_rising(addon, fake_backend):
    import bpy
    from fit_implicit.blender_addon import fit_session, plot
    scene = _cube_scene()
    session = fit_session.FitSession(scene, fake_backend.address,
                                     fit_session.FitSettings(preset="draft", steps=100, ring_count=4))
    session.begin()
    try:
        assert session.run(timeout=60).status == "done"
    finally:
        session.close()
    points = session.history.points        # the Progress messages received (the backend may merge some)
    assert len(points) >= 10 and points[-1] == (100.0, 0.01, 11.0)
    assert scene.implicit.total_steps == 100 and scene.implicit.step == 100
    img = bpy.data.images[fit_session.PLOT_IMAGE]
    assert tuple(img.size) == (plot.WIDTH, plot.HEIGHT)
    px = np.empty(len(img.pixels), np.float32)
    img.pixels.foreach_get(px)
    rgba = np.round(px.reshape(plot.HEIGHT, plot.WIDTH, 4)[::-1] * 255).astype(np.uint8)   # top row first
    expected = plot.draw_plot(*session.history.arrays())
    assert np.array_equal(rgba, expected)
    # The preview icon the panel draws holds the same picture.
    icon = np.empty(plot.WIDTH * plot.HEIGHT * 4, np.float32)
    img.preview.image_pixels_float.foreach_get(icon)
    assert np.abs(icon.reshape(plot.HEIGHT, plot.WIDTH, 4)[::-1] * 255 - rgba).max() <= 1


def test_plot_curves_go_the_right_way():
    from fit_implicit.blender_addon import plot
    steps = np.arange(1, 201)
    img = plot.draw_plot(steps, 1.0 / steps, 10 + 0.05 * steps)

    def rows(color, col):
        return np.nonzero((img[:, col, :3] == color[:3]).all(-1))[0]
    # Falling loss: high on the left, low on the right; rising PSNR the other way (row 0 is the top).
    assert rows(plot.LOSS_COLOR, 0).mean() < 10 and rows(plot.LOSS_COLOR, plot.WIDTH - 1).mean() > plot.HEIGHT - 10
    assert rows(plot.PSNR_COLOR, 0).mean() > plot.HEIGHT - 10 and rows(plot.PSNR_COLOR, plot.WIDTH - 1).mean() < 10
    h = plot.History(max_points=64)
    for s in range(1000):
        h.add(s, 1.0, 1.0)
    assert len(h.points) <= 64 and h.points[-1][0] == 999
    assert plot.draw_plot([], [], []).shape == (plot.HEIGHT, plot.WIDTH, 4)


def test_panel_icons_exist_in_this_blender():
    import bpy
    from fit_implicit.blender_addon import panels
    icons = set(bpy.types.UILayout.bl_rna.functions["label"].parameters["icon"].enum_items.keys())
    used = set(re.findall(r'icon="([A-Z_0-9]+)"', (REPO / "blender_addon" / "panels.py").read_text()))
    used |= set(panels.STATUS_ICONS.values())
    used |= set(re.findall(r'icon="([A-Z_0-9]+)"', (REPO / "blender_addon" / "preferences.py").read_text()))
    assert used and used <= icons, used - icons


def test_start_status_free_memory_log_and_stop_buttons(addon, tmp_path, monkeypatch):
    monkeypatch.setenv("FIT_IMPLICIT_RUNS_DIR", str(tmp_path / "runs"))   # no jobs resumed from other runs
    import bpy
    from fit_implicit.blender_addon import backend_process, panels, status
    address = free_address()
    _prefs(address)
    _cube_scene()
    assert bpy.ops.implicit.backend_start(wait=True) == {"FINISHED"}
    proc = backend_process.get(address)
    assert proc is not None and proc.running and "--device" in proc.command and "cpu" in proc.command
    assert status.monitor(address).wait_for((status.IDLE,), 15).state == status.IDLE
    assert panels.backend_line(address) == ("Backend idle (cpu)", "CHECKMARK")
    assert bpy.ops.implicit.free_memory() == {"FINISHED"}
    assert bpy.ops.implicit.backend_log() == {"FINISHED"}
    assert f"backend listening on {address}" in bpy.data.texts["Fit Implicit Backend Log"].as_string()
    assert bpy.ops.implicit.backend_stop(wait=True) == {"FINISHED"}
    assert not proc.running and proc.returncode == 0
    assert status.monitor(address).wait_for((status.NOT_RUNNING,), 15).state == status.NOT_RUNNING
    assert panels.backend_line(address)[0] == "Backend not running"


class _Layout:
    """Stands in for a panel's layout (the bpy module has no windows): accepts every call."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: self


def test_showing_the_tab_starts_the_local_backend_once(addon, tmp_path, monkeypatch):
    """Start When Shown: drawing the main panel with nothing running at the (local) address starts
    the backend, so its start-up is over before the first Fit; once: after Stop Backend the next
    draw leaves it stopped.  Off (or Start Automatically off), drawing starts nothing."""
    monkeypatch.setenv("FIT_IMPLICIT_RUNS_DIR", str(tmp_path / "runs"))
    from types import SimpleNamespace

    import bpy
    from fit_implicit.blender_addon import backend_process, status
    from fit_implicit.blender_addon.panels import VIEW3D_PT_implicit
    _cube_scene()

    def draw_when_not_running(address):
        assert status.monitor(address).wait_for((status.NOT_RUNNING,), 15).state == status.NOT_RUNNING
        VIEW3D_PT_implicit.draw(SimpleNamespace(layout=_Layout()), bpy.context)

    for auto_start, when_shown in ((True, False), (False, True)):
        address = free_address()
        _prefs(address, auto_start=auto_start).start_when_shown = when_shown
        draw_when_not_running(address)
        assert backend_process.get(address) is None, (auto_start, when_shown)

    address = free_address()
    _prefs(address, auto_start=True).start_when_shown = True
    draw_when_not_running(address)
    proc = backend_process.get(address)
    assert proc is not None and proc.running, "showing the tab started no backend"
    proc.wait_ready(timeout=60)
    assert status.monitor(address).wait_for((status.IDLE,), 15).state == status.IDLE
    assert bpy.ops.implicit.backend_stop(wait=True) == {"FINISHED"} and not proc.running
    draw_when_not_running(address)
    assert backend_process.get(address) is None, "a stopped backend was started again"


@pytest.mark.slow
def test_fit_starts_a_local_backend_on_demand(addon, tmp_path, monkeypatch):
    """Auto-start with the real trainer: the fit is cut short by the operator's timeout (a whole
    fit takes ~30 s on 2 cores); what matters is that the backend came up and trained."""
    import bpy
    from fit_implicit.blender_addon import backend_process
    monkeypatch.setenv("FIT_IMPLICIT_RUNS_DIR", str(tmp_path / "runs"))
    address = free_address()
    _prefs(address, auto_start=True)
    scene = _cube_scene()
    scene.implicit.preview_size = 16
    t = time.monotonic()
    assert bpy.ops.implicit.fit(timeout=8.0) == {"CANCELLED"}
    proc = backend_process.get(address)
    assert proc is not None and proc.running, "no backend was started"
    assert time.monotonic() - t < 60
    assert scene.implicit.status.startswith("Cancelled (time limit of 8 s reached")
    assert not scene.implicit.running
    log = proc.log_tail(20000)
    assert re.search(r"job \w+: running", log), log
    assert bpy.ops.implicit.backend_stop(wait=True) == {"FINISHED"}


@pytest.mark.slow
def test_fit_sdf_to_points_starts_a_local_backend_on_demand(addon, tmp_path, monkeypatch):
    """Fit SDF to Points with no backend running and Auto Start on: the backend comes up and the job
    reaches it (cut short by the operator's timeout; the fit itself is tested in test_points_fit_bpy.py).
    With Auto Start off the artist is told that nothing answers."""
    import bpy
    from fit_implicit.blender_addon import backend_process
    monkeypatch.setenv("FIT_IMPLICIT_RUNS_DIR", str(tmp_path / "runs"))
    address = free_address()
    _prefs(address, auto_start=False)
    _cube_scene()
    bpy.ops.mesh.primitive_uv_sphere_add(radius=1.0)
    with pytest.raises(RuntimeError, match="No backend answered at .* is it running"):
        bpy.ops.implicit.fit_points(timeout=8.0)
    assert backend_process.get(address) is None
    _prefs(address, auto_start=True)
    with pytest.raises(RuntimeError, match="Fit SDF to Points: no result within 8 s"):   # cut short, reported
        bpy.ops.implicit.fit_points(timeout=8.0)
    proc = backend_process.get(address)
    assert proc is not None and proc.running, "no backend was started"
    log = proc.log_tail(20000)
    assert re.search(r"job \w+: running", log), log
    assert bpy.ops.implicit.backend_stop(wait=True) == {"FINISHED"}


def test_surface_level_goes_from_the_panel_into_the_submit(addon, fake_backend):
    """The radiance field's Surface Level (0: Auto) travels from the panel's property through the
    fit's settings into the Submit the backend receives; out of range it is clamped by Blender."""
    import bpy
    from fit_implicit.blender_addon import capture, fit_session, operators
    scene = _cube_scene()
    method = scene.implicit.method
    scene.implicit.method = "nerf"
    assert scene.implicit.mesh_opacity == 0.0 and operators._settings_from_scene(scene).mesh_opacity == 0.0
    scene.implicit.mesh_opacity = 0.4
    settings = operators._settings_from_scene(scene)
    assert settings.mesh_opacity == pytest.approx(0.4)
    made = []

    def factory(address):
        made.append(Recorder(address))
        return made[-1]

    settings = fit_session.FitSettings(preset="draft", steps=5, ring_count=4, preview_size=0,
                                       mesh_opacity=settings.mesh_opacity)
    session = fit_session.FitSession(scene, fake_backend.address, settings, client_factory=factory)
    session.begin()
    deadline = time.monotonic() + 60
    while not session.tick() and time.monotonic() < deadline:
        time.sleep(0.05)
    session.close()
    assert session.result.status == "done", session.result.message
    assert made[0].submit.mesh_opacity == pytest.approx(0.4)
    # The most the panel allows is sent as it reads (float32 0.99 is 0.9900000095, above the cap
    # of the wire without the rounding): a fit at the top of the range is not refused.
    scene.implicit.mesh_opacity = 1.5
    assert scene.implicit.mesh_opacity == pytest.approx(0.99)
    submit = capture.build_submit(made[0].submit.images, made[0].submit.intrinsics, made[0].submit.poses,
                                  made[0].submit.aabb, method="nerf",
                                  mesh_opacity=operators._settings_from_scene(scene).mesh_opacity)
    assert submit.mesh_opacity == 0.99
    scene.implicit.mesh_opacity, scene.implicit.method = 0.0, method     # as the other tests expect them
