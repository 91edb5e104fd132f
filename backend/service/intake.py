"""Large messages are decoded and stored off the socket loop, so that nobody waits behind them.

Checking an upload of hundreds of MB and writing it into its job folder takes seconds; done on
the server's loop thread it held every other client's Ping, Status and Cancel that long (the
add-on gives up on a backend silent for 4 s).  The loop hands every message larger than
``LARGE_BYTES`` to this one thread, in arrival order; the thread decodes it and runs its handler
when that handler may run here (``threaded``: Submit and StoreModel only touch the job queue,
which has its own lock), otherwise it hands the decoded message back to the loop.  Replies go
through the outbox like the worker's messages: only the loop thread touches the socket.

Bound: messages waiting here hold at most ``max_bytes`` (zero-copy frames libzmq already
received); one arriving over that gets ``Error(code="busy")`` at once.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable

from fit_implicit.shared import protocol, wire

from fit_implicit.backend.service.outbox import Outbox

log = logging.getLogger(__name__)

LARGE_BYTES = 1 << 20

Handler = Callable[[bytes, Any], Any]


class Intake:
    def __init__(self, outbox: Outbox, limits: wire.Limits, threaded: dict[type, Handler], max_bytes: int):
        self._outbox = outbox
        self._limits = limits
        self._threaded = threaded
        self.max_bytes = max_bytes
        self._cond = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._held = 0                 # bytes of the waiting messages and of the one being handled
        self._back: collections.deque = collections.deque()   # (identity, message) for the loop's handlers
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="intake", daemon=True)
        self._thread.start()

    def offer(self, identity: bytes, body: list, nbytes: int) -> bool:
        """Take a message (False: too much is waiting already; the caller answers busy)."""
        with self._cond:
            if self._held and self._held + nbytes > self.max_bytes:
                return False
            self._held += nbytes
            self._waiting.append((identity, body, nbytes))
            self._cond.notify()
        return True

    def busy(self) -> bool:
        return bool(self._held or self._back)

    def handed_back(self) -> list[tuple[bytes, Any]]:
        """Decoded messages whose handlers run on the loop thread, in arrival order."""
        out = []
        while self._back:
            out.append(self._back.popleft())
        return out

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=5.0)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                identity, body, nbytes = self._waiting.popleft()
            try:
                self._take(identity, body)
            except Exception:   # noqa: BLE001 - never lose the thread
                log.exception("error while taking a message from %s", identity.hex())
            finally:
                del body
                with self._cond:
                    self._held -= nbytes

    def _take(self, identity: bytes, body: list) -> None:
        try:
            message = protocol.decode_message(body, self._limits)
        except Exception as exc:   # noqa: BLE001 - WireError/ProtocolError, or anything unforeseen
            log.info("rejected a message from %s: %s", identity.hex(), exc)
            self._outbox.put(identity, protocol.error_for(exc, body))
            return
        handler = self._threaded.get(type(message))
        if handler is None:
            self._back.append((identity, message))
            return
        reply = call_handler(handler, identity, message)
        if reply is not None:
            self._outbox.put(identity, reply)


def call_handler(handler: Handler, identity: bytes, message) -> "protocol.Message | None":
    """``handler(identity, message)``; an exception becomes an internal_error reply (logged):
    a bug in one handler must not stop the server."""
    try:
        return handler(identity, message)
    except Exception as exc:   # noqa: BLE001
        log.exception("error while handling %s from %s", message.TYPE, identity.hex())
        return protocol.Error(code="internal_error", in_reply_to=message.TYPE,
                              message=f"internal backend error while handling {message.TYPE}: {exc}"[:4000])
