"""FitSession, fit_scene and the operators, driven tick by tick against a scripted fake client.

The fake stands in for blender_addon.client.JobClient (same API: start, poll, cancel, close,
finished, error, job_id); the real client and server are exercised in test_packaging.py.
"""
import os

import numpy as np
import pytest

from bpy_helpers import add_camera, add_plane, emission_material, fresh_scene, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender]

ADDRESS = "tcp://127.0.0.1:1"


@pytest.fixture()
def fs(addon):
    from fit_implicit.blender_addon import fit_session
    return fit_session


@pytest.fixture()
def protocol():
    from fit_implicit.shared import protocol
    return protocol


class FakeClient:
    """Replays ``batches`` (lists of messages, one list per poll) after start()."""

    def __init__(self, address, batches=(), confirm_cancel=True):
        self.address = address
        self.batches = [list(b) for b in batches]
        self.confirm_cancel = confirm_cancel
        self.submit = None
        self.cancelled = self.closed = False
        self.finished, self.error, self.job_id = False, None, None

    def start(self, submit):
        self.submit = submit

    def poll(self):
        from fit_implicit.shared import protocol
        out = self.batches.pop(0) if self.batches else []
        for m in out:
            if isinstance(m, protocol.Accepted):
                self.job_id = m.job_id
            if isinstance(m, protocol.JOB_END_TYPES):
                self.finished = True
                self.error = getattr(m, "message", None) if isinstance(m, protocol.Failed) else None
        return out

    def cancel(self):
        from fit_implicit.shared import protocol
        self.cancelled = True
        if self.confirm_cancel:
            self.batches.append([protocol.Cancelled(job_id=self.job_id or "")])

    def close(self):
        self.closed = True


def _welcome(address):
    from fit_implicit.shared import protocol
    return protocol.Welcome()


def _scene():
    scene = fresh_scene(width=32, height=24, samples=1)
    grey = emission_material("Grey", (0.5, 0.5, 0.5))
    add_plane(scene, "Object", size=1.0, material=grey)
    add_camera(scene, "Cam A", location=(0, 0, 4))
    add_camera(scene, "Cam B", location=(0, -4, 4), rotation=(0.785398, 0, 0))
    add_camera(scene, "Eval", location=(4, 0, 4), rotation=(0.785398, 0, 1.570796))
    return scene


def _job_messages(protocol, job="j1"):
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32) + np.float32(5)
    return [
        [protocol.Accepted(job_id=job)],
        [protocol.Progress(job_id=job, step=10, total_steps=100, loss=0.5, psnr=12.5, elapsed=1.0, fraction=0.1),
         protocol.Preview(job_id=job, image=np.full((4, 6, 4), 10, np.uint8), step=10),
         protocol.Preview(job_id=job, image=np.full((4, 6, 4), 200, np.uint8), step=20)],
        [],
        [protocol.Progress(job_id=job, step=100, total_steps=100, loss=0.01, psnr=31.0, elapsed=9.0, fraction=1.0)],
        [protocol.Progress(job_id=job, stage="mesh", step=100, total_steps=100, fraction=1.0),
         protocol.MeshResult(job_id=job, vertices=v, faces=np.array([[0, 1, 2]], np.int32),
                             colors=np.full((3, 3), 0.5, np.float32))],
        [protocol.RenderResult(job_id=job, index=0, image=np.full((24, 32, 4), 7, np.uint8)),
         protocol.Done(job_id=job, summary={"psnr": 31.0, "steps": 100})],
    ]


def test_session_runs_tick_by_tick(fs, protocol):
    import json

    import bpy
    scene = _scene()
    bpy.data.objects["Object"].location = (0.2, 0.1, 0.0)      # the asset's origin lands here
    bpy.context.view_layer.update()
    clients = []

    def factory(address):
        clients.append(FakeClient(address, _job_messages(protocol)))
        return clients[-1]

    s = fs.FitSession(scene, ADDRESS, fs.FitSettings(preset="draft", eval_cameras=["Eval"]),
                      client_factory=factory, probe=_welcome)
    s.begin()
    assert scene.implicit.running and s.state.running
    from fit_implicit.blender_addon import running
    assert running.active_session(scene) is s
    folder = s._folder
    # One render per tick: 2 training views, then the eval camera's reference render.
    for i in range(2):
        assert not s.tick()
        assert scene.implicit.progress == pytest.approx((i + 1) / 3)
        assert scene.implicit.status == f"Rendered view {i + 1} of 3"
    assert not s.tick()                       # the last render, then the job is sent
    assert scene.implicit.status == "Sending 2 views to the backend"
    sub = clients[0].submit
    assert sub.images.shape == (2, 24, 32, 4) and sub.preset == "draft"
    assert sub.eval_sizes.tolist() == [[32, 24]] and sub.eval_poses.shape == (1, 4, 4)
    assert s.result.camera_names == ["Cam A", "Cam B"] and s.result.eval_camera_names == ["Eval"]
    assert s.result.eval_reference.shape == (1, 24, 32, 4)
    assert (sub.images[..., 3].max(axis=(1, 2)) == 255).all()    # the object is in every view

    assert not s.tick()                       # Accepted
    assert s.result.job_id == "j1"
    assert not s.tick()                       # Progress + two previews: only the last is shown
    p = scene.implicit
    assert (p.step, p.progress) == (10, pytest.approx(0.1)) and p.psnr == pytest.approx(12.5)
    assert "Training step 10/100" in p.status
    img = bpy.data.images["Implicit Preview"]
    px = np.empty(6 * 4 * 4, np.float32)
    img.pixels.foreach_get(px)
    assert np.allclose(px[:3], 200 / 255) and s.result.previews == 1
    while not s.tick():
        pass
    r = s.result
    assert r.status == "done", r.message
    assert "Fit finished" in r.message and "PSNR 31.00" in r.message
    assert {k: r.summary[k] for k in ("psnr", "steps")} == {"psnr": 31.0, "steps": 100}
    assert r.summary["heldout_views"] == 1 and len(r.asset_renders) == 1    # the asset checked at "Eval"
    assert r.object is not None and r.object.name in bpy.data.objects
    co = np.empty(9, np.float32)
    r.object.data.vertices.foreach_get("co", co)
    mw = np.array(r.object.matrix_world)
    assert np.allclose(co.reshape(3, 3)[0] @ mw[:3, :3].T + mw[:3, 3], 5.0)      # the surface where it was sent
    assert np.allclose(mw[:3, 3], [0.2, 0.1, 0.0]) and np.allclose(mw[:3, :3], np.eye(3))   # origin at the source's
    ob = r.object                     # the asset says how it was made
    assert (ob["implicit_job_id"], ob["implicit_method"], ob["implicit_preset"]) == ("j1", "nerf", "draft")
    assert ob["implicit_steps"] == 100 and ob["implicit_train_psnr"] == 31.0 and ob["implicit_sources"] == "Object"
    assert json.loads(ob["implicit_settings"])["preset"] == "draft" and ob["implicit_seconds_total"] >= 0
    assert ob["implicit_heldout_views"] == 1
    entry = scene.implicit.results[scene.implicit.results_index]       # the fit joined the Results list
    assert (entry.job_id, entry.method, entry.preset, entry.asset) == ("j1", "nerf", "draft", ob) and entry.psnr == 31.0
    assert r.renders[0].shape == (24, 32, 4)
    assert {"prepare", "render", "upload", "train", "mesh", "import", "total"} <= set(r.timings)
    assert not p.running and p.progress == 1.0
    assert running.active_session(scene) is None
    assert clients[0].closed and not os.path.exists(folder)


def test_cancel_while_rendering_restores_nothing_left(fs):
    scene = _scene()
    view = scene.view_settings.view_transform
    s = fs.FitSession(scene, ADDRESS, client_factory=lambda a: FakeClient(a), probe=_welcome)
    s.begin()
    s.tick()
    s.cancel()
    assert s.finished and s.result.status == "cancelled"
    assert scene.view_settings.view_transform == view and not scene.implicit.running


def test_cancel_while_running_waits_for_backend(fs, protocol):
    scene = _scene()
    box = []
    s = fs.FitSession(scene, ADDRESS, client_factory=lambda a: box.append(
        FakeClient(a, [[protocol.Accepted(job_id="j")]])) or box[-1], probe=_welcome)
    s.begin()
    while s._stage == "render":
        s.tick()
    s.tick()
    s.cancel()
    assert box[0].cancelled and not s.finished and scene.implicit.status.startswith("Cancelling")
    s.tick()
    assert s.finished and s.result.status == "cancelled"


def test_cancel_gives_up_when_backend_never_confirms(fs):
    scene = _scene()
    s = fs.FitSession(scene, ADDRESS, fs.FitSettings(cancel_timeout=0.05),
                      client_factory=lambda a: FakeClient(a, confirm_cancel=False), probe=_welcome)
    s.begin()
    s.run(timeout=0.01)   # renders, then cancels after the timeout, then gives up waiting
    assert s.result.status == "cancelled"
    assert s.result.message == "Cancelled (time limit of 0.01 s reached; the backend did not confirm in time)."


def test_backend_failure_is_reported_with_hint(fs, protocol):
    scene = _scene()
    dead = [[protocol.Failed(job_id="", message=f"no backend answered at {ADDRESS} within 5 s — is it running?",
                             code="unreachable")]]   # as the real client makes it up
    s = fs.FitSession(scene, ADDRESS, client_factory=lambda a: FakeClient(a, dead), probe=_welcome)
    s.begin()
    r = s.run()
    assert r.status == "failed"
    assert "fit-implicit serve" in r.message and ADDRESS in r.message
    failed = [[protocol.Accepted(job_id="j")],
              [protocol.Failed(job_id="j", message="CUDA out of memory", code="out_of_memory")]]
    s = fs.FitSession(scene, ADDRESS, client_factory=lambda a: FakeClient(a, failed), probe=_welcome)
    s.begin()
    message = s.run().message
    assert message.startswith("The fit failed: CUDA out of memory.") and "lower the preset" in message
    # As the backend sends it (backend/service/jobs.py failed_message): the add-on's advice, once.
    oom = protocol.Failed(job_id="j", message="GPU out of memory: lower the preset (e.g. 'draft'), ... (CUDA out of "
                          "memory. Tried to allocate 2.00 GiB)", code="out_of_memory",
                          detail="CUDA out of memory. Tried to allocate 2.00 GiB")
    s = fs.FitSession(scene, ADDRESS, client_factory=lambda a: FakeClient(a, [[protocol.Accepted(job_id="j")], [oom]]),
                      probe=_welcome)
    s.begin()
    assert s.run().message == "The fit failed: CUDA out of memory. Tried to allocate 2.00 GiB. " + fs.OUT_OF_MEMORY_ADVICE


def test_unreachable_backend_fails_before_rendering_and_removes_ring(fs):
    scene = fresh_scene()
    ob = add_plane(scene)
    ob.select_set(True)

    from fit_implicit.blender_addon.client import BackendError

    def probe(address):   # as client.probe says it
        raise BackendError(f"no backend answered at {address} within 2 s — is it running?", "unreachable")

    with pytest.raises(fs.FitError, match="fit-implicit serve --bind tcp://127.0.0.1:1"):
        fs.FitSession(scene, ADDRESS, probe=probe).begin()
    assert not [o for o in scene.objects if o.type == "CAMERA"]
    assert not scene.implicit.running


def test_fit_scene_blocking(fs, protocol):
    scene = _scene()
    r = fs.fit_scene(scene, ADDRESS, client_factory=lambda a: FakeClient(a, _job_messages(protocol)),
                     probe=_welcome, preset="draft", cameras=["Cam A"], eval_cameras=["Eval"])
    assert r.status == "done" and r.images.shape == (1, 24, 32, 4) and r.object is not None
    assert r.intrinsics.shape == (1, 4) and r.poses.shape == (1, 4, 4) and r.aabb.shape == (2, 3)
    with pytest.raises(fs.FitError, match="Unknown fit setting"):
        fs.fit_scene(scene, ADDRESS, colour="red")
    fail = [[protocol.Failed(job_id="", message="bad")]]
    with pytest.raises(fs.FitError, match="The fit failed: bad") as info:
        fs.fit_scene(scene, ADDRESS, client_factory=lambda a: FakeClient(a, fail), probe=_welcome)
    assert info.value.result.status == "failed"


def test_operator_blocking_path(fs, protocol, monkeypatch):
    import bpy
    scene = fresh_scene()
    add_plane(scene)
    with pytest.raises(RuntimeError, match="no cameras and nothing is selected"):
        bpy.ops.implicit.fit()
    scene = _scene()
    scene.implicit.preset = "high"
    clients = []
    monkeypatch.setattr(fs, "default_probe", _welcome)
    monkeypatch.setattr(fs, "default_client_factory",
                        lambda a, **kw: clients.append(FakeClient(a, _job_messages(protocol))) or clients[-1])
    assert bpy.ops.implicit.fit(address="tcp://10.0.0.1:7") == {"FINISHED"}
    assert clients[0].address == "tcp://10.0.0.1:7" and clients[0].submit.preset == "high"
    assert clients[0].submit.images.shape[0] == 3          # no eval cameras: all three train
    assert "Implicit Mesh" in bpy.data.objects
    assert bpy.ops.implicit.cancel.poll() is False


def test_a_quality_never_chosen_follows_the_backends_device(fs, protocol, monkeypatch):
    """Quality left as it came: a CPU backend trains the draft preset (and the operator says
    so), a GPU one the standard preset; a chosen quality is kept whatever the device."""
    import bpy
    clients = []
    monkeypatch.setattr(fs, "default_client_factory",
                        lambda a, **kw: clients.append(FakeClient(a, _job_messages(protocol))) or clients[-1])
    for device, chosen, expected in (("cpu", None, "draft"), ("cuda:0", None, "standard"), ("cpu", "high", "high")):
        scene = _scene()
        scene.implicit.property_unset("preset")
        if chosen:
            scene.implicit.preset = chosen
        monkeypatch.setattr(fs, "default_probe", lambda a, device=device, **kw: protocol.Welcome(device=device))
        assert bpy.ops.implicit.fit(address="tcp://10.0.0.1:7") == {"FINISHED"}
        assert clients[-1].submit.preset == expected, (device, chosen)
        assert bpy.data.objects["Implicit Mesh"]["implicit_preset"] == expected
        bpy.data.objects.remove(bpy.data.objects["Implicit Mesh"])


# --------------------------------------------------------------------------------------------
# The interactive pieces, called directly (the bpy module has no event loop and no UI)
# --------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for UILayout (records calls) and for the window manager."""

    def __init__(self, calls=None):
        self.calls = [] if calls is None else calls
        self.enabled = True
        self.windows = []

    def __getattr__(self, name):
        def record(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            return _Recorder(self.calls)
        return record


def test_modal_path_and_panel_drawing(fs, protocol):
    from types import SimpleNamespace

    import bpy
    from fit_implicit.blender_addon.operators import IMPLICIT_OT_fit
    from fit_implicit.blender_addon.panels import VIEW3D_PT_implicit

    scene = _scene()
    session = fs.FitSession(scene, ADDRESS, client_factory=lambda a: FakeClient(a, _job_messages(protocol)),
                            probe=_welcome)
    session.begin()
    reports = []
    wm = _Recorder()
    op = SimpleNamespace(_session=session, _timer="timer", report=lambda kind, text: reports.append((kind, text)))
    ctx = SimpleNamespace(window_manager=wm, scene=scene, preferences=bpy.context.preferences)
    timer = SimpleNamespace(type="TIMER", value="NOTHING")

    layout = _Recorder()
    VIEW3D_PT_implicit.draw(SimpleNamespace(layout=layout), ctx)
    assert ("operator", ("implicit.cancel",), {"icon": "CANCEL"}) in layout.calls
    assert any(name == "progress" and kw["type"] == "BAR" for name, _, kw in layout.calls)

    assert IMPLICIT_OT_fit.modal(op, ctx, SimpleNamespace(type="MOUSEMOVE", value="NOTHING")) == {"PASS_THROUGH"}
    ticks = 0
    while (ret := IMPLICIT_OT_fit.modal(op, ctx, timer)) == {"PASS_THROUGH"}:
        ticks += 1
        assert ticks < 50
    assert ret == {"FINISHED"} and reports[-1][0] == {"INFO"} and "Fit finished" in reports[-1][1]
    assert ("event_timer_remove", ("timer",), {}) in wm.calls

    layout = _Recorder()
    VIEW3D_PT_implicit.draw(SimpleNamespace(layout=layout), ctx)
    assert ("operator", ("implicit.fit",), {"icon": "PLAY"}) in layout.calls

    # Esc while rendering: cancelled on the next timer tick, reported as a warning.
    session = fs.FitSession(scene, ADDRESS, client_factory=lambda a: FakeClient(a), probe=_welcome)
    session.begin()
    op._session = session
    assert IMPLICIT_OT_fit.modal(op, ctx, SimpleNamespace(type="ESC", value="PRESS")) == {"RUNNING_MODAL"}
    assert IMPLICIT_OT_fit.modal(op, ctx, timer) == {"CANCELLED"}
    assert reports[-1] == ({"WARNING"}, "Cancelled.")


def test_file_saved_while_running_opens_idle(addon, tmp_path):
    import bpy
    scene = fresh_scene()
    scene.implicit.running = True
    path = str(tmp_path / "saved.blend")
    bpy.ops.wm.save_as_mainfile(filepath=path)
    bpy.ops.wm.open_mainfile(filepath=path)
    props = bpy.context.scene.implicit
    assert not props.running and props.status.startswith("Interrupted")


def test_empty_mesh_is_not_imported(fs, protocol):
    scene = _scene()
    msgs = [[protocol.Accepted(job_id="j")],
            [protocol.MeshResult(job_id="j", vertices=np.zeros((0, 3), np.float32),
                                 faces=np.zeros((0, 3), np.int32), colors=np.zeros((0, 3), np.float32)),
             protocol.Done(job_id="j", summary={"psnr": 16.5})]]
    r = fs.fit_scene(scene, ADDRESS, client_factory=lambda a: FakeClient(a, msgs), probe=_welcome)
    assert r.status == "done" and r.object is None and r.mesh[0].shape == (0, 3)
    assert "(PSNR 16.50 dB), but the mesh is empty" in r.message
    assert not [o for o in scene.objects if o.type == "MESH" and o.name.startswith("Implicit")]


# --------------------------------------------------------------------------------------------
# The imported asset checked at the held-out views (blender_addon/asset_check.py)
# --------------------------------------------------------------------------------------------
def _half_plane_job(protocol, job="jc"):
    """A backend's answer whose mesh is the LEFT half of _scene's plane (x in [-0.5, 0]), so that
    the asset's render shows whether the source was hidden; the field's render is flat grey."""
    v = np.array([[-0.5, -0.5, 0.0], [0.0, -0.5, 0.0], [0.0, 0.5, 0.0], [-0.5, 0.5, 0.0]], np.float32)
    return [[protocol.Accepted(job_id=job)],
            [protocol.MeshResult(job_id=job, vertices=v, faces=np.array([[0, 1, 2], [0, 2, 3]], np.int32),
                                 colors=np.full((4, 3), 0.5, np.float32))],
            [protocol.RenderResult(job_id=job, index=0, image=np.full((24, 32, 4), 128, np.uint8)),
             protocol.Done(job_id=job, summary={"psnr": 30.0})]]


def test_imported_asset_is_scored_beside_the_field_at_the_held_out_view(fs, protocol):
    import bpy
    from fit_implicit.shared.quality import psnr_white

    scene = _scene()
    r = fs.fit_scene(scene, ADDRESS, client_factory=lambda a: FakeClient(a, _half_plane_job(protocol)),
                     probe=_welcome, cameras=["Cam B"], eval_cameras=["Cam A"])
    assert r.status == "done", r.message
    truth, asset = r.eval_reference[0], r.asset_renders[0]
    # The asset was rendered alone (the source plane hidden, then shown again): its silhouette is
    # the left half of the plane's, not the whole plane.
    ref_mask, asset_mask = truth[..., 3] > 127, asset[..., 3] > 127
    assert 0.35 < asset_mask.sum() / ref_mask.sum() < 0.65, (asset_mask.sum(), ref_mask.sum())
    assert (asset_mask & ref_mask).sum() >= 0.9 * asset_mask.sum()
    cols = np.nonzero(asset_mask.any(axis=0))[0]
    assert cols.max() <= np.nonzero(ref_mask.any(axis=0))[0].mean() + 1      # left of the plane's centre
    assert not scene.objects["Object"].hide_render and not r.object.hide_render
    # Both scores against Blender's reference render, in the summary, on the object, in the message.
    s = r.summary
    assert s["heldout_views"] == 1
    assert s["heldout_field_psnr"] == round(psnr_white(r.renders[0], truth), 2)
    assert s["heldout_asset_psnr"] == round(psnr_white(asset, truth), 2)
    assert s["heldout_gap_db"] == round(s["heldout_field_psnr"] - s["heldout_asset_psnr"], 2)
    assert r.object["implicit_heldout_asset_psnr"] == s["heldout_asset_psnr"]
    assert f"Imported asset {s['heldout_asset_psnr']:.2f} dB on 1 held-out view" in r.message
    assert "check" in r.timings
    img = bpy.data.images["Implicit Held-out Check"]
    assert tuple(img.size) == (3 * 32, 24)                   # reference | field | asset

    # Off: no check, no figures.
    r = fs.fit_scene(scene, ADDRESS, client_factory=lambda a: FakeClient(a, _half_plane_job(protocol)),
                     probe=_welcome, cameras=["Cam B"], eval_cameras=["Cam A"], check_asset=False)
    assert r.status == "done" and "heldout_asset_psnr" not in r.summary and not r.asset_renders


def test_held_out_cameras_are_evaluated_and_a_placed_ring_holds_one_out(fs, protocol):
    from fit_implicit.blender_addon import capture

    scene = _scene()
    scene.objects["Eval"][capture.HOLDOUT_PROP] = True          # as the rig's Held Out share marks it
    clients = []

    def factory(address):
        clients.append(FakeClient(address, _half_plane_job(protocol)))
        return clients[-1]

    r = fs.fit_scene(scene, ADDRESS, client_factory=factory, probe=_welcome)
    assert r.camera_names == ["Cam A", "Cam B"] and r.eval_camera_names == ["Eval"]
    assert clients[0].submit.images.shape[0] == 2 and clients[0].submit.eval_poses.shape == (1, 4, 4)
    assert r.summary["heldout_views"] == 1

    # No cameras: the ring placed around the selection gets one more camera, held out.
    scene = fresh_scene()
    add_plane(scene, "Object").select_set(True)
    r = fs.fit_scene(scene, ADDRESS, client_factory=factory, probe=_welcome, ring_count=6)
    ring = [o for o in scene.objects if o.type == "CAMERA"]
    held = [o for o in ring if capture.is_holdout(o)]
    assert len(ring) == 7 and len(held) == 1
    assert clients[-1].submit.images.shape[0] == 6 and r.eval_camera_names == [held[0].name]
    assert held[0].name not in r.camera_names and r.summary["heldout_views"] == 1
