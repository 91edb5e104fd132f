"""Turning fitted fields into assets: meshes (and later UVs and textures)."""
from .mesh import extract_mesh, write_mesh

__all__ = ["extract_mesh", "write_mesh"]
