"""The encodings a field's MLP reads, chosen by the setting ``encoding`` (names in shared/methods.py).

Every encoding maps points in [0, 1]^3 to features, in ``levels`` bands of ``level_width`` features,
coarse first (level-major), so that the trainers can switch bands on coarse to fine (surface fields'
``start_levels``, camera refinement's fade-in).  Which to pick:

==============  =======================================================  =====================================
``hashgrid``    multiresolution hash grid (instant-ngp, hashgrid.py):    the default: the fastest to a sharp
                trainable tables, detail only where the data are         result; memory grows with the tables
``fourier``     Gaussian Fourier features (Tancik et al. 2020):          few parameters, global and smooth;
                ``[cos 2 pi B x, sin 2 pi B x]``, ``B ~ N(0, s^2)``        ``fourier_scale`` s (cycles per unit
                with s = ``fourier_scale`` cycles per unit of the box    of the box) is the detail: too small
                                                                          blurs, too large gives noise
``positional``  NeRF's positional encoding: ``sin, cos (2 pi 2^k x)``,   axis-aligned octaves; comparisons
                k < ``positional_frequencies``                          with NeRF/BARF, smooth fits
``siren``       sine layers (Sitzmann et al. 2020) with SIREN's          smooth, with meaningful derivatives
                initialisation: ``sin(omega (W h + b))``                 of every order; slower to train
==============  =======================================================  =====================================

``detail(level)`` is the size (in units of [0, 1]) of a level's finest feature; surface fields take
their finite-difference step from it (fields/sdf.py).  For the hash grid that is a cell; for the
smooth encodings it is a sixteenth of the shortest wavelength, small enough for accurate gradients.

The spectral encodings have no tables: the trainers' "grid" parameter group is empty for them, and
SIREN's layers train with the MLPs.  SIREN wants a learning rate about 100 times smaller than the
trainers' MLP rate (1e-4 in its paper against 1e-2 here), so its weights are stored divided by
SIREN_LR_SCALE and multiplied back in ``forward``: Adam's steps on the stored values (about the
learning rate) then move the real weights SIREN_LR_SCALE times as far.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fit_implicit.backend.fields.hashgrid import HashGridConfig
from fit_implicit.shared.methods import ENCODINGS

FOURIER_BANDS = 8           # Fourier features come in this many bands, sorted by frequency
SIREN_LR_SCALE = 0.01       # SIREN's weights move at this share of the MLP learning rate (module doc)


@dataclass
class SpectralConfig:
    """The settings of the encodings other than the hash grid (module doc)."""

    fourier_features: int = 256         # Gaussian frequencies (2 features each: cos, sin); a multiple of 8
    fourier_scale: float = 2.0          # their standard deviation, cycles per unit of the box (images: 10)
    positional_frequencies: int = 10    # octaves 1, 2, 4, ... cycles per unit of the box
    siren_layers: int = 3               # sine layers
    siren_width: int = 128              # their width (the features the MLP reads)
    siren_omega: float = 30.0           # SIREN's omega_0: the sine's frequency factor

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if int(self.fourier_features) < FOURIER_BANDS or int(self.fourier_features) % FOURIER_BANDS:
            raise ValueError(f"fourier_features must be a positive multiple of {FOURIER_BANDS}, "
                             f"got {self.fourier_features}")
        if not 0.0 < float(self.fourier_scale) <= 4096.0:
            raise ValueError(f"fourier_scale must be in (0, 4096] cycles per unit, got {self.fourier_scale}")
        if not 1 <= int(self.positional_frequencies) <= 24:
            raise ValueError(f"positional_frequencies must be in [1, 24], got {self.positional_frequencies}")
        for name in ("siren_layers", "siren_width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not float(self.siren_omega) > 0.0:
            raise ValueError(f"siren_omega must be positive, got {self.siren_omega}")


class FourierFeatures(nn.Module):
    """``[cos 2 pi B x, sin 2 pi B x]`` per band, B (m, 3) drawn once (a saved buffer), its rows
    sorted by length and split into FOURIER_BANDS bands.  x (N, 3) in [0, 1] -> (N, 2 m)."""

    def __init__(self, count: int, scale: float):
        super().__init__()
        b = torch.randn(count, 3) * float(scale)
        self.register_buffer("frequencies", b[b.norm(dim=1).argsort()].contiguous())
        self.levels, self.level_width = FOURIER_BANDS, 2 * count // FOURIER_BANDS
        self.out_dim = 2 * count

    def detail(self, level: int) -> float:
        per = self.frequencies.shape[0] // self.levels
        top = float(self.frequencies[(level + 1) * per - 1].norm())
        return 1.0 / (16.0 * max(top, 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = (2.0 * math.pi) * (x @ self.frequencies.t())                  # (N, m)
        n = x.shape[0]
        both = torch.stack([phase.cos(), phase.sin()], dim=1)                  # (N, 2, m)
        return both.reshape(n, 2, self.levels, self.level_width // 2).transpose(1, 2).reshape(n, self.out_dim)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"grid": [], "mlp": []}


class PositionalEncoding(nn.Module):
    """NeRF's encoding: octave k gives ``sin(2 pi 2^k x), cos(2 pi 2^k x)`` (6 features).
    x (N, 3) in [0, 1] -> (N, 6 L)."""

    def __init__(self, frequencies: int):
        super().__init__()
        self.register_buffer("octaves", 2.0 ** torch.arange(frequencies, dtype=torch.float32),
                             persistent=False)
        self.levels, self.level_width = frequencies, 6
        self.out_dim = 6 * frequencies

    def detail(self, level: int) -> float:
        return 1.0 / (16.0 * 2.0 ** level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = (2.0 * math.pi) * x[:, None, :] * self.octaves[None, :, None]  # (N, L, 3)
        return torch.cat([phase.sin(), phase.cos()], dim=2).reshape(x.shape[0], self.out_dim)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"grid": [], "mlp": []}


class Siren(nn.Module):
    """Sine layers ``h <- sin(omega (W h + b))`` on ``2 x - 1``, with SIREN's initialisation: the
    first layer's weights uniform in +-1/3 (its fan-in), the others' in +-sqrt(6 / width) / omega.
    Weights are stored divided by SIREN_LR_SCALE (module doc).  x (N, 3) in [0, 1] -> (N, width)."""

    def __init__(self, layers: int, width: int, omega: float):
        super().__init__()
        self.omega = float(omega)
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        fan_in = 3
        for i in range(layers):
            bound = 1.0 / fan_in if i == 0 else math.sqrt(6.0 / fan_in) / self.omega
            w = torch.empty(width, fan_in).uniform_(-bound, bound)
            b = torch.empty(width).uniform_(-1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in)) / self.omega
            self.weights.append(nn.Parameter(w / SIREN_LR_SCALE))
            self.biases.append(nn.Parameter(b / SIREN_LR_SCALE))
            fan_in = width
        self.levels, self.level_width, self.out_dim = 1, width, width

    def detail(self, level: int) -> float:
        return 1.0 / (16.0 * self.omega / math.pi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = 2.0 * x - 1.0
        for w, b in zip(self.weights, self.biases):
            h = torch.sin(self.omega * F.linear(h, w * SIREN_LR_SCALE, b * SIREN_LR_SCALE))
        return h

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"grid": [], "mlp": [*self.weights, *self.biases]}


def build_encoding(name: str, grid: HashGridConfig, spectral: SpectralConfig) -> nn.Module:
    """The encoding called ``name`` (one of shared/methods.py ENCODINGS) from its settings."""
    if name == "hashgrid":
        return grid.build()
    if name == "fourier":
        return FourierFeatures(int(spectral.fourier_features), float(spectral.fourier_scale))
    if name == "positional":
        return PositionalEncoding(int(spectral.positional_frequencies))
    if name == "siren":
        return Siren(int(spectral.siren_layers), int(spectral.siren_width), float(spectral.siren_omega))
    raise ValueError(f"encoding {name!r} is not one of {', '.join(ENCODINGS)}")


def encoding_levels(name: str, grid: HashGridConfig, spectral: SpectralConfig) -> int:
    """How many coarse-to-fine bands the encoding ``name`` has (without building it)."""
    return {"hashgrid": int(grid.levels), "fourier": FOURIER_BANDS,
            "positional": int(spectral.positional_frequencies), "siren": 1}[name]


__all__ = ["SpectralConfig", "FourierFeatures", "PositionalEncoding", "Siren",
           "build_encoding", "encoding_levels", "FOURIER_BANDS", "SIREN_LR_SCALE"]
