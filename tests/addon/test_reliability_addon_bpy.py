"""The add-on under faults: the backend killed mid-job (real backend process, real client, real
heartbeats) and malformed results that slipped past the protocol checks.  (issue 6, parts 1-2)"""
from __future__ import annotations

import time

import numpy as np
import pytest

from bpy_helpers import add_camera, add_plane, emission_material, fresh_scene, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def fs(addon):
    from fit_implicit.blender_addon import fit_session
    return fit_session


def _scene():
    scene = fresh_scene(width=16, height=16, samples=1)
    add_plane(scene, "Object", size=1.0, material=emission_material("Grey", (0.5, 0.5, 0.5)))
    add_camera(scene, "Cam A", location=(0, 0, 4))
    add_camera(scene, "Cam B", location=(0, -4, 4), rotation=(0.785398, 0, 0))
    return scene


def _data_counts():
    import bpy
    return len(bpy.data.objects), len(bpy.data.meshes), len(bpy.data.materials)


# ---- backend killed -----------------------------------------------------------------------------
def test_backend_killed_mid_job_is_noticed_within_5_s_and_blender_stays_responsive(fs, backend_factory):
    from fit_implicit.shared import protocol

    backend = backend_factory(fake=True)
    scene = _scene()
    session = fs.FitSession(scene, backend.address, fs.FitSettings(steps=100_000, preview_size=0))
    session.begin()                                   # real probe, real JobClient (1 s heartbeats)
    deadline = time.monotonic() + 60
    while not isinstance(session.result.last_progress, protocol.Progress):   # renders, uploads, trains
        assert not session.tick(), session.result.message
        assert time.monotonic() < deadline
        time.sleep(0.02)
    backend.kill()                                    # kill -9
    killed = time.monotonic()
    longest_tick = 0.0
    while True:   # what the modal operator's timer does
        t = time.monotonic()
        finished = session.tick()
        longest_tick = max(longest_tick, time.monotonic() - t)
        if finished:
            break
        assert time.monotonic() - killed < 10, "the dead backend was not noticed"
        time.sleep(0.05)
    noticed = time.monotonic() - killed
    print(f"backend killed: noticed after {noticed:.2f} s; longest tick {longest_tick * 1000:.1f} ms")
    assert noticed < 5.0 and longest_tick < 0.1
    r = session.result
    assert r.status == "failed" and "stopped answering" in r.message and backend.address in r.message
    assert "fit-implicit serve" in r.message   # how to start it again
    assert not session.state.running and scene.implicit.running is False


# ---- malformed results ---------------------------------------------------------------------------
class ScriptedClient:
    """Stands in for JobClient (start, poll, cancel, close, finished, error, job_id): replays one
    list of messages, built WITHOUT validation, as if they had slipped past the client's checks."""

    def __init__(self, address, messages):
        self.messages, self.finished, self.error, self.job_id = list(messages), False, None, "j1"
        self.closed = False

    def start(self, submit):
        pass

    def poll(self):
        out, self.messages = self.messages, []
        return out

    def cancel(self):
        pass

    def close(self):
        self.closed = True


def _bad_meshes(protocol):
    good_v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    faces = np.array([[0, 1, 2]], np.int32)
    colors = np.full((3, 3), 0.5, np.float32)
    nan_v = good_v.copy()
    nan_v[1, 2] = np.nan
    return {
        "NaN vertices": (protocol.MeshResult(job_id="j1", vertices=nan_v, faces=faces, colors=colors), "NaN"),
        "faces out of range": (protocol.MeshResult(job_id="j1", vertices=good_v, faces=faces + 7, colors=colors),
                               "indices must be in"),
        "negative faces": (protocol.MeshResult(job_id="j1", vertices=good_v, faces=faces - 5, colors=colors),
                           "indices must be in"),
        "colours of another size": (protocol.MeshResult(job_id="j1", vertices=good_v, faces=faces,
                                                        colors=colors[:2]), "does not match"),
        "float64 vertices": (protocol.MeshResult(job_id="j1", vertices=good_v.astype(np.float64), faces=faces,
                                                 colors=colors), "dtype float64 is not allowed"),
        "render of the wrong shape": (protocol.RenderResult(job_id="j1", index=0,
                                                            image=np.zeros((4, 4, 3), np.uint8)), "axis 2 must be 4"),
    }


@pytest.mark.parametrize("case", ["NaN vertices", "faces out of range", "negative faces", "colours of another size",
                                  "float64 vertices", "render of the wrong shape"])
def test_malformed_results_fail_clearly_and_leave_the_scene_untouched(fs, case):
    from fit_implicit.shared import protocol

    bad, text = _bad_meshes(protocol)[case]
    scene = _scene()
    before = _data_counts()
    objects_before = {ob.name for ob in scene.objects}
    box = []
    session = fs.FitSession(scene, "tcp://127.0.0.1:1", fs.FitSettings(preview_size=0), probe=lambda a: protocol.Welcome(),
                            client_factory=lambda a: box.append(ScriptedClient(a, [
                                protocol.Accepted(job_id="j1"), bad, protocol.Done(job_id="j1")])) or box[-1])
    session.begin()
    deadline = time.monotonic() + 30
    while not session.tick():
        assert time.monotonic() < deadline
    r = session.result
    assert r.status == "failed" and "malformed result" in r.message and text in r.message, r.message
    assert "nothing of it was imported" in r.message
    assert r.object is None and r.mesh is None
    assert _data_counts() == before and {ob.name for ob in scene.objects} == objects_before
    assert box[0].closed   # the job was let go of (the real client cancels it on the backend)


def test_what_the_backend_says_about_a_fit_is_shown_and_kept_in_the_report(fs):
    """Progress.note (issue 14: checkpoints that cannot be written; issue 13: a long fit): in the
    panel while the fit runs, in the final report, once each."""
    from fit_implicit.shared import protocol

    scene = _scene()
    said = "could not write a training checkpoint (RuntimeError: disk full); training goes on"
    box = []
    session = fs.FitSession(scene, "tcp://127.0.0.1:1", fs.FitSettings(preview_size=0, import_mesh=False),
                            probe=lambda a: protocol.Welcome(),
                            client_factory=lambda a: box.append(ScriptedClient(a, [
                                protocol.Accepted(job_id="j1"),
                                protocol.Progress(job_id="j1", step=5, total_steps=10, note=said),
                                protocol.Progress(job_id="j1", step=9, total_steps=10, note=said),
                                protocol.Progress(job_id="j1", step=10, total_steps=10)])) or box[-1])
    session.begin()
    deadline = time.monotonic() + 30
    while not box or box[0].messages:
        session.tick()
        assert time.monotonic() < deadline
    assert scene.implicit.note == said and session.result.notes.count(said) == 1
    box[0].messages.append(protocol.Done(job_id="j1", summary={"steps": 10}))
    while not session.tick():
        assert time.monotonic() < deadline
    assert session.result.status == "done" and f"(Backend: {said})" in session.result.message, session.result.message
