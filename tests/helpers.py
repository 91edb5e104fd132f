"""Test helpers for anything that talks to a backend.  Import them: ``from helpers import ...``
(tests/ is on sys.path under pytest; conftest.py wraps the common ones in fixtures).

* :func:`make_submit` - a small, valid Submit (cameras on a ring looking at an analytic scene).
* :class:`BackendProcess` - ``fit-implicit serve`` (or the same server with :func:`fake_runner`)
  in a subprocess on a free port; waits for its "backend listening on ..." line.
* :func:`fake_runner` - a job runner that needs no torch: timed fake steps, a tetrahedron mesh,
  flat renders.  ``Submit.name`` picks a behaviour (see :data:`FAKE_STEP_SECONDS`).
* :class:`RawPeer` - a bare DEALER socket to send arbitrary frames and read decoded replies.
* :class:`RawZmtp` - a raw TCP connection speaking ZMTP by hand (stalled and oversized messages).
* :class:`KeepSubmit` - stands in for the add-on's JobClient: keeps the Submit it was started with
  (no backend needed to check what would be sent).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]

from fit_implicit.shared import cameras, protocol  # noqa: E402


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------
def make_submit(n: int = 4, size: int = 16, *, eval_count: int = 0, **settings) -> protocol.Submit:
    """A validated Submit of ``n`` (size x size) RGBA images of two shaded spheres.

    Cameras sit on a ring around the scene (tests/synthetic.py); ``eval_count`` adds that many
    eval cameras of the same size.  ``settings`` set any scalar Submit field (steps, preset, name...).
    Defaults keep real training tiny: preset draft, 20 steps, mesh resolution 16, no previews.
    """
    import synthetic   # tests/synthetic.py (numpy only)

    intrinsics, poses = synthetic.camera_rig(n + eval_count, size)
    images = np.stack([synthetic.render(intrinsics[i], poses[i], size, size, ss=1) for i in range(n)])
    values = dict(preset="draft", steps=20, mesh_resolution=16, preview_size=0, name="test")
    values.update(settings)
    return protocol.Submit(
        images=images, intrinsics=intrinsics[:n], poses=poses[:n], aabb=synthetic.aabb(),
        eval_intrinsics=intrinsics[n:], eval_poses=poses[n:],
        eval_sizes=np.full((eval_count, 2), size, np.int32), **values,
    ).validate()


def ring_cameras(n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(intrinsics (n, 4), poses (n, 4, 4)) looking at the origin from radius 4 (no scene needed)."""
    poses = np.stack([cameras.look_at(p, np.zeros(3)) for p in cameras.ring_positions(np.zeros(3), 4.0, n)])
    k = cameras.intrinsics_from_fov(0.7, size, size)
    return np.repeat(k[None], n, 0), poses


# --------------------------------------------------------------------------------------------
# A job runner without torch
# --------------------------------------------------------------------------------------------
#: Seconds per fake step.  Submit.steps (0 -> 20) steps are run; Submit.name picks a behaviour:
#: "fail" raises RuntimeError("fake failure"), "oom" raises torch.cuda.OutOfMemoryError (imports
#: torch), "bad-mesh" sends a mesh with out-of-range faces, "die" kills its process half-way
#: (SIGKILL; "die-once": only the first time for a job, marked in its folder), anything else
#: succeeds.  The summary says which process ran it ("pid") and when it began ("began", wall clock).
FAKE_STEP_SECONDS = 0.01


def fake_runner(submit: protocol.Submit, ctx) -> dict:
    total, began = submit.steps or 20, time.time()
    for step in range(1, total + 1):
        if ctx.should_stop():
            from fit_implicit.backend.service.jobs import JobCancelled
            raise JobCancelled()
        time.sleep(FAKE_STEP_SECONDS)
        ctx.progress("train", step=step, total_steps=total, loss=1.0 / step, psnr=10.0 + step * 0.01,
                     elapsed=step * FAKE_STEP_SECONDS, fraction=step / total)
        if submit.preview_size and step % 5 == 0:
            ctx.preview(np.full((8, 8, 4), step % 256, np.uint8), step)
        if submit.name == "fail" and step == total // 2:
            raise RuntimeError("fake failure")
        if submit.name.startswith("die") and step == total // 2:
            mark = Path(ctx.folder) / "died-once"
            if submit.name == "die" or not mark.exists():
                mark.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        if submit.name == "oom" and step == total // 2:
            import torch
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    faces = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
    if submit.name == "bad-mesh":
        faces = faces + 10
    ctx.send(protocol.MeshResult(job_id=ctx.job_id, vertices=verts, faces=faces,
                                 colors=np.full((4, 3), 0.5, np.float32)))
    for i, (w, h) in enumerate(submit.eval_sizes):
        ctx.send(protocol.RenderResult(job_id=ctx.job_id, index=i, image=np.full((int(h), int(w), 4), 128, np.uint8)))
    return {"steps": total, "psnr": 10.0 + total * 0.01, "vertices": 4, "faces": 4, "pid": os.getpid(), "began": began}


def serve_fake(argv: list[str] | None = None) -> int:
    """``python -c "import helpers; helpers.serve_fake()" --bind ...``: the real server, fake runner."""
    import argparse

    from fit_implicit.backend.service import server

    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    return server.main(parser.parse_args(argv), runner=fake_runner)


# --------------------------------------------------------------------------------------------
# A backend in a subprocess
# --------------------------------------------------------------------------------------------
class BackendProcess:
    """A backend subprocess listening on a free loopback port.

    Args:
        fake: run the real server with :func:`fake_runner` instead of the trainer (no torch).
        args: extra command-line options (e.g. ["--max-queue", "1"]).
        startup_timeout: seconds to wait for the "backend listening on ..." line.
        preexec_fn: run in the child before the backend starts (e.g. a lower open-file limit).
    Attributes:
        address: ``tcp://127.0.0.1:PORT``.  proc: the Popen.  log_path: its stderr (the log).
    """

    def __init__(self, *, fake: bool = True, args: list[str] = (), startup_timeout: float = 30.0,
                 preexec_fn=None):
        # Each backend gets its own job folders (unless the test names some): no job of another
        # test resumes here.
        self.runs_dir = None if "--runs-dir" in args else tempfile.mkdtemp(prefix="backend-runs-")
        bind = ["--bind", "tcp://127.0.0.1:0", "--device", "cpu", *args]
        bind += ["--runs-dir", self.runs_dir] if self.runs_dir else []
        if fake:
            cmd = [sys.executable, "-c", "import sys, helpers; sys.exit(helpers.serve_fake(sys.argv[1:]))", *bind]
        else:
            cmd = [sys.executable, "-m", "fit_implicit.backend", "serve", *bind]
        # tests/ for the fake runner (helpers); the rest of PYTHONPATH as it is
        path = os.pathsep.join(p for p in (str(REPO / "tests"), os.environ.get("PYTHONPATH", "")) if p)
        env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
        fd, self.log_path = tempfile.mkstemp(prefix="backend-", suffix=".log")
        self._log = os.fdopen(fd, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     preexec_fn=preexec_fn)
        self.worker_address = ""      # with --worker-bind: where workers on other hosts join
        self.address = self._wait_for_address(startup_timeout)
        deadline = time.monotonic() + 5
        while "--worker-bind" in args and not self.worker_address and time.monotonic() < deadline:
            time.sleep(0.01)

    def _wait_for_address(self, timeout: float) -> str:
        found: list[str] = []

        def read():   # also keeps the pipe drained for the life of the process
            for line in self.proc.stdout:
                match = re.match(r"backend listening on (\S+)", line)
                if match and not found:
                    found.append(match.group(1))
                door = re.match(r"workers join at (\S+)", line)
                if door:
                    self.worker_address = door.group(1)

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.02)
        if not found:
            self.kill()
            raise RuntimeError(f"the backend did not start (exit {self.proc.returncode}):\n{self.log()}")
        return found[0]

    def log(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status (kills it if it does not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (kill -9) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.terminate()
        self._log.close()
        os.unlink(self.log_path)
        if self.runs_dir:
            shutil.rmtree(self.runs_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# A bare client socket
# --------------------------------------------------------------------------------------------
#: The token of "one user" in tests that are not about ownership (tests/backend/service/test_ownership.py is).
TEST_TOKEN = "5e1f" * 8


class RawPeer:
    """A DEALER socket connected to ``address`` for hand-made frames.  Use as a context manager."""

    def __init__(self, address: str, token: str = "", curve: tuple | None = None):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:       # (server public key, client public key, client secret key)
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.sock.connect(address)
        if token:       # say who it is (shared/protocol.py Hello.token): the jobs of that token are its own
            reply = self.request(protocol.Hello(client="test peer", token=token), timeout=10)
            assert isinstance(reply, protocol.Welcome), reply

    def send(self, message_or_frames) -> None:
        frames = message_or_frames.to_frames() if isinstance(message_or_frames, protocol.Message) else message_or_frames
        self.sock.send_multipart(frames, copy=False)

    def recv(self, timeout: float = 5.0) -> protocol.Message:
        """The next message, decoded and validated; raises TimeoutError if none comes."""
        if not self.sock.poll(int(timeout * 1000)):
            raise TimeoutError(f"no reply within {timeout} s")
        return protocol.decode_message(self.sock.recv_multipart())

    def request(self, message_or_frames, timeout: float = 5.0) -> protocol.Message:
        self.send(message_or_frames)
        return self.recv(timeout)

    def recv_until(self, types: tuple, timeout: float = 10.0) -> list[protocol.Message]:
        """Every message up to and including the first of one of ``types``."""
        out, deadline = [], time.monotonic() + timeout
        while True:
            out.append(self.recv(max(0.01, deadline - time.monotonic())))
            if isinstance(out[-1], types):
                return out

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RawZmtp:
    """A TCP connection that speaks just enough ZMTP 3.0 (NULL security, a DEALER) to send a
    message by hand and stop anywhere in it: what a stalled or hostile client does and a libzmq
    socket never would."""

    def __init__(self, address: str):
        import socket
        import struct

        self._struct = struct
        host, port = address[len("tcp://"):].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)
        self.sock.sendall(b"\xff" + bytes(8) + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\0") + bytes(32))
        got = b""
        while len(got) < 64:                       # the backend's greeting
            chunk = self.sock.recv(64 - len(got))
            if not chunk:
                raise ConnectionError("the backend closed the connection during the greeting")
            got += chunk
        body = b"\x05READY\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
        self.sock.sendall(b"\x04" + bytes([len(body)]) + body)

    def frame_header(self, size: int, more: bool) -> bytes:
        """The header of a frame of ``size`` bytes (its data follows)."""
        return bytes([(1 if more else 0) | 2]) + self._struct.pack(">Q", size)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def is_closed(self, timeout: float) -> bool:
        """True once the backend has closed the connection (within ``timeout`` seconds)."""
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except socket.timeout:
                return False
            except OSError:          # reset
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A process's resident memory (``VmHWM``: its peak so far), in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise KeyError(field)


class KeepSubmit:
    """Stands in for blender_addon/client.py's JobClient (same API: start, poll, cancel, close,
    finished, error): keeps the Submit it was started with and answers nothing."""

    def __init__(self, _address: str | None = None):
        self.submit, self.finished, self.error = None, False, None

    def start(self, submit) -> None:
        self.submit = submit

    def poll(self) -> list:
        return []

    def cancel(self) -> None:
        self.finished = True

    def close(self) -> None:
        self.finished = True


class Replay(KeepSubmit):
    """A JobClient stand-in that keeps its Submit and answers with ``batches`` of messages, one
    batch a poll (the job id: ``job_id``)."""

    def __init__(self, address, batches, job_id: str = "job1"):
        super().__init__(address)
        self.batches, self.job_id = [list(b) for b in batches], job_id

    def poll(self):
        out = self.batches.pop(0) if self.batches else []
        self.finished = not self.batches
        return out


def zmq_round_trip(message: protocol.Message, name: str) -> protocol.Message:
    """``message`` sent over a real ZeroMQ PAIR (inproc://NAME) and decoded on the other side."""
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind(f"inproc://{name}")
        b.connect(f"inproc://{name}")
        a.send_multipart(message.to_frames(), copy=False)
        return protocol.decode_message(b.recv_multipart(copy=False))
    finally:
        a.close(linger=0)
        b.close(linger=0)
