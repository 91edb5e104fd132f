"""Add-on preferences: where the backend listens, how to start one on this machine, and the
CurveZMQ keys of a remote backend.

CurveZMQ keys: the backend's public key is a preference (Z85 text, or the path of its
``server.key``); this machine's client key pair is kept out of every .blend, userpref.blend
included: ``client.key`` (public) and ``client.key_secret`` (mode 0600) in
:func:`client_keys_dir` (Blender's user config folder ``fit_implicit/``, or
``$FIT_IMPLICIT_CLIENT_KEYS_DIR``).  Every place that connects to the backend gets its keyword
arguments from :func:`connection_kwargs`.
"""
import os
import re
import sys
import tempfile
import textwrap

import bpy

DEFAULT_ADDRESS = "tcp://127.0.0.1:5599"

DEVICE_ITEMS = (
    ("AUTO", "Automatic", "The first CUDA GPU if there is one, else the CPU"),
    ("GPU", "GPU", "The CUDA GPU with the index below (--device cuda:N)"),
    ("ALL_GPUS", "All GPUs", "A worker on every CUDA GPU: jobs from several Blender sessions run at once, one a GPU "
                             "(--gpus all)"),
    ("CPU", "CPU", "Train on the CPU (slow; for trying things out)"),
)


class ImplicitPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    address: bpy.props.StringProperty(
        name="Backend Address",
        description="ZeroMQ address of the fitting backend (start it with: fit-implicit serve)",
        default=DEFAULT_ADDRESS,
    )
    python: bpy.props.StringProperty(
        name="Backend Python", subtype="FILE_PATH",
        description="Python executable of the backend (with torch and pyzmq installed); "
                    "empty: the checkout's .venv, else python3 on the PATH",
        default="",
    )
    source_dir: bpy.props.StringProperty(
        name="Backend Folder", subtype="DIR_PATH",
        description="Folder that holds the backend/ package (the Fit Implicit checkout), put on PYTHONPATH; "
                    "empty: found next to the add-on, or installed in the backend's Python",
        default="",
    )
    auto_start: bpy.props.BoolProperty(
        name="Start Automatically",
        description="Start a local backend when Fit Implicit finds none running at a 127.0.0.1 address",
        default=True,
    )
    start_when_shown: bpy.props.BoolProperty(
        name="Start When Shown",
        description="With Start Automatically: start the local backend as soon as the Implicit tab is shown, so that "
                    "its start-up (a few seconds) is over by the first Fit; off: only when Fit finds none running",
        default=True,
    )
    device: bpy.props.EnumProperty(name="Device", items=DEVICE_ITEMS, default="AUTO",
                                   description="Where a backend started from Blender trains")
    gpu_index: bpy.props.IntProperty(name="GPU", description="CUDA device index (cuda:N)", default=0,
                                     min=0, max=63)
    use_curve: bpy.props.BoolProperty(
        name="Use CurveZMQ",
        description="Encrypt and authenticate the connection (needed for a backend on another machine, or one "
                    "started with --curve); off: plain connection, for a backend on this machine",
        default=False,
    )
    server_key: bpy.props.StringProperty(
        name="Backend Public Key",
        description="The backend's CurveZMQ public key (40 Z85 characters, printed when it starts), or the path "
                    "of its server.key file",
        default="",
    )

    def draw(self, context):
        from . import backend_process
        layout = self.layout
        layout.prop(self, "address")
        box = layout.box()
        box.label(text="Local Backend", icon="CONSOLE")
        box.prop(self, "python")
        box.prop(self, "source_dir")
        row = box.row(align=True)
        row.prop(self, "device")
        sub = row.row(align=True)
        sub.enabled = self.device == "GPU"
        sub.prop(self, "gpu_index")
        row = box.row(align=True)
        row.prop(self, "auto_start")
        sub = row.row(align=True)
        sub.enabled = self.auto_start
        sub.prop(self, "start_when_shown")
        row = box.row(align=True)
        row.operator("implicit.backend_start", icon="PLAY")
        row.operator("implicit.backend_stop", icon="PAUSE")
        row.operator("implicit.free_memory", icon="TRASH")
        row.operator("implicit.backend_log", icon="TEXT")
        box.label(text="Command: " + " ".join(backend_process.LocalBackend.command_for(
            backend_python(self), self.address, backend_device(self))))
        self.draw_curve(layout.box())

    def draw_curve(self, box):
        box.label(text="Remote Backend Security (CurveZMQ)", icon="LOCKED")
        box.prop(self, "use_curve")
        col = box.column()
        col.enabled = self.use_curve
        col.prop(self, "server_key")
        try:
            pair = read_client_keys()
        except KeyProblem as exc:
            pair, problem = None, str(exc)
        else:
            problem = curve_problem(self) if self.use_curve else ""
        row = col.row(align=True)
        row.operator("implicit.generate_client_keys", icon="FILE_REFRESH",
                     text="New Client Keys" if pair else "Generate Client Keys")
        sub = row.row(align=True)
        sub.enabled = pair is not None
        sub.operator("implicit.copy_public_key", icon="COPYDOWN")
        col.label(text=f"Client public key: {pair[0]}" if pair else "No client keys yet")
        col.label(text=f"Stored in {client_keys_dir()} (the secret key readable by you only)")
        if pair:
            col.label(text="Add the client public key to the backend's authorized_keys (one key per line).")
        for i, line in enumerate(textwrap.wrap(problem, 90)):
            col.label(text=line, icon="ERROR" if i == 0 else "BLANK1")


def prefs(context=None):
    """This add-on's preferences, or None when it is not registered as an add-on (scripts, tests)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(__package__)
    return addon.preferences if addon is not None else None


def backend_address(context, scene=None) -> str:
    """The address to use: the scene's override if set, else the preferences, else the default."""
    scene = scene if scene is not None else getattr(context, "scene", None)
    override = getattr(getattr(scene, "implicit", None), "address", "") if scene is not None else ""
    if override.strip():
        return override.strip()
    addon = context.preferences.addons.get(__package__) if context is not None else None
    if addon is not None and addon.preferences is not None and addon.preferences.address.strip():
        return addon.preferences.address.strip()
    return DEFAULT_ADDRESS


def backend_python(p) -> str:
    """The preferences' Python, else the checkout's .venv, else python3 (python on Windows)."""
    from . import backend_process
    if p is not None and p.python.strip():
        return bpy.path.abspath(p.python.strip())
    src = backend_process.default_source_dir()
    if src is not None:
        for rel in ("bin/python", "Scripts/python.exe"):
            if (src / ".venv" / rel).is_file():
                return str(src / ".venv" / rel)
    return "python" if sys.platform == "win32" else "python3"


def backend_device(p) -> str:
    """Where a backend started from Blender trains: "" (automatic), "cpu", "cuda:N" or "all-gpus"
    (backend_process.py LocalBackend)."""
    if p is None or p.device == "AUTO":
        return ""
    return {"CPU": "cpu", "ALL_GPUS": "all-gpus"}.get(p.device, f"cuda:{p.gpu_index}")


def backend_sources(p) -> list[str]:
    from . import backend_process
    if p is not None and p.source_dir.strip():
        return [bpy.path.abspath(p.source_dir.strip())]
    src = backend_process.default_source_dir()
    return [str(src)] if src is not None else []


# --------------------------------------------------------------------------------------------
# CurveZMQ keys
# --------------------------------------------------------------------------------------------
CLIENT_KEYS_ENV = "FIT_IMPLICIT_CLIENT_KEYS_DIR"
CLIENT_PUBLIC_FILE, CLIENT_SECRET_FILE = "client.key", "client.key_secret"
MAX_KEY_FILE = 4096      # bytes read from a key file: a key is 40 characters
Z85_KEY = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")   # the Z85 alphabet (ZeroMQ RFC 32)


class KeyProblem(ValueError):
    """The CurveZMQ settings are not usable; the text says what to do."""


def client_keys_dir() -> str:
    """Folder of this machine's client key pair: $FIT_IMPLICIT_CLIENT_KEYS_DIR, else
    ``fit_implicit`` in Blender's user config folder."""
    env = os.environ.get(CLIENT_KEYS_ENV, "").strip()
    if env:
        return os.path.expanduser(env)
    return bpy.utils.user_resource("CONFIG", path="fit_implicit")


def _key_line(path: str, what: str) -> str:
    """The first line of ``path`` that is not blank or a # comment."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE)
    except OSError as exc:
        raise KeyProblem(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
    for line in data.decode("ascii", "replace").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    raise KeyProblem(f"the {what} file {path} holds no key")


def _check_z85(key: str, what: str) -> str:
    if len(key) != 40:
        raise KeyProblem(f"the {what} is not a CurveZMQ key (expected 40 Z85 characters, got {len(key)})")
    if not Z85_KEY.fullmatch(key):
        raise KeyProblem(f"the {what} is not valid Z85 text (a character outside the Z85 alphabet)")
    return key


def read_server_key(text: str) -> str:
    """The backend's public key from the preference: Z85 text, or the path of its server.key."""
    text = (text or "").strip()
    if not text:
        raise KeyProblem("set the backend's public key (Backend Public Key: the 40 characters it prints when it "
                         "starts, or the path of its server.key)")
    if len(text) == 40 and not os.path.exists(bpy.path.abspath(text)):
        return _check_z85(text, "backend public key")
    path = bpy.path.abspath(text)
    if not os.path.isfile(path):
        raise KeyProblem(f"the backend public key is neither a CurveZMQ key (40 Z85 characters) nor a file: {text}")
    return _check_z85(_key_line(path, "backend public key"), f"backend public key in {path}")


def read_client_keys(folder: str | None = None) -> tuple[str, str] | None:
    """(public, secret) Z85 of this machine's client key pair, None when none was generated.
    Raises KeyProblem for a broken pair or a secret readable by others."""
    import zmq
    folder = folder or client_keys_dir()
    public_path, secret_path = os.path.join(folder, CLIENT_PUBLIC_FILE), os.path.join(folder, CLIENT_SECRET_FILE)
    if not os.path.exists(secret_path):
        return None
    if os.name == "posix":
        mode = os.stat(secret_path).st_mode & 0o777
        if mode & 0o077:
            raise KeyProblem(f"{secret_path} is readable by other users (mode {mode:o}): run chmod 600 "
                             f"{secret_path}, or generate new client keys")
    secret = _check_z85(_key_line(secret_path, "client secret key"), "client secret key")
    try:
        public = zmq.curve_public(secret.encode("ascii")).decode("ascii")
    except (ValueError, zmq.ZMQError) as exc:
        raise KeyProblem(f"the client secret key in {secret_path} is not valid ({exc}): generate new client "
                         "keys") from None
    if not os.path.exists(public_path) or _key_line(public_path, "client public key") != public:
        raise KeyProblem(f"the client public key in {public_path} does not belong to the secret key next to it: "
                         "generate new client keys")
    return public, secret


def generate_client_keys(folder: str | None = None) -> str:
    """Make a new client key pair (replacing the old one); returns its public key (Z85)."""
    import zmq
    folder = folder or client_keys_dir()
    os.makedirs(folder, mode=0o700, exist_ok=True)
    public, secret = (k.decode("ascii") for k in zmq.curve_keypair())
    secret_path = os.path.join(folder, CLIENT_SECRET_FILE)
    tmp = secret_path + ".new"
    if os.path.exists(tmp):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    if os.name == "posix":
        os.chmod(tmp, 0o600)   # whatever the umask
    os.replace(tmp, secret_path)
    with open(os.path.join(folder, CLIENT_PUBLIC_FILE), "w") as f:
        f.write(public + "\n")
    return public


def connection_kwargs(context=None) -> dict:
    """The CurveZMQ keyword arguments of every connection to the backend (client.probe,
    client.JobClient, status.monitor, status.request): {} when CurveZMQ is off (or the add-on is
    not registered), else server_public_key / client_public_key / client_secret_key (Z85 str).
    A backend this Blender started itself (Start, or auto-start) listens on 127.0.0.1 without
    CurveZMQ, so the connections to its address go plain whatever the switch says.
    Raises KeyProblem with what to do when CurveZMQ is on but a key is missing or not valid."""
    p = prefs(context)
    if p is None or not p.use_curve:
        return {}
    from . import backend_process
    own = backend_process.get(p.address)
    if own is not None and own.running:
        return {}
    server = read_server_key(p.server_key)
    pair = read_client_keys()
    if pair is None:
        raise KeyProblem("this machine has no CurveZMQ client keys yet: press Generate Client Keys in the add-on "
                         "preferences and add the public key to the backend's authorized_keys")
    from .client import BackendError, curve_keys
    try:
        curve_keys(server, *pair)
    except BackendError as exc:
        raise KeyProblem(str(exc)) from None
    return {"server_public_key": server, "client_public_key": pair[0], "client_secret_key": pair[1]}


def curve_problem(p) -> str:
    """What is wrong with the CurveZMQ settings of preferences ``p`` ("" when usable or off)."""
    if p is None or not p.use_curve:
        return ""
    try:
        read_server_key(p.server_key)
        if read_client_keys() is None:
            return "No client keys yet: press Generate Client Keys."
    except KeyProblem as exc:
        return str(exc)[:1].upper() + str(exc)[1:]
    return ""


class IMPLICIT_OT_generate_client_keys(bpy.types.Operator):
    """Make this machine's CurveZMQ key pair (the secret stays in a private file, never in a .blend)"""

    bl_idname = "implicit.generate_client_keys"
    bl_label = "Generate Client Keys"
    bl_options = {"REGISTER", "INTERNAL"}

    def invoke(self, context, event):
        try:
            exists = read_client_keys() is not None
        except KeyProblem:
            exists = True
        if exists:   # a backend may already allow the old key
            return context.window_manager.invoke_confirm(
                self, event, title="Replace the client keys?",
                message="Backends that allow the old public key will refuse this client until you add the new one")
        return self.execute(context)

    def execute(self, context):
        # try / report ERROR / report INFO: the shape of most operators' execute (operators.py too)
        try:
            public = generate_client_keys()
        except OSError as exc:
            self.report({"ERROR"}, f"Could not write the client keys to {client_keys_dir()}: {exc.strerror or exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"New client public key {public}: add it to the backend's authorized_keys")
        return {"FINISHED"}


class IMPLICIT_OT_copy_public_key(bpy.types.Operator):
    """Copy this machine's CurveZMQ public key, to append it to the backend's authorized_keys"""

    bl_idname = "implicit.copy_public_key"
    bl_label = "Copy Public Key"
    bl_options = {"REGISTER", "INTERNAL"}

    def execute(self, context):
        try:
            pair = read_client_keys()
        except KeyProblem as exc:
            self.report({"ERROR"}, str(exc)[:1].upper() + str(exc)[1:])
            return {"CANCELLED"}
        if pair is None:
            self.report({"ERROR"}, "No client keys yet: press Generate Client Keys first")
            return {"CANCELLED"}
        context.window_manager.clipboard = pair[0]
        self.report({"INFO"}, "Copied the client public key: append it to the backend's authorized_keys")
        return {"FINISHED"}


KEY_CLASSES = (IMPLICIT_OT_generate_client_keys, IMPLICIT_OT_copy_public_key)


def log_path(address: str) -> str:
    """Where the log of a backend started from Blender goes (one file per port)."""
    folder = None
    try:
        folder = bpy.utils.extension_path_user(__package__, path="logs", create=True)
    except (ValueError, AttributeError, OSError):   # not installed as an extension (development)
        pass
    folder = folder or os.path.join(tempfile.gettempdir(), "fit_implicit_logs")
    os.makedirs(folder, exist_ok=True)
    port = address.rpartition(":")[2] or "backend"
    return os.path.join(folder, f"backend-{port}.log")
