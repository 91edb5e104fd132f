"""A fit over time through the job queue (issue 17, protocol 9): a Submit whose photos carry their
instants trains a field over time, meshes the instant it is asked for and renders its eval cameras
at theirs; later RenderJobs render each camera at its own instant and MeshJobs mesh any instant.
Real (tiny) training on the CPU (the session's shared fit: conftest.py clip_fit); the wire's
checks of the times."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from job_runs import moving_submit, run_jobs
from fit_implicit.shared import protocol

pytestmark = pytest.mark.timeout(300)


@pytest.mark.slow   # the session's tiny fit over time (conftest.py clip_fit, ~40 s), shared with the add-on's tests
def test_a_fit_over_time_meshes_and_renders_the_instants_asked_for(clip_fit):
    submit, fit, runs, fit_id = clip_fit
    renders, meshes = run_jobs(
        runs,
        protocol.RenderJob(fit_job_id=fit_id, intrinsics=submit.eval_intrinsics, poses=submit.eval_poses,
                           sizes=submit.eval_sizes, times=np.array([1.0, 0.0])),
        protocol.MeshJob(fit_job_id=fit_id, mesh_resolution=24, time=0.0, track_times=np.array([0.0, 0.5, 1.0])))
    done = fit[-1]
    assert isinstance(done, protocol.Done), done
    assert done.summary["dynamic"] is True and done.summary["mesh_time"] == 1.0
    # the eval cameras rendered at their instants; the RenderJob's swapped instants give the other images
    at_fit = [m.image for m in fit if isinstance(m, protocol.RenderResult)]
    later = [m.image for m in renders if isinstance(m, protocol.RenderResult)]
    assert len(at_fit) == len(later) == 2
    assert not np.array_equal(at_fit[0], later[0]) and not np.array_equal(at_fit[1], later[1])
    # the meshes of the instants asked for (where the objects go: tests/backend/fitting/test_dynamic_fit.py)
    mesh_end = next(m for m in fit if isinstance(m, protocol.MeshResult))
    mesh_start = next(m for m in meshes if isinstance(m, protocol.MeshResult))
    assert meshes[-1].summary["time"] == 0.0
    assert mesh_end.vertices.shape != mesh_start.vertices.shape or not np.allclose(mesh_end.vertices,
                                                                                    mesh_start.vertices)
    # ... and the mesh of instant 0 followed through the instants asked for (export/tracks.py; how
    # well it follows a motion: tests/backend/fitting/test_dynamic_fit.py, on a longer fit)
    tracks = mesh_start.tracks
    assert tracks.shape == (3, len(mesh_start.vertices), 3) and list(mesh_start.track_times) == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(tracks[0], mesh_start.vertices, atol=1e-4)
    assert meshes[-1].summary["tracked_times"] == 3 and meshes[-1].summary["track_lost"] < 0.05, meshes[-1].summary


def test_times_on_the_wire_are_checked(monkeypatch):
    sub = moving_submit()
    for name, value, match in [("times", sub.times[:5], "submit.times: expected none or 18 instants"),
                               ("times", np.full(18, 1.5), "submit.times"),
                               ("eval_times", np.array([0.5]), "submit.eval_times: expected none or 2")]:
        bad = dataclasses.replace(sub, **{name: value})
        with pytest.raises(protocol.ProtocolError, match=match):
            bad.validate()
    with pytest.raises(protocol.ProtocolError, match="render_job.times"):
        protocol.RenderJob(fit_job_id="x", intrinsics=sub.eval_intrinsics, poses=sub.eval_poses,
                           sizes=sub.eval_sizes, times=np.array([0.2])).validate()
    with pytest.raises(protocol.ProtocolError, match="time"):
        protocol.MeshJob(fit_job_id="x", time=2.0).validate()
    with pytest.raises(protocol.ProtocolError, match="mesh_job.track_times"):
        protocol.MeshJob(fit_job_id="x", track_times=np.array([0.5, -0.1])).validate()
    with pytest.raises(protocol.ProtocolError, match="T = 10001 is more than the allowed 10000"):
        protocol.MeshJob(fit_job_id="x", track_times=np.zeros(10001)).validate()
    mesh = protocol.MeshResult(job_id="j", vertices=np.zeros((4, 3), np.float32), faces=np.zeros((1, 3), np.int32),
                               colors=np.zeros((4, 3), np.float32))
    with pytest.raises(protocol.ProtocolError, match="mesh.tracks: 3 vertices a row for a mesh of 4"):
        dataclasses.replace(mesh, track_times=np.zeros(2, np.float32), tracks=np.zeros((2, 3, 3), np.float32)).validate()
    with pytest.raises(protocol.ProtocolError, match="NaN"):
        dataclasses.replace(mesh, track_times=np.zeros(1, np.float32),
                            tracks=np.full((1, 4, 3), np.nan, np.float32)).validate()
    with pytest.raises(protocol.ProtocolError, match=r"mesh.track_times: instants must be in \[0, 1\]"):
        dataclasses.replace(mesh, track_times=np.full(1, 2.0, np.float32), tracks=np.zeros((1, 4, 3), np.float32)).validate()
    monkeypatch.setattr(protocol, "MAX_TRACK_POINTS", 7)      # the real cap (2^27) would need 1.5 GiB here
    with pytest.raises(protocol.ProtocolError, match="2 instants x 4 vertices is more than the allowed 7"):
        dataclasses.replace(mesh, track_times=np.zeros(2, np.float32), tracks=np.zeros((2, 4, 3), np.float32)).validate()
    # the times travel: encoded and decoded as they were
    back = protocol.decode_message(sub.to_frames())
    np.testing.assert_allclose(back.times, sub.times)
