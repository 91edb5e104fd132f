"""Encodings and fields.  Fields work in the trainer's normalised frame ([-1, 1]^3)."""
from .hashgrid import HashGrid, hashgrid_encode
from .nerf import NerfField, NerfFieldConfig

__all__ = ["HashGrid", "hashgrid_encode", "NerfField", "NerfFieldConfig"]
