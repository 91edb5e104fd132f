"""Messages on their way from the worker thread to the socket (owned by the server's main thread).

ZeroMQ sockets are not thread-safe, so the worker never sends: it puts ``(identity, message)``
pairs here and the main loop drains them between polls of the socket.

Two lanes, so that control never waits behind bulk data:

* **control** (progress, mesh, renders, job ends): a bounded FIFO.  ``put`` blocks when it is
  full, which slows the worker down instead of dropping anything.
* **previews**: coalesced.  At most one preview per job waits; a newer one replaces it.  They are
  sent after every pending control message, and at most one per job every ``preview_gap``
  seconds, so a runner that makes previews as fast as it can still streams a bounded rate.

Bounds: the control lane holds at most ``max_control`` messages (then the worker waits); the
preview lane at most one message per running job.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any

Item = tuple[bytes, Any]   # (ZeroMQ routing identity of the client, protocol.Message)


class Outbox:
    def __init__(self, max_control: int = 256, preview_gap: float = 0.2):
        self._control: queue.Queue[Item] = queue.Queue(maxsize=max_control)
        self._previews: dict[tuple[bytes, str], Item] = {}   # (identity, job_id) -> newest
        self._last_preview: dict[tuple[bytes, str], float] = {}   # when each job's last preview left
        self._lock = threading.Lock()
        self.preview_gap = preview_gap
        self.previews_replaced = 0   # how many previews were superseded before being sent

    def put(self, identity: bytes, message: Any, *, final: bool = False, timeout: float | None = None) -> None:
        """Queue a control message; blocks while the control lane is full (raises queue.Full
        after ``timeout`` seconds if one is given).  ``final`` marks the job's last message:
        a preview of that job still waiting is dropped, so nothing follows the end."""
        if final:
            with self._lock:
                key = (identity, getattr(message, "job_id", ""))
                self._previews.pop(key, None)
                self._last_preview.pop(key, None)
        self._control.put((identity, message), timeout=timeout)

    def put_preview(self, identity: bytes, message: Any) -> None:
        """Queue a preview, replacing any preview of the same job that has not been sent yet."""
        key = (identity, getattr(message, "job_id", ""))
        with self._lock:
            if key in self._previews:
                self.previews_replaced += 1
            self._previews[key] = (identity, message)

    def drain(self, max_items: int = 64) -> list[Item]:
        """Up to ``max_items`` control messages (oldest first), then the waiting previews that
        are due (one per job per ``preview_gap``)."""
        items: list[Item] = []
        while len(items) < max_items:
            try:
                items.append(self._control.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        with self._lock:
            for key, item in list(self._previews.items()):
                if now - self._last_preview.get(key, -1e9) >= self.preview_gap:
                    items.append(item)
                    del self._previews[key]
                    self._last_preview[key] = now
            if len(self._last_preview) > 4096:   # jobs that ended without a final message
                self._last_preview = {k: t for k, t in self._last_preview.items() if now - t < 60.0}
        return items

    def pending(self) -> int:
        with self._lock:
            return self._control.qsize() + len(self._previews)
