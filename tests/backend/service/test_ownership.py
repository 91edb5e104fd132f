"""Nobody takes another's job (issue 14): a job belongs to the token its client said in Hello;
other clients are not told its id (Status, Pong) and are answered as if it did not exist when
they attach to it, cancel it, render, mesh or fetch its model.  The owner, on a new connection
with the same token, can do all of it.  Real backend subprocess (the fake runner), real ZeroMQ."""
import time

import numpy as np
import pytest

from fit_implicit.blender_addon.client import JobClient
from fit_implicit.shared import protocol
from helpers import RawPeer, make_submit

pytestmark = pytest.mark.timeout(120)

OWNER, OTHER = "a" * 32, "b" * 32


def hello(peer: RawPeer, token: str = "") -> None:
    assert isinstance(peer.request(protocol.Hello(client="test", token=token)), protocol.Welcome)


def test_only_the_owner_sees_and_touches_its_job(fake_backend):
    with RawPeer(fake_backend.address) as owner, RawPeer(fake_backend.address) as other, \
            RawPeer(fake_backend.address) as anonymous:
        hello(owner, OWNER)
        hello(other, OTHER)
        # 6,000 fake steps (60 s): still running when the owner attaches at the end, however slow
        # this machine is; the owner cancels it there, so the test does not wait it out.
        owner.send(make_submit(n=2, size=8, steps=6000))
        job_id = owner.recv(timeout=10).job_id
        time.sleep(0.3)
        # Other clients learn that the backend is busy, not whose job or which.
        for peer in (other, anonymous):
            status = peer.request(protocol.Status())
            assert status.state == "busy" and status.running_job == "" and status.queued_jobs == ""
            pong = peer.request(protocol.Ping(seq=1))
            assert pong.state == "busy" and pong.running_job == ""
        with RawPeer(fake_backend.address) as look:          # the owner's token on another connection
            hello(look, OWNER)
            assert look.request(protocol.Status()).running_job == job_id
        # Their requests on it are answered word for word as for a job that does not exist.
        k = np.array([[10.0, 10, 4, 4]])
        nowhere = "0123456789ab"

        def requests(jid):
            return (protocol.Attach(job_id=jid), protocol.Cancel(job_id=jid),
                    protocol.RenderJob(fit_job_id=jid, intrinsics=k, poses=np.eye(4)[None],
                                       sizes=np.array([[8, 8]], np.int32)),
                    protocol.MeshJob(fit_job_id=jid), protocol.FetchModel(fit_job_id=jid))
        for msg, absent in zip(requests(job_id), requests(nowhere)):
            for peer in (other, anonymous):
                reply, unknown = peer.request(msg), peer.request(absent)
                assert isinstance(reply, protocol.Error) and reply.code == "unknown_job", (msg.TYPE, reply)
                assert (reply.code, reply.message) == (unknown.code, unknown.message.replace(nowhere, job_id))
        # The owner's job went on untouched; the owner, on a NEW connection with its token, attaches
        # and cancels it.
        with RawPeer(fake_backend.address) as again:
            hello(again, OWNER)
            attached = again.request(protocol.Attach(job_id=job_id))
            assert isinstance(attached, protocol.Attached) and attached.state == "running"
            again.send(protocol.Cancel(job_id=job_id))
            end = again.recv_until(protocol.JOB_END_TYPES, timeout=30)[-1]
            assert isinstance(end, protocol.Cancelled), end


def test_a_job_without_a_token_belongs_to_its_connection(fake_backend):
    with RawPeer(fake_backend.address) as first, RawPeer(fake_backend.address) as second:
        first.send(make_submit(n=2, size=8, steps=5))
        job_id = first.recv(timeout=10).job_id
        first.recv_until(protocol.JOB_END_TYPES, timeout=30)
        reply = second.request(protocol.Attach(job_id=job_id))
        assert isinstance(reply, protocol.Error) and reply.code == "unknown_job"
        assert isinstance(first.request(protocol.Attach(job_id=job_id)), protocol.Attached)


def test_the_add_on_client_says_its_token(fake_backend):
    client = JobClient(fake_backend.address, token=OWNER)
    client.start(make_submit(n=2, size=8, steps=5))
    client.wait(30)
    client.close()
    assert client.finished and client.error is None
    with RawPeer(fake_backend.address) as owner, RawPeer(fake_backend.address) as other:
        hello(owner, OWNER)
        hello(other, OTHER)
        assert isinstance(owner.request(protocol.Attach(job_id=client.job_id)), protocol.Attached)
        assert isinstance(other.request(protocol.Attach(job_id=client.job_id)), protocol.Error)
    with pytest.raises(protocol.ProtocolError, match="hello.token: expected 16 to 64 lowercase hexadecimal"):
        protocol.Hello(token="not hex at all!!").validate()


def test_models_given_back_have_their_own_caps_and_never_push_out_others_results(tmp_path):
    """StoreModel: at most MAX_MODELS_PER_OWNER kept a client (then a clear refusal), and they
    expire on their own clock without counting against the kept results of fits."""
    import json

    from fit_implicit.backend.service import checkpoint, jobs
    from fit_implicit.backend.service.outbox import Outbox

    queue = jobs.JobQueue(lambda msg, ctx: {}, Outbox(), device="cpu", runs_dir=tmp_path, keep_seconds=3600, max_kept=1)
    run = json.dumps({"format": 2, "method": "nerf", "config": {}, "aabb": [[0, 0, 0], [1, 1, 1]]}).encode()
    weights = b"PK\x03\x04" + bytes(60)
    ids = [queue.store_model(run, weights, owner=b"t:me") for _ in range(jobs.MAX_MODELS_PER_OWNER)]
    with pytest.raises(ValueError, match=f"already keeps {jobs.MAX_MODELS_PER_OWNER} models given back .yours"):
        queue.store_model(run, weights, owner=b"t:me")
    other = queue.store_model(run, weights, owner=b"t:you")           # another client still may
    assert queue.owner_of(other) == b"t:you" and queue.owner_of(ids[0]) == b"t:me"
    assert queue.expire() == [] and all((tmp_path / i / "model.pt").is_file() for i in ids)   # max_kept=1 spares them
    assert checkpoint.read_job_record(tmp_path / other)["kind"] == "stored_model"
    assert sorted(queue.expire(now=time.time() + 7200)) == sorted(ids + [other])
    with pytest.raises(ValueError, match="not a torch archive"):
        queue.store_model(run, b"\x80\x04pickle", owner=b"t:me")


def test_the_add_on_client_is_told_at_once_when_another_connection_takes_its_job(fake_backend):
    """The same owner attaching from elsewhere (another Blender session) takes the job's messages:
    the add-on's client that followed it ends at once with the reason, and does not cancel it."""
    client = JobClient(fake_backend.address, token=OWNER)
    client.start(make_submit(n=2, size=8, steps=600))           # 6 s of fake training
    deadline = time.monotonic() + 10
    while client.job_id is None and time.monotonic() < deadline:
        client.poll()
        time.sleep(0.02)
    with RawPeer(fake_backend.address) as elsewhere:
        hello(elsewhere, OWNER)
        t = time.monotonic()
        assert isinstance(elsewhere.request(protocol.Attach(job_id=client.job_id)), protocol.Attached)
        ends = client.wait(5)
        told = time.monotonic() - t
        assert client.finished and client.error_code == "job_taken" and "another connection" in client.error, ends
        assert told < 1.0, told
        client.close()
        done = elsewhere.recv_until(protocol.JOB_END_TYPES, timeout=30)    # the job went on, here
        assert isinstance(done[-1], protocol.Done)
