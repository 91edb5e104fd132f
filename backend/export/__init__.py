"""Turning fitted fields into assets: the surface (mesh.py: marching_cubes.py, cleanup.py, the
radiance field's iso-level in iso.py), UV textures (texture.py) and files, one writer per format
(glb.py, obj.py, ply.py; files.py picks one by the file's suffix, textured.py holds what the
textured writers share)."""
