"""Helpers for tests that drive Blender through the bpy wheel.

bpy is a singleton per process: in-process tests share one Blender and start each test from
``fresh_scene()``.  Anything that needs a separate Blender (environment variables read at
import, installing extensions, a clean add-on state) runs a script in a subprocess with
``run_bpy()``; the script reports back with ``emit(**values)`` (JSON).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

HAVE_BPY = importlib.util.find_spec("bpy") is not None
requires_bpy = pytest.mark.skipif(not HAVE_BPY, reason="needs the bpy module (pip install bpy==5.0.1, Python 3.11)")

# Prepended to every subprocess script.
_PRELUDE = """
import json as _json, os as _os, sys as _sys
{path_line}
def emit(**values):
    with open(_os.environ["BPY_RESULT"], "w") as _f:
        _json.dump(values, _f)
"""


def bpy_site_dir() -> Path:
    """The folder of the installed bpy wheel (without importing bpy)."""
    spec = importlib.util.find_spec("bpy")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the bpy module is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def run_bpy(code: str, *, env: dict | None = None, timeout: float = 300, cwd: str | None = None,
            repo_on_path: bool = True) -> dict:
    """Run ``code`` in a fresh Python (with bpy importable) and return what it ``emit()``-ed.

    ``repo_on_path=False`` keeps the checkout's packages (blender_addon, shared, backend) out of
    reach, e.g. to prove that an installed extension works on its own.
    Raises AssertionError with the tail of the output if the script fails or emits nothing.
    """
    with tempfile.TemporaryDirectory(prefix="bpy_run_") as tmp:
        script = Path(tmp) / "script.py"
        result = Path(tmp) / "result.json"
        path_line = f"_sys.path.insert(0, {str(REPO)!r})" if repo_on_path else ""
        script.write_text(_PRELUDE.format(path_line=path_line) + textwrap.dedent(code))
        full_env = dict(os.environ)
        if not repo_on_path:
            full_env.pop("PYTHONPATH", None)
        full_env.update(env or {})
        full_env["BPY_RESULT"] = str(result)
        proc = subprocess.run([sys.executable, str(script)], env=full_env, cwd=cwd or tmp,
                              capture_output=True, text=True, timeout=timeout)
        out = (proc.stdout + "\n" + proc.stderr)[-6000:]
        if proc.returncode != 0:
            raise AssertionError(f"bpy subprocess failed (exit {proc.returncode}):\n{out}")
        if not result.exists():
            raise AssertionError(f"bpy subprocess emitted no result:\n{out}")
        values = json.loads(result.read_text())
        values["_output"] = out
        return values


def fresh_scene(engine: str = "CYCLES", width: int = 32, height: int = 24, samples: int = 4):
    """Reset the in-process Blender to an empty scene set up for tiny, fast CPU renders."""
    import bpy

    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    scene.render.engine = engine
    scene.render.resolution_x, scene.render.resolution_y = width, height
    scene.render.resolution_percentage = 100
    if engine == "CYCLES":
        scene.cycles.device = "CPU"
        scene.cycles.samples = samples
        scene.cycles.use_denoising = False
        scene.cycles.use_adaptive_sampling = False
    return scene


def add_camera(scene, name="Camera", location=(0.0, 0.0, 5.0), rotation=(0.0, 0.0, 0.0), lens=50.0):
    """A perspective camera (default: at +5 Z looking down -Z, +Y up in the image)."""
    import bpy

    data = bpy.data.cameras.new(name)
    data.lens = lens
    ob = bpy.data.objects.new(name, data)
    ob.location, ob.rotation_euler = location, rotation
    scene.collection.objects.link(ob)
    if scene.camera is None:
        scene.camera = ob
    bpy.context.view_layer.update()
    return ob


def shader_material(name: str, shader: str, rgb, **inputs):
    """A material of one shader node (``shader``, e.g. "ShaderNodeEmission" or
    "ShaderNodeBsdfDiffuse") whose Color is ``rgb`` (scene-linear) and whose other ``inputs`` (by
    socket name) are set, wired to the material output."""
    import bpy

    mat = bpy.data.materials.new(name)
    if mat.node_tree is None:
        mat.use_nodes = True
    tree = mat.node_tree
    for node in list(tree.nodes):
        tree.nodes.remove(node)
    node = tree.nodes.new(shader)
    out = tree.nodes.new("ShaderNodeOutputMaterial")
    node.inputs["Color"].default_value = (*rgb, 1.0)
    for socket, value in inputs.items():
        node.inputs[socket].default_value = value
    tree.links.new(node.outputs[0], out.inputs["Surface"])
    return mat


def emission_material(name: str, rgb, strength: float = 1.0):
    """A material that emits ``rgb`` (scene-linear) and nothing else: exact, noise-free pixels."""
    return shader_material(name, "ShaderNodeEmission", rgb, Strength=strength)


def add_plane(scene, name="Plane", size=1.0, location=(0.0, 0.0, 0.0), material=None):
    """A square plane facing +Z, built directly (no operator, no context needed)."""
    import bpy

    h = size / 2.0
    me = bpy.data.meshes.new(name)
    me.from_pydata([(-h, -h, 0), (h, -h, 0), (h, h, 0), (-h, h, 0)], [], [(0, 1, 2, 3)])
    if material is not None:
        me.materials.append(material)
    ob = bpy.data.objects.new(name, me)
    ob.location = location
    scene.collection.objects.link(ob)
    bpy.context.view_layer.update()
    return ob
