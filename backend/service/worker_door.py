"""Workers on other hosts: ``serve --worker-bind tcp://0.0.0.0:5600``, and on each GPU box
``fit-implicit worker --server tcp://HOST:5600`` (backend/service/worker_process.py).

A worker that joins becomes one more worker of the server's JobQueue (a :class:`RemoteWorker`):
jobs go to it in the same fair order as to the local ones, so the number of boxes behind one
address is not bounded by one host.  The door is a ROUTER socket owned by one thread here, which
relays between it and one inproc PAIR socket a remote worker (owned by that worker's JobQueue
thread, like a local worker process's socket: backend/service/workers.py has the frames).

Beyond a local worker's frames: the worker says ``ready {name, device, protocol}`` and hears
``welcome`` (or ``refused {why}``); both ends send ``beat`` every second; a worker silent for
``timeout`` seconds is gone: its running job is queued again (jobs.py WorkerDied) and it leaves
the list (it joins again when it comes back).  A remote worker has no share of the server's
disk: it keeps checkpoints in a scratch folder of its own and sends the fitted model back
(``model``) before ``done``; a job that moves to another worker after one died starts over.
Render and mesh jobs of saved models run on the local workers only (they read the job folders).

Security: any address but loopback needs CurveZMQ, with the server's key pair and its own
allow-list, ``authorized_workers`` (a worker receives every job's images).
"""
from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from dataclasses import dataclass

import zmq

from fit_implicit.shared import protocol

from fit_implicit.backend.service import security
from fit_implicit.backend.service.options import DEFAULT_WORKER_TIMEOUT
from fit_implicit.backend.service.workers import BEAT_SECONDS, Relay, frame_head, parse_frames

log = logging.getLogger(__name__)

MAX_REMOTE_WORKERS = 256
_NAME = re.compile(r"[^0-9A-Za-z_.:@-]")


class RemoteWorker(Relay):
    """A worker on another host, reached through the door's relay (an inproc PAIR)."""

    remote = True

    def __init__(self, name: str, device: str, endpoint: str, context: zmq.Context):
        self.name, self.device = name, device
        self.restarts = 0
        self.state = "starting"
        self.gone = False            # set by the door's thread: it left or went silent
        self._endpoint, self._context = endpoint, context
        self._socket = None

    def accepts(self, message: protocol.Message | None) -> bool:
        return not isinstance(message, (protocol.RenderJob, protocol.MeshJob))   # those read this host's folders

    def ready(self) -> bool:
        return self._socket is not None and not self.gone

    def start(self) -> bool:
        if self.gone:
            return False
        self._socket = self._context.socket(zmq.PAIR)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDTIMEO, 5000)   # the door dropped the relay: Relay.run raises WorkerDied
        self._socket.connect(self._endpoint)
        return True

    def lost(self) -> str | None:
        return "left: it stopped answering" if self.gone else None

    def free_memory(self) -> None:
        if self.ready():
            self._socket.send_multipart([frame_head("free")])

    def stop(self) -> None:
        self._close()
        self.state = "stopped"

    def _close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None


@dataclass
class _Peer:
    worker: RemoteWorker
    pair: zmq.Socket          # the door's end of the relay
    heard: float


class WorkerDoor:
    """The ROUTER workers on other hosts connect to, and the thread that relays for them.

    ``jobs``: the JobQueue they join (``add_worker``); ``curve``: the server's key pair with the
    workers' allow-list (None: plain, loopback only)."""

    def __init__(self, jobs, context: zmq.Context, bind: str, curve: security.CurveSetup | None,
                 timeout: float = DEFAULT_WORKER_TIMEOUT, max_message_bytes: int = 4 << 30):
        self.jobs, self._context, self._bind, self._curve = jobs, context, bind, curve
        self.timeout, self._max_bytes = timeout, max_message_bytes
        self._peers: dict[bytes, _Peer] = {}
        self._numbers = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="worker-door", daemon=True)
        self._socket: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self.endpoint = ""

    def bind(self) -> str:
        sock = self._context.socket(zmq.ROUTER)
        if self._curve is not None:
            security.make_curve_server(sock, self._curve, security.WORKER_ZAP_DOMAIN)
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(self._bind)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    # ---- the relay thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        self._poller.register(self._socket, zmq.POLLIN)
        next_beat = time.monotonic()
        try:
            while not self._stop.is_set():
                events = dict(self._poller.poll(100))
                if self._socket in events:
                    self._from_workers()
                for identity, peer in list(self._peers.items()):
                    if peer.pair in events:
                        self._to_worker(identity, peer)
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + BEAT_SECONDS
                    for identity, peer in list(self._peers.items()):
                        if now - peer.heard > self.timeout:
                            self._drop(identity, f"silent for {now - peer.heard:.0f} s")
                        else:
                            self._send(identity, [frame_head("beat")])
        except zmq.ContextTerminated:
            pass
        finally:
            for identity in list(self._peers):
                self._drop(identity, "the backend stopped")
            self._socket.close(linger=0)

    def _from_workers(self) -> None:
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            identity = bytes(frames[0].buffer)
            head, _ = parse_frames(frames[1:])
            peer = self._peers.get(identity)
            if peer is not None:
                peer.heard = time.monotonic()
            op = head.get("op")
            if op == "ready":
                self._join(identity, head)
            elif op == "beat" or peer is None:
                continue
            else:
                try:
                    peer.pair.send_multipart(frames[1:], zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    log.warning("worker %s: its thread is not reading; a %r was dropped", peer.worker.name, op)

    def _join(self, identity: bytes, head: dict) -> None:
        old = self._peers.get(identity)
        if old is not None:    # the same worker again (it lost us for a while): its old self is gone
            self._drop(identity, "it joined again")
        if head.get("protocol") != protocol.PROTOCOL_VERSION:
            self._refuse(identity, f"protocol version mismatch: the worker speaks {head.get('protocol')!r}, "
                                   f"this backend {protocol.PROTOCOL_VERSION}; install the same version on both")
            return
        if len(self._peers) >= MAX_REMOTE_WORKERS:
            self._refuse(identity, f"this backend already has {MAX_REMOTE_WORKERS} workers on other hosts")
            return
        number = next(self._numbers)
        name = f"r{number}"
        where = _NAME.sub("", str(head.get("name", "")))[:64] or "remote"
        device = f"{_NAME.sub('', str(head.get('device', '')))[:32] or '?'}@{where}"
        pair = self._context.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        endpoint = f"inproc://fit-implicit-worker-{id(self)}-{number}"
        pair.bind(endpoint)
        self._poller.register(pair, zmq.POLLIN)
        worker = RemoteWorker(name, device, endpoint, self._context)
        self._peers[identity] = _Peer(worker, pair, time.monotonic())
        self._send(identity, [frame_head("welcome", name=name)])
        log.info("worker %s joined: %s", name, device)
        self.jobs.add_worker(worker)

    def _refuse(self, identity: bytes, why: str) -> None:
        log.warning("refused a worker: %s", why)
        self._send(identity, [frame_head("refused", why=why)])

    def _to_worker(self, identity: bytes, peer: _Peer) -> None:
        while True:
            try:
                frames = peer.pair.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._send(identity, frames)

    def _send(self, identity: bytes, frames: list) -> None:
        try:
            self._socket.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:    # it is gone (EHOSTUNREACH) or not reading (EAGAIN)
            if identity in self._peers and exc.errno == zmq.EHOSTUNREACH:
                self._drop(identity, "its connection closed")

    def _drop(self, identity: bytes, why: str) -> None:
        peer = self._peers.pop(identity, None)
        if peer is None:
            return
        log.warning("worker %s (%s) left: %s", peer.worker.name, peer.worker.device, why)
        peer.worker.gone = True
        try:
            peer.pair.send_multipart([frame_head("gone", why=f"left: {why}")], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        try:
            self._poller.unregister(peer.pair)
        except KeyError:
            pass
        peer.pair.close(linger=0)
