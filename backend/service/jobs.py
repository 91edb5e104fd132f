"""Jobs: their state machine, the fair queue and the one worker thread that runs them.

States::

    queued ──► running ──► done | failed | cancelled
       └──────────────────► cancelled | failed      (cancelled, or the backend shut down, while waiting)

Fairness: waiting jobs run round-robin between clients (the client that was served least
recently goes first), so one client flooding the queue delays the others by one job at most.

Persistence (when a ``runs_dir`` is given, backend/service/paths.py): each job has a folder
``<runs_dir>/<job_id>/`` holding its Submit, its state, training checkpoints, its fitted model
and its results (see :mod:`backend.service.checkpoint`).  At start-up :meth:`JobQueue.restore` re-queues
the jobs that had not ended (they resume from their last checkpoint) and remembers the ended
ones, whose results a client can fetch again with Attach until they expire (``keep_seconds``).

Jobs run on *workers*, each with a thread of its own here that takes the next job in fair order
when its worker is free.  The default is one :class:`InProcess` worker: a *job runner*, a plain
callable ``runner(submit, ctx) -> summary`` (see :data:`JobRunner`), called in that thread.  The
real runner is :func:`backend.service.fit_job.run_fit_job`; tests inject fakes.  ``serve --gpus``
or ``--workers`` gives one worker process a GPU instead (backend/service/workers.py): a worker
that dies (killed, out of host memory, a lost GPU) is started again and its job queued again
(it resumes from its last checkpoint), the other workers' jobs go on.  The runner reports
through its :class:`JobContext`; the worker thread turns how the runner ended into exactly one
of Done, Failed or Cancelled.  Everything the worker sends goes through the :class:`~backend.service.outbox.Outbox`: only
the server's main thread touches the socket.

Methods of :class:`JobQueue` are called from the server's main thread and return what the server
should send itself (they never put into the outbox, which the main thread drains: it must not
block on it).
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import gc
import json
import logging
import math
import queue
import shutil
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from fit_implicit.shared import protocol

from fit_implicit.backend.service import checkpoint, paths
from fit_implicit.backend.service.outbox import Outbox

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


class UnknownJob(Exception):
    """No such job (never existed, or its results expired); the text says which."""


class WorkerDied(Exception):
    """The process running a job ended without ending the job (backend/service/workers.py): the
    job is queued again, up to :data:`MAX_WORKER_DEATHS` times."""


class WorkerJobFailed(Exception):
    """A job failed in a worker process; ``failed`` is the Failed message it made there."""

    def __init__(self, failed: protocol.Failed):
        super().__init__(failed.message)
        self.failed = failed


MAX_WORKER_DEATHS = 2   # a job whose worker died this many times fails (it is what kills them)


@dataclass(eq=False)
class Job:
    id: str
    client: bytes | None                   # routing identity its messages go to (None: nobody attached)
    submit: protocol.Submit | None         # None once ended (and for restored jobs until they run)
    state: JobState = JobState.QUEUED
    owner: bytes = b""                     # who submitted it: the key of round-robin fairness
    folder: Path | None = None             # <runs_dir>/<id>/ (None: not persisted)
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    ended: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    shutdown: bool = False                 # stopped because the backend is shutting down
    summary: str = ""                      # one line for logs: how it ended
    stored: int = 0                        # results written to its folder so far
    lock: threading.Lock = field(default_factory=threading.Lock)   # client + stored results together
    nbytes: int = 0                        # what its Submit holds (every array): memory, or disk once stored
    worker_deaths: int = 0                 # workers that died running it (it was queued again each time)

    def deliver(self, message: protocol.Message) -> bytes | None:
        """Store a result in the job's folder and return who it goes to, as one step (so that a
        client attaching meanwhile gets it exactly once: from the folder or from the socket)."""
        with self.lock:
            if self.folder is not None:
                try:
                    checkpoint.store_message(self.folder, self.stored, message)
                    self.stored += 1
                except OSError as exc:
                    log.error("job %s: could not store its %s result: %s", self.id, message.TYPE, exc)
            return self.client


class JobContext:
    """What a runner sees of its job.  Used from the worker thread only.

    * :meth:`should_stop` / :meth:`check_cancelled`: poll for cancel requests.
    * :meth:`progress`: throttled to one message per ``progress_interval`` unless ``force``.
    * :meth:`preview`: coalesced; never blocks behind anything.
    * :meth:`send`: results (MeshResult, RenderResult); validated here, so an invalid result
      fails the job with a clear text instead of reaching the client.
    """

    def __init__(self, job: Job, outbox: Outbox, device: str, progress_interval: float = 0.1,
                 checkpoint_interval: float = 0.0):
        self.job_id = job.id
        self.device = device
        self.folder = job.folder                     # the job's folder (None: no checkpoints, no saved model)
        self.checkpoint_interval = checkpoint_interval   # seconds between training checkpoints (0: none)
        self._job = job
        self._outbox = outbox
        self.progress_interval = progress_interval
        self._last_progress = -math.inf
        self.last_progress: dict[str, Any] = {}    # the newest progress values seen (sent or not)

    def should_stop(self) -> bool:
        return self._job.cancel.is_set()

    def check_cancelled(self) -> None:
        if self._job.cancel.is_set():
            raise JobCancelled()

    def progress(self, stage: str = "train", *, step: int = 0, total_steps: int = 0, loss: float = 0.0,
                 psnr: float = 0.0, elapsed: float = 0.0, eta: float = 0.0, fraction: float = 0.0,
                 force: bool = False, note: str = "") -> None:
        values = dict(stage=stage, step=_count(step), total_steps=_count(total_steps), loss=_finite(loss),
                      psnr=_finite(psnr), elapsed=max(0.0, _finite(elapsed)), eta=max(0.0, _finite(eta)),
                      fraction=min(1.0, max(0.0, _finite(fraction))))
        self.last_progress = values
        now = time.monotonic()
        last_step = values["total_steps"] > 0 and values["step"] >= values["total_steps"]
        if not (note or force or last_step or now - self._last_progress >= self.progress_interval):
            return
        self._last_progress = now
        self._put(protocol.Progress(job_id=self.job_id, note=note[:protocol.MAX_STRING], **values).validate())

    def forward(self, message: protocol.Message) -> None:
        """Pass on a message a worker process made for this job (backend/service/workers.py):
        previews coalesced, results stored, progress remembered, as if made here."""
        if isinstance(message, protocol.Preview):
            if self._job.client is not None:
                self._outbox.put_preview(self._job.client, message)
            return
        if isinstance(message, protocol.Progress):
            self.last_progress = {k: getattr(message, k) for k in
                                  ("stage", "step", "total_steps", "loss", "psnr", "elapsed", "eta", "fraction")}
        self.send(message)

    def note(self, text: str) -> None:
        """Tell the client something once (a Progress carrying ``note``, with the last numbers)."""
        self.progress(**{**(self.last_progress or {}), "note": text})

    def preview(self, image: np.ndarray, step: int = 0) -> None:
        """``image``: (h, w, 4) or (h, w, 3) uint8 sRGB, straight alpha, top row first."""
        try:
            image = np.asarray(image)
            if image.ndim == 3 and image.shape[2] == 3:
                image = np.concatenate([image, np.full(image.shape[:2] + (1,), 255, np.uint8)], axis=2)
            msg = protocol.Preview(job_id=self.job_id, image=np.ascontiguousarray(image), step=_count(step))
            client = self._job.client
            if client is not None:
                self._outbox.put_preview(client, msg.validate())
        except protocol.ProtocolError as exc:   # a bad preview never fails a job
            log.warning("job %s: preview dropped: %s", self.job_id, exc)

    def send(self, message: protocol.Message) -> None:
        try:
            message.validate()
        except protocol.ProtocolError as exc:
            raise RuntimeError(f"the backend produced an invalid {message.TYPE} message: {exc}") from exc
        if message.TYPE in checkpoint.STORED_TYPES:
            self._put(message, self._job.deliver(message))
        else:
            self._put(message)

    def _put(self, message: protocol.Message, client: bytes | None = b"") -> None:
        client = self._job.client if client == b"" else client
        if client is None:   # nobody attached (e.g. a job resumed after a restart): results are stored
            return
        try:
            self._outbox.put(client, message, timeout=60.0)
        except queue.Full:
            log.error("job %s: outbox stayed full for 60 s; %s message dropped", self.job_id, message.TYPE)


#: ``runner(submit, ctx) -> summary``: runs one job in the worker thread.  Returns a flat mapping
#: of short keys to numbers/strings (it becomes Done.summary).  Raises JobCancelled when
#: ``ctx.should_stop()`` turned true, anything else on failure.
JobRunner = Callable[[protocol.Submit, JobContext], Mapping[str, Any]]


class InProcess:
    """A worker that runs jobs in its JobQueue thread, in this process (the default: one device).

    A worker (this, or backend/service/workers.py WorkerProcess) has ``name``, ``device``,
    ``restarts``, ``state``, ``remote`` and ``gone``; :meth:`start` readies it (called in its thread while :meth:`ready`
    is False; False: it could not, try later), :meth:`run` runs one job like a :data:`JobRunner`,
    :meth:`accepts` says which jobs it can run, :meth:`free_memory` empties its device's cache
    between jobs, :meth:`stop` lets it go."""

    def __init__(self, runner: JobRunner, device: str, warm_up: Callable[[], Any] | None = None, name: str = "w0"):
        self.runner, self.device, self.name = runner, device, name
        self._warm_up = warm_up
        self.restarts = 0
        self.state = "starting"
        self.remote = self.gone = False   # (workers on other hosts: backend/service/worker_door.py)
        self._started = False

    def ready(self) -> bool:
        return self._started

    def start(self) -> bool:
        self._started = True
        if self._warm_up is not None:
            try:
                self._warm_up()
            except Exception:   # a failed warm-up only costs the first job its start-up time
                log.warning("warm-up failed; the first job pays the start-up costs", exc_info=True)
        return True

    def accepts(self, message: protocol.Message | None) -> bool:
        return True

    def run(self, submit: protocol.Submit, ctx: JobContext) -> Mapping[str, Any]:
        return self.runner(submit, ctx)

    def free_memory(self) -> None:
        free_gpu_memory()
        torch = sys.modules.get("torch")
        if torch is not None and str(self.device).startswith("cuda"):
            log.info("freed cached GPU memory (%.0f MiB still allocated)", torch.cuda.memory_allocated() / 2**20)

    def stop(self) -> None:
        pass


class JobQueue:
    """The waiting jobs (at most ``max_queue``, served round-robin by owner) and the worker thread.

    Args:
        runner, device, warm_up: the one in-process worker (:class:`InProcess`), unless ``workers``.
        workers: the workers (InProcess or backend/service/workers.py WorkerProcess), a thread each.
        runs_dir: where job folders live (None: nothing is persisted; no Attach, no resume).
        checkpoint_interval: seconds between training checkpoints (0: none).
        keep_seconds: how long an ended job's folder (results, model) is kept for Attach.
        max_kept: at most this many ended job folders are kept (the oldest go first).
    """

    def __init__(self, runner: JobRunner | None, outbox: Outbox, *, device: str = "cpu", max_queue: int = 8,
                 max_queued_bytes: int = 8 << 30, history: int = 100, progress_interval: float = 0.1,
                 runs_dir: str | Path | None = None, checkpoint_interval: float = 60.0,
                 keep_seconds: float = 24 * 3600.0, max_kept: int = 1000,
                 warm_up: Callable[[], Any] | None = None, workers: list | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.workers = list(workers) if workers else [InProcess(runner, device, warm_up)]
        self._outbox = outbox
        self.device = self.workers[0].device
        self.max_queue = max_queue
        self.max_queued_bytes = max_queued_bytes
        self.runs_dir = Path(runs_dir) if runs_dir is not None else None
        self.checkpoint_interval = checkpoint_interval
        self.keep_seconds = keep_seconds
        self.max_kept = max_kept
        self._progress_interval = progress_interval
        self._cond = threading.Condition()
        self._waiting: list[Job] = []                 # arrival order; run order is fair_order()
        self._served: dict[bytes, int] = {}           # owner -> turn it was last served (bounded below)
        self._turn = 0
        self._running: dict[str, Job] = {}           # worker name -> its job
        self._free_asked: set[str] = set()            # FreeMemory: these workers empty their caches when idle
        self._ended: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._history = history
        self._kept: collections.OrderedDict[str, float] = collections.OrderedDict()   # id -> wall end time
        # Models given back (StoreModel): their own expiry and caps, so that they never push
        # other clients' results out (id -> (owner, wall time)).
        self._models: collections.OrderedDict[str, tuple[bytes, float]] = collections.OrderedDict()
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, args=(w,), name=f"job-worker-{w.name}", daemon=True)
                         for w in self.workers]

    # ---- called from the server's main thread ---------------------------------------------
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def restore(self) -> tuple[int, int]:
        """Re-queue the unfinished jobs found in ``runs_dir`` and remember the ended ones.

        Returns ``(requeued, kept)``.  Unreadable folders are logged and left alone.
        """
        if self.runs_dir is None or not self.runs_dir.is_dir():
            return 0, 0
        found = []
        for entry in self.runs_dir.iterdir():
            if not paths.is_job_id(entry.name) or entry.is_symlink() or not entry.is_dir():
                continue
            try:
                record = checkpoint.read_job_record(entry)
            except checkpoint.CheckpointError as exc:
                record = _salvage(entry, exc)
            found.append((float(record.get("created_wall") or 0.0), entry.name, record))
        requeued = 0
        with self._cond:
            for _, job_id, record in sorted(found):
                folder = paths.job_folder(self.runs_dir, job_id)
                if record.get("state") in (JobState.QUEUED.value, JobState.RUNNING.value):
                    # Results of an unfinished job are made again when it runs: drop partial ones.
                    shutil.rmtree(folder / checkpoint.RESULTS_DIR, ignore_errors=True)
                    job = Job(id=job_id, client=None, submit=None, folder=folder,
                              owner=_owner_bytes(record.get("owner")))
                    self._waiting.append(job)
                    requeued += 1
                elif record.get("kind") == "stored_model":
                    self._models[job_id] = (_owner_bytes(record.get("owner")), float(record.get("ended_wall") or 0.0))
                else:
                    self._kept[job_id] = float(record.get("ended_wall") or time.time())
            self._kept = collections.OrderedDict(sorted(self._kept.items(), key=lambda kv: kv[1]))   # oldest first
            self._cond.notify_all()
        if found:
            log.info("found %d job folders in %s: %d unfinished jobs re-queued", len(found), self.runs_dir, requeued)
        return requeued, len(self._kept)

    def store_model(self, run_json: bytes, weights: bytes, name: str = "", owner: bytes = b"") -> str:
        """Keep a model given back by a client (StoreModel) as the folder of an ended job, so that
        RenderJob and MeshJob find it under the returned id; it expires like any ended job.
        Raises ValueError (not a run: backend/fitting/runs.py check_run_files) or OSError."""
        from fit_implicit.backend.fitting.runs import RUN_FILE, WEIGHTS_FILE, check_run_files

        if self.runs_dir is None:
            raise ValueError("this backend keeps no job folders (started without --runs-dir), so it cannot keep models")
        check_run_files(run_json, weights)
        with self._cond:
            mine = sum(1 for who, _ in self._models.values() if who == owner)
            if mine >= MAX_MODELS_PER_OWNER or len(self._models) >= MAX_MODELS:
                raise ValueError(f"this backend already keeps {mine if mine >= MAX_MODELS_PER_OWNER else len(self._models)} "
                                 f"models given back ({'yours' if mine >= MAX_MODELS_PER_OWNER else 'in all'}; at most "
                                 f"{MAX_MODELS_PER_OWNER} a client, {MAX_MODELS} in all, each for "
                                 f"{self.keep_seconds / 3600:g} h); try again later")
        job_id = uuid.uuid4().hex[:12]
        folder = paths.job_folder(self.runs_dir, job_id)
        try:
            folder.mkdir(parents=True, exist_ok=False)
            checkpoint.atomic_write_bytes(folder / WEIGHTS_FILE, bytes(weights))
            checkpoint.atomic_write_bytes(folder / RUN_FILE, bytes(run_json))
            checkpoint.write_job_record(folder, id=job_id, state=JobState.DONE.value, created_wall=time.time(),
                                        ended_wall=time.time(), name=name[:256], message="model given back",
                                        owner=owner.hex(), kind="stored_model")
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        with self._cond:
            self._models[job_id] = (owner, time.time())
        log.info("job %s: a model given back (%.1f MB) kept", job_id, len(weights) / 2**20)
        return job_id

    def unknown_text(self, job_id: str) -> str:
        """What a client hears about a job this backend does not have, or another client's (the
        same words, so that they tell nothing apart)."""
        keep = f"; results are kept for {self.keep_seconds / 3600:g} h after a job ends" if self.runs_dir else ""
        return f"no job {job_id[:64]!r} on this backend (it never existed or its results expired{keep})"

    def owner_of(self, job_id: str) -> bytes | None:
        """Who owns a job (the owner key it was submitted with, see the server's Hello handling):
        None when there is no such job here, b"" for a job folder of an older backend that did
        not record one (anybody may use it)."""
        with self._cond:
            for job in (*self._waiting, *self._running.values(), *self._ended.values()):
                if job.id == job_id:
                    return job.owner
        if self.runs_dir is None or not paths.is_job_id(job_id):
            return None
        folder = paths.job_folder(self.runs_dir, job_id)
        try:
            return _owner_bytes(checkpoint.read_job_record(folder).get("owner"))
        except checkpoint.CheckpointError:
            return None

    def submit(self, client: bytes, submit: protocol.Submit, owner: bytes | None = None) -> tuple[Job, int]:
        """Queue a job for ``owner`` (default: the connection ``client``).  Returns it and its
        position (jobs ahead of it, the running one included).

        Raises QueueFull, ShuttingDown, or OSError if its folder cannot be written.
        """
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the backend is shutting down and takes no new jobs")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"queue full: {len(self._waiting)} jobs are already waiting "
                                f"(the backend was started with --max-queue {self.max_queue}); try again later")
            size, who = _nbytes(submit), owner or client
            held = sum(job.nbytes for job in self._waiting)
            if self._waiting and held + size > self.max_queued_bytes:
                raise QueueFull(f"queue full: the {len(self._waiting)} waiting jobs already hold "
                                f"{held / 2**30:.1f} GiB of images and passes (at most "
                                f"{self.max_queued_bytes / 2**30:.1f} GiB); try again when they have run")
            mine = [job.nbytes for job in self._waiting if job.owner == who]
            share = self.max_queued_bytes // 2
            if mine and sum(mine) + size > share:
                raise QueueFull(f"queue full for this client: your {len(mine)} waiting jobs already hold "
                                f"{sum(mine) / 2**30:.1f} GiB of images and passes, and one client may queue at most "
                                f"{share / 2**30:.1f} GiB; try again when one has run")
        job = Job(id=uuid.uuid4().hex[:12], client=client, submit=submit, owner=who, nbytes=size)
        # Written before it is queued: a kill from now on loses nothing.  Render jobs (RenderJob,
        # backend/service/render_job.py) are short and read another job's folder: they keep none.
        if self.runs_dir is not None and isinstance(submit, (protocol.Submit, protocol.PointsJob)):
            job.folder = paths.job_folder(self.runs_dir, job.id)
            try:
                job.folder.mkdir(parents=True, exist_ok=False)
                checkpoint.save_submit(job.folder, submit)
                checkpoint.write_job_record(job.folder, id=job.id, state=JobState.QUEUED.value,
                                            created_wall=time.time(), name=submit.name[:256], owner=job.owner.hex())
            except OSError:
                shutil.rmtree(job.folder, ignore_errors=True)
                raise
            job.submit = None      # on disk now: read again when it runs, so waiting jobs hold no memory
        with self._cond:
            self._waiting.append(job)
            position = self._position(job)
            self._cond.notify_all()
        log.info("job %s queued at position %d (%s)", job.id, position,
                 f"{len(submit.images)} images" if hasattr(submit, "images") else submit.TYPE)
        return job, position

    def attach(self, job_id: str, client: bytes
               ) -> tuple[Job | None, JobState, int, list[protocol.Message], bytes | None]:
        """Send the job's future messages to ``client``; returns ``(job or None if it ended,
        state, position, stored results to resend, the connection it was sent to until now)``.
        Raises UnknownJob."""
        if not paths.is_job_id(job_id):
            raise UnknownJob(f"{job_id[:64]!r} is not a job id of this backend")
        with self._cond:
            job = next((j for j in self._waiting if j.id == job_id), None)
            if job is None:
                job = next((j for j in self._running.values() if j.id == job_id), None)
            position = self._position(job) if job is not None and job.state is JobState.QUEUED else 0
        if job is not None:
            with job.lock:
                before, job.client = job.client, client
                stored = self._stored(job.folder)
            log.info("job %s: client %s attached (%s)", job_id, client.hex(), job.state.value)
            return job, job.state, position, stored, before
        folder = None if self.runs_dir is None else paths.job_folder(self.runs_dir, job_id)
        if folder is None or job_id not in self._kept or not folder.is_dir():
            raise UnknownJob(self.unknown_text(job_id))
        state = JobState(checkpoint.read_job_record(folder).get("state", JobState.FAILED.value))
        log.info("job %s: client %s fetched its results (%s)", job_id, client.hex(), state.value)
        return None, state, 0, self._stored(folder), None

    def cancel(self, job_id: str) -> tuple[Job | None, bool]:
        """Ask a job to stop.  Returns ``(job or None if unknown, removed_from_queue)``.

        A waiting job is removed at once (the caller sends its Cancelled); a running one is
        flagged and the worker sends Cancelled when the runner stops; an ended one is left alone.
        """
        with self._cond:
            for job in self._waiting:
                if job.id == job_id:
                    self._waiting.remove(job)
                    self._end(job, JobState.CANCELLED, "cancelled while queued", protocol.Cancelled(job_id=job.id))
                    return job, True
            for job in self._running.values():
                if job.id == job_id:
                    job.cancel.set()
                    log.info("job %s: cancel requested", job_id)
                    return job, False
            return self._ended.get(job_id), False

    def cancel_client(self, client: bytes) -> list[Job]:
        """Cancel every job of one client (it went away).  Returns the jobs removed from the queue."""
        with self._cond:
            removed = [job for job in self._waiting if job.client == client]
            for job in removed:
                self._waiting.remove(job)
                self._end(job, JobState.CANCELLED, "cancelled: its client went away", protocol.Cancelled(job_id=job.id))
            for job in self._running.values():
                if job.client == client:
                    job.cancel.set()
        return removed

    def expire(self, now: float | None = None) -> list[str]:
        """Delete the folders of jobs that ended more than ``keep_seconds`` ago (or beyond
        ``max_kept``).  Returns their ids."""
        now = time.time() if now is None else now
        gone = []
        with self._cond:
            while self._kept:
                job_id, ended = next(iter(self._kept.items()))
                if now - ended <= self.keep_seconds and len(self._kept) <= self.max_kept:
                    break
                self._kept.popitem(last=False)
                gone.append(job_id)
            while self._models and now - next(iter(self._models.values()))[1] > self.keep_seconds:
                gone.append(self._models.popitem(last=False)[0])
        for job_id in gone:
            if self.runs_dir is not None:
                shutil.rmtree(paths.job_folder(self.runs_dir, job_id), ignore_errors=True)
            log.info("job %s: results expired, folder removed", job_id)
        return gone

    def stop(self) -> list[Job]:
        """Take no new jobs, fail the waiting ones and ask the running one to stop.

        Returns the failed waiting jobs (the caller tells their clients).  The running job ends
        with Failed through the outbox; :meth:`join` waits for it.  Persisted jobs stay
        unfinished in their folders: the next start resumes them.
        """
        with self._cond:
            self._stopping = True
            dropped = list(self._waiting)
            self._waiting.clear()
            for job in dropped:
                self._end(job, JobState.FAILED, "the backend was shut down before this job started", persist=False)
            for job in self._running.values():
                job.shutdown = True
                job.cancel.set()
            self._cond.notify_all()
        return dropped

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker threads to finish (after :meth:`stop`); True if they did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def busy(self) -> bool:
        """A job is running or waiting."""
        with self._cond:
            return bool(self._running) or bool(self._waiting)

    def running(self) -> Job | None:
        """A running job (the first worker's that has one), or None."""
        with self._cond:
            return next(iter(self._running.values()), None)

    def running_jobs(self) -> list[Job]:
        with self._cond:
            return list(self._running.values())

    def worker_states(self) -> str:
        """One line for Status: each worker's device and state, and how often it was restarted."""
        with self._cond:
            return ", ".join(f"{w.name} {w.device} {w.state}" + (f" (restarted {w.restarts}x)" if w.restarts else "")
                             for w in self.workers)

    def free_memory(self) -> None:
        """Ask every worker to empty its device's cache (each does when it is next idle)."""
        with self._cond:
            self._free_asked = {w.name for w in self.workers}
            self._cond.notify_all()

    def waiting(self) -> list[Job]:
        """The waiting jobs in the order they will run."""
        with self._cond:
            return self._fair_order()

    def clients_with_jobs(self) -> set[bytes]:
        with self._cond:
            clients = {job.client for job in self._waiting if job.client is not None}
            clients |= {job.client for job in self._running.values() if job.client is not None}
            return clients

    # ---- fairness (caller holds the lock) ---------------------------------------------------
    def _fair_order(self) -> list[Job]:
        """Round-robin by owner: the owner served least recently (never: first) goes next;
        each owner's jobs keep their order."""
        queues: dict[bytes, collections.deque[Job]] = {}
        for job in self._waiting:
            queues.setdefault(job.owner, collections.deque()).append(job)
        served = {owner: self._served.get(owner, -1) for owner in queues}
        arrival = {owner: i for i, owner in enumerate(queues)}
        order, turn = [], self._turn
        while queues:
            owner = min(queues, key=lambda o: (served[o], arrival[o]))
            order.append(queues[owner].popleft())
            served[owner], turn = turn, turn + 1
            if not queues[owner]:
                del queues[owner]
        return order

    def _next_for(self, worker) -> Job | None:
        """The first waiting job in fair order that ``worker`` can run (caller holds the lock)."""
        if not self._waiting:
            return None
        return next((job for job in self._fair_order() if worker.accepts(job.submit)), None)

    def add_worker(self, worker) -> None:
        """A worker that joined while serving (backend/service/worker_door.py: one on another host)."""
        thread = threading.Thread(target=self._work, args=(worker,), name=f"job-worker-{worker.name}", daemon=True)
        with self._cond:
            if self._stopping:
                return
            self.workers.append(worker)
            self._threads.append(thread)
        thread.start()

    def _position(self, job: Job) -> int:
        return self._fair_order().index(job) + (len(self._running) >= len(self.workers))

    # ---- the worker thread -----------------------------------------------------------------
    def _work(self, worker) -> None:
        backoff = 1.0
        while True:
            if not worker.ready():    # first, or its process died: (re)start it before it takes a job
                if worker.start():
                    backoff = 1.0
                elif worker.gone:   # a worker on another host that left: forget it
                    with self._cond:
                        self.workers.remove(worker)
                    worker.stop()
                    log.info("worker %s (%s) left", worker.name, worker.device)
                    return
                else:                 # e.g. its GPU is gone: try again later, take no job meanwhile
                    with self._cond:
                        worker.state = "down"
                        self._cond.wait_for(lambda: self._stopping, timeout=backoff)
                    backoff = min(60.0, 2 * backoff)
                    if not self._stopping:
                        continue
            with self._cond:
                worker.state = "idle"
                while not self._stopping and worker.name not in self._free_asked and self._next_for(worker) is None:
                    self._cond.wait(1.0 if worker.remote else None)   # (a remote one may leave)
                    if worker.remote and not worker.ready():
                        break
                if self._stopping:
                    worker.state = "stopped"
                    break
                job = None
                if worker.name in self._free_asked:   # FreeMemory (only asked with no job running or waiting)
                    self._free_asked.discard(worker.name)
                elif worker.ready():
                    job = self._next_for(worker)
                if job is not None:
                    self._waiting.remove(job)
                    self._served[job.owner], self._turn = self._turn, self._turn + 1
                    if len(self._served) > 4 * self.max_queue + 64:   # forget owners served long ago
                        for owner in sorted(self._served, key=self._served.get)[: len(self._served) // 2]:
                            del self._served[owner]
                    job.state, job.started = JobState.RUNNING, time.monotonic()
                    self._running[worker.name] = job
                    worker.state = "busy"
            if job is None:
                try:
                    if worker.ready():
                        worker.free_memory()
                except Exception:   # noqa: BLE001 - best effort
                    log.warning("%s could not free its memory", worker.name, exc_info=True)
                continue
            try:
                self._run(job, worker)
            except Exception:   # _run catches everything; this is a last line of defence
                log.exception("job %s: worker error", job.id)
            finally:
                with self._cond:
                    self._running.pop(worker.name, None)
        worker.stop()

    def _run(self, job: Job, worker) -> None:
        log.info("job %s: running on %s (%s)", job.id, worker.name, worker.device)
        ctx = JobContext(job, self._outbox, worker.device, self._progress_interval, self.checkpoint_interval)
        oom = False
        try:
            if job.folder is not None:
                checkpoint.write_job_record(job.folder, state=JobState.RUNNING.value)
                if job.submit is None:   # restored after a restart
                    job.submit = checkpoint.load_submit(job.folder)
            summary = dict(worker.run(job.submit, ctx))
            summary.setdefault("seconds", time.monotonic() - job.started)
            summary.setdefault("device", worker.device)
            end: protocol.Message = protocol.Done(job_id=job.id, summary=clean_summary(summary)).validate()
            state, text = JobState.DONE, "done"
        except Exception as exc:  # noqa: BLE001 - every failure must reach the client
            if job.shutdown:
                text = ("the backend was shut down while this job was running; it resumes from its last "
                        f"checkpoint when the backend starts again (reattach to job {job.id})"
                        if job.folder is not None else "the backend was shut down while this job was running")
                end, state = protocol.Failed(job_id=job.id, message=text, code="shutdown"), JobState.FAILED
            elif isinstance(exc, JobCancelled) or job.cancel.is_set():
                end, state, text = protocol.Cancelled(job_id=job.id), JobState.CANCELLED, "cancelled"
            elif isinstance(exc, WorkerDied) and job.worker_deaths + 1 < MAX_WORKER_DEATHS:
                self._queue_again(job, ctx, worker, exc)
                return
            elif isinstance(exc, WorkerDied):
                text = (f"the worker process running this job died {job.worker_deaths + 1} times ({exc}); the job "
                        "stops here (it may need more memory than the worker has: try a lower preset)")
                log.error("job %s failed: %s", job.id, text)
                end, state = protocol.Failed(job_id=job.id, message=text[:protocol.MAX_STRING], code="worker_died"), \
                    JobState.FAILED
            elif isinstance(exc, WorkerJobFailed):
                text = exc.failed.message   # the worker process freed its own memory
                log.error("job %s failed on %s: %s", job.id, worker.name, text)
                end, state = dataclasses.replace(exc.failed, job_id=job.id), JobState.FAILED
            else:
                oom = is_out_of_memory(exc)
                text = describe_failure(exc)
                log.error("job %s failed: %s", job.id, text, exc_info=exc)
                end, state = failed_message(job.id, exc, text), JobState.FAILED
            exc.__traceback__ = None   # let go of the frames (and the tensors they hold) now
        ctx = None
        with self._cond:
            client = self._end(job, state, text, end, persist=not job.shutdown)   # also lets the job's images go
        if oom:
            free_gpu_memory()
        if client is not None:
            self._outbox.put(client, end, final=True)

    def _queue_again(self, job: Job, ctx: JobContext, worker, exc: Exception) -> None:
        """A worker died under ``job``: first in line again (its owner loses no turn); partial
        results go (they are made again); it resumes from its last checkpoint."""
        job.worker_deaths += 1
        ctx.note(f"the worker {worker.name} on {worker.device} stopped ({exc}); this job runs again from its last checkpoint")
        log.warning("job %s: worker %s died (%s); queued again", job.id, worker.name, exc)
        with job.lock:
            if job.folder is not None:
                shutil.rmtree(job.folder / checkpoint.RESULTS_DIR, ignore_errors=True)
                job.stored = 0
        with self._cond:
            job.state, job.started = JobState.QUEUED, None
            self._waiting.insert(0, job)
            self._served.pop(job.owner, None)
            self._cond.notify_all()

    def _end(self, job: Job, state: JobState, text: str, end: protocol.Message | None = None,
             persist: bool = True) -> bytes | None:
        """Record how a job ended (caller holds the lock); returns who its end message goes to.

        ``persist``: also store the end message and state in the job's folder (not on shutdown,
        so that the next start resumes the job)."""
        job.state, job.ended, job.summary, job.submit = state, time.monotonic(), text, None
        self._ended[job.id] = job
        while len(self._ended) > self._history:
            self._ended.popitem(last=False)
        log.info("job %s: %s", job.id, text)
        if not persist or job.folder is None or end is None:
            return job.client
        client = job.deliver(end)
        try:
            checkpoint.write_job_record(job.folder, state=state.value, ended_wall=time.time(), message=text[:4000])
            checkpoint.remove_checkpoint(job.folder)
            checkpoint.remove_submit(job.folder)   # only needed to resume; the images can be large
            self._kept[job.id] = time.time()
        except OSError as exc:
            log.error("job %s: could not record its end: %s", job.id, exc)
        return client

    def _stored(self, folder: Path | None) -> list[protocol.Message]:
        if folder is None:
            return []
        try:
            return checkpoint.stored_messages(folder)
        except checkpoint.CheckpointError as exc:
            log.error("%s", exc)
            raise UnknownJob(f"the results of this job cannot be read: {exc}") from exc


def is_out_of_memory(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch else None
    return (oom_type is not None and isinstance(exc, oom_type)) or "CUDA out of memory" in str(exc)


def free_gpu_memory() -> None:
    """After a GPU out-of-memory failure: drop the failed job's tensors and empty torch's cache."""
    gc.collect()
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:500]


def failed_message(job_id: str, exc: BaseException, text: str) -> protocol.Failed:
    """The Failed of a job that raised ``exc`` (``text``: :func:`describe_failure`): a GPU out of
    memory carries code "out_of_memory" and, as ``detail``, the error's own words without the
    advice, so that a client can give its own (shared/protocol.py Failed); an exception with a
    ``code`` (render_job.py RenderJobError: "unknown_job") passes it on."""
    if is_out_of_memory(exc):
        return protocol.Failed(job_id=job_id, message=text, code="out_of_memory",
                               detail=_first_line(exc) or "GPU out of memory")
    code = getattr(exc, "code", "")
    return protocol.Failed(job_id=job_id, message=text, code=code[:64] if isinstance(code, str) else "")


def describe_failure(exc: BaseException) -> str:
    """A clear, one-paragraph text for the user (fits in Failed.message)."""
    first = _first_line(exc)
    if is_out_of_memory(exc):
        return ("GPU out of memory: lower the preset (e.g. 'draft'), send fewer or smaller images, "
                f"or close other programs using the GPU. The backend is ready for the next job. ({first})")
    if isinstance(exc, MemoryError):
        return "out of memory (RAM): lower the preset, or send fewer or smaller images."
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text[: protocol.MAX_STRING]


NOBODY = b"\0"      # an owner key no client has (server.py keys start with "t:" or "i:")
MAX_MODELS_PER_OWNER = 16   # models given back (StoreModel) one client may have kept at once
MAX_MODELS = 256            # ... all clients together


def _owner_bytes(value: Any) -> bytes:
    """A job record's "owner" (hex) as bytes: b"" when the record has none (an older backend's:
    anybody may use the job), NOBODY when it is not hex."""
    if value is None:
        return b""
    try:
        return bytes.fromhex(value) if isinstance(value, str) else NOBODY
    except ValueError:
        return NOBODY


def _salvage(folder: Path, problem: Exception) -> dict:
    """A job folder whose job.json cannot be read: nothing in it is lost or left forever.  Its
    Submit intact: the job is queued again; a fitted model: kept as a finished job; anything else:
    an ended job, so the folder expires like one.  A new job.json says which."""
    now, when = time.time(), folder.stat().st_mtime
    try:
        checkpoint.load_submit(folder)
        record = {"state": JobState.QUEUED.value, "created_wall": when}
        how = "its Submit is intact: queued again"
    except (checkpoint.CheckpointError, OSError):
        done = (folder / "run.json").is_file() and (folder / "model.pt").is_file()   # fitting/runs.py is_run
        record = {"state": (JobState.DONE if done else JobState.FAILED).value, "created_wall": when,
                  "ended_wall": now, "message": "job.json was damaged" + ("" if done else "; the job is lost")}
        how = "its fitted model is kept" if done else "nothing to resume: it ends and expires like any ended job"
    log.warning("%s: %s; %s (nobody may reattach: its owner is not known)", folder, problem, how)
    record.update(format=checkpoint.FORMAT, id=folder.name, owner=NOBODY.hex())
    try:
        checkpoint.atomic_write_bytes(folder / checkpoint.JOB_FILE, json.dumps(record).encode())
    except OSError as exc:
        log.error("%s: could not rewrite job.json: %s", folder, exc)
    return record


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


def _nbytes(message: protocol.Message | None) -> int:
    """Bytes of every array a job's message carries (images, passes, cameras, ...)."""
    if message is None:
        return 0
    return sum(int(v.nbytes) for v in vars(message).values() if isinstance(v, np.ndarray))


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
