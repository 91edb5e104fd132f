"""Code used by both the Blender add-on and the backend: the wire protocol and camera maths.

Imports numpy only (never bpy, torch or zmq), and only relative imports, so that
``build_addon.py`` can vendor this package inside the extension.
"""
__version__ = "0.1.0"
