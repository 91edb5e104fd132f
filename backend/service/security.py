"""CurveZMQ for the backend: its key pair, the allow-list of clients, and the ZAP handler.

The backend binds loopback by default, with no encryption.  Any other address (and loopback
with ``--curve``) requires CurveZMQ:

* the server's key pair lives in a keys folder (``--keys-dir``, else ``$FIT_IMPLICIT_KEYS_DIR``,
  else ``~/.config/fit_implicit/``): ``server.key`` (public, Z85, give it to clients) and
  ``server.key_secret`` (private, mode 0600).  Both are generated on first run;
* clients are admitted only if their public key is listed in ``authorized_keys`` in that
  folder (one Z85 key per line; ``#`` comments and blank lines are ignored).  The file is
  re-read when it changes, so keys can be added without a restart.  A connection refused there
  is logged with the key.

Nothing here is evaluated or unpickled: the key files are plain text lines.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

KEYS_DIR_ENV = "FIT_IMPLICIT_KEYS_DIR"
PUBLIC_KEY_FILE = "server.key"
SECRET_KEY_FILE = "server.key_secret"
AUTHORIZED_KEYS_FILE = "authorized_keys"
AUTHORIZED_WORKERS_FILE = "authorized_workers"   # workers on other hosts (serve --worker-bind): they see every job
ZAP_DOMAIN = "fit-implicit"
WORKER_ZAP_DOMAIN = "fit-implicit-workers"
_Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")


class KeyError_(ValueError):
    """The keys folder is not usable; the text says what to do."""


def default_keys_dir() -> Path:
    env = os.environ.get(KEYS_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".config" / "fit_implicit"


@dataclass(frozen=True)
class CurveSetup:
    keys_dir: Path
    public_key: bytes        # Z85, 40 bytes
    secret_key: bytes
    authorized_keys: Path


def is_z85_key(text: str) -> bool:
    return bool(_Z85_KEY.fullmatch(text))


def read_authorized_keys(path: Path) -> set[bytes]:
    """Z85 public keys of ``path`` (one per line); malformed lines are logged and skipped."""
    keys = set()
    for number, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if is_z85_key(line):
            keys.add(line.encode("ascii"))
        else:
            log.warning("%s line %d is not a Z85 public key (40 characters); ignored", path, number)
    return keys


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)   # whatever the umask


def ensure_server_keys(keys_dir: Path, stem: str = "server") -> tuple[bytes, bytes]:
    """The server's (public, secret) Z85 keys, generated into ``keys_dir`` on first use
    (``stem`` "worker": a worker's own pair, ``worker.key`` and ``worker.key_secret``)."""
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_path = keys_dir / PUBLIC_KEY_FILE.replace("server", stem)
    secret_path = keys_dir / SECRET_KEY_FILE.replace("server", stem)
    if not secret_path.exists():
        public, secret = zmq.curve_keypair()
        _write_private(secret_path, secret.decode("ascii") + "\n")
        public_path.write_text(public.decode("ascii") + "\n")
        log.info("generated the %s's CurveZMQ key pair in %s", stem, keys_dir)
    mode = secret_path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyError_(f"{secret_path} is readable by other users (mode {mode:o}); run: chmod 600 {secret_path}")
    secret = secret_path.read_text(encoding="ascii").strip()
    if not is_z85_key(secret):
        raise KeyError_(f"{secret_path} does not hold a Z85 secret key; delete it and "
                        f"{public_path} to generate a new pair")
    public = zmq.curve_public(secret.encode("ascii"))
    if not public_path.exists() or public_path.read_text(encoding="ascii").strip() != public.decode("ascii"):
        public_path.write_text(public.decode("ascii") + "\n")
    return public, secret.encode("ascii")


def setup_server_curve(keys_dir: Path | str | None = None, workers: bool = False) -> CurveSetup:
    """Key pair (generated if missing) and a non-empty allow-list, or KeyError_ saying what to do.
    ``workers``: the allow-list of workers on other hosts (``authorized_workers``), not clients."""
    keys_dir = Path(keys_dir).expanduser() if keys_dir else default_keys_dir()
    public, secret = ensure_server_keys(keys_dir)
    authorized = keys_dir / (AUTHORIZED_WORKERS_FILE if workers else AUTHORIZED_KEYS_FILE)
    if authorized.exists() and read_authorized_keys(authorized):
        return CurveSetup(keys_dir, public, secret, authorized)
    if workers:
        raise KeyError_(
            f"CurveZMQ is not set up for workers: no worker is allowed in {authorized}. Add the public key of "
            f"every worker that may join (each `fit-implicit worker` prints its own, and keeps it in worker.key), "
            f"one per line. Give workers this server's public key: {public.decode('ascii')}.")
    raise KeyError_(
        f"CurveZMQ is not set up: no client is allowed in {authorized}. Add the public key (Z85, 40 "
        f"characters) of every client that may connect, one per line; a client makes its key pair with "
        f"zmq.curve_keypair(). Give clients this server's public key: {public.decode('ascii')} "
        f"(also in {keys_dir / PUBLIC_KEY_FILE}). Use --keys-dir or ${KEYS_DIR_ENV} for another folder."
    )


class _AllowList:
    """ZAP credentials provider: admits the keys of ``authorized_keys`` (re-read when it changes)."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple | None = None
        self._keys: set[bytes] = set()

    def _load(self) -> set[bytes]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp != self._stamp:
                self._keys, self._stamp = read_authorized_keys(self.path), stamp
        except OSError as exc:
            log.error("cannot read %s (%s): refusing every client", self.path, exc)
            self._keys, self._stamp = set(), None
        return self._keys

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self._load()
        if not allowed:
            who = "worker" if domain == WORKER_ZAP_DOMAIN else "client"
            log.warning("refused a %s: its public key %s is not in %s", who, key.decode("ascii", "replace"), self.path)
        return allowed


def start_authenticator(context: zmq.Context, setup: CurveSetup | None,
                        workers: CurveSetup | None = None) -> ThreadAuthenticator:
    """A ZAP handler on ``context`` that admits only the allow-listed public keys: clients'
    (``setup``) and workers' (``workers``), each on its own socket's domain."""
    auth = ThreadAuthenticator(context, log=logging.getLogger(__name__ + ".zap"))
    auth.start()
    if setup is not None:
        auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=_AllowList(setup.authorized_keys))
    if workers is not None:
        auth.configure_curve_callback(WORKER_ZAP_DOMAIN, credentials_provider=_AllowList(workers.authorized_keys))
    return auth


def make_curve_server(sock: zmq.Socket, setup: CurveSetup, domain: str = ZAP_DOMAIN) -> None:
    """Make ``sock`` (before bind) a CurveZMQ server with the backend's key pair."""
    sock.curve_secretkey = setup.secret_key
    sock.curve_publickey = setup.public_key
    sock.curve_server = True
    sock.zap_domain = domain.encode()
