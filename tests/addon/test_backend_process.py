"""Backend management without Blender: starting and stopping ``fit-implicit serve`` as a
child process, the status line polled in the background, and FreeMemory.

Everything here is real: real backend processes (the real server; the fake job runner from
tests/helpers.py where a job must run), real ZeroMQ sockets, and a real socket that speaks
another protocol version.
"""
import json
import socket
import sys
import textwrap
import threading
import time

import pytest
import zmq

from helpers import REPO, RawPeer, make_submit
from fit_implicit.shared import protocol

from fit_implicit.blender_addon import backend_process, status  # bpy-free modules of the add-on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def monitors():
    made = []

    def make(address, **kw):
        made.append(status.StatusMonitor(address, **kw))
        return made[-1]

    yield make
    for m in made:
        m.close()


def test_start_real_backend_status_free_memory_and_stop(tmp_path, monitors, monkeypatch):
    monkeypatch.setenv("FIT_IMPLICIT_RUNS_DIR", str(tmp_path / "runs"))   # no jobs resumed from other runs
    address = f"tcp://127.0.0.1:{free_port()}"
    log_path = tmp_path / "logs" / "backend.log"
    proc = backend_process.LocalBackend(sys.executable, address, device="cpu", log_path=str(log_path),
                                        source_dirs=[str(REPO)])
    mon = monitors(address, interval=0.2, timeout=1.0)
    assert mon.wait_for((status.NOT_RUNNING,), 10).state == status.NOT_RUNNING   # nothing there yet
    t = time.monotonic()
    proc.start()
    try:
        proc.wait_ready(timeout=90)
        startup = time.monotonic() - t
        snap = mon.wait_for((status.IDLE,), 15)
        assert snap.state == status.IDLE and snap.device == "cpu", snap
        assert snap.line == "Backend idle (cpu)"
        with RawPeer(address) as peer:
            reply = peer.request(protocol.FreeMemory())
        assert isinstance(reply, protocol.Ack) and reply.request == "free_memory"
    finally:
        t = time.monotonic()
        code = proc.stop()
        stop_seconds = time.monotonic() - t
    assert code == 0 and stop_seconds < 8, (code, stop_seconds, proc.log_tail())
    assert "backend listening on " + address in log_path.read_text()
    assert mon.wait_for((status.NOT_RUNNING,), 10).state == status.NOT_RUNNING
    print(f"backend start-up {startup:.1f} s, stop {stop_seconds:.2f} s")


def test_status_busy_counts_jobs_and_free_memory_waits_for_idle(backend_factory, monitors):
    backend = backend_factory(fake=True)
    mon = monitors(backend.address, interval=0.2, timeout=2.0)
    assert mon.wait_for((status.IDLE,), 10).state == status.IDLE
    with RawPeer(backend.address) as peer:
        for _ in range(2):   # one runs (10 s of fake steps), one waits
            peer.send(make_submit(steps=1000))
        accepted = [m for m in peer.recv_until((protocol.Accepted,), 10) if isinstance(m, protocol.Accepted)]
        accepted += [m for m in peer.recv_until((protocol.Accepted,), 10) if isinstance(m, protocol.Accepted)]
        snap = mon.wait_for((status.BUSY,), 10)
        deadline = time.monotonic() + 5
        while snap.queued != 1 and time.monotonic() < deadline:
            time.sleep(0.1)
            snap = mon.snapshot()
        assert snap.state == status.BUSY and snap.line == "Backend busy (job 1 of 2)", snap
        with RawPeer(backend.address) as other:
            reply = other.request(protocol.FreeMemory())
        assert isinstance(reply, protocol.Error) and reply.code == "busy" and "running" in reply.message
        for a in accepted:
            peer.send(protocol.Cancel(job_id=a.job_id))
        assert mon.wait_for((status.IDLE,), 15).state == status.IDLE


def _other_version_server(stop: threading.Event, endpoint: list):
    """A ROUTER that answers everything with a Welcome of protocol version 99 (a newer backend)."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    endpoint.append(f"tcp://127.0.0.1:{port}")
    while not stop.is_set():
        if sock.poll(50):
            frames = sock.recv_multipart()
            header = {"v": 99, "type": "welcome", "protocol": 99, "server": "future backend"}
            sock.send_multipart([frames[0], json.dumps(header).encode()])
    sock.close()


@pytest.fixture
def other_version_backend():
    stop, endpoint = threading.Event(), []
    t = threading.Thread(target=_other_version_server, args=(stop, endpoint), daemon=True)
    t.start()
    while not endpoint:
        time.sleep(0.01)
    yield endpoint[0]
    stop.set()
    t.join(2)


def test_status_version_mismatch(other_version_backend, monitors):
    mon = monitors(other_version_backend, interval=0.2)
    snap = mon.wait_for((status.MISMATCH,), 10)
    assert snap.state == status.MISMATCH and snap.line == "Backend version mismatch"
    assert "99" in snap.detail and "install the same version" in snap.detail


def test_start_errors_are_clear(tmp_path):
    with pytest.raises(backend_process.BackendProcessError, match="not on this machine"):
        backend_process.LocalBackend(sys.executable, "tcp://10.1.2.3:5599", log_path=str(tmp_path / "l"))
    with pytest.raises(backend_process.BackendProcessError, match="cpu, cuda, cuda:N"):
        backend_process.LocalBackend(sys.executable, "tcp://127.0.0.1:5599", device="gpu0",
                                     log_path=str(tmp_path / "l"))
    every_gpu = backend_process.LocalBackend(sys.executable, "tcp://127.0.0.1:5599", device="all-gpus",
                                             log_path=str(tmp_path / "l"))
    assert every_gpu.command[-2:] == ["--gpus", "all"] and "--device" not in every_gpu.command   # the preference "All GPUs"
    proc = backend_process.LocalBackend(str(tmp_path / "no-python"), "tcp://127.0.0.1:5599",
                                        log_path=str(tmp_path / "l"))
    with pytest.raises(backend_process.BackendProcessError, match="was not found.*preferences"):
        proc.start()


def test_a_python_without_the_backend_gets_one_sentence_saying_what_to_do(tmp_path):
    """A fresh install: the preferences point at (or default to) a Python that lacks the backend."""
    import subprocess
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True, timeout=120)
    python = tmp_path / "bare" / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    proc = backend_process.LocalBackend(str(python), "tcp://127.0.0.1:5599", log_path=str(tmp_path / "b.log"))
    proc.start()
    with pytest.raises(backend_process.BackendProcessError) as info:
        proc.wait_ready(timeout=60)
    text = str(info.value)
    assert f"the backend Python {python} has no Fit Implicit backend installed" in text, text
    assert "set Backend Python in the add-on preferences" in text and "Traceback" not in text, text


def test_port_in_use_reports_the_backends_own_reason(fake_backend, tmp_path):
    proc = backend_process.LocalBackend(sys.executable, fake_backend.address, device="cpu",
                                        log_path=str(tmp_path / "b.log"), source_dirs=[str(REPO)])
    proc.start()
    with pytest.raises(backend_process.BackendProcessError) as info:
        proc.wait_ready(timeout=90)
    assert "exited (code 1)" in str(info.value) and "already running" in str(info.value)
    assert str(tmp_path / "b.log") in str(info.value)


def test_stop_kills_a_backend_that_ignores_sigterm(tmp_path):
    # A stand-in `backend` package that ignores SIGTERM: stop() must kill it after the grace time.
    pkg = tmp_path / "src" / "backend"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(textwrap.dedent("""
        import signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("backend listening on", sys.argv[sys.argv.index("--bind") + 1], flush=True)
        time.sleep(120)
    """))
    proc = backend_process.LocalBackend(sys.executable, "tcp://127.0.0.1:5598", log_path=str(tmp_path / "x.log"),
                                        source_dirs=[str(tmp_path / "src")])
    proc.start()
    proc.wait_ready(timeout=20)
    t = time.monotonic()
    code = proc.stop(grace=1.0)
    assert code == -9 and time.monotonic() - t < 5 and not proc.running
