"""Load: four clients at once queue fairly; a flood of previews never delays control messages;
a client that stops reading cannot make the backend queue without bound.  (issue 6, part 3)

Real sockets throughout; the preview flood runs the real Server in a thread of this process
with a runner that makes 1024x1024 previews as fast as it can (no torch needed for that).
"""
from __future__ import annotations

import statistics
import threading
import time

import numpy as np
import pytest
import zmq

from fit_implicit.backend.service.server import PREVIEW_CREDIT, Server, ServerConfig
from fit_implicit.blender_addon.client import JobClient
from helpers import TEST_TOKEN, RawPeer, make_submit
from fit_implicit.shared import protocol

pytestmark = pytest.mark.timeout(180)


# ---- fairness over the socket ------------------------------------------------------------------------
def test_four_clients_submitting_at_once_are_served_round_robin(fake_backend):
    peers = {name: RawPeer(fake_backend.address) for name in "abcd"}
    try:
        ids: dict[str, list[str]] = {name: [] for name in peers}
        ends: list[tuple[float, str]] = []

        def submit(name, count):
            for _ in range(count):
                peers[name].send(make_submit(steps=25, name=name))   # ~0.25 s each
                for reply in peers[name].recv_until((protocol.Accepted, protocol.Error)):
                    if isinstance(reply, protocol.JOB_END_TYPES):   # an earlier job of this client
                        ends.append((time.monotonic(), name))
                assert isinstance(reply, protocol.Accepted), reply
                ids[name].append(reply.job_id)

        submit("a", 4)                                   # "a" floods first ...
        threads = [threading.Thread(target=submit, args=(n, 1)) for n in "bcd"]   # ... the others at once
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        poller = zmq.Poller()
        for peer in peers.values():
            poller.register(peer.sock, zmq.POLLIN)
        deadline = time.monotonic() + 30
        while len(ends) < 7 and time.monotonic() < deadline:
            for sock, _ in poller.poll(100):
                message = protocol.decode_message(sock.recv_multipart())
                if isinstance(message, protocol.JOB_END_TYPES):
                    assert isinstance(message, protocol.Done)
                    name = next(n for n, i in ids.items() if message.job_id in i)
                    ends.append((time.monotonic(), name))
        order = [name for _, name in sorted(ends)]
    finally:
        for peer in peers.values():
            peer.close()
    print("jobs ended in the order", "".join(order))
    # a's first job was already running; then one job per client in turn, a's rest at the end.
    assert order[0] == "a" and sorted(order[1:4]) == ["b", "c", "d"] and order[4:] == ["a", "a", "a"], order


# ---- a preview flood in-process ------------------------------------------------------------------------
def flood_runner(submit, ctx):
    """Previews of preview_size x preview_size as fast as possible until cancelled (or 20 s)."""
    size = submit.preview_size or 1024
    frames = [np.full((size, size, 4), v, np.uint8) for v in (40, 200)]
    start, step = time.monotonic(), 0
    while time.monotonic() - start < 20:
        ctx.check_cancelled()
        step += 1
        ctx.preview(frames[step % 2], step)
        ctx.progress("train", step=step, total_steps=10**6, fraction=0.0)
        time.sleep(0.001)
    return {"steps": step}


@pytest.fixture
def flood_server(tmp_path):
    ready, stop, box = threading.Event(), threading.Event(), {}

    def serve():
        server = Server(ServerConfig(bind="tcp://127.0.0.1:0", runs_dir=str(tmp_path)), runner=flood_runner)
        server.outbox.preview_gap = 0.0   # worst case: a preview leaves on every turn of the loop
        box["server"], box["address"] = server, server.bind()
        ready.set()
        server.serve(stop)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield box["server"], box["address"]
    stop.set()
    thread.join(15)


def test_control_messages_are_answered_within_a_second_while_previews_stream(flood_server):
    server, address = flood_server
    client = JobClient(address, heartbeat_interval=0.25, dead_after=3.0, token=TEST_TOKEN)   # reads in its own thread
    client.start(make_submit(preview_size=1024))
    received = {"preview": 0, "bytes": 0}

    def drain():   # the Blender timer: the newest preview only
        for m in client.poll():
            if isinstance(m, protocol.Preview):
                received["preview"] += 1
                received["bytes"] += m.image.nbytes
    deadline = time.monotonic() + 10
    while received["preview"] < 3:
        drain()
        assert time.monotonic() < deadline and not client.finished, client.error
        time.sleep(0.05)
    status_times = []
    with RawPeer(address, token=TEST_TOKEN) as other:
        for _ in range(20):
            t = time.monotonic()
            reply = other.request(protocol.Status(), timeout=5)
            status_times.append(time.monotonic() - t)
            assert reply.state == "busy" and reply.running_job == client.job_id
            drain()
            time.sleep(0.05)
    t = time.monotonic()
    client.cancel()
    ack = cancelled = None
    while cancelled is None and time.monotonic() - t < 5:
        for m in client.poll():
            if isinstance(m, protocol.Ack) and ack is None:
                ack = time.monotonic() - t
            if isinstance(m, protocol.Cancelled):
                cancelled = time.monotonic() - t
        time.sleep(0.005)
    client.close()
    print(f"previews received while measuring: {received['preview']} ({received['bytes'] / 2**20:.0f} MiB); "
          f"Status round trip median {statistics.median(status_times) * 1000:.1f} ms, max "
          f"{max(status_times) * 1000:.1f} ms; Cancel -> Ack {ack * 1000:.1f} ms, -> Cancelled {cancelled * 1000:.1f} ms")
    assert max(status_times) < 1.0 and ack is not None and ack < 1.0 and cancelled < 1.0
    assert received["preview"] >= 3


def test_a_client_that_stops_reading_gets_a_bounded_number_of_previews(flood_server):
    server, address = flood_server
    with RawPeer(address) as silent:
        silent.send(make_submit(preview_size=512))       # then never reads, never pings
        time.sleep(2.0)
        held_back = server.previews_held_back
        with RawPeer(address) as other:                  # the backend still answers others at once
            t = time.monotonic()
            assert other.request(protocol.Status(), timeout=2).state == "busy"
            answered = time.monotonic() - t
        queued, until = 0, time.monotonic() + 1.0   # what waited for it (progress keeps coming)
        while time.monotonic() < until and silent.sock.poll(100):
            queued += isinstance(protocol.decode_message(silent.sock.recv_multipart()), protocol.Preview)
    print(f"silent client: {queued} previews were sent to it, {held_back} held back; Status in {answered * 1000:.1f} ms")
    assert queued <= PREVIEW_CREDIT and held_back > 100 and answered < 1.0
    assert not server._backlog or all(len(b) < 1000 for b in server._backlog.values())
