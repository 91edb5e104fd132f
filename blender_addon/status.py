"""The backend status line, polled in a background thread so that drawing never waits.

No bpy here.  :func:`monitor` returns the (shared) :class:`StatusMonitor` of an address; the
panel reads :meth:`StatusMonitor.snapshot` (a copy, no socket work) and a ``bpy.app.timers``
function redraws it when :attr:`StatusMonitor.version` changes.

States: "not running" (nothing answers), "connecting" (a handshake is on its way, or a local
backend is starting), "idle", "busy" (a job runs: "job 1 of M", M counting the waiting ones) and
"version mismatch" (the backend speaks another protocol version).  A backend that answers
something else than the protocol is shown as "not running" with the reason.

CurveZMQ (``curve``: the Z85 key triple of :func:`client.curve_keys`): a socket monitor watches
the handshake, so that a backend that refuses this client's key shows "refused", one that needs
keys we do not have "needs keys", and a failed handshake (wrong server key, or keys against a
backend without CurveZMQ) "handshake failed", each with a detail saying what to do, instead of
"not running".  The connection is retried every ``timeout``: fixing the keys recovers.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace

import zmq

from . import client
from ._shared import protocol

log = logging.getLogger(__name__)

NOT_RUNNING, CONNECTING, IDLE, BUSY, MISMATCH = "not running", "connecting", "idle", "busy", "version mismatch"
REFUSED, NEEDS_KEYS, HANDSHAKE_FAILED = client.REFUSED, client.NEEDS_KEYS, client.HANDSHAKE_FAILED
KEY_STATES = (REFUSED, NEEDS_KEYS, HANDSHAKE_FAILED)
LINES = {MISMATCH: "Backend version mismatch", REFUSED: "Backend refused this client's key",
         NEEDS_KEYS: "Backend needs CurveZMQ keys", HANDSHAKE_FAILED: "Backend handshake failed (keys)"}


@dataclass(frozen=True)
class BackendStatus:
    state: str = CONNECTING
    detail: str = ""             # a sentence for a tooltip or a report
    device: str = ""             # from Welcome
    server: str = ""
    running_job: str = ""
    queued: int = 0
    checked_at: float = 0.0      # time.monotonic() of the last answer or timeout

    @property
    def line(self) -> str:
        """The panel's status line."""
        if self.state == BUSY:
            return f"Backend busy (job 1 of {1 + self.queued})"
        if self.state == IDLE:
            return f"Backend idle ({self.device})" if self.device else "Backend idle"
        return LINES.get(self.state, f"Backend {self.state}")


class StatusMonitor:
    """Polls one address: Hello until welcomed, then a Ping every ``interval`` seconds.

    ``timeout``: seconds without an answer after which the backend counts as not running.
    ``curve``: (server public, client public, client secret) Z85 bytes, or None for no CurveZMQ.
    """

    def __init__(self, address: str, interval: float = 1.0, timeout: float = 2.5,
                 curve: tuple[bytes, bytes, bytes] | None = None):
        self.address = address
        self.curve = curve
        self._problem: tuple[str, str] | None = None   # (state, reason) of the last failed handshake
        self.interval = interval
        self.timeout = timeout
        self.version = 0                 # bumped on every change of the snapshot
        self._status = BackendStatus()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"fit-implicit-status {address}", daemon=True)
        self._thread.start()

    def snapshot(self) -> BackendStatus:
        with self._lock:
            return self._status

    def refresh(self) -> None:
        """Poll now instead of at the next interval (e.g. right after Start)."""
        self._wake.set()

    def wait_for(self, states: tuple[str, ...], timeout: float) -> BackendStatus:
        """Block until the state is one of ``states`` (tests, scripts); returns the last snapshot."""
        deadline = time.monotonic() + timeout
        while self.snapshot().state not in states and time.monotonic() < deadline:
            self.refresh()
            time.sleep(0.05)
        return self.snapshot()

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the thread ------------------------------------------------------------------------
    def _set(self, **changes) -> None:
        with self._lock:
            new = replace(self._status, checked_at=time.monotonic(), **changes)
            if (new.state, new.detail, new.device, new.running_job, new.queued) != (
                    self._status.state, self._status.detail, self._status.device,
                    self._status.running_job, self._status.queued):
                self.version += 1
            self._status = new

    def _socket(self) -> tuple[zmq.Socket, zmq.Socket]:
        """(DEALER, monitor socket of its handshake failures)."""
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)
        sock.setsockopt(zmq.IMMEDIATE, 1)          # no Hellos piling up while nothing listens
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)     # status replies are tiny: refuse anything big
        if self.curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve
        events = sock.get_monitor_socket(client.HANDSHAKE_EVENTS)
        try:
            sock.connect(self.address)
        except zmq.ZMQError:
            self._close(sock, events)
            raise
        return sock, events

    @staticmethod
    def _close(sock: zmq.Socket, events: zmq.Socket) -> None:
        sock.disable_monitor()
        events.close(linger=0)
        sock.close(linger=0)

    def _on_event(self, events: zmq.Socket) -> None:
        """A handshake failed: remember why; refused and mismatched keys show at once (an
        unspecific failure shows when the timeout passes without an answer)."""
        from zmq.utils.monitor import recv_monitor_message
        try:
            event = recv_monitor_message(events, zmq.NOBLOCK)
        except zmq.Again:
            return
        found = client.handshake_problem(int(event["event"]), int(event["value"]), self.curve)
        if found is None:
            return
        if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL or self._problem is None:
            self._problem = found
        if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self._show_problem()

    def _show_problem(self) -> None:
        state, reason = self._problem
        self._set(state=state, detail=f"the backend at {self.address} {reason}", running_job="", queued=0)

    def _run(self) -> None:
        try:
            sock, events = self._socket()
        except zmq.ZMQError as exc:
            self._set(state=NOT_RUNNING, detail=f"{self.address!r} is not a valid backend address: {exc.strerror}")
            return
        welcomed, seq, asked_at, heard_at = False, 0, 0.0, time.monotonic()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(events, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now - asked_at >= self.interval or self._wake.is_set():
                    self._wake.clear()
                    seq += 1
                    message = protocol.Ping(seq=seq) if welcomed else protocol.Hello(client="fit-implicit status")
                    try:
                        sock.send_multipart(message.to_frames(), flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                    asked_at = now
                ready = dict(poller.poll(50))
                if events in ready:
                    self._on_event(events)
                if sock in ready:
                    reply = self._receive(sock)
                    if reply is not None:
                        heard_at = time.monotonic()
                        self._problem = None
                        welcomed = self._handle(reply, welcomed)
                elif time.monotonic() - heard_at > self.timeout:
                    if self._problem is not None:     # the handshake failed: say why, try again
                        self._problem = client.clarify(self._problem, self.address, self.curve)
                        self._show_problem()
                        self._problem = None
                    elif self._status.state != NOT_RUNNING:
                        self._set(state=NOT_RUNNING, detail=f"no backend answers at {self.address}",
                                  running_job="", queued=0)
                    if self._status.state != NOT_RUNNING:
                        # A fresh socket: no stale Hello/Pings are delivered to the next backend,
                        # and a new handshake (keys may have been added to authorized_keys).
                        poller.unregister(sock)
                        poller.unregister(events)
                        self._close(sock, events)
                        sock, events = self._socket()
                        poller.register(sock, zmq.POLLIN)
                        poller.register(events, zmq.POLLIN)
                    welcomed = False
                    heard_at = time.monotonic()   # wait another timeout before looking again
                    asked_at = 0.0
        finally:
            self._close(sock, events)

    def _receive(self, sock):
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        try:
            return protocol.decode_message(frames)
        except protocol.WireError as exc:
            if getattr(exc, "code", "") == "version_mismatch":
                self._set(state=MISMATCH, detail=f"protocol version mismatch with the backend at {self.address} "
                                                 f"({exc}); install the same version of the add-on and the backend")
            else:
                self._set(state=NOT_RUNNING, detail=f"something at {self.address} answered, but not as a Fit "
                                                    f"Implicit backend: {exc}")
            return False

    def _handle(self, m, welcomed: bool) -> bool:
        if m is False:
            return False
        if isinstance(m, protocol.Welcome):
            if m.protocol != protocol.PROTOCOL_VERSION:
                self._set(state=MISMATCH, detail=f"the backend speaks protocol {m.protocol}, this add-on "
                                                 f"{protocol.PROTOCOL_VERSION}")
                return False
            self._set(state=IDLE if self._status.state != BUSY else BUSY, device=m.device, server=m.server,
                      detail=f"{m.server} on {m.device}")
            self.refresh()       # ask at once whether it is busy
            return True
        if isinstance(m, protocol.Pong):
            self._set(state=BUSY if m.state == "busy" else IDLE, running_job=m.running_job, queued=m.queued)
            return welcomed
        if isinstance(m, protocol.Error):
            if m.code == "version_mismatch":
                self._set(state=MISMATCH, detail=m.message)
            return False
        return welcomed


# --------------------------------------------------------------------------------------------
_MONITORS: dict[tuple, StatusMonitor] = {}
_LOCK = threading.Lock()


def monitor(address: str, **keys) -> StatusMonitor:
    """The monitor of ``address`` with these CurveZMQ ``keys`` (preferences.connection_kwargs:
    server_public_key, client_public_key, client_secret_key; none for no CurveZMQ), started on
    first use; one with other keys for the same address is stopped.  Cheap: safe to call from
    draw().  Raises client.BackendError when the keys are not valid."""
    curve = client.curve_keys(keys.get("server_public_key"), keys.get("client_public_key"),
                              keys.get("client_secret_key"))
    stale = []
    with _LOCK:
        mon = _MONITORS.get((address, curve))
        if mon is None or not mon.alive:
            stale = [k for k in _MONITORS if k[0] == address and k[1] != curve]
            mon = _MONITORS[(address, curve)] = StatusMonitor(address, curve=curve)
        stale = [_MONITORS.pop(k) for k in stale]
    for old in stale:
        old.close(timeout=0)
    return mon


def versions() -> int:
    """Sum of all monitors' versions: changes whenever any status line changes."""
    with _LOCK:
        return sum(m.version for m in _MONITORS.values())


def close_all() -> None:
    with _LOCK:
        mons = list(_MONITORS.values())
        _MONITORS.clear()
    for m in mons:
        m.close()


def request(address: str, message: protocol.Message, timeout: float = 2.0, **keys) -> protocol.Message:
    """Send one message on a fresh socket (CurveZMQ ``keys`` as for :func:`monitor`) and return
    the validated reply.

    Raises client.BackendError (code "unreachable": nothing answered; or keys not valid) or
    protocol.WireError (a malformed or other-version reply; its ``code`` says which)."""
    curve = client.curve_keys(keys.get("server_public_key"), keys.get("client_public_key"),
                              keys.get("client_secret_key"))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    try:
        sock.connect(address)
        sock.send_multipart(message.to_frames())
        if not sock.poll(int(timeout * 1000)):
            raise client.BackendError(f"no backend answered at {address} within {timeout:g} s", client.UNREACHABLE)
        return protocol.decode_message(sock.recv_multipart())
    finally:
        sock.close(linger=0)
