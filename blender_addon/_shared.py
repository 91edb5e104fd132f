"""Where the add-on gets the shared protocol code from.

Inside a built extension, ``build_addon.py`` vendors the ``shared`` package as
``blender_addon/shared/`` (import it relatively: the extension's module name is
``bl_ext.<repo>.fit_implicit``).  In a development checkout there is no vendored copy and the
``fit_implicit.shared`` package (the project installed in development mode) is used.  Add-on modules import from here::

    from ._shared import protocol, wire, cameras
"""
import importlib.util

if importlib.util.find_spec(f"{__package__}.shared") is not None:
    from .shared import (cameras, color, colmap, layouts, methods, protocol, quality,  # vendored copy (built extension)
                         transforms, wire)
else:
    from fit_implicit.shared import (cameras, color, colmap, layouts, methods, protocol, quality,  # development checkout
                                     transforms, wire)

__all__ = ["cameras", "color", "colmap", "layouts", "methods", "protocol", "quality", "transforms", "wire"]
