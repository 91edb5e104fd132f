"""A worker process: runs the jobs its server sends, one at a time, on its device.

Two ways in (backend/service/workers.py describes the frames):

* started by its server (``serve --gpus`` / ``--workers``): ``--endpoint``, a PAIR socket to its
  server's thread on the same host; it shares the server's job folders and exits when told or
  when its server is gone;
* on another host (``fit-implicit worker --server tcp://HOST:5600``, backend/service/worker_door.py):
  a DEALER to the server's worker door, CurveZMQ unless loopback; it says ready, beats every
  second, keeps checkpoints in a scratch folder of its own and sends the fitted model back.  A
  silent server: the job stops and the worker asks to join again until the server answers.

The job runs in a thread with a JobContext of its own; the main thread owns the socket: it
sends what the job's context left in its Outbox (backend/service/outbox.py) and listens for
cancel.  Results are stored by the server (it keeps the job's folder record).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import zmq

from fit_implicit.shared import protocol

from fit_implicit.backend.service.jobs import (Job, JobCancelled, JobContext, clean_summary, describe_failure,
                                               failed_message, free_gpu_memory, is_out_of_memory)
from fit_implicit.backend.service.outbox import Outbox
from fit_implicit.backend.service.workers import BEAT_SECONDS, RESULT_LIMITS, frame_head, read_frames

log = logging.getLogger("fit_implicit.worker")

SERVER = b"server"    # the Outbox's identity for the one peer


def load_runner(name: str, runs_dir: str | None) -> Callable:
    """The job runner ``module:function`` ("" -> the real fit job), with render, mesh and points
    jobs as the server has them (backend/service/render_job.py with_render_jobs)."""
    from fit_implicit.backend.service.render_job import with_render_jobs

    if name:
        module, _, attr = name.partition(":")
        runner = importlib.import_module(module)
        for part in attr.split("."):
            runner = getattr(runner, part)
    else:
        from fit_implicit.backend.service.fit_job import run_fit_job as runner
    return with_render_jobs(runner, lambda: runs_dir)


class Link:
    """The socket to the server, with how to tell it is gone: a local worker's server is its
    parent process; a remote one must be heard (beats) at least every ``timeout`` seconds."""

    def __init__(self, sock: zmq.Socket, remote: bool, timeout: float):
        self.sock, self.remote, self.timeout = sock, remote, timeout
        self._parent = os.getppid()
        self.heard = self._beat = time.monotonic()

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames, copy=False)

    def receive(self, ms: int) -> tuple[dict, list] | None:
        """The server's next message (beats are taken here), or None after ``ms``."""
        self.tick()
        if not self.sock.poll(ms):
            return None
        head, frames = read_frames(self.sock)
        self.heard = time.monotonic()
        return None if head.get("op") == "beat" else (head, frames)

    def tick(self) -> None:
        if self.remote and time.monotonic() - self._beat >= BEAT_SECONDS:
            self._beat = time.monotonic()
            self.sock.send_multipart([frame_head("beat")])

    def lost(self) -> bool:
        if self.remote:
            return time.monotonic() - self.heard > self.timeout
        return os.getppid() != self._parent


def run_job(link: Link, head: dict, frames: list, runner: Callable, device: str, scratch: Path | None) -> None:
    """Run one job; everything it says goes to the server, then one of done, failed, cancelled.
    ``scratch``: a folder of this host for the job's checkpoints and model (remote workers)."""
    job_id = str(head.get("job_id", ""))[:64]
    try:
        message = protocol.decode_message(frames, RESULT_LIMITS)
    except (protocol.ProtocolError, ValueError) as exc:   # from our own server: a bug, told as a failure
        link.send([frame_head("failed"), *protocol.Failed(job_id=job_id, message=f"worker: {exc}"[:4000]).to_frames()])
        return
    job = Job(id=job_id, client=SERVER, submit=message)   # no folder: the server stores the results
    outbox = Outbox()
    ctx = JobContext(job, outbox, device, float(head.get("progress_interval", 0.1)),
                     float(head.get("checkpoint_interval", 0.0)))
    if scratch is not None:
        ctx.folder = scratch / job_id
        ctx.folder.mkdir(parents=True, exist_ok=True)
    elif head.get("folder"):
        ctx.folder = Path(head["folder"])     # the server's job folder: checkpoints and the model go there
    ended: dict[str, Any] = {}

    def work() -> None:
        try:
            ended["summary"] = clean_summary(dict(runner(message, ctx)))
        except BaseException as exc:   # noqa: BLE001 - told to the server
            ended["error"] = exc

    thread = threading.Thread(target=work, name=f"job-{job.id}", daemon=True)
    thread.start()
    while thread.is_alive() or outbox.pending():
        for _, msg in outbox.drain():
            link.send([frame_head("message"), *msg.to_frames()])
        got = link.receive(10)
        if got is not None and got[0].get("op") in ("cancel", "exit"):
            job.cancel.set()
        elif got is None and link.lost():   # the server is gone: stop (it runs the job again when it can)
            job.cancel.set()
        if not thread.is_alive():
            thread.join()
    exc = ended.get("error")
    try:
        if exc is None:
            if scratch is not None:
                send_model(link, ctx.folder)
            link.send([frame_head("done", summary=ended.get("summary", {}))])
        elif isinstance(exc, JobCancelled) or job.cancel.is_set():
            link.send([frame_head("cancelled")])
        else:
            text = describe_failure(exc)
            log.error("job %s failed: %s", job.id, text, exc_info=exc)
            link.send([frame_head("failed"), *failed_message(job.id, exc, text).to_frames()])
            if is_out_of_memory(exc):
                free_gpu_memory()
    finally:
        if scratch is not None:
            shutil.rmtree(ctx.folder, ignore_errors=True)


def send_model(link: Link, folder: Path) -> None:
    """The fitted model of a job (backend/fitting/runs.py: run.json, model.pt), if it saved one."""
    from fit_implicit.backend.fitting.runs import RUN_FILE, WEIGHTS_FILE

    if (folder / RUN_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        link.send([frame_head("model"), (folder / RUN_FILE).read_bytes(), (folder / WEIGHTS_FILE).read_bytes()])


def serve_jobs(link: Link, runner: Callable, device: str, scratch: Path | None) -> str:
    """Run jobs until told to exit ("exit") or the server is gone ("lost")."""
    while not link.lost():
        got = link.receive(500)
        if got is None:
            continue
        head, frames = got
        op = head.get("op")
        if op == "exit":
            return "exit"
        if op == "free":
            free_gpu_memory()
        elif op == "job":
            run_job(link, head, frames, runner, device, scratch)
        elif op in ("welcome", "refused"):
            continue
    return "lost"


def curve_client(sock: zmq.Socket, server_key: str, keys_dir: str | None) -> None:
    """Make ``sock`` a CurveZMQ client with this worker's key pair (made on first use)."""
    from fit_implicit.backend.service import security

    key = server_key.strip()
    if not security.is_z85_key(key) and Path(key).expanduser().is_file():
        key = Path(key).expanduser().read_text(encoding="ascii").strip()
    if not security.is_z85_key(key):
        raise SystemExit("error: --server-key must be the backend's public key (40 Z85 characters) or its server.key file")
    folder = Path(keys_dir).expanduser() if keys_dir else security.default_keys_dir()
    public, secret = security.ensure_server_keys(folder, stem="worker")
    print(f"worker public key (add it to the backend's authorized_workers): {public.decode('ascii')}", flush=True)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = key.encode("ascii"), public, secret


def join(context: zmq.Context, args: argparse.Namespace, runner: Callable) -> int:
    """A worker on another host: join the server's door, serve, join again when it is lost."""
    from fit_implicit.backend.service.server import is_local_address

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="fit-implicit-worker-"))
    name = args.name or platform.node() or "remote"
    while True:
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)
        if args.server_key or not is_local_address(args.server):
            if not args.server_key:
                raise SystemExit(f"error: {args.server} is not on this host: give --server-key (the backend's "
                                 "public key) so that the link is encrypted (CurveZMQ)")
            curve_client(sock, args.server_key, args.keys_dir)
        sock.connect(args.server)
        link = Link(sock, remote=True, timeout=args.timeout)
        hello = frame_head("ready", name=name, device=args.device, protocol=protocol.PROTOCOL_VERSION)
        welcomed, asked = False, 0.0
        while not welcomed:
            if time.monotonic() - asked > 2.0:
                sock.send_multipart([hello])
                asked = time.monotonic()
            got = link.receive(200)
            if got is not None and got[0].get("op") == "refused":
                print(f"error: the backend refused this worker: {got[0].get('why')}", file=sys.stderr, flush=True)
                return 1
            welcomed = got is not None and got[0].get("op") == "welcome"
        print(f"worker joined {args.server} as {got[0].get('name')} ({args.device})", flush=True)
        link.heard = time.monotonic()
        if serve_jobs(link, runner, args.device, scratch) == "exit":
            return 0
        log.warning("the backend at %s was silent for %.0f s; joining again", args.server, args.timeout)
        sock.close(linger=0)


def main(argv: list[str] | None = None) -> int:
    """A worker started by its server (workers.py WorkerProcess); one on another host starts with
    ``fit-implicit worker`` (backend/cli.py, then :func:`run`)."""
    parser = argparse.ArgumentParser(prog="fit_implicit.backend.service.worker_process")
    parser.add_argument("--endpoint", required=True, help="its server thread's socket")
    parser.add_argument("--runs-dir", default=None)
    parser.add_argument("--warm-up", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="w0")
    parser.add_argument("--runner", default="")
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker {args.name}: %(message)s")
    runner = load_runner(args.runner, getattr(args, "runs_dir", None))
    if args.device.startswith("cuda") and (getattr(args, "warm_up", False) or getattr(args, "server", None)):
        from fit_implicit.backend.service.warmup import warm_up
        try:
            warm_up(args.device)
        except Exception:   # noqa: BLE001 - the first job pays the start-up costs
            log.warning("warm-up failed", exc_info=True)
    context = zmq.Context()
    try:
        if getattr(args, "endpoint", None) is None:
            return join(context, args, runner)
        sock = context.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(args.endpoint)
        token = os.environ.pop("FIT_IMPLICIT_WORKER_TOKEN", "")
        sock.send_multipart([frame_head("ready", token=token, pid=os.getpid())])
        serve_jobs(Link(sock, remote=False, timeout=0.0), runner, args.device, None)
        return 0
    finally:
        context.destroy(linger=2000)   # what is still queued for the server goes first


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
