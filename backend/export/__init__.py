"""Turning fitted fields into assets: meshes (and later UVs and textures)."""
from fit_implicit.backend.export.files import write_mesh
from fit_implicit.backend.export.mesh import extract_mesh

__all__ = ["extract_mesh", "write_mesh"]
