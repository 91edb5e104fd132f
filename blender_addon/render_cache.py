"""Clear Cache: delete the rendered views the add-on keeps for Resume Renders.

The cache is one folder (capture.default_cache_dir: ``fit_implicit_cache`` next to the saved
.blend, else in the system's temp folder) of files named by capture.ViewRenderer: a 40-digit
hex key + ``.npz``, and ``<key>.npz.<pid>.tmp.npz`` while one is being written.  Only files
named that way are deleted, so anything else a user put in that folder stays; the folder goes
when nothing else is left in it.
"""
import os
import re

import bpy

from . import running

CACHE_FILE = re.compile(r"[0-9a-f]{40}\.npz(\.\d+\.tmp\.npz)?")


def clear_render_cache(folder: str) -> tuple[int, int]:
    """Delete the cached views in ``folder``; returns (files deleted, bytes freed).  A missing
    folder frees nothing.  Raises OSError when a file cannot be deleted."""
    if not os.path.isdir(folder):
        return 0, 0
    count = freed = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if CACHE_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                size = entry.stat(follow_symlinks=False).st_size
                os.remove(entry.path)
                count, freed = count + 1, freed + size
    try:
        os.rmdir(folder)        # only when empty
    except OSError:
        pass
    return count, freed


class IMPLICIT_OT_clear_cache(bpy.types.Operator):
    """Delete the rendered views kept for Resume Renders (the next fit renders every view again)"""

    bl_idname = "implicit.clear_cache"
    bl_label = "Clear Cache"
    bl_options = {"REGISTER"}

    @classmethod
    def poll(cls, context):
        if running.all_sessions():      # a fit may be writing to the cache
            cls.poll_message_set("A fit is running: clear the cache when it has ended")
            return False
        return True

    def execute(self, context):
        from .capture import default_cache_dir
        folder = default_cache_dir()
        try:
            count, freed = clear_render_cache(folder)
        except OSError as exc:
            self.report({"ERROR"}, f"Could not clear the render cache {folder}: {exc.strerror or exc}")
            return {"CANCELLED"}
        if count == 0:
            self.report({"INFO"}, f"The render cache is empty ({folder})")
        else:
            self.report({"INFO"}, f"Freed {freed / 1e6:.1f} MB ({count} cached files) in {folder}")
        return {"FINISHED"}


CLASSES = (IMPLICIT_OT_clear_cache,)
