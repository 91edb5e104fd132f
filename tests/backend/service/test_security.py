"""CurveZMQ (issue 6, "security"): remote binds need it, allow-listed clients are served,
everyone else is refused (and logged).  Only 127.0.0.1 is used (with --curve)."""
from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import time

import pytest
import zmq

from fit_implicit.backend.service import security
from fit_implicit.backend.service.server import ConfigError, config_from_args
from fit_implicit.blender_addon.client import BackendError, JobClient, probe
from helpers import REPO, RawPeer, make_submit
from fit_implicit.shared import protocol


@pytest.fixture
def keys(tmp_path):
    """A keys folder with the server pair and one allowed client; returns (dir, server_pub, client_pub, client_sec)."""
    keys_dir = tmp_path / "keys"
    server_public, _ = security.ensure_server_keys(keys_dir)
    client_public, client_secret = zmq.curve_keypair()
    (keys_dir / "authorized_keys").write_text(f"# allowed clients\n\n{client_public.decode()}\n")
    return keys_dir, server_public, client_public, client_secret


@pytest.fixture
def curve_backend(backend_factory, keys):
    return backend_factory(fake=True, args=["--curve", "--keys-dir", str(keys[0])])


def wait_for_log(backend, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in backend.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{backend.log()[-2000:]}"
        time.sleep(0.05)
    return backend.log()


def test_keys_are_generated_once_with_a_private_secret(tmp_path, monkeypatch):
    keys_dir = tmp_path / "cfg"
    monkeypatch.setenv(security.KEYS_DIR_ENV, str(keys_dir))
    assert security.default_keys_dir() == keys_dir
    with pytest.raises(security.KeyError_, match="authorized_keys"):   # no allow-list yet: keys made anyway
        security.setup_server_curve()
    secret_path = keys_dir / security.SECRET_KEY_FILE
    assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    public = (keys_dir / security.PUBLIC_KEY_FILE).read_text().strip().encode()
    assert zmq.curve_public(secret_path.read_text().strip().encode()) == public
    assert security.ensure_server_keys(keys_dir)[0] == public    # not regenerated
    os.chmod(secret_path, 0o644)
    with pytest.raises(security.KeyError_, match="chmod 600"):
        security.ensure_server_keys(keys_dir)


def test_remote_bind_without_keys_exits_with_what_to_do(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), **{security.KEYS_DIR_ENV: str(tmp_path / "k")})
    result = subprocess.run([sys.executable, "-m", "fit_implicit.backend", "serve", "--bind", "tcp://0.0.0.0:0", "--device", "cpu"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "refusing to listen on tcp://0.0.0.0:0 without CurveZMQ" in result.stderr
    assert "authorized_keys" in result.stderr and "zmq.curve_keypair()" in result.stderr
    assert stat.S_IMODE((tmp_path / "k" / security.SECRET_KEY_FILE).stat().st_mode) == 0o600
    # the old escape hatch is gone
    result = subprocess.run([sys.executable, "-m", "fit_implicit.backend", "serve", "--bind", "tcp://0.0.0.0:0", "--device", "cpu",
                             "--insecure-allow-remote"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "unrecognized arguments: --insecure-allow-remote" in result.stderr


def test_remote_bind_with_keys_turns_curve_on(keys):
    args = argparse.Namespace(bind="tcp://0.0.0.0:5599", device="cpu", max_queue=None, keys_dir=str(keys[0]))
    config = config_from_args(args)   # (nothing is bound here)
    assert config.curve is not None and config.curve.public_key == keys[1]
    loopback = config_from_args(argparse.Namespace(bind="tcp://127.0.0.1:0", device="cpu", max_queue=None))
    assert loopback.curve is None
    with pytest.raises(ConfigError, match="without CurveZMQ"):
        config_from_args(argparse.Namespace(bind="tcp://0.0.0.0:5599", device="cpu", max_queue=None,
                                            keys_dir=str(keys[0] / "empty")))


def test_an_allowed_client_is_served(curve_backend, keys):
    _, server_public, client_public, client_secret = keys
    curve = dict(server_public_key=server_public.decode(), client_public_key=client_public, client_secret_key=client_secret)
    assert probe(curve_backend.address, timeout=5, **curve).protocol == protocol.PROTOCOL_VERSION
    client = JobClient(curve_backend.address, heartbeat_interval=0.2, dead_after=5.0, **curve)
    client.start(make_submit(n=2, size=8, steps=5))
    messages = client.wait(20)
    client.close()
    assert isinstance(messages[-1], protocol.Done), client.error
    assert any(isinstance(m, protocol.MeshResult) for m in messages)


def test_a_client_without_curve_is_refused_and_logged(curve_backend):
    with pytest.raises(BackendError, match="no backend answered.*CurveZMQ"):
        probe(curve_backend.address, timeout=1.0)
    wait_for_log(curve_backend, "refused a connection")


def test_a_client_key_not_in_the_allow_list_is_refused_and_logged(curve_backend, keys):
    stranger_public, stranger_secret = zmq.curve_keypair()
    with pytest.raises(BackendError, match="no backend answered.*authorized_keys"):
        probe(curve_backend.address, timeout=1.0, server_public_key=keys[1], client_public_key=stranger_public,
              client_secret_key=stranger_secret)
    wait_for_log(curve_backend, f"refused a client: its public key {stranger_public.decode()} is not in")
    # the allow-list is re-read when it changes: the same key is served once it is added
    with open(keys[0] / "authorized_keys", "a") as f:
        f.write(stranger_public.decode() + "\n")
    assert probe(curve_backend.address, timeout=5, server_public_key=keys[1], client_public_key=stranger_public,
                 client_secret_key=stranger_secret).protocol == protocol.PROTOCOL_VERSION


def test_client_keys_are_checked():
    public, secret = zmq.curve_keypair()
    with pytest.raises(BackendError, match="all three"):
        JobClient("tcp://127.0.0.1:1", server_public_key=public)
    with pytest.raises(BackendError, match="40 Z85"):
        JobClient("tcp://127.0.0.1:1", server_public_key="short", client_public_key=public, client_secret_key=secret)
    with pytest.raises(BackendError, match="does not belong"):
        JobClient("tcp://127.0.0.1:1", server_public_key=public, client_public_key=public, client_secret_key=zmq.curve_keypair()[1])


def test_an_unclear_curve_failure_is_named_by_asking_plainly(backend_factory, curve_backend, keys):
    """On a loaded machine a CurveZMQ client against a plain backend can see only an unspecific
    handshake failure (the backend hung up before this side read its greeting).  The add-on then
    asks plainly: a plain backend answers, so the user is told to turn CurveZMQ off; a CurveZMQ
    backend (the server key was wrong) does not, and the key hint stays."""
    from fit_implicit.blender_addon import client
    plain = backend_factory(fake=True)
    public, secret = zmq.curve_keypair()
    curve = client.curve_keys(zmq.curve_keypair()[0], public, secret)      # a server key nobody has
    unclear = (client.HANDSHAKE_FAILED, client.UNCLEAR_HANDSHAKE)
    assert client.clarify(unclear, plain.address, curve) == (client.HANDSHAKE_FAILED, client.NO_CURVE)
    assert "does not use CurveZMQ" in client.NO_CURVE
    assert client.clarify(unclear, curve_backend.address, curve) == unclear
    assert client.clarify(unclear, plain.address, None) == unclear         # no keys: nothing to clarify
    refused = (client.REFUSED, "refused this client's CurveZMQ key")
    assert client.clarify(refused, plain.address, curve) == refused        # only the unclear one is re-asked


def test_with_curve_a_job_belongs_to_its_key_and_token(backend_factory, keys):
    """Ownership (issue 14) with CurveZMQ: the token counts only together with the key pair it was
    said with; a reconnect with the same key (and token) still attaches, and so does one with
    the same key and no token at all."""
    keys_dir, server_public, a_public, a_secret = keys
    b_public, b_secret = zmq.curve_keypair()
    with open(keys_dir / "authorized_keys", "a") as f:
        f.write(b_public.decode() + "\n")
    backend = backend_factory(fake=True, args=["--curve", "--keys-dir", str(keys_dir)])
    token = "c0ffee" * 6
    a, b = (server_public, a_public, a_secret), (server_public, b_public, b_secret)
    with RawPeer(backend.address, token=token, curve=a) as owner:
        accepted = owner.request(make_submit(steps=400), timeout=10)
        assert isinstance(accepted, protocol.Accepted)
        job = accepted.job_id
    with RawPeer(backend.address, token=token, curve=b) as thief:       # the token, another key
        reply = thief.request(protocol.Attach(job_id=job))
        assert isinstance(reply, protocol.Error) and reply.code == "unknown_job"
        assert thief.request(protocol.Status()).queued_jobs == "" and thief.request(protocol.Ping(seq=1)).running_job == ""
    with RawPeer(backend.address, token=token, curve=a) as again:       # the same add-on reconnects
        assert isinstance(again.request(protocol.Attach(job_id=job)), protocol.Attached)
    with RawPeer(backend.address, curve=a) as keyonly:                  # same key, no token: its own jobs only
        reply = keyonly.request(protocol.Attach(job_id=job))
        assert isinstance(reply, protocol.Error)                       # the job was submitted with a token
        own = keyonly.request(make_submit(steps=2), timeout=10)
    with RawPeer(backend.address, curve=a) as keyonly_again:
        assert isinstance(keyonly_again.request(protocol.Attach(job_id=own.job_id)), protocol.Attached)
    with RawPeer(backend.address, curve=b) as other_key:
        assert isinstance(other_key.request(protocol.Attach(job_id=own.job_id)), protocol.Error)
