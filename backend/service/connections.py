"""Bounds per connection that libzmq does not keep: a whole message's size, stalled uploads, and
the number of connections (file descriptors).

libzmq checks ``ZMQ_MAXMSGSIZE`` per *frame* and hands a multipart message to the application
only once its last frame has arrived, so a peer that sends many frames, or one large frame and
then stalls, holds memory the server never sees.  The kernel sees it: for every TCP connection the
server knows its descriptor (the socket monitor's ACCEPTED event, and ``ZMQ_SRCFD`` on each
message), ``TCP_INFO`` says how many bytes arrived and when the last did, and the server counts
what it was handed.  The difference is a message still on its way:

* more than ``max_message_bytes`` of it: the connection is dropped (shutdown of its socket;
  libzmq frees what it buffered);
* no byte of it for ``stall_seconds``: dropped;
* all such partial messages together over ``max_pending_bytes``: the largest is dropped.

Connections: the process's soft descriptor limit is raised to its hard limit at start-up; past
``max_connections`` (that limit less ``RESERVED_FDS`` for job files, or ``--max-clients``) a new
connection's first message gets ``Error(code="too_many_clients")`` and the connection is closed,
so the clients already connected keep being served.

Linux only (``TCP_INFO``'s layout is Linux's); elsewhere, and for ipc:// connections, only
libzmq's own bounds apply (docs/reliability.md says which).
"""
from __future__ import annotations

import logging
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

RESERVED_FDS = 128          # descriptors kept free for job files, checkpoints, logs and libzmq itself
HANDSHAKE_BYTES = 16 << 10  # what a connection may send that is never a message (greetings, CurveZMQ handshake)
FRAME_OVERHEAD = 64         # what a frame may cost on the wire beyond its payload (ZMTP header, CurveZMQ box)
PARTIAL_BYTES = 64 << 10    # more than this on its way counts as a message being received
REFUSE_AFTER = 0.5          # seconds between a refused client's Error and closing its connection
IDLE_REFUSED = 5.0          # a refused connection that says nothing is closed after this long
SCAN_EVERY = 0.25           # seconds between looks at every connection
WATCH_EVERY = 0.02          # ... and at those receiving a message

_TCP_INFO_SIZE = 136        # up to tcpi_bytes_received (Linux 4.1+)
_LAST_DATA_RECV = 52        # u32, milliseconds since the last data arrived
_BYTES_RECEIVED = 128       # u64, payload bytes received on the connection


def raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one where the OS allows; returns the soft limit
    now in force (0 where the platform has none)."""
    try:
        import resource
    except ImportError:        # Windows: no RLIMIT_NOFILE
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if sys.platform == "darwin":
        want = min(want, 10240)            # macOS refuses more than OPEN_MAX for the soft limit
    if soft != resource.RLIM_INFINITY and want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, want, exc)
    return 0 if soft == resource.RLIM_INFINITY else int(soft)


def tcp_info(fd: int) -> tuple[int, float] | None:
    """``(bytes received, seconds since the last data)`` of a TCP socket, or None (not Linux,
    not a TCP socket, closed, or a kernel without the counter)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    finally:
        sock.detach()       # the descriptor stays libzmq's
    if len(raw) < _TCP_INFO_SIZE:
        return None
    return struct.unpack_from("<Q", raw, _BYTES_RECEIVED)[0], struct.unpack_from("<I", raw, _LAST_DATA_RECV)[0] / 1000.0


def close_connection(fd: int) -> None:
    """End a TCP connection libzmq owns: shut its socket down; libzmq sees the end, closes the
    descriptor and frees what it buffered for it."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


@dataclass
class Connection:
    accepted: float
    delivered: int = 0            # payload bytes of the messages handed to the server
    frames: int = 0
    pending: int = 0              # bytes of a message on its way (last look)
    refused: bool = False         # over max_connections: gets an Error and is closed
    refused_at: float = 0.0       # when its Error was sent (0: not yet)
    watch: bool = True            # looked at every WATCH_EVERY (new, or receiving)
    identities: set = field(default_factory=set)


class Connections:
    """The server's view of its TCP connections (used from the server's loop thread only)."""

    def __init__(self, max_message_bytes: int, *, max_connections: int = 0, stall_seconds: float = 60.0,
                 max_pending_bytes: int = 0):
        self.max_message_bytes = max_message_bytes
        self.max_connections = max_connections            # 0: no limit
        self.stall_seconds = stall_seconds
        self.max_pending_bytes = max_pending_bytes or 2 * max_message_bytes
        self._open: dict[int, Connection] = {}
        self._last_scan = 0.0
        self._last_watch = 0.0

    # ---- events ---------------------------------------------------------------------------
    def accepted(self, fd: int) -> None:
        refused = bool(self.max_connections) and len(self._open) >= self.max_connections
        self._open[fd] = Connection(accepted=time.monotonic(), refused=refused)
        if refused:
            log.warning("%d connections are open (at most %d): a new client will be refused",
                        len(self._open) - 1, self.max_connections)

    def closed(self, fd: int) -> None:
        self._open.pop(fd, None)

    def knows(self, fd: int) -> bool:
        """Whether the connection on ``fd`` was seen accepted (its monitor event read)."""
        return fd in self._open

    def received(self, fd: int, identity: bytes, nbytes: int, nframes: int) -> bool:
        """Count a message handed to the server; False when its connection is refused (the
        server answers it with too_many_clients and nothing else)."""
        conn = self._open.get(fd)
        if conn is None:
            return True
        conn.delivered += nbytes
        conn.frames += nframes
        conn.identities.add(identity)
        if conn.refused and not conn.refused_at:
            conn.refused_at = time.monotonic()
        return not conn.refused

    def refusal_text(self) -> str:
        return (f"the backend already serves {self.max_connections} connections, its limit (open files); "
                "try again when other clients have disconnected, or raise the limit (ulimit -n, --max-clients)")

    def busy(self) -> bool:
        """True while some connection is receiving a message (the loop then looks more often)."""
        return any(c.watch for c in self._open.values())

    # ---- the periodic look ----------------------------------------------------------------
    def check(self) -> list[tuple[int, str]]:
        """Drop connections over a bound; returns ``(fd, reason)`` for each dropped one."""
        now = time.monotonic()
        everyone = now - self._last_scan >= SCAN_EVERY
        if not everyone and now - self._last_watch < WATCH_EVERY:
            return []
        self._last_watch = now
        if everyone:
            self._last_scan = now
        drop: list[tuple[int, str]] = []
        for fd, conn in list(self._open.items()):
            if not (everyone or conn.watch):
                continue
            if conn.refused:
                if (conn.refused_at and now - conn.refused_at > REFUSE_AFTER) or now - conn.accepted > IDLE_REFUSED:
                    drop.append((fd, "refused"))
                continue
            info = tcp_info(fd)
            if info is None:
                conn.watch = False
                continue
            received, quiet = info
            conn.pending = received - conn.delivered - FRAME_OVERHEAD * conn.frames - HANDSHAKE_BYTES
            conn.watch = conn.pending > PARTIAL_BYTES or now - conn.accepted < 1.0
            if conn.pending > self.max_message_bytes + PARTIAL_BYTES:
                drop.append((fd, "too_big"))
            elif conn.pending > PARTIAL_BYTES and quiet > self.stall_seconds:
                drop.append((fd, "stalled"))
        dropping = {fd for fd, _ in drop}
        pending = sorted(((c.pending, fd) for fd, c in self._open.items()
                          if fd not in dropping and c.pending > PARTIAL_BYTES), reverse=True)
        total = sum(p for p, _ in pending)
        for size, fd in pending:
            if total <= self.max_pending_bytes:
                break
            drop.append((fd, "pending"))
            total -= size
        for fd, reason in drop:
            conn = self._open.pop(fd)
            if reason != "refused":
                log.warning("dropped a connection (fd %d) %s: %s", fd, ", ".join(i.hex() for i in conn.identities)
                            or "before its first message", {
                                "too_big": f"a message grew past {self.max_message_bytes >> 20} MiB",
                                "stalled": f"{conn.pending >> 10} KiB of a message, then nothing for "
                                           f"{self.stall_seconds:g} s",
                                "pending": f"unfinished messages of all clients held over "
                                           f"{self.max_pending_bytes >> 20} MiB; this was the largest "
                                           f"({conn.pending >> 20} MiB)"}[reason])
            close_connection(fd)
        return drop


def connection_limit(configured: int, soft_limit: int) -> int:
    """How many connections to serve: ``configured`` (0: as many as the descriptors allow)."""
    room = max(16, soft_limit - RESERVED_FDS) if soft_limit else 0
    if configured and room:
        return min(configured, room)
    return configured or room
