"""Encodings and fields: the hash grid (hashgrid.py, fused kernels in hashgrid_triton.py), the
blocks the fields share (layers.py), the radiance field (nerf.py), the signed distance field
(sdf.py) and the occupancy field (occfield.py).  Fields work in the trainer's normalised frame
([-1, 1]^3)."""
