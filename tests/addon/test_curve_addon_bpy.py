"""CurveZMQ from the add-on's preferences: a backend that requires keys (``--curve``) is used
with the keys set there, and a refused or missing key is said as such (not "not running").

Real parts: bpy 5.0.1 headless with the add-on enabled (its preferences and operators), real
backend processes with ``--curve`` on 127.0.0.1 and a generated keys folder (the real server;
jobs run tests/helpers.fake_runner unless the test says the real trainer), real ZeroMQ with
CurveZMQ and the backend's ZAP allow-list.  The client keys are made by the add-on's own
"Generate Client Keys" operator into a temporary folder ($FIT_IMPLICIT_CLIENT_KEYS_DIR).
"""
import os
import stat
import sys
import time

import pytest
import zmq

from bpy_helpers import REPO, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def addon():
    import bpy  # noqa: F401  (first: it puts addon_utils on the path)
    import addon_utils
    mod = addon_utils.enable("fit_implicit.blender_addon", default_set=True)
    assert mod is not None
    yield mod
    from fit_implicit.blender_addon import status
    status.close_all()
    addon_utils.disable("fit_implicit.blender_addon")


@pytest.fixture
def client_keys(addon, tmp_path, monkeypatch):
    """The add-on's client key folder, emptied for the test; returns the public key the
    Generate Client Keys operator made."""
    import bpy
    from fit_implicit.blender_addon import preferences
    folder = tmp_path / "client"
    monkeypatch.setenv(preferences.CLIENT_KEYS_ENV, str(folder))
    assert preferences.read_client_keys() is None
    assert bpy.ops.implicit.generate_client_keys() == {"FINISHED"}
    public, secret = preferences.read_client_keys()
    return public


@pytest.fixture
def prefs(addon):
    import bpy
    p = bpy.context.preferences.addons["fit_implicit.blender_addon"].preferences
    names = ("address", "use_curve", "server_key", "auto_start", "python", "source_dir", "device")
    saved = {name: getattr(p, name) for name in names}
    yield p
    for name, value in saved.items():
        setattr(p, name, value)


def curve_backend(backend_factory, tmp_path, allowed: list[str], fake: bool = True, args=()):
    """A --curve backend on 127.0.0.1 whose authorized_keys lists ``allowed``; returns
    (backend, path of its server.key)."""
    from fit_implicit.backend.service import security
    keys_dir = tmp_path / "server_keys"
    security.ensure_server_keys(keys_dir)
    (keys_dir / "authorized_keys").write_text("# clients\n" + "".join(k + "\n" for k in allowed))
    backend = backend_factory(fake=fake, args=["--curve", "--keys-dir", str(keys_dir), *args])
    return backend, keys_dir / security.PUBLIC_KEY_FILE


def _cube_scene():
    import bpy
    scene = bpy.context.scene
    for ob in list(bpy.data.objects):
        bpy.data.objects.remove(ob, do_unlink=True)
    scene.render.engine = "CYCLES"
    scene.render.resolution_x, scene.render.resolution_y, scene.render.resolution_percentage = 32, 24, 100
    scene.cycles.device, scene.cycles.samples = "CPU", 1
    scene.implicit.address, scene.implicit.status = "", ""
    bpy.ops.mesh.primitive_cube_add(size=1.0)
    scene.implicit.ring_count = 4
    scene.implicit.preset = "draft"
    scene.implicit.preview_size = 0
    return scene


def _monitor(address):
    from fit_implicit.blender_addon import preferences, status
    import bpy
    return status.monitor(address, **preferences.connection_kwargs(bpy.context))


class _Layout:
    """Records what a draw() puts on screen (headless Blender has no windows to draw into)."""

    def __init__(self, texts):
        self.texts, self.enabled = texts, True

    def label(self, text="", **_):
        self.texts.append(text)

    def prop(self, data, name, **_):
        self.texts.append(f"prop {name}")

    def operator(self, idname, text="", **_):
        self.texts.append(f"button {text or idname}")

    def box(self):
        return self

    row = column = lambda self, **_: self


def _drawn(prefs) -> str:
    texts = []
    prefs.draw_curve(_Layout(texts))
    return " ".join(texts)   # wrapped lines joined back


def test_client_keys_are_private_and_copied_for_authorized_keys(client_keys, prefs):
    import bpy
    from fit_implicit.blender_addon import preferences
    folder = preferences.client_keys_dir()
    secret_path = os.path.join(folder, preferences.CLIENT_SECRET_FILE)
    assert stat.S_IMODE(os.stat(secret_path).st_mode) == 0o600
    secret = open(secret_path).read().strip()
    assert zmq.curve_public(secret.encode()).decode() == client_keys
    assert bpy.ops.implicit.copy_public_key() == {"FINISHED"}
    clip = bpy.context.window_manager.clipboard
    # Headless Blender may have no system clipboard; where it has one, it holds the public key.
    assert clip in ("", client_keys), clip
    # Nothing secret goes into the preferences (saved in userpref.blend) or a .blend.
    prefs.use_curve, prefs.server_key = True, zmq.curve_keypair()[0].decode()
    shown = _drawn(prefs)
    assert f"Client public key: {client_keys}" in shown and "button New Client Keys" in shown
    assert secret not in shown
    assert secret not in repr([getattr(prefs, k) for k in prefs.bl_rna.properties.keys() if k != "rna_type"])
    # Bad settings are named in words.
    prefs.server_key = "not a key"
    with pytest.raises(preferences.KeyProblem, match="neither a CurveZMQ key .* nor a file"):
        preferences.connection_kwargs(bpy.context)
    prefs.server_key = "~" * 40
    with pytest.raises(preferences.KeyProblem, match="not valid Z85"):
        preferences.connection_kwargs(bpy.context)
    os.chmod(secret_path, 0o644)
    prefs.server_key = zmq.curve_keypair()[0].decode()
    with pytest.raises(preferences.KeyProblem, match="readable by other users"):
        preferences.connection_kwargs(bpy.context)
    assert "readable by other users" in preferences.curve_problem(prefs)
    assert "readable by other users" in _drawn(prefs)     # said in the preferences, under the keys
    os.chmod(secret_path, 0o600)
    open(os.path.join(folder, preferences.CLIENT_PUBLIC_FILE), "w").write(zmq.curve_keypair()[0].decode())
    with pytest.raises(preferences.KeyProblem, match="does not belong to the secret key"):
        preferences.connection_kwargs(bpy.context)
    prefs.use_curve = False
    assert preferences.connection_kwargs(bpy.context) == {}   # off: plain connections, as before


def test_right_keys_status_idle_fit_done_and_free_memory(client_keys, prefs, backend_factory, tmp_path):
    import bpy
    from fit_implicit.blender_addon import panels, status
    backend, server_key_file = curve_backend(backend_factory, tmp_path, [client_keys])
    prefs.address, prefs.auto_start = backend.address, False
    prefs.use_curve, prefs.server_key = True, str(server_key_file)   # the path of server.key works
    assert _monitor(backend.address).wait_for((status.IDLE,), 15).state == status.IDLE
    assert panels.backend_line(backend.address) == ("Backend idle (cpu)", "CHECKMARK")
    prefs.server_key = server_key_file.read_text().strip()            # and so does the key itself
    assert _monitor(backend.address).wait_for((status.IDLE,), 15).state == status.IDLE
    scene = _cube_scene()
    assert bpy.ops.implicit.fit(timeout=60) == {"FINISHED"}
    assert scene.implicit.status.startswith("Fit finished"), scene.implicit.status
    assert "Implicit" in " ".join(ob.name for ob in bpy.data.objects if ob.type == "MESH")
    assert bpy.ops.implicit.free_memory() == {"FINISHED"}
    assert "refused" not in backend.log()


def test_a_key_missing_from_authorized_keys_is_reported_as_refused(client_keys, prefs, backend_factory, tmp_path):
    import bpy
    from fit_implicit.blender_addon import panels, status
    stranger = zmq.curve_keypair()[0].decode()
    backend, server_key_file = curve_backend(backend_factory, tmp_path, [stranger])
    prefs.address, prefs.auto_start = backend.address, True    # refused is not "unreachable": no auto-start
    prefs.use_curve, prefs.server_key = True, server_key_file.read_text().strip()
    snap = _monitor(backend.address).wait_for((status.REFUSED,), 15)
    assert snap.state == status.REFUSED, snap
    assert "authorized_keys" in snap.detail
    assert panels.backend_line(backend.address) == ("Backend refused this client's key", "LOCKED")
    time.sleep(3.5)   # past the not-running timeout: still refused, not "not running"
    assert _monitor(backend.address).snapshot().state == status.REFUSED
    _cube_scene()
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="refused this client's CurveZMQ key: add this client's public key"):
        bpy.ops.implicit.fit(timeout=30)
    assert time.monotonic() - t < 10
    from fit_implicit.blender_addon import backend_process
    assert backend_process.get(backend.address) is None   # no local backend was started instead
    with pytest.raises(RuntimeError, match="refused this client's CurveZMQ key"):
        bpy.ops.implicit.free_memory()
    # Once the key is allowed (the backend re-reads authorized_keys) the same client gets in.
    with open(server_key_file.parent / "authorized_keys", "a") as f:
        f.write(client_keys + "\n")
    assert _monitor(backend.address).wait_for((status.IDLE,), 15).state == status.IDLE


def test_a_curve_backend_without_keys_configured_needs_keys(addon, prefs, backend_factory, tmp_path):
    import bpy
    from fit_implicit.blender_addon import panels, status
    backend, _ = curve_backend(backend_factory, tmp_path, [zmq.curve_keypair()[0].decode()])
    prefs.address, prefs.auto_start, prefs.use_curve = backend.address, True, False
    snap = _monitor(backend.address).wait_for((status.NEEDS_KEYS,), 15)
    assert snap.state == status.NEEDS_KEYS and "Use CurveZMQ" in snap.detail, snap
    assert panels.backend_line(backend.address) == ("Backend needs CurveZMQ keys", "UNLOCKED")
    _cube_scene()
    with pytest.raises(RuntimeError, match="requires CurveZMQ keys: in the add-on preferences turn on Use CurveZMQ"):
        bpy.ops.implicit.fit(timeout=30)
    from fit_implicit.blender_addon import backend_process
    assert backend_process.get(backend.address) is None


def test_keys_against_a_plain_backend_and_a_wrong_server_key_are_named(client_keys, prefs, backend_factory,
                                                                       tmp_path):
    import bpy
    from fit_implicit.blender_addon import status
    plain = backend_factory(fake=True)
    prefs.address, prefs.auto_start = plain.address, False
    prefs.use_curve, prefs.server_key = True, zmq.curve_keypair()[0].decode()
    snap = _monitor(plain.address).wait_for((status.HANDSHAKE_FAILED,), 15)
    assert snap.state == status.HANDSHAKE_FAILED and "does not use CurveZMQ" in snap.detail, snap
    backend, _ = curve_backend(backend_factory, tmp_path, [client_keys])
    prefs.address = backend.address                    # the server key set above is not this backend's
    snap = _monitor(backend.address).wait_for((status.HANDSHAKE_FAILED,), 15)
    assert snap.state == status.HANDSHAKE_FAILED and "check the backend's public key" in snap.detail, snap
    _cube_scene()
    with pytest.raises(RuntimeError, match="did not complete the CurveZMQ handshake"):
        bpy.ops.implicit.fit(timeout=30)


@pytest.mark.slow   # starts a real backend process (torch import)
def test_a_backend_this_blender_starts_itself_needs_no_keys(client_keys, prefs, tmp_path, monkeypatch):
    """Use CurveZMQ on (for a remote box), then Start on a loopback address: the local backend
    listens without CurveZMQ on 127.0.0.1, and the add-on talks to it plainly, not "does not use
    CurveZMQ"."""
    import socket
    import bpy
    from fit_implicit.blender_addon import backend_process, panels, preferences, status
    from fit_implicit.backend.service import security
    monkeypatch.setenv("FIT_IMPLICIT_RUNS_DIR", str(tmp_path / "runs"))
    security.ensure_server_keys(tmp_path / "remote_keys")          # the remote box's key
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    prefs.address, prefs.auto_start = address, True
    prefs.use_curve, prefs.server_key = True, str(tmp_path / "remote_keys" / security.PUBLIC_KEY_FILE)
    prefs.device = "ALL_GPUS"                                          # a worker a GPU: serve --gpus all
    assert preferences.backend_device(prefs) == "all-gpus"
    prefs.python, prefs.source_dir, prefs.device = sys.executable, str(REPO), "CPU"
    assert preferences.connection_kwargs(bpy.context)                # nothing started yet: keys apply
    _cube_scene()
    try:
        assert bpy.ops.implicit.backend_start(wait=True) == {"FINISHED"}
        proc = backend_process.get(address)
        assert proc is not None and proc.running and "--curve" not in proc.command
        assert preferences.connection_kwargs(bpy.context) == {}
        assert _monitor(address).wait_for((status.IDLE,), 30).state == status.IDLE
        assert panels.backend_line(address) == ("Backend idle (cpu)", "CHECKMARK")
    finally:
        assert bpy.ops.implicit.backend_stop(wait=True) == {"FINISHED"}
    assert not proc.running
    assert preferences.connection_kwargs(bpy.context)                # gone: the keys apply again


def test_loopback_without_keys_works_as_before(addon, prefs, fake_backend):
    import bpy
    from fit_implicit.blender_addon import panels, status
    prefs.address, prefs.auto_start, prefs.use_curve = fake_backend.address, False, False
    assert _monitor(fake_backend.address).wait_for((status.IDLE,), 15).state == status.IDLE
    assert panels.backend_line(fake_backend.address) == ("Backend idle (cpu)", "CHECKMARK")
    scene = _cube_scene()
    assert bpy.ops.implicit.fit(timeout=60) == {"FINISHED"}
    assert scene.implicit.status.startswith("Fit finished")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_trainer_over_curve_runs_a_draft_fit_to_done(client_keys, prefs, backend_factory, tmp_path):
    """The real trainer behind --curve: a draft fit of few steps, from the add-on, to Done."""
    from fit_implicit.blender_addon import fit_session
    backend, server_key_file = curve_backend(backend_factory, tmp_path, [client_keys], fake=False,
                                             args=["--no-warm-up"])
    prefs.address, prefs.auto_start = backend.address, False
    prefs.use_curve, prefs.server_key = True, str(server_key_file)
    scene = _cube_scene()
    result = fit_session.fit_scene(scene, preset="draft", steps=20, mesh_resolution=32, ring_count=4,
                                   preview_size=0, timeout=200)
    assert result.status == "done" and result.mesh is not None, result.message
