"""Encodings and fields.  Fields work in the trainer's normalised frame ([-1, 1]^3)."""
from fit_implicit.backend.fields.hashgrid import HashGrid, hashgrid_encode
from fit_implicit.backend.fields.nerf import NerfField, NerfFieldConfig

__all__ = ["HashGrid", "hashgrid_encode", "NerfField", "NerfFieldConfig"]
