"""``fit-implicit serve``: the ZeroMQ ROUTER loop that answers clients and runs jobs.

Only the main thread touches the socket.  Each turn of the loop polls the socket for a few
milliseconds, answers every message that arrived (Ping is always answered at once, even while a
job trains in the worker thread), then sends what the worker left in the outbox.  Every message
is handled inside its own try/except: a bad or hostile message gets an Error reply and is
logged; the server never stops serving because of one.

Security: anyone who can reach the socket can make this machine run jobs and allocate memory.
Loopback (and ipc://) addresses are served without encryption.  Any other address requires
CurveZMQ (see :mod:`backend.service.security`): the server's key pair is generated on first run, and
only clients whose public key is in the allow-list ``authorized_keys`` are admitted (a ZAP
handler checks every connection; refusals are logged).  Without a non-empty allow-list the
backend refuses to start on such an address.  ``--curve`` turns CurveZMQ on for loopback too.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import ipaddress
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zmq

from fit_implicit.shared import protocol, wire

from fit_implicit.backend import __version__
from fit_implicit.backend.service import paths, security, options as serve_options
from fit_implicit.backend.service.connections import Connections, connection_limit, raise_fd_limit
from fit_implicit.backend.service.intake import LARGE_BYTES, Intake, call_handler
from fit_implicit.backend.service.jobs import JobQueue, JobRunner, QueueFull, ShuttingDown, UnknownJob
from fit_implicit.backend.service.outbox import Outbox
from fit_implicit.backend.service.worker_door import WorkerDoor
from fit_implicit.backend.service.workers import WorkerProcess, runner_name, worker_devices
from fit_implicit.backend.service.options import DEFAULT_BIND, add_arguments

__all__ = ["Server", "ServerConfig", "ConfigError", "main", "cli", "add_arguments", "check_bind_address"]

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = serve_options.DEFAULT_MAX_MESSAGE_MB << 20
PREVIEW_CREDIT = 4      # previews a client may get per message it sends (it pings every second)
MAX_BACKLOG = 1000      # messages waiting for one client's full pipe before heartbeats/progress are dropped


class ConfigError(ValueError):
    """The server cannot start with these settings; the text says why and what to do."""


@dataclass
class ServerConfig:
    bind: str = DEFAULT_BIND
    device: str = "cpu"                       # resolved: "cpu", "cuda" or "cuda:N"
    max_queue: int = serve_options.DEFAULT_MAX_QUEUE        # jobs waiting behind the running one
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    curve: security.CurveSetup | None = None  # CurveZMQ keys and allow-list (non-loopback or --curve)
    client_timeout: float = serve_options.DEFAULT_CLIENT_TIMEOUT  # cancel jobs of a client silent this long (0: never)
    shutdown_grace: float = 5.0               # seconds to let a running job stop on shutdown
    hwm: int = 100                            # messages queued in ZeroMQ per peer and direction
    poll_ms: int = 10                         # longest wait before the outbox is drained (job running)
    idle_poll_ms: int = 200                   # the same with no job running (fewer wake-ups)
    max_queued_bytes: int = 8 << 30           # array bytes all waiting jobs may hold together
    runs_dir: str | None = None               # job folders (C3); None: nothing persisted (in-process tests)
    checkpoint_interval: float = serve_options.DEFAULT_CHECKPOINT_SECONDS   # 0: no training checkpoints
    keep_seconds: float = serve_options.DEFAULT_KEEP_HOURS * 3600.0        # ended jobs' results kept this long
    warm_up: bool = False                     # a tiny fit on the worker before the first job (CUDA only)
    stall_seconds: float = serve_options.DEFAULT_STALL_SECONDS   # an unfinished message silent this long: dropped
    max_clients: int = 0                      # connections served at once (0: as the open-file limit allows)
    workers: list[str] = dataclasses.field(default_factory=list)   # a worker process on each (--gpus/--workers); []: in-process
    worker_bind: str | None = None            # workers on other hosts join here (worker_door.py); None: none
    worker_curve: security.CurveSetup | None = None   # the door's CurveZMQ (non-loopback or --curve)
    worker_timeout: float = serve_options.DEFAULT_WORKER_TIMEOUT


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Check the settings and resolve the device.  Raises ConfigError with a clear text.

    Reads ``bind``, ``device`` and ``max_queue``; the other options are optional attributes.
    """
    address = getattr(args, "bind", None) or DEFAULT_BIND
    want_curve = bool(getattr(args, "curve", False)) or not is_local_address(address)
    curve = None
    if want_curve:
        try:
            curve = security.setup_server_curve(getattr(args, "keys_dir", None))
        except (security.KeyError_, OSError) as exc:
            raise ConfigError(f"refusing to listen on {address} without CurveZMQ: {exc}") from exc
    bind = check_bind_address(address, curve=curve is not None)
    max_queue = getattr(args, "max_queue", None)
    max_queue = serve_options.DEFAULT_MAX_QUEUE if max_queue is None else int(max_queue)
    if max_queue < 1:
        raise ConfigError(f"--max-queue must be at least 1, got {max_queue}")
    mb = getattr(args, "max_message_mb", None)
    max_bytes = DEFAULT_MAX_MESSAGE_BYTES if mb is None else int(mb) << 20
    if max_bytes < 1 << 20:
        raise ConfigError("--max-message-mb must be at least 1")
    timeout = getattr(args, "client_timeout", None)
    runs_dir = getattr(args, "runs_dir", None) or str(paths.default_runs_dir())
    every = getattr(args, "checkpoint_seconds", None)
    keep = getattr(args, "keep_hours", None)
    if (every is not None and every < 0) or (keep is not None and keep < 0):
        raise ConfigError("--checkpoint-seconds and --keep-hours must not be negative")
    try:
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot use {runs_dir} for job folders ({exc.strerror}); pick another with --runs-dir") from exc
    door, door_curve = getattr(args, "worker_bind", None), None
    if door:
        if bool(getattr(args, "curve", False)) or not is_local_address(door):
            try:
                door_curve = security.setup_server_curve(getattr(args, "keys_dir", None), workers=True)
            except (security.KeyError_, OSError) as exc:
                raise ConfigError(f"refusing to let workers join at {door} without CurveZMQ: {exc}") from exc
        door = check_bind_address(door, curve=door_curve is not None)
    device = resolve_device(getattr(args, "device", None))
    gpus, count = getattr(args, "gpus", None), int(getattr(args, "workers", None) or 0)
    try:
        gpu_count = 0
        if gpus is not None:
            import torch
            gpu_count = torch.cuda.device_count()
        workers = worker_devices(gpus, count, device, gpu_count)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    # With workers, "device" names their devices once each (Welcome and Status: "cuda:0, cuda:1").
    return ServerConfig(bind=bind, device=", ".join(dict.fromkeys(workers)) if workers else device,
                        max_queue=max_queue, workers=workers,
                        worker_bind=door, worker_curve=door_curve,
                        worker_timeout=float(getattr(args, "worker_timeout", None) or serve_options.DEFAULT_WORKER_TIMEOUT),
                        max_message_bytes=max_bytes, curve=curve,
                        client_timeout=serve_options.DEFAULT_CLIENT_TIMEOUT if timeout is None
                        else max(0.0, float(timeout)), runs_dir=runs_dir,
                        checkpoint_interval=serve_options.DEFAULT_CHECKPOINT_SECONDS if every is None else float(every),
                        keep_seconds=3600.0 * (serve_options.DEFAULT_KEEP_HOURS if keep is None else float(keep)),
                        warm_up=bool(getattr(args, "warm_up", True)),
                        stall_seconds=float(getattr(args, "stall_seconds", None) or serve_options.DEFAULT_STALL_SECONDS),
                        max_clients=max(0, int(getattr(args, "max_clients", None) or 0)))


def check_bind_address(address: str, curve: bool = False) -> str:
    """Validate a ZeroMQ bind address; returns it with port 0 written as ``*`` (a free port).

    Only ``tcp://`` on a loopback host and ``ipc://`` are allowed unless ``curve`` (CurveZMQ set up).
    """
    if address.startswith(("ipc://", "inproc://")):
        return address
    if not address.startswith("tcp://"):
        raise ConfigError(f"cannot listen on {address!r}: use tcp://127.0.0.1:PORT (or ipc://PATH)")
    host, sep, port = address[len("tcp://"):].rpartition(":")
    if not sep or not host or not (port == "*" or (port.isdigit() and int(port) <= 65535)):
        raise ConfigError(f"cannot listen on {address!r}: expected tcp://HOST:PORT with PORT in 0..65535")
    if not curve and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {address} without CurveZMQ: only loopback addresses (127.0.0.1, ::1, "
            "localhost) are served unencrypted. To accept other machines, list their public keys in "
            f"authorized_keys in the keys folder (--keys-dir, ${security.KEYS_DIR_ENV}, default "
            "~/.config/fit_implicit/); the server's key pair is generated there on first run."
        )
    return f"tcp://{host}:*" if port in ("0", "*") else address


def is_local_address(address: str) -> bool:
    """ipc://, inproc:// and tcp:// on a loopback host (anything else needs CurveZMQ)."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    host, sep, _ = address.removeprefix("tcp://").rpartition(":")
    return address.startswith("tcp://") and bool(sep) and is_loopback(host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False   # '*', interface names, other host names


def resolve_device(requested: str | None) -> str:
    """None -> "cuda" if available, else "mps" (Apple silicon) if available, else "cpu"; "cpu";
    "cuda" or "cuda:N" if available; "mps" if available."""
    requested = (requested or "").strip().lower() or None
    if requested == "cpu":
        return "cpu"
    if requested is not None and not re.fullmatch(r"cuda(:\d+)?|mps", requested):
        raise ConfigError(f"--device {requested!r} is not one of cpu, cuda, cuda:N, mps")
    import torch  # only when we must look for a GPU

    from fit_implicit.backend.fitting.model import mps_available
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu"
    if requested == "mps":
        if not mps_available():
            raise ConfigError("--device mps was asked for, but PyTorch sees no Apple GPU (macOS 12.3+ on Apple "
                              "silicon); use --device cpu")
        return "mps"
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {requested} was asked for, but CUDA is not available to torch "
                          f"{torch.__version__} on this machine; use --device cpu")
    index = int(requested.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return requested


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------
class Server:
    """A ROUTER socket, a job queue with its worker, and the loop between them.

    Usage: ``endpoint = server.bind()``, then ``server.serve(stop_event)`` (returns after
    ``stop_event`` is set and running jobs were stopped), in the thread that called bind().
    """

    def __init__(self, config: ServerConfig, runner: JobRunner | None = None,
                 context: zmq.Context | None = None):
        warm_up, workers = None, None
        self._own_context = context is None
        self._context = context or zmq.Context()
        if config.workers:   # a process each, running the runner by name (workers.py)
            cpu = [d for d in config.workers if not d.startswith("cuda")]
            threads = max(1, (os.cpu_count() or 1) // len(cpu)) if len(cpu) > 1 else 0
            workers = [WorkerProcess(f"w{i}", device, runner=runner_name(runner), runs_dir=config.runs_dir,
                                     warm_up=config.warm_up, threads=threads if device in cpu else 0, context=self._context)
                       for i, device in enumerate(config.workers)]
        else:
            if runner is None:
                from fit_implicit.backend.service.fit_job import run_fit_job
                runner = run_fit_job
                if config.warm_up and config.device.startswith("cuda"):
                    from fit_implicit.backend.service.warmup import warm_up as _warm_up
                    warm_up = lambda: _warm_up(config.device)   # noqa: E731
            # RenderJob -> renders of a saved model; the rest -> runner
            from fit_implicit.backend.service.render_job import with_render_jobs
            runner = with_render_jobs(runner, lambda: config.runs_dir)
        self.config = config
        self.limits = dataclasses.replace(
            wire.DEFAULT_LIMITS,
            max_total_bytes=config.max_message_bytes,
            max_array_bytes=min(wire.DEFAULT_LIMITS.max_array_bytes, config.max_message_bytes),
        )
        self.outbox = Outbox()
        self.connections = Connections(config.max_message_bytes, stall_seconds=config.stall_seconds)
        # Submit and StoreModel only touch the job queue (its own lock): large ones run on the intake thread.
        self.intake = Intake(self.outbox, self.limits, {protocol.Submit: self._on_submit,
                                                        protocol.PointsJob: self._on_submit,
                                                        protocol.StoreModel: self._on_store_model},
                             max_bytes=2 * config.max_message_bytes)
        self.jobs = JobQueue(runner, self.outbox, device=config.device, max_queue=config.max_queue,
                             max_queued_bytes=config.max_queued_bytes, runs_dir=config.runs_dir,
                             checkpoint_interval=config.checkpoint_interval, keep_seconds=config.keep_seconds,
                             warm_up=warm_up, workers=workers)
        self._socket: zmq.Socket | None = None
        self.door: WorkerDoor | None = None       # workers on other hosts (--worker-bind)
        self._monitor: zmq.Socket | None = None
        self._auth = None
        self.endpoint = ""
        self._last_seen: dict[bytes, float] = {}
        self._owner_keys: dict[bytes, bytes] = {}          # connection -> owner key (from its Hello's token)
        self._keys_of: dict[bytes, str] = {}                # connection -> its CurveZMQ public key (Z85)
        self._preview_credit: dict[bytes, int] = {}          # previews a client may still get (flow control)
        self._backlog: dict[bytes, collections.deque] = {}   # messages waiting for a full pipe, per client
        self.previews_held_back = 0
        self._handlers: dict[type, Callable[[bytes, Any], protocol.Message | None]] = {
            protocol.Hello: self._on_hello,
            protocol.Ping: self._on_ping,
            protocol.Submit: self._on_submit,
            protocol.PointsJob: self._on_submit,
            protocol.Cancel: self._on_cancel,
            protocol.Status: self._on_status,
            protocol.Attach: self._on_attach,
            protocol.FreeMemory: self._on_free_memory,
            protocol.RenderJob: self._on_render_job,
            protocol.MeshJob: self._on_render_job,
            protocol.FetchModel: self._on_fetch_model,
            protocol.StoreModel: self._on_store_model,
        }

    def bind(self) -> str:
        """Create and bind the socket; returns the real endpoint (with the chosen port)."""
        sock = self._context.socket(zmq.ROUTER)
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED   # connections.py
        if self.config.curve is not None or self.config.worker_curve is not None:
            self._auth = security.start_authenticator(self._context, self.config.curve, self.config.worker_curve)
        if self.config.curve is not None:
            security.make_curve_server(sock, self.config.curve)
            events |= zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL \
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        self._monitor = sock.get_monitor_socket(events)
        self.connections.max_connections = connection_limit(self.config.max_clients, raise_fd_limit())
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, self.config.hwm)
        sock.setsockopt(zmq.RCVHWM, self.config.hwm)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # unknown peer -> EHOSTUNREACH, not a silent drop
        if "[" in self.config.bind or self.config.bind.count(":") > 2:
            sock.setsockopt(zmq.IPV6, 1)
        try:
            sock.bind(self.config.bind)
        except zmq.ZMQError:
            self._stop_security(sock)
            sock.close(linger=0)
            raise
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.worker_bind:
            self.door = WorkerDoor(self.jobs, self._context, self.config.worker_bind, self.config.worker_curve,
                                   self.config.worker_timeout, self.config.max_message_bytes)
            try:
                self.door.bind()
            except zmq.ZMQError:
                self.door = None
                self._stop_security(sock)
                sock.close(linger=0)
                self._socket = None
                raise
        self.jobs.restore()   # unfinished jobs of an earlier run resume; ended ones can be fetched
        self.jobs.expire()
        self.jobs.start()
        if self.door is not None:
            self.door.start()
        return self.endpoint

    def serve(self, stop: threading.Event) -> None:
        if self._socket is None:
            raise RuntimeError("call bind() before serve()")
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
        next_check = time.monotonic() + 1.0
        try:
            while not stop.is_set():
                try:
                    self._turn(poller)
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + 1.0
                        self._drop_silent_clients()
                        self.jobs.expire()
                except zmq.ContextTerminated:
                    return
                except Exception:   # noqa: BLE001 - log, keep serving
                    log.exception("error in the server loop")
                    time.sleep(0.05)
            self._shut_down(poller, stop)
        finally:
            self.close()

    def close(self) -> None:
        self.intake.stop()
        if self.door is not None:
            self.door.stop()
            self.door = None
        if self._socket is not None:
            self._stop_security(self._socket)
            self._socket.close()
            self._socket = None
        if self._own_context:   # a worker thread stuck in a job past the grace still holds a socket: close it too
            self._context.term() if self.jobs.join(timeout=0) else self._context.destroy(linger=0)

    def _stop_security(self, sock: zmq.Socket) -> None:
        if self._monitor is not None:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def _read_monitor(self) -> None:
        """Connections opened and closed (connections.py); CurveZMQ handshakes that failed (no
        CURVE, wrong server key, key not allowed) are logged."""
        from zmq.utils.monitor import recv_monitor_message

        for _ in range(10000):
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                self.connections.accepted(int(event["value"]))
                continue
            if event["event"] in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self.connections.closed(int(event["value"]))
                continue
            reason = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "authentication failed (key not allowed)",
                      zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "not a CurveZMQ client or protocol error",
                      }.get(event["event"], "handshake failed")
            addr = event.get("endpoint", b"")
            log.warning("refused a connection on %s: %s (code %s)",
                        addr.decode(errors="replace") if isinstance(addr, bytes) else addr, reason, event["value"])

    # ---- one turn of the loop ----------------------------------------------------------------
    def _turn(self, poller: zmq.Poller) -> None:
        busy = self.jobs.busy() or self.outbox.pending() or self.intake.busy() or self.connections.busy()
        if poller.poll(self.config.poll_ms if busy else self.config.idle_poll_ms):
            if self._monitor is not None:   # connections first: a new one's first message must find it counted
                self._read_monitor()
            for _ in range(100):   # then let the outbox have its turn
                try:
                    frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._handle(frames)
        if self._monitor is not None:      # its events wake the poll too
            self._read_monitor()
        self.connections.check()
        for identity, message in self.intake.handed_back():
            self._reply(identity, message)
        self._flush_backlogs()
        for identity, message in self.outbox.drain():
            self._send(identity, message)

    def _handle(self, frames: list) -> None:
        identity = frames[0].bytes
        self._last_seen[identity] = time.monotonic()
        self._preview_credit[identity] = PREVIEW_CREDIT
        body = frames[1:]
        if self.config.curve is not None and identity not in self._keys_of:
            self._keys_of[identity] = _user_id(frames[-1])      # the client's CurveZMQ public key (ZAP User-Id)
        nbytes = sum(len(f) for f in body)
        fd = _source_fd(frames[0])
        if fd >= 0 and self._monitor is not None and not self.connections.knows(fd):
            self._read_monitor()    # accepted since the turn began: its event is on the monitor socket by now
        if not self.connections.received(fd, identity, nbytes, len(body)):
            self._send(identity, protocol.Error(code="too_many_clients", in_reply_to=protocol.peek_type(body),
                                                message=self.connections.refusal_text()))
            return
        if nbytes > LARGE_BYTES:     # checked and stored on the intake thread (intake.py)
            if not self.intake.offer(identity, body, nbytes):
                self._send(identity, protocol.Error(
                    code="busy", in_reply_to=protocol.peek_type(body),
                    message="the backend is still storing other uploads; send this again in a few seconds"))
            return
        try:
            message = protocol.decode_message(body, self.limits)
        except Exception as exc:   # noqa: BLE001 - WireError/ProtocolError, or anything unforeseen
            log.info("rejected a message from %s: %s", identity.hex(), exc)
            self._send(identity, protocol.error_for(exc, body))
            return
        self._reply(identity, message)

    def _reply(self, identity: bytes, message: protocol.Message) -> None:
        handler = self._handlers.get(type(message))
        if handler is None:
            reply = protocol.Error(code="unexpected_message", in_reply_to=message.TYPE,
                                   message=f"the backend does not accept {message.TYPE!r} messages")
        else:
            reply = call_handler(handler, identity, message)
        if reply is not None:
            self._send(identity, reply)

    def _send(self, identity: bytes, message: protocol.Message) -> bool:
        """Send without blocking.  Flow control: a client gets at most PREVIEW_CREDIT previews
        per message it sends (its heartbeat), so previews never pile up for a client that stopped
        reading; other messages that meet a full pipe (SNDHWM) wait in its backlog, in order."""
        preview = isinstance(message, protocol.Preview)
        if preview:
            if self._preview_credit.get(identity, 0) <= 0:
                self.previews_held_back += 1
                return False
            self._preview_credit[identity] -= 1
        elif identity in self._backlog:   # keep the order: behind what already waits
            self._hold(identity, message)
            return False
        try:
            frames = message.to_frames()
            self._socket.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            if not preview:
                self._hold(identity, message)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                log.info("client %s is gone; %s dropped", identity.hex(), message.TYPE)
                self._backlog.pop(identity, None)
            else:
                log.error("could not send %s to %s: %s", message.TYPE, identity.hex(), exc)
        except Exception:   # noqa: BLE001 - e.g. an unencodable message: log, keep serving
            log.exception("could not send %s to %s", message.TYPE, identity.hex())
        return False

    def _hold(self, identity: bytes, message: protocol.Message) -> None:
        """Queue a message for a client whose pipe is full.  Bounded: a newer Progress of the same
        job replaces the waiting one, heartbeats and errors are dropped once MAX_BACKLOG wait;
        results and job ends (a bounded number per job; also kept in the job's folder) wait."""
        backlog = self._backlog.setdefault(identity, collections.deque())
        if backlog and isinstance(message, protocol.Progress) and isinstance(backlog[-1], protocol.Progress) \
                and backlog[-1].job_id == message.job_id:
            backlog[-1] = message
            return
        if len(backlog) >= MAX_BACKLOG and isinstance(message, (protocol.Pong, protocol.Progress, protocol.Error,
                                                                protocol.StatusReply, protocol.Ack)):
            log.warning("client %s is not reading; %s dropped", identity.hex(), message.TYPE)
            return
        if not backlog:
            log.warning("client %s is not reading (its queue is full); messages wait", identity.hex())
        backlog.append(message)

    def _flush_backlogs(self) -> None:
        for identity in list(self._backlog):
            backlog = self._backlog[identity]
            while backlog:
                try:
                    self._socket.send_multipart([identity, *backlog[0].to_frames()], flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    log.info("client %s: %d waiting messages dropped (%s)", identity.hex(), len(backlog), exc)
                    backlog.clear()
                    break
                backlog.popleft()
            if not backlog:
                del self._backlog[identity]

    # ---- handlers: (identity, message) -> reply or None ------------------------------------
    def _owner(self, identity: bytes) -> bytes:
        """The owner key of a connection: from its Hello's token (the same for every connection
        that says it, and with CurveZMQ the same key pair), else its CurveZMQ key, else the
        connection itself."""
        owner = self._owner_keys.get(identity)
        if owner:
            return owner
        key = self._keys_of.get(identity)
        return b"k:" + hashlib.sha256(key.encode()).digest() if key else b"i:" + identity

    def _foreign(self, identity: bytes, job_id: str) -> bool:
        """True when ``job_id`` is a job of this backend that this connection does not own; its
        requests are answered as for a job that does not exist (the id is not confirmed)."""
        owner = self.jobs.owner_of(job_id)
        return owner is not None and owner != b"" and owner != self._owner(identity)

    def _no_job(self, msg: protocol.Message, job_id: str) -> protocol.Error:
        """The answer to a request on a job this connection may not see: word for word what a job
        that does not exist gets (attach/cancel: jobs.py unknown_text; models: render_job.py)."""
        from fit_implicit.backend.service.render_job import no_model_text

        text = no_model_text(job_id) if isinstance(msg, (protocol.RenderJob, protocol.MeshJob, protocol.FetchModel)) \
            else self.jobs.unknown_text(job_id)
        return protocol.Error(code="unknown_job", in_reply_to=msg.TYPE, message=text)

    def _on_hello(self, identity: bytes, msg: protocol.Hello) -> protocol.Message:
        log.info("hello from %s (%s)", identity.hex(), msg.client or "unnamed client")
        if msg.token:     # with CurveZMQ the token counts only with the same key: a stolen token alone is not enough
            key = self._keys_of.get(identity, "")
            self._owner_keys[identity] = b"t:" + hashlib.sha256(f"{key}\n{msg.token}".encode()).digest()
        return protocol.Welcome(protocol=protocol.PROTOCOL_VERSION, server=f"fit-implicit backend {__version__}",
                                device=self.config.device, methods=",".join(protocol.METHODS))

    def _mine_running(self, identity: bytes) -> tuple[bool, str]:
        """(a job is running or waiting: "busy", the ids of this client's running jobs, comma-separated).
        A job accepted but not yet taken by a worker counts: the moment between the two once read
        "idle" to a client that had just been told Accepted (tests/backend/service/test_server.py)."""
        running, me = self.jobs.running_jobs(), self._owner(identity)
        return self.jobs.busy(), ",".join(job.id for job in running if job.owner == me)[:protocol.MAX_NAME]

    def _on_ping(self, identity: bytes, msg: protocol.Ping) -> protocol.Message:
        busy, mine = self._mine_running(identity)
        return protocol.Pong(seq=msg.seq, state="busy" if busy else "idle", running_job=mine,
                             queued=len(self.jobs.waiting()))

    def _on_submit(self, identity: bytes, msg: protocol.Submit) -> protocol.Message:
        try:
            job, position = self.jobs.submit(identity, msg, owner=self._owner(identity))
        except QueueFull as exc:
            return protocol.Error(code="queue_full", message=str(exc), in_reply_to=msg.TYPE)
        except ShuttingDown as exc:
            return protocol.Error(code="shutting_down", message=str(exc), in_reply_to=msg.TYPE)
        except OSError as exc:
            log.error("could not store a job in %s: %s", self.config.runs_dir, exc)
            return protocol.Error(code="storage", in_reply_to=msg.TYPE,
                                  message=f"the backend could not store the job ({exc.strerror or exc}); "
                                          "free disk space or pick another --runs-dir")
        return protocol.Accepted(job_id=job.id, position=position)

    def _on_render_job(self, identity: bytes, msg: protocol.RenderJob | protocol.MeshJob) -> protocol.Message:
        """Queue renders (RenderJob) or a new mesh (MeshJob) of a fit job's saved model
        (backend/service/render_job.py); the model itself is looked for when the job runs, so these
        may be queued behind the fit that makes it."""
        if self.config.runs_dir is None:
            return protocol.Error(code="no_models", in_reply_to=msg.TYPE,
                                  message="this backend keeps no job folders, so it has no fitted models to render")
        if not paths.is_job_id(msg.fit_job_id):
            return protocol.Error(code="unknown_job", in_reply_to=msg.TYPE,
                                  message=f"{msg.fit_job_id[:64]!r} is not a job id")
        if self._foreign(identity, msg.fit_job_id) or self.jobs.owner_of(msg.fit_job_id) is None:
            return self._no_job(msg, msg.fit_job_id)     # neither queued, running nor kept here
        return self._on_submit(identity, msg)

    def _on_fetch_model(self, identity: bytes, msg: protocol.FetchModel) -> protocol.Message:
        """Send a fit job's saved model (run.json and model.pt as they are on disk)."""
        from fit_implicit.backend.fitting.runs import read_run_files
        from fit_implicit.backend.service.render_job import RenderJobError, model_folder

        if self._foreign(identity, msg.fit_job_id):
            return self._no_job(msg, msg.fit_job_id)
        try:
            run_json, weights = read_run_files(model_folder(self.config.runs_dir, msg.fit_job_id))
        except (RenderJobError, ValueError, OSError) as exc:
            return protocol.Error(code="unknown_job", in_reply_to=msg.TYPE, message=str(exc))
        return protocol.ModelFile(fit_job_id=msg.fit_job_id, run_json=np.frombuffer(run_json, np.uint8),
                                  weights=np.frombuffer(weights, np.uint8))

    def _on_store_model(self, identity: bytes, msg: protocol.StoreModel) -> protocol.Message:
        """Keep a model a client gives back; its new id serves RenderJob and MeshJob."""
        try:
            job_id = self.jobs.store_model(msg.run_json.tobytes(), msg.weights.tobytes(), msg.name,
                                           owner=self._owner(identity))
        except ValueError as exc:
            return protocol.Error(code="bad_model", in_reply_to=msg.TYPE, message=str(exc))
        except OSError as exc:
            return protocol.Error(code="storage", in_reply_to=msg.TYPE,
                                  message=f"the backend could not store the model ({exc.strerror or exc})")
        return protocol.Ack(request="store_model", job_id=job_id)

    def _on_attach(self, identity: bytes, msg: protocol.Attach) -> protocol.Message | None:
        """Point the job's messages at this client and resend what it already produced."""
        if self._foreign(identity, msg.job_id):
            return self._no_job(msg, msg.job_id)
        try:
            job, state, position, stored, before = self.jobs.attach(msg.job_id, identity)
        except UnknownJob as exc:
            return protocol.Error(code="unknown_job", in_reply_to=msg.TYPE, message=str(exc))
        if before is not None and before != identity:    # the connection that followed it is told at once
            self._send(before, protocol.Error(
                code="job_taken", in_reply_to="attach",
                message=f"job {msg.job_id} is now followed by another connection of the same client (it attached, "
                        "e.g. another Blender session); this one gets none of its messages any more"))
        self._send(identity, protocol.Attached(job_id=msg.job_id, state=state.value, position=position))
        for message in stored:
            self._send(identity, message)
        return None

    def _on_cancel(self, identity: bytes, msg: protocol.Cancel) -> protocol.Message | None:
        if self._foreign(identity, msg.job_id):
            return self._no_job(msg, msg.job_id)
        job, removed = self.jobs.cancel(msg.job_id)
        if job is None:
            return self._no_job(msg, msg.job_id)
        self._send(identity, protocol.Ack(request="cancel", job_id=job.id))
        if removed and job.client is not None:   # it never ran: nothing of it is in the outbox, so it ends here
            self._send(job.client, protocol.Cancelled(job_id=job.id))
        return None

    def _on_status(self, identity: bytes, msg: protocol.Status) -> protocol.Message:
        (busy, mine), me = self._mine_running(identity), self._owner(identity)
        ids, size = [], 0
        for job in self.jobs.waiting():
            if job.owner != me:         # other clients' job ids are theirs
                continue
            size += len(job.id) + 1
            if size > protocol.MAX_STRING:
                break
            ids.append(job.id)
        return protocol.StatusReply(state="busy" if busy else "idle", running_job=mine, queued_jobs=",".join(ids),
                                    device=self.config.device, workers=self.jobs.worker_states()[:protocol.MAX_STRING])

    def _on_free_memory(self, identity: bytes, msg: protocol.FreeMemory) -> protocol.Message:
        """Empty torch's CUDA cache, only between jobs (a running job would just take it back)."""
        if self.jobs.running() is not None or self.jobs.waiting():
            return protocol.Error(code="busy", in_reply_to=msg.TYPE,
                                  message="a job is running or waiting; GPU memory is released when the queue is empty")
        if self.config.device.startswith("cuda"):
            self.jobs.free_memory()   # each worker empties its own cache (jobs.py)
        return protocol.Ack(request="free_memory")

    # ---- housekeeping -----------------------------------------------------------------------
    def _drop_silent_clients(self) -> None:
        """Cancel the jobs of clients not heard from for ``client_timeout`` (they crashed or quit)."""
        timeout = self.config.client_timeout
        now = time.monotonic()
        with_jobs = self.jobs.clients_with_jobs()
        for identity in with_jobs:
            silent = now - self._last_seen.get(identity, now)
            if timeout > 0 and silent > timeout:
                log.warning("client %s silent for %.0f s: cancelling its jobs", identity.hex(), silent)
                self.jobs.cancel_client(identity)
        for identity, seen in list(self._last_seen.items()):
            if identity not in with_jobs and now - seen > max(timeout, 600.0):
                del self._last_seen[identity]
                self._owner_keys.pop(identity, None)
                self._keys_of.pop(identity, None)
                self._preview_credit.pop(identity, None)
                self._backlog.pop(identity, None)   # gone for 10 minutes: it can Attach to get results

    def _shut_down(self, poller: zmq.Poller, stop: threading.Event) -> None:
        """Fail waiting jobs, stop the running one, keep serving until it ended (or grace ran out)."""
        log.info("shutting down")
        for job in self.jobs.stop():
            later = f"; it runs when the backend starts again (reattach to job {job.id})" if job.folder else ""
            if job.client is not None:
                self._send(job.client, protocol.Failed(job_id=job.id, message="the backend was shut down "
                                                       "before this job started" + later, code="shutdown"))
        deadline = time.monotonic() + self.config.shutdown_grace
        while not self.jobs.join(timeout=0) and time.monotonic() < deadline:
            self._turn(poller)
        if not self.jobs.join(timeout=0):
            log.warning("the running job did not stop within %.0f s; exiting anyway", self.config.shutdown_grace)
        self._turn(poller)   # the worker's last messages


def _user_id(frame) -> str:
    """The ZAP User-Id of a message (the client's public key with CurveZMQ), or ""."""
    try:
        return str(frame.get("User-Id") or "")[:64]
    except (zmq.ZMQError, AttributeError, TypeError, UnicodeDecodeError):
        return ""


def _source_fd(frame) -> int:
    """The descriptor of the connection a message came in on (-1: unknown)."""
    try:
        return int(frame.get(zmq.SRCFD))
    except (zmq.ZMQError, AttributeError, TypeError, ValueError):
        return -1


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def main(args: argparse.Namespace, runner: JobRunner | None = None) -> int:
    """Run the server until SIGTERM/SIGINT.  Returns the process exit status.

    ``args`` needs ``bind``, ``device`` and ``max_queue`` (see :func:`add_arguments` for the
    rest).  ``runner`` replaces the real fit job (tests).
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    server = Server(config, runner=runner)
    try:
        endpoint = server.bind()
    except zmq.ZMQError as exc:
        hint = " (is a backend already running there? pick another port with --bind)" \
            if exc.errno == zmq.EADDRINUSE else ""
        print(f"error: cannot listen on {config.bind}: {exc.strerror}{hint}", file=sys.stderr, flush=True)
        server.close()
        return 1
    stop = threading.Event()
    _install_signal_handlers(stop)
    print(f"backend listening on {endpoint}", flush=True)
    if server.door is not None:
        print(f"workers join at {server.door.endpoint}", flush=True)
    if config.curve is not None:
        log.info("CurveZMQ on: server public key %s; clients allowed from %s",
                 config.curve.public_key.decode("ascii"), config.curve.authorized_keys)
    log.info("device %s, up to %d waiting jobs", config.device, config.max_queue)
    server.serve(stop)
    log.info("stopped")
    return 0


def _install_signal_handlers(stop: threading.Event) -> None:
    if threading.current_thread() is not threading.main_thread():
        return   # signals can only be caught in the main thread; the caller sets `stop` itself

    def on_signal(signum, _frame):
        if stop.is_set():   # a second signal: leave now
            raise SystemExit(128 + signum)
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def cli(argv: list[str] | None = None) -> int:
    """``python -m fit_implicit.backend.service.server [options]``: the same as ``fit-implicit serve``."""
    parser = argparse.ArgumentParser(prog="fit-implicit serve", description="Run the fitting backend.")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
