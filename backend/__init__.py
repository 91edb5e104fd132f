"""Fit Implicit backend: trains implicit fields on posed images and exports assets.

Never imports bpy.  pyzmq is needed only by ``fit-implicit serve`` (backend.service.server).
"""
__version__ = "0.1.0"
