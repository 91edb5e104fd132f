"""One worker process of ``serve --gpus`` / ``--workers``: runs the jobs its server thread sends,
one at a time, on its device.  backend/service/workers.py starts it and describes the frames.

The job runs in a thread here with a JobContext of its own; this process's main thread owns the
socket: it sends what the job's context left in its Outbox (backend/service/outbox.py) and
listens for cancel.  Results are stored by the server (it has the job's folder record); the
job's checkpoints and fitted model are written into the folder from here, as in-process.
The process exits when told, or when its server is gone.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import zmq

from fit_implicit.shared import protocol

from fit_implicit.backend.service.jobs import (Job, JobCancelled, JobContext, clean_summary, describe_failure,
                                               failed_message, free_gpu_memory, is_out_of_memory)
from fit_implicit.backend.service.outbox import Outbox
from fit_implicit.backend.service.workers import RESULT_LIMITS, frame_head, read_frames

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


def run_job(sock: zmq.Socket, head: dict, frames: list, runner: Callable, device: str, server: int) -> None:
    """Run one job; everything it says goes to the server, then one of done, failed, cancelled."""
    try:
        message = protocol.decode_message(frames, RESULT_LIMITS)
    except (protocol.ProtocolError, ValueError) as exc:   # from our own server: a bug, told as a failure
        failed = protocol.Failed(job_id=str(head.get("job_id", ""))[:64], message=f"worker: {exc}"[:protocol.MAX_STRING])
        sock.send_multipart([frame_head("failed"), *failed.to_frames()])
        return
    job = Job(id=str(head.get("job_id", "")), client=SERVER, submit=message)   # no folder: the server stores results
    outbox = Outbox()
    ctx = JobContext(job, outbox, device, float(head.get("progress_interval", 0.1)),
                     float(head.get("checkpoint_interval", 0.0)))
    ctx.folder = Path(head["folder"]) if head.get("folder") else None     # checkpoints and the model go there
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
            sock.send_multipart([frame_head("message"), *msg.to_frames()], copy=False)
        if sock.poll(10):
            op = read_frames(sock)[0].get("op")
            if op in ("cancel", "exit"):
                job.cancel.set()
        elif os.getppid() != server:   # the server is gone (killed): stop, it resumes the job when it starts again
            job.cancel.set()
        if not thread.is_alive():
            thread.join()
    exc = ended.get("error")
    if exc is None:
        sock.send_multipart([frame_head("done", summary=ended.get("summary", {}))])
    elif isinstance(exc, JobCancelled) or job.cancel.is_set():
        sock.send_multipart([frame_head("cancelled")])
    else:
        text = describe_failure(exc)
        log.error("job %s failed: %s", job.id, text, exc_info=exc)
        sock.send_multipart([frame_head("failed"), *failed_message(job.id, exc, text).to_frames()])
        if is_out_of_memory(exc):
            free_gpu_memory()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fit_implicit.backend.service.worker_process")
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--name", default="w0")
    parser.add_argument("--runner", default="")
    parser.add_argument("--runs-dir", default=None)
    parser.add_argument("--warm-up", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s worker {args.name}: %(message)s")
    token = os.environ.pop("FIT_IMPLICIT_WORKER_TOKEN", "")
    runner = load_runner(args.runner, args.runs_dir)
    if args.warm_up and args.device.startswith("cuda"):
        from fit_implicit.backend.service.warmup import warm_up
        try:
            warm_up(args.device)
        except Exception:   # noqa: BLE001 - the first job pays the start-up costs
            log.warning("warm-up failed", exc_info=True)
    server = os.getppid()
    context = zmq.Context()
    sock = context.socket(zmq.PAIR)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(args.endpoint)
    sock.send_multipart([frame_head("ready", token=token, pid=os.getpid())])
    try:
        while os.getppid() == server:   # the server went away: so do we
            if not sock.poll(500):
                continue
            head, frames = read_frames(sock)
            op = head.get("op")
            if op == "exit":
                break
            if op == "free":
                free_gpu_memory()
            elif op == "job":
                run_job(sock, head, frames, runner, args.device, server)
    finally:
        sock.close()
        context.term()
    return 0


if __name__ == "__main__":
    sys.exit(main())
