"""Jobs: their state machine, the FIFO queue and the one worker thread that runs them.

States::

    queued ──► running ──► done | failed | cancelled
       └──────────────────► cancelled | failed      (cancelled, or the backend shut down, while waiting)

One worker thread runs one job at a time through a *job runner*: a plain callable
``runner(submit, ctx) -> summary`` (see :data:`JobRunner`).  The real one is
:func:`backend.fit_job.run_fit_job`; tests inject fakes.  The runner reports through its
:class:`JobContext`; the worker turns how the runner ended into exactly one of Done, Failed or
Cancelled.  Everything the worker sends goes through the :class:`~backend.outbox.Outbox`: only
the server's main thread touches the socket.

Methods of :class:`JobQueue` are called from the server's main thread and return what the server
should send itself (they never put into the outbox, which the main thread drains: it must not
block on it).
"""
from __future__ import annotations

import collections
import enum
import logging
import math
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from shared import protocol

from .outbox import Outbox

log = logging.getLogger(__name__)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobCancelled(Exception):
    """Raised inside a runner (by :meth:`JobContext.check_cancelled`) once a cancel was asked for."""


class QueueFull(Exception):
    """The queue already holds ``max_queue`` waiting jobs."""


class ShuttingDown(Exception):
    """The backend is stopping and takes no new jobs."""


@dataclass(eq=False)
class Job:
    id: str
    client: bytes                          # ZeroMQ routing identity of the submitting client
    submit: protocol.Submit | None         # dropped (set to None) once the job has ended
    state: JobState = JobState.QUEUED
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    ended: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False                 # stopped because the backend is shutting down
    summary: str = ""                      # one line for logs: how it ended


class JobContext:
    """What a runner sees of its job.  Used from the worker thread only.

    * :meth:`should_stop` / :meth:`check_cancelled`: poll for cancel requests.
    * :meth:`progress`: throttled to one message per ``progress_interval`` unless ``force``.
    * :meth:`preview`: coalesced; never blocks behind anything.
    * :meth:`send`: results (MeshResult, RenderResult); validated here, so an invalid result
      fails the job with a clear text instead of reaching the client.
    """

    def __init__(self, job: Job, outbox: Outbox, device: str, progress_interval: float = 0.1):
        self.job_id = job.id
        self.device = device
        self._job = job
        self._outbox = outbox
        self._interval = progress_interval
        self._last_progress = -math.inf
        self.last_progress: dict[str, Any] = {}    # the newest progress values seen (sent or not)

    def should_stop(self) -> bool:
        return self._job.cancel.is_set()

    def check_cancelled(self) -> None:
        if self._job.cancel.is_set():
            raise JobCancelled()

    def progress(self, stage: str = "train", *, step: int = 0, total_steps: int = 0, loss: float = 0.0,
                 psnr: float = 0.0, elapsed: float = 0.0, eta: float = 0.0, fraction: float = 0.0,
                 force: bool = False) -> None:
        values = dict(stage=stage, step=_count(step), total_steps=_count(total_steps), loss=_finite(loss),
                      psnr=_finite(psnr), elapsed=max(0.0, _finite(elapsed)), eta=max(0.0, _finite(eta)),
                      fraction=min(1.0, max(0.0, _finite(fraction))))
        self.last_progress = values
        now = time.monotonic()
        last_step = values["total_steps"] > 0 and values["step"] >= values["total_steps"]
        if not (force or last_step or now - self._last_progress >= self._interval):
            return
        self._last_progress = now
        self._put(protocol.Progress(job_id=self.job_id, **values).validate())

    def preview(self, image: np.ndarray, step: int = 0) -> None:
        """``image``: (h, w, 4) or (h, w, 3) uint8 sRGB, straight alpha, top row first."""
        try:
            image = np.asarray(image)
            if image.ndim == 3 and image.shape[2] == 3:
                image = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
            msg = protocol.Preview(job_id=self.job_id, image=np.ascontiguousarray(image), step=_count(step))
            self._outbox.put_preview(self._job.client, msg.validate())
        except protocol.ProtocolError as exc:   # a bad preview never fails a job
            log.warning("job %s: preview dropped: %s", self.job_id, exc)

    def send(self, message: protocol.Message) -> None:
        try:
            message.validate()
        except protocol.ProtocolError as exc:
            raise RuntimeError(f"the backend produced an invalid {message.TYPE} message: {exc}") from exc
        self._put(message)

    def _put(self, message: protocol.Message) -> None:
        try:
            self._outbox.put(self._job.client, message, timeout=60.0)
        except queue.Full:
            log.error("job %s: outbox stayed full for 60 s; %s message dropped", self.job_id, message.TYPE)


#: ``runner(submit, ctx) -> summary``: runs one job in the worker thread.  Returns a flat mapping
#: of short keys to numbers/strings (it becomes Done.summary).  Raises JobCancelled when
#: ``ctx.should_stop()`` turned true, anything else on failure.
JobRunner = Callable[[protocol.Submit, JobContext], Mapping[str, Any]]


class JobQueue:
    """The FIFO of waiting jobs (at most ``max_queue``) and the worker thread."""

    def __init__(self, runner: JobRunner, outbox: Outbox, *, device: str, max_queue: int = 8,
                 max_queued_bytes: int = 8 << 30, history: int = 100, progress_interval: float = 0.1):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self._runner = runner
        self._outbox = outbox
        self.device = device
        self.max_queue = max_queue
        self.max_queued_bytes = max_queued_bytes
        self._progress_interval = progress_interval
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._ended: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._history = history
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="job-worker", daemon=True)

    # ---- called from the server's main thread ---------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, client: bytes, submit: protocol.Submit) -> tuple[Job, int]:
        """Queue a job.  Returns it and its position (jobs ahead of it, the running one included)."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the backend is shutting down and takes no new jobs")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"queue full: {len(self._waiting)} jobs are already waiting "
                                f"(the backend was started with --max-queue {self.max_queue}); try again later")
            held = sum(_nbytes(job.submit) for job in self._waiting)
            if self._waiting and held + _nbytes(submit) > self.max_queued_bytes:
                raise QueueFull(f"queue full: the {len(self._waiting)} waiting jobs already hold "
                                f"{held / 2**30:.1f} GiB of images; try again when they have run")
            job = Job(id=uuid.uuid4().hex[:12], client=client, submit=submit)
            position = len(self._waiting) + (self._running is not None)
            self._waiting.append(job)
            self._cond.notify_all()
        log.info("job %s queued at position %d (%d images)", job.id, position, len(submit.images))
        return job, position

    def cancel(self, job_id: str) -> tuple[Job | None, bool]:
        """Ask a job to stop.  Returns ``(job or None if unknown, removed_from_queue)``.

        A waiting job is removed at once (the caller sends its Cancelled); a running one is
        flagged and the worker sends Cancelled when the runner stops; an ended one is left alone.
        """
        with self._cond:
            for job in self._waiting:
                if job.id == job_id:
                    self._waiting.remove(job)
                    self._end(job, JobState.CANCELLED, "cancelled while queued")
                    return job, True
            if self._running is not None and self._running.id == job_id:
                self._running.cancel.set()
                log.info("job %s: cancel requested", job_id)
                return self._running, False
            return self._ended.get(job_id), False

    def cancel_client(self, client: bytes) -> list[Job]:
        """Cancel every job of one client (it went away).  Returns the jobs removed from the queue."""
        with self._cond:
            removed = [job for job in self._waiting if job.client == client]
            for job in removed:
                self._waiting.remove(job)
                self._end(job, JobState.CANCELLED, "cancelled: its client went away")
            if self._running is not None and self._running.client == client:
                self._running.cancel.set()
        return removed

    def stop(self) -> list[Job]:
        """Take no new jobs, fail the waiting ones and ask the running one to stop.

        Returns the failed waiting jobs (the caller tells their clients).  The running job ends
        with Failed through the outbox; :meth:`join` waits for it.
        """
        with self._cond:
            self._stopping = True
            dropped = list(self._waiting)
            self._waiting.clear()
            for job in dropped:
                self._end(job, JobState.FAILED, "the backend was shut down before this job started")
            if self._running is not None:
                self._running.shutdown = True
                self._running.cancel.set()
            self._cond.notify_all()
        return dropped

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to finish (after :meth:`stop`); True if it did."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def busy(self) -> bool:
        """A job is running or waiting."""
        with self._cond:
            return self._running is not None or bool(self._waiting)

    def running(self) -> Job | None:
        return self._running

    def waiting(self) -> list[Job]:
        with self._cond:
            return list(self._waiting)

    def clients_with_jobs(self) -> set[bytes]:
        with self._cond:
            clients = {job.client for job in self._waiting}
            if self._running is not None:
                clients.add(self._running.client)
            return clients

    # ---- the worker thread -----------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._waiting.popleft()
                job.state, job.started = JobState.RUNNING, time.monotonic()
                self._running = job
            try:
                self._run(job)
            except Exception:   # _run catches everything; this is a last line of defence
                log.exception("job %s: worker error", job.id)
            finally:
                with self._cond:
                    self._running = None

    def _run(self, job: Job) -> None:
        log.info("job %s: running", job.id)
        ctx = JobContext(job, self._outbox, self.device, self._progress_interval)
        try:
            summary = dict(self._runner(job.submit, ctx))
            summary.setdefault("seconds", time.monotonic() - job.started)
            summary.setdefault("device", self.device)
            end: protocol.Message = protocol.Done(job_id=job.id, summary=clean_summary(summary)).validate()
            state, text = JobState.DONE, "done"
        except Exception as exc:  # noqa: BLE001 - every failure must reach the client
            if job.shutdown:
                text = "the backend was shut down while this job was running"
                end, state = protocol.Failed(job_id=job.id, message=text), JobState.FAILED
            elif isinstance(exc, JobCancelled) or job.cancel.is_set():
                end, state, text = protocol.Cancelled(job_id=job.id), JobState.CANCELLED, "cancelled"
            else:
                text = describe_failure(exc)
                log.error("job %s failed: %s", job.id, text, exc_info=exc)
                end, state = protocol.Failed(job_id=job.id, message=text), JobState.FAILED
        with self._cond:
            self._end(job, state, text)   # also lets the job's images go
        self._outbox.put(job.client, end, final=True)

    def _end(self, job: Job, state: JobState, text: str) -> None:
        """Record how a job ended (caller holds the lock)."""
        job.state, job.ended, job.summary, job.submit = state, time.monotonic(), text, None
        self._ended[job.id] = job
        while len(self._ended) > self._history:
            self._ended.popitem(last=False)
        log.info("job %s: %s", job.id, text)


def describe_failure(exc: BaseException) -> str:
    """A clear, one-paragraph text for the user (fits in Failed.message)."""
    first = (str(exc).strip().splitlines() or [""])[0][:500]
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    if (oom_type is not None and isinstance(exc, oom_type)) or "CUDA out of memory" in str(exc):
        try:
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - best effort
            pass
        return ("GPU out of memory. Pick a lower quality preset (e.g. 'draft'), send fewer or smaller "
                f"images, or close other programs using the GPU. ({first})")
    if isinstance(exc, MemoryError):
        return "out of memory (RAM): send fewer or smaller images, or pick a lower quality preset."
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text[: protocol.MAX_STRING]


def clean_summary(summary: Mapping[str, Any]) -> dict:
    """Make a runner's summary fit Done.summary: plain scalars, finite floats, short strings."""
    out: dict[str, Any] = {}
    for key, value in list(summary.items())[:64]:
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        elif isinstance(value, str):
            value = value[: protocol.MAX_STRING]
        elif not (value is None or isinstance(value, (bool, int, float))):
            value = str(value)[:256]
        out[str(key)[:64]] = value
    return out


def _nbytes(submit: protocol.Submit | None) -> int:
    return 0 if submit is None else int(submit.images.nbytes)


def _finite(x: Any) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) else 0.0


def _count(x: Any) -> int:
    try:
        return max(0, int(x))
    except (TypeError, ValueError, OverflowError):
        return 0
