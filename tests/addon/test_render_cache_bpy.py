"""Clear Cache (implicit.clear_cache): it deletes the views Resume Renders keeps, and nothing else.

The cache files are written by the capture code's own writer; the system's temp folder (where
an unsaved file's cache lives) is moved into the test's folder.
"""
import os
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest

from bpy_helpers import fresh_scene, requires_bpy

pytestmark = [requires_bpy, pytest.mark.blender]


def _fill_cache(folder: str, views: int = 2) -> int:
    """``views`` cached views, as capture.ViewRenderer writes them; returns their bytes."""
    from fit_implicit.blender_addon import capture
    rng = np.random.default_rng(0)
    for i in range(views):
        rgba = rng.integers(0, 256, (400, 400, 4), dtype=np.uint8)     # noise: about 0.6 MB compressed
        capture._write_cached(os.path.join(folder, f"{i:040x}.npz"), capture.RenderedView(rgba))
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))


def _clear(context) -> tuple[set, list]:
    from fit_implicit.blender_addon.render_cache import IMPLICIT_OT_clear_cache
    reports = []
    op = SimpleNamespace(report=lambda kind, text: reports.append((kind, text)))
    return IMPLICIT_OT_clear_cache.execute(op, context), reports


def test_clear_cache_frees_the_render_cache_and_keeps_other_files(addon, tmp_path, monkeypatch):
    import bpy
    from fit_implicit.blender_addon import capture, running
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    scene = fresh_scene()
    folder = capture.default_cache_dir()
    assert folder == str(tmp_path / "fit_implicit_cache")

    # Nothing cached yet: nothing to free, and no error.
    assert _clear(bpy.context) == ({"FINISHED"}, [({"INFO"}, f"The render cache is empty ({folder})")])

    size = _fill_cache(folder)
    with open(os.path.join(folder, f"{7:040x}.npz.1234.tmp.npz"), "wb") as f:      # a write cut short
        f.write(b"\0" * 1000)
    with open(os.path.join(folder, "notes.txt"), "w") as f:                          # not the add-on's
        f.write("mine")
    result, reports = _clear(bpy.context)
    assert result == {"FINISHED"}
    assert reports == [({"INFO"}, f"Freed {(size + 1000) / 1e6:.1f} MB (3 cached files) in {folder}")]
    assert size > 1e6 and os.listdir(folder) == ["notes.txt"]

    # Once only the add-on's files were there, the folder goes too.
    os.remove(os.path.join(folder, "notes.txt"))
    _fill_cache(folder, views=1)
    assert bpy.ops.implicit.clear_cache() == {"FINISHED"} and not os.path.exists(folder)

    # Not while a fit runs: it may be writing to the cache.
    running.add(scene, object())
    try:
        assert not bpy.ops.implicit.clear_cache.poll()
    finally:
        running.remove(scene, running.active_session(scene))
    assert bpy.ops.implicit.clear_cache.poll()


def test_a_saved_file_clears_the_cache_next_to_it(addon, tmp_path):
    import bpy
    from fit_implicit.blender_addon import capture
    fresh_scene()
    bpy.ops.wm.save_as_mainfile(filepath=str(tmp_path / "scene.blend"))
    try:
        folder = capture.default_cache_dir()
        assert folder == str(tmp_path / "fit_implicit_cache")
        _fill_cache(folder)
        result, reports = _clear(bpy.context)
        assert result == {"FINISHED"} and "(2 cached files)" in reports[0][1] and not os.path.exists(folder)
    finally:
        fresh_scene()       # the next tests start from an unsaved file
