"""The extension as users get it: build the zip, validate it, install it into a fresh Blender,
enable it, and run the Fit operator through the bundled pyzmq against a real backend process
(the real server with the fake job runner from tests/helpers.py)."""
import os
import subprocess
import sys
import tomllib
import zipfile

import pytest

from bpy_helpers import HAVE_BPY, REPO, run_bpy

pytestmark = [pytest.mark.skipif(not HAVE_BPY, reason="needs the bpy module"), pytest.mark.blender]

PLATFORM = "linux-x64"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(zip path, None) built with wheels, or (zip path, reason) of an offline --no-wheels build."""
    out = tmp_path_factory.mktemp("dist")
    cache = REPO / "dist" / "wheel-cache"      # shared with `make addon`: reruns work offline
    cmd = [sys.executable, str(REPO / "build_addon.py"), "--out", str(out), "--wheel-cache", str(cache)]
    proc = subprocess.run(cmd + ["--platforms", PLATFORM], capture_output=True, text=True, timeout=300)
    no_wheels = None
    if proc.returncode != 0:
        no_wheels = ("built with --no-wheels because the pyzmq wheels could not be fetched "
                     f"(PyPI unreachable?): {(proc.stderr or proc.stdout).strip()[-400:]}")
        proc = subprocess.run(cmd + ["--no-wheels"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    zips = sorted(out.glob("fit_implicit-*.zip"))
    assert len(zips) == 1, zips
    if no_wheels is None:
        assert zips[0].name == "fit_implicit-0.1.0-linux_x64.zip"
    return zips[0], no_wheels


def _cli():
    sys.path.insert(0, str(REPO))
    import build_addon
    return build_addon.find_extension_cli()


def test_zip_validates_and_holds_everything(built):
    path, no_wheels = built
    proc = subprocess.run([sys.executable, str(_cli()), "validate", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        manifest = tomllib.loads(z.read("blender_manifest.toml").decode())
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    for required in ("__init__.py", "capture.py", "importer.py", "fit_session.py", "operators.py",
                     "panels.py", "client.py", "_shared.py", "shared/protocol.py", "shared/cameras.py",
                     "shared/wire.py"):
        assert required in names, required
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert not any("import torch" in src or "from torch" in src for src in sources.values())
    assert manifest["id"] == "fit_implicit" and manifest["version"] == "0.1.0"
    assert manifest["blender_version_min"] == "4.2.0" and manifest["type"] == "add-on"
    assert manifest["license"] == ["SPDX:GPL-3.0-or-later"]
    assert set(manifest["permissions"]) == {"network", "files", "clipboard"}
    if no_wheels:
        pytest.skip(no_wheels)
    wheels = sorted(n for n in names if n.startswith("wheels/"))
    assert len(wheels) == 2, wheels
    assert any("-cp311-cp311-manylinux" in w for w in wheels) and any("-cp312-abi3-manylinux" in w for w in wheels)
    assert manifest["build"]["generated"]["platforms"] == [PLATFORM]
    assert sorted(manifest["build"]["generated"]["wheels"]) == sorted("./" + w for w in wheels)


INSTALL_SCRIPT = r"""
import os, sys, time
import bpy, addon_utils

zip_path, address = os.environ["FI_ZIP"], os.environ["FI_ADDRESS"]
res = {}
res["install"] = sorted(bpy.ops.extensions.package_install_files(
    filepath=zip_path, repo="user_default", enable_on_install=True))
mod_name = "bl_ext.user_default.fit_implicit"
res["enabled"] = mod_name in {a.module for a in bpy.context.preferences.addons}
res["module_loaded"] = mod_name in sys.modules
res["has_fit"] = hasattr(bpy.ops.implicit, "fit") and hasattr(bpy.types, "IMPLICIT_OT_fit")
res["checkout_visible"] = any(m == "fit_implicit.blender_addon" or m.startswith("fit_implicit.blender_addon.") for m in sys.modules)
# The bpy module appends the extensions' site-packages after the environment's own (where the
# test environment has pyzmq too); Blender itself puts it first.  Do what Blender does, so that
# the client below really runs on the bundled wheel.
res["zmq_imported_early"] = "zmq" in sys.modules
local = [p for p in sys.path if os.path.join("extensions", ".local", "lib") in p]
for p in local:
    sys.path.remove(p)
sys.path[:0] = local
import zmq
res["zmq_file"] = zmq.__file__
res["zmq_version"] = zmq.zmq_version()
prefs = bpy.context.preferences.addons[mod_name].preferences
res["default_address"] = prefs.address

# 1. No cameras and nothing selected: a clear error.
scene = bpy.context.scene
for ob in list(scene.objects):
    bpy.data.objects.remove(ob, do_unlink=True)
bpy.ops.mesh.primitive_cube_add(size=1.0, location=(0.5, -0.25, 0.75))
cube = bpy.context.object
cube.select_set(False)
try:
    bpy.ops.implicit.fit()
    res["no_camera_error"] = ""
except RuntimeError as exc:
    res["no_camera_error"] = str(exc)

# 2. Backend not running: a clear error that says how to start it.
cube.select_set(True)
try:
    bpy.ops.implicit.fit(address="tcp://127.0.0.1:9")
    res["no_backend_error"] = ""
except RuntimeError as exc:
    res["no_backend_error"] = str(exc)

# 3. A whole fit through the installed add-on and its bundled zmq, against a real backend.
scene.render.engine = "CYCLES"
scene.cycles.samples = 1
scene.render.resolution_x, scene.render.resolution_y = 32, 24
scene.implicit.ring_count = 6
scene.implicit.preset = "draft"
t = time.monotonic()
res["fit"] = sorted(bpy.ops.implicit.fit(address=address))
res["fit_seconds"] = time.monotonic() - t
res["cameras"] = len([o for o in scene.objects if o.type == "CAMERA"])
res["status"] = scene.implicit.status
res["running"] = scene.implicit.running
mesh = bpy.data.objects.get("Implicit Mesh")
res["mesh_vertices"] = len(mesh.data.vertices) if mesh else -1
res["mesh_collection"] = mesh.users_collection[0].name if mesh else ""

# 4. The script API of the installed extension.
fs = sys.modules[mod_name + ".fit_session"]
r = fs.fit_scene(bpy.context, address, preset="draft", eval_cameras=["Implicit Camera 000"])
res["api_status"] = r.status
res["api_renders"] = [list(x.shape) for x in r.renders]
res["api_images"] = list(r.images.shape)
res["api_timings"] = sorted(r.timings)

bpy.ops.preferences.addon_disable(module=mod_name)
res["disabled"] = not hasattr(bpy.types, "IMPLICIT_OT_fit")
emit(**res)
"""


def test_install_enable_and_fit_against_backend(built, fake_backend, tmp_path):
    path, no_wheels = built
    res = run_bpy(INSTALL_SCRIPT, repo_on_path=False, timeout=240, env={
        "BLENDER_USER_RESOURCES": str(tmp_path / "blender_user"),
        "FI_ZIP": str(path),
        "FI_ADDRESS": fake_backend.address,
    })
    out = res.pop("_output")
    assert res["install"] == ["FINISHED"], out
    assert res["enabled"] and res["module_loaded"] and res["has_fit"], (res, out)
    assert not res["checkout_visible"]
    assert res["default_address"] == "tcp://127.0.0.1:5599"
    assert "no cameras and nothing is selected" in res["no_camera_error"], res
    assert "fit-implicit serve" in res["no_backend_error"], res
    assert res["fit"] == ["FINISHED"], (res, out, fake_backend.log()[-2000:])
    # 6 ring cameras and one more held out (FitSettings.ring_holdout), the imported asset checked there
    assert res["cameras"] == 7 and res["mesh_vertices"] == 4 and res["mesh_collection"] == "Implicit Results"
    assert "held-out view" in res["status"], res["status"]
    assert res["status"].startswith("Fit finished") and not res["running"]
    # the named eval camera and the ring's held-out one, neither trained on
    assert res["api_status"] == "done" and res["api_renders"] == [[24, 32, 4]] * 2
    assert res["api_images"] == [5, 24, 32, 4]
    assert {"render", "upload", "train", "total"} <= set(res["api_timings"])
    assert res["disabled"] and not res["zmq_imported_early"]
    if no_wheels:
        pytest.skip("installed and ran, but zmq came from the environment: " + no_wheels)
    site = os.path.join(str(tmp_path / "blender_user"), "extensions", ".local", "lib")
    assert res["zmq_file"].startswith(site), res["zmq_file"]


# --------------------------------------------------------------------------------------------
# Blender 4.2 LTS (bpy==4.2.23 in .venv-bpy42, made by `make test`)
# --------------------------------------------------------------------------------------------
def _bpy42_python() -> str | None:
    path = os.environ.get("FIT_IMPLICIT_BPY42") or str(REPO / ".venv-bpy42" / "bin" / "python")
    return path if os.path.isfile(path) else None


def _run_script(python: str, code: str, env: dict, timeout: float) -> dict:
    """run_bpy() for another Python: the script emits its results as JSON."""
    import json
    import tempfile
    import textwrap
    with tempfile.TemporaryDirectory(prefix="bpy42_") as tmp:
        script, result = os.path.join(tmp, "script.py"), os.path.join(tmp, "result.json")
        prelude = ("import json as _json, os as _os\n"
                   "def emit(**values):\n"
                   "    with open(_os.environ['BPY_RESULT'], 'w') as _f:\n"
                   "        _json.dump(values, _f)\n")
        with open(script, "w") as f:
            f.write(prelude + textwrap.dedent(code))
        full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        full_env.update(env, BPY_RESULT=result)
        proc = subprocess.run([python, script], env=full_env, cwd=tmp, capture_output=True, text=True,
                              timeout=timeout)
        out = (proc.stdout + "\n" + proc.stderr)[-6000:]
        assert proc.returncode == 0 and os.path.exists(result), f"exit {proc.returncode}:\n{out}"
        with open(result) as f:
            values = json.load(f)
        values["_output"] = out
        return values


# Skipped only when run outside `make test` (e.g. plain pytest in a dev venv): `make test`, and so CI,
# always builds .venv-bpy42 and passes it in FIT_IMPLICIT_BPY42, so this test runs there.
@pytest.mark.skipif(_bpy42_python() is None,
                    reason="no Blender 4.2 LTS module: `make test` creates .venv-bpy42 (pip install bpy==4.2.23)")
def test_install_enable_and_fit_in_blender_4_2(built, fake_backend, tmp_path):
    """The same install-and-fit script as above, in bpy 4.2.23: zmq can only come from the
    extension's bundled wheel there (the 4.2 environment has no pyzmq)."""
    path, no_wheels = built
    if no_wheels:
        # Offline only (PyPI unreachable while building): a zip without the bundled pyzmq wheel cannot
        # talk ZeroMQ in 4.2, which has no pyzmq of its own; the reason printed says which fetch failed.
        pytest.skip("the 4.2 environment has no pyzmq of its own: " + no_wheels)
    # bpy 4.2.23 segfaults at interpreter exit after this script (every check had passed and the
    # results were written; cause not bisected yet): leave with os._exit once they are written.
    code = "import bpy\nassert bpy.app.version[:2] == (4, 2)\n" + INSTALL_SCRIPT + "\nimport os\nos._exit(0)\n"
    res = _run_script(_bpy42_python(), code, env={
        "BLENDER_USER_RESOURCES": str(tmp_path / "blender_user"),
        "FI_ZIP": str(path),
        "FI_ADDRESS": fake_backend.address,
    }, timeout=300)
    out = res.pop("_output")
    assert res["install"] == ["FINISHED"] and res["enabled"] and res["has_fit"], (res, out)
    assert "no cameras and nothing is selected" in res["no_camera_error"], res
    assert "fit-implicit serve" in res["no_backend_error"], res
    assert res["fit"] == ["FINISHED"], (res, out, fake_backend.log()[-2000:])
    assert res["cameras"] == 7 and res["mesh_vertices"] == 4 and res["status"].startswith("Fit finished")
    assert res["api_status"] == "done" and res["api_renders"] == [[24, 32, 4]] * 2
    assert res["disabled"]
    site = os.path.join(str(tmp_path / "blender_user"), "extensions", ".local", "lib")
    assert res["zmq_file"].startswith(site), res["zmq_file"]
