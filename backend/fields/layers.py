"""Building blocks the fields share: the settings of an encoding + MLP field, the MLP, and the
spherical-harmonics encoding of view directions."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fit_implicit.backend.fields.encodings import SpectralConfig, build_encoding, encoding_levels
from fit_implicit.backend.fields.hashgrid import HashGridConfig
from fit_implicit.shared.methods import ENCODINGS


@dataclass
class FieldConfig:
    """What every field has: an encoding of positions (fields/encodings.py) and MLPs of one width."""

    encoding: str = "hashgrid"  # hashgrid | fourier | positional | siren (fields/encodings.py: which to pick)
    grid: HashGridConfig = field(default_factory=HashGridConfig)
    spectral: SpectralConfig = field(default_factory=SpectralConfig)
    hidden: int = 64            # MLP width
    geo_features: int = 15      # geometry features from the density/geometry MLP to the colour heads
    color_layers: int = 2       # hidden layers of the colour MLP
    warm_start: bool = True     # start the MLPs from the shipped meta-learned weights (fields/warm_start.py)

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding {self.encoding!r} is not one of {', '.join(ENCODINGS)}")
        self.grid.validate()
        self.spectral.validate()
        if int(self.hidden) < 1:
            raise ValueError(f"hidden must be at least 1, got {self.hidden}")

    def build_encoding(self) -> nn.Module:
        """The encoding module (fields/encodings.py) these settings describe."""
        return build_encoding(self.encoding, self.grid, self.spectral)

    @property
    def all_levels(self) -> int:
        """The encoding's coarse-to-fine bands (hash levels for the hash grid)."""
        return encoding_levels(self.encoding, self.grid, self.spectral)


def sh_encode(d: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics up to degree 4 (16 values) of unit directions.

    Args:
        d: (N, 3) float32 unit vectors.
    Returns:
        (N, 16) float32, in the order and normalisation of tiny-cuda-nn's SphericalHarmonics.
    """
    x, y, z = d.unbind(-1)
    xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
    return torch.stack([
        torch.full_like(x, 0.28209479177387814),
        -0.48860251190291987 * y,
        0.48860251190291987 * z,
        -0.48860251190291987 * x,
        1.0925484305920792 * xy,
        -1.0925484305920792 * yz,
        0.94617469575755997 * zz - 0.31539156525251999,
        -1.0925484305920792 * xz,
        0.54627421529603959 * (xx - yy),
        0.59004358992664352 * y * (-3.0 * xx + yy),
        2.8906114426405538 * xy * z,
        0.45704579946446572 * y * (1.0 - 5.0 * zz),
        0.3731763325901154 * z * (5.0 * zz - 3.0),
        0.45704579946446572 * x * (1.0 - 5.0 * zz),
        1.4453057213202769 * z * (xx - yy),
        0.59004358992664352 * x * (-xx + 3.0 * yy),
    ], dim=-1)


def mlp(dims: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)
