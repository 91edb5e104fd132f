"""Worker processes: ``serve --gpus all`` (or ``--workers N``) runs each job in a process of its own,
one a GPU, so that many jobs run at once and a worker that dies takes no other job with it.

The server's JobQueue (backend/service/jobs.py) keeps what it keeps for one worker (the fair
queue, job folders, Attach, Cancel); each :class:`WorkerProcess` is one of its workers, driven
from that worker's thread in the server.  The process (backend/service/worker_process.py) runs
the same job runner the server would run in-process, on its own device, and talks to its
thread over a ZeroMQ PAIR socket (ipc:// in a private folder; loopback TCP where there is no
ipc, e.g. Windows): the server's job runs there, its messages come back here and go on to the
client as if made here (:meth:`JobContext.forward`).

Frames: a small JSON header ``{"op": ...}``, then, for some ops, a protocol message::

    server -> worker:  job {job_id, folder, checkpoint_interval, progress_interval} + the job's message
                       cancel | free | exit
    worker -> server:  ready {token, pid} | message + a protocol message of the job
                       done {summary} | failed + Failed | cancelled

The worker's job folder is the server's (one host): checkpoints written there let a restarted
worker resume the job.  A worker that exits, is killed (``kill -9``, the kernel's OOM killer) or
crashes is started again; its job is queued again (jobs.py WorkerDied).
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping

import zmq

from fit_implicit.shared import protocol, wire

from fit_implicit.backend.service.jobs import JobCancelled, JobContext, WorkerDied, WorkerJobFailed

log = logging.getLogger(__name__)

BEAT_SECONDS = 1.0        # workers on other hosts and their backend beat this often (worker_door.py)
START_TIMEOUT = 120.0     # seconds for a new worker to say ready (imports, CUDA context, warm-up)
STOP_TIMEOUT = 10.0       # seconds for a worker to exit when told before it is killed
#: Results a worker sends are checked like the server's own; up to this large (a mesh, textures).
RESULT_LIMITS = wire.Limits(max_array_bytes=1 << 34, max_total_bytes=1 << 35)


def runner_name(runner: Any) -> str:
    """``module:function`` of a job runner, for a worker process to import ("" for the real
    fit job).  Raises ValueError for a runner that cannot be imported by name (a lambda)."""
    if runner is None:
        return ""
    module, name = getattr(runner, "__module__", ""), getattr(runner, "__qualname__", "")
    if not module or not name or "<" in name or module == "__main__":
        raise ValueError(f"worker processes need a job runner importable by name, not {runner!r}")
    return f"{module}:{name}"


def worker_devices(gpus: str | None, workers: int, device: str, gpu_count: int) -> list[str]:
    """The device of each worker process ([] for the in-process worker).

    ``gpus``: "all", a count N (the first N GPUs, as ``fit --gpus N``), or GPU indices with a comma
    ("0,2"; "2," for GPU 2 alone); None: no GPU was asked for.  ``workers``: processes in all (0:
    one a GPU, or none); ``device``: where workers go without ``gpus``.  Raises ValueError."""
    if gpus is None:
        if workers < 0:
            raise ValueError(f"--workers must not be negative, got {workers}")
        return [device] * workers
    text = gpus.strip().lower()
    if text == "all":
        indices = list(range(gpu_count))
    elif text.isdigit():
        if not 0 < int(text) <= gpu_count:
            raise ValueError(f"--gpus {gpus}: torch sees {gpu_count} CUDA GPU(s)")
        indices = list(range(int(text)))
    else:
        try:
            indices = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"--gpus {gpus!r}: give 'all', a count, or GPU indices such as 0,1") from None
    if not indices:
        raise ValueError("--gpus: this machine has no CUDA GPU visible to torch" if text == "all"
                         else f"--gpus {gpus!r}: no GPU index given")
    bad = [i for i in indices if not 0 <= i < gpu_count]
    if bad:
        raise ValueError(f"--gpus {gpus}: GPU {bad[0]} does not exist (torch sees {gpu_count} CUDA GPU(s))")
    if len(set(indices)) != len(indices):
        raise ValueError(f"--gpus {gpus}: a GPU is named twice (give --workers to put several workers on each)")
    count = workers or len(indices)
    return [f"cuda:{indices[i % len(indices)]}" for i in range(count)]


class Relay:
    """A worker whose jobs run elsewhere, behind a socket its JobQueue thread owns: the job goes
    out as frames, its messages come back and go on to the client (:meth:`JobContext.forward`).
    Subclasses open the socket in :meth:`start` and say in :meth:`lost` when the other end is gone."""

    name: str
    device: str
    remote = False            # on another host (worker_door.py RemoteWorker)
    gone = False              # ... and it left for good
    _socket: zmq.Socket | None = None

    def accepts(self, message: protocol.Message | None) -> bool:
        """Whether this worker can run a job of this kind (None: a fit restored from its folder)."""
        return True

    def lost(self) -> str | None:
        """Why the other end is gone (it then cannot end the job), or None while it is there."""
        raise NotImplementedError

    def run(self, message: protocol.Message, ctx: JobContext) -> Mapping[str, Any]:
        """Run one job there; returns its summary.  Raises JobCancelled, WorkerJobFailed (it
        failed there) or WorkerDied (the other end went away under it)."""
        if not self.ready():
            raise WorkerDied(f"worker {self.name} is not running")
        head = frame_head("job", job_id=ctx.job_id, folder=str(ctx.folder) if ctx.folder is not None else "",
                          checkpoint_interval=ctx.checkpoint_interval, progress_interval=ctx.progress_interval)
        try:
            self._socket.send_multipart([head, *message.to_frames()], copy=False)
        except zmq.Again:
            self._close()
            raise WorkerDied(self.lost() or "it did not take the job") from None
        told_cancel = False
        while True:
            if ctx.should_stop() and not told_cancel:
                try:
                    self._socket.send_multipart([frame_head("cancel")], zmq.NOBLOCK)
                except zmq.Again:
                    pass   # gone: lost() says so below
                told_cancel = True
            if not self._socket.poll(50):
                why = self.lost()
                if why is not None:
                    self._close()
                    raise WorkerDied(why)
                continue
            head, frames = read_frames(self._socket)
            op = head.get("op")
            if op == "message":
                ctx.forward(protocol.decode_message(frames, RESULT_LIMITS))
            elif op == "model":     # a worker without the job's folder sends the fitted model back
                keep_model(ctx, frames)
            elif op == "done":
                summary = head.get("summary")
                return {**(summary if isinstance(summary, dict) else {}), "device": self.device}   # not its cuda:0
            elif op == "cancelled":
                raise JobCancelled()
            elif op == "failed":
                failed = protocol.decode_message(frames, RESULT_LIMITS)
                if not isinstance(failed, protocol.Failed):
                    raise RuntimeError(f"worker {self.name} ended a job with a {failed.TYPE}")
                raise WorkerJobFailed(failed)
            elif op == "gone":
                self._close()
                raise WorkerDied(str(head.get("why", "it went away")))
            else:
                log.warning("worker %s: unexpected %r during a job", self.name, op)

    def _close(self) -> None:
        raise NotImplementedError


def keep_model(ctx: JobContext, frames: list) -> None:
    """Write a fitted model a worker sent (run.json, model.pt) into the job's folder, checked
    first (backend/fitting/runs.py check_run_files), for later RenderJob, MeshJob and FetchModel."""
    from fit_implicit.backend.fitting.runs import RUN_FILE, WEIGHTS_FILE, check_run_files
    from fit_implicit.backend.service.checkpoint import atomic_write_bytes

    if ctx.folder is None or len(frames) != 2:
        return
    run_json, weights = bytes(frames[0].buffer), bytes(frames[1].buffer)
    try:
        check_run_files(run_json, weights)
    except ValueError as exc:
        log.error("job %s: the worker's model was not kept: %s", ctx.job_id, exc)
        return
    atomic_write_bytes(ctx.folder / WEIGHTS_FILE, weights)
    atomic_write_bytes(ctx.folder / RUN_FILE, run_json)


class WorkerProcess(Relay):
    """One worker process and the socket to it.  Every method but :attr:`state` is called from
    its JobQueue thread only (the socket is that thread's)."""

    def __init__(self, name: str, device: str, *, runner: str = "", runs_dir: str | None = None,
                 warm_up: bool = False, threads: int = 0, context: zmq.Context | None = None):
        self.name, self.device = name, device
        self.restarts = 0
        self.state = "starting"
        self._runner, self._runs_dir, self._warm_up, self._threads = runner, runs_dir, warm_up, threads
        self._context = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._proc: subprocess.Popen | None = None
        self._folder: str | None = None
        self._started_once = False

    # ---- life --------------------------------------------------------------------------------
    def ready(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._socket is not None

    def start(self) -> bool:
        """Start the process and wait for its ready; False (logged) if it did not come up."""
        self._close()
        self.state = "starting"
        if self._started_once:
            self.restarts += 1
        self._started_once = True
        token = secrets.token_hex(16)
        self._socket = self._context.socket(zmq.PAIR)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, -1)
        if zmq.has("ipc") and os.name == "posix":
            self._folder = tempfile.mkdtemp(prefix="fit-implicit-worker-")   # 0700: only this user may connect
            self._socket.bind(f"ipc://{self._folder}/{self.name}")
        else:
            self._socket.bind("tcp://127.0.0.1:*")
        endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        cmd = [sys.executable, "-m", "fit_implicit.backend.service.worker_process", "--endpoint", endpoint,
               "--device", self.device, "--name", self.name]
        cmd += ["--runner", self._runner] if self._runner else []
        cmd += ["--runs-dir", self._runs_dir] if self._runs_dir else []
        cmd += ["--warm-up"] if self._warm_up else []
        env = dict(os.environ, FIT_IMPLICIT_WORKER_TOKEN=token)
        if self._threads:
            env["FIT_IMPLICIT_THREADS"] = str(self._threads)
        if self.device.startswith("cuda:"):   # the worker sees its GPU only, as cuda:0
            env["CUDA_VISIBLE_DEVICES"] = _visible(self.device.partition(":")[2])
            cmd[cmd.index("--device") + 1] = "cuda:0"
        try:
            self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            log.error("worker %s: could not start a process: %s", self.name, exc)
            self._close()
            return False
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                log.error("worker %s on %s exited while starting (%s)", self.name, self.device, _how(self._proc.returncode))
                self._close()
                return False
            if self._socket.poll(100):
                head, _ = read_frames(self._socket)
                if head.get("op") == "ready" and head.get("token") == token:
                    log.info("worker %s on %s ready (pid %d)", self.name, self.device, self._proc.pid)
                    return True
                log.error("worker %s: unexpected first message %r", self.name, head.get("op"))
                break
        log.error("worker %s on %s did not start within %.0f s", self.name, self.device, START_TIMEOUT)
        self._close()
        return False

    def stop(self) -> None:
        """Tell the process to exit; kill it if it does not."""
        if self._proc is not None and self._proc.poll() is None and self._socket is not None:
            try:
                self._socket.send_multipart([frame_head("exit")], zmq.NOBLOCK)
                self._proc.wait(STOP_TIMEOUT)
            except (zmq.ZMQError, subprocess.TimeoutExpired):
                log.warning("worker %s did not exit within %.0f s: killed", self.name, STOP_TIMEOUT)
        self._close()
        self.state = "stopped"

    def _close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def free_memory(self) -> None:
        if self.ready():
            self._socket.send_multipart([frame_head("free")])

    def lost(self) -> str | None:
        code = self._proc.poll() if self._proc is not None else -9
        return None if code is None else _how(code)
def _visible(index: str) -> str:
    """The CUDA_VISIBLE_DEVICES entry for this process's GPU ``index`` (itself a position in an
    inherited CUDA_VISIBLE_DEVICES, if one is set)."""
    inherited = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    return inherited[int(index)] if int(index) < len(inherited) else index


def _how(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = ": out of host memory, or kill -9" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with status {code}"


def frame_head(op: str, **fields: Any) -> bytes:
    return json.dumps({"op": op, **fields}).encode()


def read_frames(sock: zmq.Socket) -> tuple[dict, list]:
    """One message: its JSON header and the frames after it."""
    return parse_frames(sock.recv_multipart(copy=False))


def parse_frames(frames: list) -> tuple[dict, list]:
    """A worker message's JSON header ({} if it is not a JSON object) and the frames after it."""
    try:
        head = json.loads(bytes(frames[0].buffer))
    except (ValueError, UnicodeDecodeError, IndexError):
        head = {}
    return (head if isinstance(head, dict) else {}), frames[1:]
