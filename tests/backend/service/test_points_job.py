"""PointsJob (issue 16) through a real backend process over ZeroMQ: a mesh's surface and a scan's
points fitted on the CPU, the clean mesh back in the sender's frame, the model kept for MeshJob;
bad jobs refused (on the wire) or failed (a cloud of NaN) with the reason, and the backend goes on."""
import numpy as np
import pytest

from helpers import TEST_TOKEN, BackendProcess, RawPeer
from fit_implicit.shared import protocol

pytestmark = pytest.mark.timeout(300)

# a box 2 x 1 x 0.5 units, off the origin, its faces wound counter-clockwise seen from outside
LO, HI = np.array([3.0, -1.0, 0.5]), np.array([5.0, 0.0, 1.0])
CORNERS = np.array([[x, y, z] for z in (0, 1) for y in (0, 1) for x in (0, 1)], dtype=np.float64)
BOX_V = LO + CORNERS * (HI - LO)
BOX_F = np.array([[0, 2, 1], [1, 2, 3], [4, 5, 6], [5, 7, 6], [0, 1, 4], [1, 5, 4],
                  [2, 6, 3], [3, 6, 7], [0, 4, 2], [2, 4, 6], [1, 3, 5], [3, 7, 5]], dtype=np.int32)
SMALL = dict(preset="draft", steps=150, mesh_resolution=64, mesh_samples=20000)


@pytest.fixture(scope="module")
def backend():
    proc = BackendProcess(fake=False)
    yield proc
    proc.close()


def _run(peer: RawPeer, job: protocol.PointsJob) -> list:
    assert isinstance(peer.request(job), protocol.Accepted)
    return peer.recv_until(protocol.JOB_END_TYPES, timeout=240)


@pytest.mark.slow   # one 150-step fit on the CPU, ~20 s with the backend's start
def test_a_mesh_comes_back_clean_at_its_place_and_the_model_stays(backend):
    with RawPeer(backend.address, token=TEST_TOKEN) as peer:
        peer.request(protocol.Hello(client="test"))
        got = _run(peer, protocol.PointsJob(vertices=BOX_V.astype(np.float32), faces=BOX_F, name="box", voxel_size=0.05,
                                            **SMALL))
        assert isinstance(got[-1], protocol.Done), got[-1]
        mesh = next(m for m in got if isinstance(m, protocol.MeshResult))
        lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
        assert np.allclose((lo + hi) / 2, (LO + HI) / 2, atol=0.02)       # the sender's place ...
        assert np.allclose(hi - lo, HI - LO, atol=0.15)                   # ... and size (a box's corners come out round)
        summary = got[-1].summary
        assert summary["method"] == "points" and summary["oriented"] and summary["faces"] == len(mesh.faces)
        assert summary["mesh_resolution"] in (49, 50)       # voxels of 0.05 across 2 units and a 10 % margin each side
        assert any(isinstance(m, protocol.Progress) for m in got)
        # its model is kept like a fit's: MeshJob meshes it again
        again = _run(peer, protocol.MeshJob(fit_job_id=got[-1].job_id, mesh_resolution=32))
        assert isinstance(again[-1], protocol.Done) and any(isinstance(m, protocol.MeshResult) for m in again)


def test_bad_points_jobs_are_refused_or_fail_with_the_reason(backend):
    pts = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)
    with RawPeer(backend.address, token=TEST_TOKEN) as peer:
        peer.request(protocol.Hello(client="test"))
        both = protocol.PointsJob(points=pts, vertices=BOX_V.astype(np.float32), faces=BOX_F)
        reply = peer.request(both.to_frames())
        assert isinstance(reply, protocol.Error) and "either points or a mesh" in reply.message
        wrong = protocol.PointsJob(points=pts, normals=pts[:10])
        assert "10 rows for 100 points" in peer.request(wrong.to_frames()).message
        nan = protocol.PointsJob(points=np.full((50, 3), np.nan, np.float32), **SMALL)
        end = _run(peer, nan)[-1]
        assert isinstance(end, protocol.Failed) and "0 finite points" in end.message
        # voxels too small for the largest mesh: refused before any training, saying what to change
        fine = protocol.PointsJob(vertices=BOX_V.astype(np.float32), faces=BOX_F, voxel_size=1e-4, **SMALL)
        got = _run(peer, fine)
        assert isinstance(got[-1], protocol.Failed) and "give a larger voxel size" in got[-1].message
        assert not any(isinstance(m, protocol.Progress) and m.stage == "train" for m in got)
        assert isinstance(peer.request(protocol.Ping(seq=1)), protocol.Pong)         # still serving
