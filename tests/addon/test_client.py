"""The add-on's client against hand-made backends (a bare ROUTER in this process)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

import fit_implicit.blender_addon.client as client_module
from fit_implicit.blender_addon.client import BackendError, JobClient, probe
from helpers import REPO, make_submit
from fit_implicit.shared import protocol

pytestmark = pytest.mark.timeout(120)   # a hang fails the test instead of the run


class FakeBackend:
    """A ROUTER that answers each received message with ``reply(message_frames) -> frames | None``."""

    def __init__(self, reply):
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.reply, self.received = reply, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            if self.sock.poll(20):
                identity, *frames = self.sock.recv_multipart()
                self.received.append(frames)
                out = self.reply(frames)
                if out is not None:
                    self.sock.send_multipart([identity, *out])
        self.sock.close(linger=0)

    def close(self):
        self._stop.set()
        self._thread.join(2)


@pytest.fixture
def fake_router():
    made = []

    def make(reply):
        made.append(FakeBackend(reply))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


def header(frames) -> dict:
    return json.loads(frames[0])


def test_malformed_replies_become_a_clear_failure(fake_router):
    backend = fake_router(lambda frames: [b"\x80\x04garbage"])
    client = JobClient(backend.address, heartbeat_interval=0.1, dead_after=2.0)
    client.start(make_submit())
    messages = client.wait(3)
    assert client.finished and "sent a malformed message" in client.error
    assert isinstance(messages[-1], protocol.Failed) and client.error_code == "malformed_reply"
    assert client.poll() == []
    client.close()


def test_a_newer_backend_is_named_with_both_versions(fake_router):
    ours, newer = protocol.PROTOCOL_VERSION, protocol.PROTOCOL_VERSION + 1

    def reply(frames):
        return [json.dumps({"v": newer, "type": "welcome", "protocol": newer, "arrays": []}).encode()]

    backend = fake_router(reply)
    with pytest.raises(BackendError, match=rf"version mismatch.*peer speaks {newer}, this side speaks {ours}") as info:
        probe(backend.address)
    assert info.value.code == "version_mismatch"
    client = JobClient(backend.address, heartbeat_interval=0.1)
    client.start(make_submit())
    client.wait(3)
    assert "version mismatch" in client.error and str(newer) in client.error and str(ours) in client.error
    assert client.error_code == "version_mismatch"
    client.close()


def test_an_error_reply_to_hello_ends_the_job(fake_router):
    def reply(frames):
        if header(frames)["type"] == "hello":
            return protocol.Error(code="version_mismatch", in_reply_to="hello",
                                  message="protocol version mismatch: client speaks 2, backend speaks 3").to_frames()
        return None

    backend = fake_router(reply)
    with pytest.raises(BackendError, match="client speaks 2, backend speaks 3") as info:
        probe(backend.address)
    assert info.value.code == "version_mismatch"


def welcome_or_accept(kind: str, job_id: str) -> list:
    """A fake backend's answer to "hello" (Welcome) or "submit" (Accepted ``job_id``)."""
    return (protocol.Welcome() if kind == "hello" else protocol.Accepted(job_id=job_id)).to_frames()


def test_heartbeats_are_sent_and_silence_is_noticed(fake_router):
    state = {"answer": True}

    def reply(frames):
        kind = header(frames)["type"]
        if kind in ("hello", "submit"):
            return welcome_or_accept(kind, "j1")
        if kind == "ping" and state["answer"]:
            return protocol.Pong(seq=header(frames)["seq"]).to_frames()
        return None

    backend = fake_router(reply)
    client = JobClient(backend.address, heartbeat_interval=0.1, dead_after=0.6)
    client.start(make_submit())
    assert any(isinstance(m, protocol.Accepted) for m in client.wait(1.0))
    assert not client.finished and client.job_id == "j1"
    state["answer"] = False
    messages = client.wait(3)
    assert client.finished and "stopped answering" in client.error and client.error_code == "unreachable"
    assert messages[-1].job_id == "j1" and messages[-1].code == "unreachable"
    # It told the (maybe alive) backend to stop; the fake router's thread may still be reading.
    deadline = time.monotonic() + 2.0
    while "cancel" not in [header(f)["type"] for f in backend.received] and time.monotonic() < deadline:
        time.sleep(0.02)
    kinds = [header(f)["type"] for f in backend.received]
    assert kinds[:2] == ["hello", "ping"] and "submit" in kinds and kinds.count("ping") >= 8
    assert "cancel" in kinds[kinds.index("submit"):]
    client.close()


def test_cancel_before_the_backend_answered_ends_locally(unused_port):
    client = JobClient(f"tcp://127.0.0.1:{unused_port}", heartbeat_interval=0.1, dead_after=5)
    client.start(make_submit())
    client.cancel()
    messages = client.wait(2)
    assert [m.TYPE for m in messages] == ["cancelled"] and client.error is None
    client.close()


def test_start_checks_the_job(monkeypatch, unused_port):
    address = f"tcp://127.0.0.1:{unused_port}"
    client = JobClient(address)
    bad = make_submit()
    bad.intrinsics = bad.intrinsics[:2]
    with pytest.raises(BackendError, match="not valid.*N = 2 does not match"):
        client.start(bad)
    monkeypatch.setattr(client_module, "MAX_MESSAGE_BYTES", 1000)
    with pytest.raises(BackendError, match="GiB"):
        client.start(make_submit())
    monkeypatch.undo()
    with pytest.raises(BackendError, match="not a valid backend address") as info:
        JobClient("127.0.0.1:5599").start(make_submit())
    assert info.value.code == "bad_address"
    client.start(make_submit())
    with pytest.raises(BackendError, match="already started"):
        client.start(make_submit())
    client.close()


def test_received_arrays_are_read_only_views_of_the_frames(fake_router):
    image = (np.arange(300 * 200 * 4) % 251).astype(np.uint8).reshape(300, 200, 4)

    def reply(frames):
        kind = header(frames)["type"]
        if kind in ("hello", "submit"):
            return welcome_or_accept(kind, "j")
        return protocol.Preview(job_id="j", image=image).to_frames()   # to every ping

    backend = fake_router(reply)
    client = JobClient(backend.address, heartbeat_interval=0.1)
    client.start(make_submit())
    previews = [m for m in client.wait(0.5) if isinstance(m, protocol.Preview)]
    assert previews and np.array_equal(previews[0].image, image)
    assert not previews[0].image.flags.owndata and not previews[0].image.flags.writeable
    client.close()


def test_shim_prefers_the_vendored_copy(tmp_path):
    pkg = tmp_path / "fake_ext"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(REPO / "blender_addon" / "_shared.py", pkg / "_shared.py")
    shutil.copytree(REPO / "shared", pkg / "shared", ignore=shutil.ignore_patterns("__pycache__"))
    code = "import fake_ext._shared as s; print(s.protocol.__name__, s.wire.__name__, s.cameras.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["fake_ext.shared.protocol", "fake_ext.shared.wire", "fake_ext.shared.cameras"]


def test_the_client_needs_neither_torch_nor_bpy():
    """client.py and _shared.py import neither (the package's __init__ imports bpy to register)."""
    for name in ("client.py", "_shared.py"):
        text = (REPO / "blender_addon" / name).read_text()
        assert not re.search(r"^\s*(import|from)\s+(bpy|torch)\b", text, re.M), name
    code = "import sys, fit_implicit.blender_addon.client; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
