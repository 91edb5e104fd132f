"""Add-on preferences: where the backend listens, and how to start one on this machine."""
import os
import sys
import tempfile

import bpy

DEFAULT_ADDRESS = "tcp://127.0.0.1:5599"

DEVICE_ITEMS = (
    ("AUTO", "Automatic", "The first CUDA GPU if there is one, else the CPU"),
    ("GPU", "GPU", "The CUDA GPU with the index below (--device cuda:N)"),
    ("CPU", "CPU", "Train on the CPU (slow; for trying things out)"),
)


class ImplicitPreferences(bpy.types.AddonPreferences):
    bl_idname = __package__

    address: bpy.props.StringProperty(
        name="Backend Address",
        description="ZeroMQ address of the fitting backend (start it with: python -m backend serve)",
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
    device: bpy.props.EnumProperty(name="Device", items=DEVICE_ITEMS, default="AUTO")
    gpu_index: bpy.props.IntProperty(name="GPU", description="CUDA device index (cuda:N)", default=0,
                                     min=0, max=63)

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
        box.prop(self, "auto_start")
        row = box.row(align=True)
        row.operator("implicit.backend_start", icon="PLAY")
        row.operator("implicit.backend_stop", icon="PAUSE")
        row.operator("implicit.free_memory", icon="TRASH")
        row.operator("implicit.backend_log", icon="TEXT")
        box.label(text="Command: " + " ".join(backend_process.LocalBackend.command_for(
            backend_python(self), self.address, backend_device(self))))


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
    """The --device value: "" (automatic), "cpu" or "cuda:N"."""
    if p is None or p.device == "AUTO":
        return ""
    return "cpu" if p.device == "CPU" else f"cuda:{p.gpu_index}"


def backend_sources(p) -> list[str]:
    from . import backend_process
    if p is not None and p.source_dir.strip():
        return [bpy.path.abspath(p.source_dir.strip())]
    src = backend_process.default_source_dir()
    return [str(src)] if src is not None else []


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
