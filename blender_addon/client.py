"""The backend client: one fitting job over ZeroMQ, driven from Blender without blocking it.

No bpy and no torch here, so it is testable without Blender.  A background thread owns a DEALER
socket and does all the talking (Hello, Submit, heartbeat Pings, Cancel); received messages are
validated with :func:`protocol.decode_message` and put on a queue that the caller drains with
:meth:`JobClient.poll` (from a modal operator's timer or ``bpy.app.timers`` in Blender, or with
the blocking :meth:`JobClient.wait` in scripts and tests).

What :meth:`JobClient.poll` returns: Welcome, Accepted, Progress, Preview, TextureResult, MeshResult,
RenderResult, CamerasResult, EnvironmentResult, Ack, then exactly one Done, Failed or Cancelled, after
which nothing more comes.
Only the newest Progress and the newest Preview wait in the queue (older ones are dropped when a
newer one arrives), so a caller that polls rarely holds a bounded number of messages.

Reconnecting: :meth:`JobClient.detach` closes the connection and leaves the job running on the
backend; a new client's :meth:`JobClient.attach` (job id) picks it up again (Attached instead of
Accepted, then the results the job already produced, then the rest), also after the backend
was restarted (the job resumes from its last checkpoint).

Failures detected here (no backend, backend died, version mismatch, job refused with an Error,
malformed message) arrive as a Failed made up by the client, whose text says what happened and
whose ``code`` says what kind of failure it was (the codes below; a refusal keeps the Error's
code, e.g. "unknown_job", "queue_full", "version_mismatch").  Every BackendError carries such a
code too.  Callers decide by code, never by the text.  Pongs and Errors that do not end the job
are only logged.

CurveZMQ (a backend on another machine, or one started with ``--curve``): pass the backend's
public key (``server.key`` in its keys folder) as ``server_public_key`` and this client's key
pair (from ``zmq.curve_keypair()``; the public half must be in the backend's ``authorized_keys``)
as ``client_public_key`` / ``client_secret_key``, all Z85 text.  A backend that refuses the key
never answers; :func:`probe` watches the handshake and raises a BackendError whose ``code`` says
why (refused key, keys needed, handshake failed: :func:`handshake_problem`); a JobClient's job
fails with "no backend answered", naming the keys as a likely cause.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import zmq

from ._shared import protocol

log = logging.getLogger(__name__)

CLIENT_NAME = "fit-implicit blender add-on"
MAX_MESSAGE_BYTES = 4 << 30   # the backend's default limit for one message


# Codes of the failures this client detects itself (BackendError.code, and the code of the
# Failed it makes up); the backend's own codes (Error.code, Failed.code) pass through as they are.
UNREACHABLE = "unreachable"            # nothing answered, the backend stopped answering
VERSION_MISMATCH = "version_mismatch"  # the same code as the wire's Error
MALFORMED_REPLY = "malformed_reply"    # the backend sent something that is not a valid message
UNEXPECTED_REPLY = "unexpected_reply"  # a valid message, but not the one the handshake expects
NOT_ACCEPTED = "not_accepted"          # the job was uploaded but never accepted
BAD_ADDRESS = "bad_address"            # not a tcp://HOST:PORT address
BAD_KEYS = "bad_keys"                  # CurveZMQ keys missing, malformed or not a pair
INVALID_JOB = "invalid_job"            # the job does not validate, or is too large to send
ALREADY_STARTED = "already_started"    # a JobClient runs one job
CLIENT_ERROR = "client_error"          # a bug in the client thread
# A failed CurveZMQ handshake, as told by the socket's monitor (see handshake_problem).
REFUSED, NEEDS_KEYS, HANDSHAKE_FAILED = "refused", "needs keys", "handshake failed"


class BackendError(RuntimeError):
    """Talking to the backend failed; the text says what happened, for the user.  ``code``: what
    kind of failure (one of the codes above, or the code of the backend's Error)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


def probe(address: str, timeout: float = 2.0, *, server_public_key: str | bytes | None = None,
          client_public_key: str | bytes | None = None,
          client_secret_key: str | bytes | None = None) -> protocol.Welcome:
    """Handshake only: returns the backend's Welcome or raises BackendError with a clear text
    and its code."""
    curve = curve_keys(server_public_key, client_public_key, client_secret_key)
    sock, events = _connect(address, curve, watch=True)
    try:
        sock.send_multipart(protocol.Hello(client=CLIENT_NAME).to_frames())
        if not _wait_for_reply(sock, events, address, curve, timeout):
            raise BackendError(f"no backend answered at {address} within {timeout:g} s — is it running?"
                               + _curve_hint(curve), UNREACHABLE)
        try:
            reply = protocol.decode_message(sock.recv_multipart(copy=False))
        except protocol.WireError as exc:
            raise BackendError(*_decode_failure(address, exc)) from exc
    finally:
        sock.disable_monitor()
        events.close(linger=0)
        sock.close(linger=0)
    if isinstance(reply, protocol.Error):
        raise BackendError(*_refusal(address, reply))
    if not isinstance(reply, protocol.Welcome):
        raise BackendError(f"the backend at {address} answered the handshake with {reply.TYPE!r} instead of welcome",
                           UNEXPECTED_REPLY)
    if reply.protocol != protocol.PROTOCOL_VERSION:
        raise BackendError(*_other_version(address, reply))
    return reply


def exchange(address: str, message: protocol.Message, *, token: str = "", timeout: float = 120.0,
             server_public_key: str | bytes | None = None, client_public_key: str | bytes | None = None,
             client_secret_key: str | bytes | None = None) -> protocol.Message:
    """One request and its reply, after the handshake (Hello with ``token``): for requests that
    are not jobs (FetchModel, StoreModel).  Raises BackendError: nothing answered within
    ``timeout`` s, a malformed reply, or the backend's Error (its code kept)."""
    curve = curve_keys(server_public_key, client_public_key, client_secret_key)
    sock, events = _connect(address, curve, watch=True)
    try:
        replies = []
        for msg in (protocol.Hello(client=CLIENT_NAME, token=token), message):
            sock.send_multipart(msg.validate().to_frames(), copy=False)
            if not _wait_for_reply(sock, events, address, curve, timeout):
                raise BackendError(f"no backend answered at {address} within {timeout:g} s — is it running?"
                                   + _curve_hint(curve), UNREACHABLE)
            try:
                replies.append(protocol.decode_message(sock.recv_multipart(copy=False)))
            except protocol.WireError as exc:
                raise BackendError(*_decode_failure(address, exc)) from exc
            if isinstance(replies[-1], protocol.Error):
                error = replies[-1]
                raise BackendError(f"the backend at {address} refused the request: {error.message}", error.code)
    finally:
        sock.disable_monitor()
        events.close(linger=0)
        sock.close(linger=0)
    return replies[-1]


class JobClient:
    """One job on one backend.

    Args:
        address: ``tcp://HOST:PORT`` of ``fit-implicit serve``.
        heartbeat_interval: seconds between Pings.
        dead_after: fail the job when nothing at all was heard from the backend for this long
            (not counted while the Submit itself is still being uploaded).
        accept_timeout: fail the job when the backend has not accepted it this long after the
            upload finished (e.g. it dropped a message larger than its limit).
        server_public_key, client_public_key, client_secret_key: Z85 CurveZMQ keys (all three or
            none); needed for a backend that requires CurveZMQ.
        token: this client's secret for the backend (shared/protocol.py Hello): the job belongs to
            it, and only a client with the same token can attach to it later ("": none, the job
            belongs to this connection only).

    Attributes (read them from the thread that calls poll()):
        finished: True once poll() has returned the job's Done, Failed or Cancelled.
        error: the text of that Failed (backend-side or client-side), else None.
        error_code: the code of that Failed ("" when it has none), else None.
        job_id: the backend's id for the job, once it has been accepted.
    """

    def __init__(self, address: str, *, heartbeat_interval: float = 1.0, dead_after: float = 4.0,
                 accept_timeout: float = 60.0, server_public_key: str | bytes | None = None,
                 client_public_key: str | bytes | None = None, client_secret_key: str | bytes | None = None,
                 token: str = ""):
        self.address = address
        self.token = token
        self.curve = curve_keys(server_public_key, client_public_key, client_secret_key)
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self.accept_timeout = accept_timeout
        self.finished = False
        self.error: str | None = None
        self.error_code: str | None = None
        self.job_id: str | None = None
        self.welcome: protocol.Welcome | None = None
        self._inbox = _Inbox()
        self._cancel_on_close = True
        self._cancel = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, submit: protocol.Submit) -> None:
        """Connect and send the job from a background thread.  Returns at once.

        The submit's arrays are sent without a copy: do not modify them until the job finished.
        Raises:
            BackendError: already started, invalid address, or an invalid or too large job.
        """
        if self._thread is not None:
            raise BackendError("this client has already started a job; make a new JobClient", ALREADY_STARTED)
        try:
            submit.validate()
        except protocol.ProtocolError as exc:
            raise BackendError(f"the job is not valid: {exc}", INVALID_JOB) from exc
        if not isinstance(submit, protocol.Submit):     # RenderJob, MeshJob: small, no images
            self._launch(submit)
            return
        size = sum(a.nbytes for a in (submit.images, submit.intrinsics, submit.poses, submit.aabb,
                                      submit.eval_intrinsics, submit.eval_poses, submit.eval_sizes))
        if size > MAX_MESSAGE_BYTES:
            raise BackendError(f"the job's images take {size / 2**30:.1f} GiB; the backend accepts at most "
                               f"{MAX_MESSAGE_BYTES / 2**30:.0f} GiB: use fewer or smaller images", INVALID_JOB)
        self._launch(submit)

    def attach(self, job_id: str) -> None:
        """Follow a job started earlier (by this or another client) by its id.  Returns at once.

        poll() then returns Attached (with the job's state), the results it already produced,
        the rest of its messages and its end.  An unknown or expired job ends with a Failed.
        """
        if self._thread is not None:
            raise BackendError("this client has already started a job; make a new JobClient", ALREADY_STARTED)
        try:
            protocol.Attach(job_id=job_id).validate()
        except protocol.ProtocolError as exc:
            raise BackendError(f"not a job id: {exc}", INVALID_JOB) from exc
        self.job_id = job_id
        self._launch(None)

    def _launch(self, submit: protocol.Submit | None) -> None:
        sock = _connect(self.address, self.curve)   # made here so that a bad address raises here; the thread owns it
        self._thread = threading.Thread(target=self._run, args=(sock, submit), name="fit-implicit-client",
                                        daemon=True)
        self._thread.start()

    def poll(self) -> list[protocol.Message]:
        """The messages received since the last call, oldest first.  Never blocks, never raises."""
        out = self._inbox.take_all()
        for message in out:
            if isinstance(message, protocol.JOB_END_TYPES):
                self.finished = True
                if isinstance(message, protocol.Failed):
                    self.error, self.error_code = message.message, message.code
        return out

    def wait(self, timeout: float | None = None, poll_interval: float = 0.05) -> list[protocol.Message]:
        """Blocking path (scripts, tests, Blender in background mode): poll until finished.

        Returns every message received; stops early (finished still False) after ``timeout`` s.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[protocol.Message] = []
        while not self.finished and (deadline is None or time.monotonic() < deadline):
            out += self.poll()
            if not self.finished:
                time.sleep(poll_interval)
        return out

    def cancel(self) -> None:
        """Ask the backend to stop the job; a Cancelled (or Done/Failed if too late) follows."""
        self._cancel.set()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the background thread.  A job still running on the backend is cancelled (unless
        :meth:`detach` was used)."""
        self._closing.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def detach(self, timeout: float = 2.0) -> None:
        """Close the connection but leave the job running on the backend: its results wait there
        (until the backend's --keep-hours expiry) for a client that calls attach(job_id)."""
        self._cancel_on_close = False
        self.close(timeout)

    # ---- the background thread ---------------------------------------------------------------
    def _run(self, sock: zmq.Socket, submit: protocol.Submit) -> None:
        try:
            _Session(self, sock, submit).run()
        except Exception as exc:   # noqa: BLE001 - the thread must report, never die silently
            log.exception("client thread failed")
            self._inbox.put(protocol.Failed(job_id=self.job_id or "", message=f"client error: {exc}"[:4000],
                                            code=CLIENT_ERROR))
        finally:
            sock.close()   # LINGER is 0 unless a last Cancel is on its way (see stop_backend_job)


class _Session:
    """The conversation of one JobClient, run in its thread.  States: hello -> submitted -> accepted -> ended."""

    def __init__(self, client: JobClient, sock: zmq.Socket, submit: protocol.Submit | None):
        self.c, self.sock, self.submit = client, sock, submit   # submit None: attach to c.job_id
        self.state = "hello"
        self.started = self.last_heard = time.monotonic()
        self.heard_anything = False
        self.upload: zmq.MessageTracker | None = None
        self.uploaded_at: float | None = None
        self.cancel_sent = False
        self.seq = 0

    def run(self) -> None:
        c = self.c
        self.send(protocol.Hello(client=CLIENT_NAME, token=c.token))
        next_ping = time.monotonic()
        while self.state != "ended":
            now = time.monotonic()
            if c._closing.is_set():
                if c._cancel_on_close:
                    self.stop_backend_job(linger=500)
                return
            if now >= next_ping:
                self.seq += 1
                self.send(protocol.Ping(seq=self.seq))
                next_ping = now + c.heartbeat_interval
            if c._cancel.is_set():
                self.on_cancel_request()
            if self.sock.poll(int(max(1.0, min(50.0, (next_ping - now) * 1000)))):
                self.receive()
            self.check_timeouts()

    def receive(self) -> None:
        for _ in range(100):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.last_heard, self.heard_anything = time.monotonic(), True
            try:
                message = protocol.decode_message(frames)
            except protocol.WireError as exc:
                self.fail(*_decode_failure(self.c.address, exc))
                return
            self.handle(message)
            if self.state == "ended":
                return

    def handle(self, m: protocol.Message) -> None:
        c = self.c
        if isinstance(m, protocol.Pong):
            return
        if isinstance(m, protocol.Welcome):
            if self.state != "hello":
                return
            if m.protocol != protocol.PROTOCOL_VERSION:
                self.fail(*_other_version(c.address, m))
                return
            c.welcome = m
            c._inbox.put(m)
            self.state = "submitted"
            if self.submit is None:
                self.send(protocol.Attach(job_id=c.job_id))
                self.uploaded_at = time.monotonic()
                return
            self.upload = self.sock.send_multipart(self.submit.to_frames(), copy=False, track=True)
            self.submit = None   # the socket holds the frames until they are sent
        elif isinstance(m, protocol.Attached):
            if self.state == "submitted" and m.job_id == c.job_id:
                self.state = "accepted"
                c._inbox.put(m)
        elif isinstance(m, protocol.Error) and m.code == "job_taken" and self.state == "accepted":
            # another connection of ours attached to the job: it goes on there, so no Cancel from here
            c._inbox.put(protocol.Failed(job_id=c.job_id or "", message=m.message, code=m.code))
            self.state = "ended"
        elif isinstance(m, protocol.Error):
            refused = m.in_reply_to in ("hello", "submit", "render_job", "mesh_job", "attach", "")
            if refused and self.state in ("hello", "submitted"):
                self.fail(*_refusal(c.address, m))
            else:   # e.g. a late Cancel of a job that already ended: not the job's end
                log.warning("backend error (%s) in reply to %s: %s", m.code, m.in_reply_to or "?", m.message)
        elif isinstance(m, protocol.Accepted):
            if self.state == "submitted":
                c.job_id, self.state = m.job_id, "accepted"
                c._inbox.put(m)
        elif isinstance(m, protocol.JOB_END_TYPES):
            if m.job_id == c.job_id:
                c._inbox.put(m)
                self.state = "ended"
        elif isinstance(getattr(m, "job_id", None), str):   # Progress, Preview, MeshResult, TextureResult, ...
            if m.job_id == c.job_id:
                c._inbox.put(m)
        else:
            log.warning("ignored an unexpected %r message from the backend", m.TYPE)

    def on_cancel_request(self) -> None:
        if self.cancel_sent:
            return
        if self.state == "hello":   # nothing was sent yet: the job ends here
            self.c._inbox.put(protocol.Cancelled(job_id=""))
            self.state = "ended"
        elif self.state == "accepted":
            self.send(protocol.Cancel(job_id=self.c.job_id))
            self.cancel_sent = True
        # "submitted": wait for Accepted (or an Error), then cancel

    def check_timeouts(self) -> None:
        c, now = self.c, time.monotonic()
        if self.upload is not None and self.uploaded_at is None:
            if not self.upload.done:
                self.last_heard = now   # our Pings wait behind the upload: silence means nothing yet
                return
            self.uploaded_at = now
        silent = now - self.last_heard
        if silent > c.dead_after:
            if not self.heard_anything:
                self.fail(f"no backend answered at {c.address} within {c.dead_after:g} s — is it running?"
                          + _curve_hint(c.curve), UNREACHABLE)
            else:
                self.fail(f"the backend stopped answering (nothing heard from {c.address} for {silent:.1f} s); "
                          "it may have crashed or been stopped — see its log", UNREACHABLE)
        elif self.state == "submitted" and self.uploaded_at is not None and now - self.uploaded_at > c.accept_timeout:
            self.fail(f"the backend at {c.address} did not accept the job within {c.accept_timeout:g} s "
                      "(was it larger than the backend's --max-message-mb?)", NOT_ACCEPTED)

    def fail(self, text: str, code: str) -> None:
        """End the job on this side with a made-up Failed (and stop it on the backend if it runs)."""
        log.warning("job failed on the client side (%s): %s", code, text)
        if self.state == "accepted" and self.heard_anything:
            self.stop_backend_job(linger=200)
        self.c._inbox.put(protocol.Failed(job_id=self.c.job_id or "", message=text[: protocol.MAX_STRING],
                                          code=code[:64]))
        self.state = "ended"

    def stop_backend_job(self, linger: int) -> None:
        if self.state == "accepted" and not self.cancel_sent:
            self.send(protocol.Cancel(job_id=self.c.job_id))
            self.cancel_sent = True
            self.sock.setsockopt(zmq.LINGER, linger)   # give the Cancel a moment to leave

    def send(self, message: protocol.Message) -> None:
        try:
            self.sock.send_multipart(message.to_frames(), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("could not send %s: the connection is backed up", message.TYPE)


class _Inbox:
    """Messages from the client thread to the caller.  Bounded by coalescing: a new Progress or
    Preview replaces the one still waiting (each kind keeps its newest only); everything else
    (results, acks, the end) is kept, and the backend sends a bounded number of those per job."""

    COALESCED = (protocol.Progress, protocol.Preview)

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.dropped = 0   # superseded Progress/Preview messages

    def put(self, message: protocol.Message) -> None:
        with self._lock:
            if isinstance(message, self.COALESCED):
                for old in self._items:
                    if type(old) is type(message):
                        self._items.remove(old)
                        self.dropped += 1
                        break
            self._items.append(message)

    def take_all(self) -> list[protocol.Message]:
        with self._lock:
            out = list(self._items)
            self._items.clear()
        return out

    def __len__(self) -> int:
        return len(self._items)


# --------------------------------------------------------------------------------------------
def curve_keys(server_public_key, client_public_key, client_secret_key) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret) as Z85 bytes, or None for no CurveZMQ.

    Raises BackendError if only some are given or one is not a 40-character Z85 key."""
    given = [k for k in (server_public_key, client_public_key, client_secret_key) if k]
    if not given:
        return None
    if len(given) != 3:
        raise BackendError("CurveZMQ needs the backend's public key and this client's public and secret keys "
                           "(all three)", BAD_KEYS)
    keys = []
    for name, key in (("server public key", server_public_key), ("client public key", client_public_key),
                      ("client secret key", client_secret_key)):
        key = key.strip().encode("ascii", "replace") if isinstance(key, str) else bytes(key).strip()
        if len(key) != 40:
            raise BackendError(f"the {name} is not a CurveZMQ key (expected 40 Z85 characters, got {len(key)})",
                               BAD_KEYS)
        keys.append(key)
    try:
        if zmq.curve_public(keys[2]) != keys[1]:
            raise BackendError("the client public key does not belong to the client secret key", BAD_KEYS)
    except (ValueError, zmq.ZMQError) as exc:
        raise BackendError(f"the client secret key is not a valid Z85 key: {exc}", BAD_KEYS) from exc
    return keys[0], keys[1], keys[2]


def _curve_hint(curve) -> str:
    if curve is None:
        return " (if it requires CurveZMQ, set its public key and this client's key pair)"
    return (" (or it refused this client's CurveZMQ key: check that the client public key is in the backend's "
            "authorized_keys and that the server key is right)")


def _connect(address: str, curve: tuple[bytes, bytes, bytes] | None = None, watch: bool = False):
    """A DEALER connected to ``address``; with ``watch``, (socket, monitor socket of its handshake
    failures), the monitor made before connecting so that no event is missed."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    if "[" in address:
        sock.setsockopt(zmq.IPV6, 1)
    events = sock.get_monitor_socket(HANDSHAKE_EVENTS) if watch else None
    try:
        sock.connect(address)
    except zmq.ZMQError as exc:
        if events is not None:
            sock.disable_monitor()
            events.close(linger=0)
        sock.close(linger=0)
        raise BackendError(f"{address!r} is not a valid backend address (expected tcp://HOST:PORT): "
                           f"{exc.strerror}", BAD_ADDRESS) from exc
    return (sock, events) if watch else sock


def handshake_problem(event: int, value: int, curve) -> tuple[str, str] | None:
    """(state, reason) of a handshake-failure event of a socket monitor, else None.  The reason
    continues "the backend at ADDRESS ...".

    Seen with libzmq 4.3: a key missing from authorized_keys gives HANDSHAKE_FAILED_AUTH (ZAP
    status 400); no keys against a CurveZMQ backend, or keys against a plain one, give
    HANDSHAKE_FAILED_PROTOCOL (mechanism mismatch), often after a NO_DETAIL; a wrong server
    public key gives NO_DETAIL only (the backend cannot decrypt our Hello and hangs up), and so,
    on a loaded machine, can keys against a plain backend: :func:`clarify` tells them apart."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return REFUSED, ("refused this client's CurveZMQ key: add this client's public key (add-on preferences: "
                         "Copy Public Key) to the backend's authorized_keys")
    if event not in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        return None
    if curve is None:
        return NEEDS_KEYS, ("requires CurveZMQ keys: in the add-on preferences turn on Use CurveZMQ, set the "
                            "backend's public key and generate this client's keys")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return HANDSHAKE_FAILED, NO_CURVE
    return HANDSHAKE_FAILED, UNCLEAR_HANDSHAKE


# The reason of a CurveZMQ handshake that failed without saying why (a wrong server key, or, when
# the backend hung up before our side read its greeting, a backend without CurveZMQ).
UNCLEAR_HANDSHAKE = ("did not complete the CurveZMQ handshake: check the backend's public key in the add-on "
                     "preferences (server.key in the backend's keys folder)")
NO_CURVE = ("does not use CurveZMQ: turn Use CurveZMQ off in the add-on preferences, or start the backend "
            "with --curve")


def answers_without_curve(address: str, timeout: float = 1.0) -> bool:
    """True when something at ``address`` answers a plain (no CurveZMQ) Hello within ``timeout`` s.

    A CurveZMQ client against a plain backend usually sees the mechanism mismatch, but when the
    backend closes the connection before this side has read its greeting (a loaded machine) only
    an unspecific failure arrives; asking plainly tells the two causes apart."""
    try:
        sock = _connect(address)
    except BackendError:
        return False
    try:
        sock.send_multipart(protocol.Hello(client="fit-implicit key check").to_frames(), flags=zmq.NOBLOCK)
        return bool(sock.poll(int(timeout * 1000), zmq.POLLIN))
    except zmq.ZMQError:
        return False
    finally:
        sock.close(linger=0)


def clarify(problem: tuple[str, str], address: str, curve) -> tuple[str, str]:
    """``problem`` (from handshake_problem), with an unclear CurveZMQ failure named "does not use
    CurveZMQ" when the backend answers a plain Hello."""
    if curve is not None and problem[1] == UNCLEAR_HANDSHAKE and answers_without_curve(address):
        return HANDSHAKE_FAILED, NO_CURVE
    return problem


def _wait_for_reply(sock: zmq.Socket, events: zmq.Socket, address: str, curve, timeout: float) -> bool:
    """True when a reply waits on ``sock`` within ``timeout`` s.  Raises BackendError (with its
    handshake code) at once when the handshake is refused or mismatched, or at the timeout when
    only an unspecific handshake failure was seen."""
    from zmq.utils.monitor import recv_monitor_message
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(events, zmq.POLLIN)
    deadline, problem = time.monotonic() + timeout, None
    while (left := deadline - time.monotonic()) > 0:
        ready = dict(poller.poll(int(left * 1000) + 1))
        if sock in ready:
            return True
        if events in ready:
            event = recv_monitor_message(events, zmq.NOBLOCK)
            found = handshake_problem(int(event["event"]), int(event["value"]), curve)
            problem = found or problem                         # NO_DETAIL may be followed by a clearer one
            if found is not None and event["event"] != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                break                                          # refused, or a mechanism mismatch: final
    if problem is not None:
        problem = clarify(problem, address, curve)
        raise BackendError(f"no backend answered at {address}: the backend there {problem[1]}", problem[0])
    return False


# (text, code) of the failures below: what BackendError and fail() take.
def _version_text(address: str, detail: str) -> tuple[str, str]:
    detail = detail.removeprefix("protocol version mismatch: ")
    return (f"protocol version mismatch with the backend at {address} ({detail}); "
            "install the same version of the add-on and the backend", VERSION_MISMATCH)


def _other_version(address: str, welcome: protocol.Welcome) -> tuple[str, str]:
    return _version_text(address, f"backend speaks {welcome.protocol}, this add-on speaks {protocol.PROTOCOL_VERSION}")


def _decode_failure(address: str, exc: Exception) -> tuple[str, str]:
    if getattr(exc, "code", "") == VERSION_MISMATCH:
        return _version_text(address, str(exc))
    return f"the backend at {address} sent a malformed message: {exc}", MALFORMED_REPLY


def _refusal(address: str, error: protocol.Error) -> tuple[str, str]:
    if error.code == VERSION_MISMATCH:
        return _version_text(address, error.message)
    return f"the backend at {address} refused the job: {error.message}", error.code
