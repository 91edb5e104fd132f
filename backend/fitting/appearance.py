"""Per-photo appearance: each training photo's exposure and white balance, learnt beside the
field so that photos shot at different settings do not fight over the field's colours (the role
of NeRF-W's appearance embeddings, here reduced to what exposure and white balance change).

Photo i's pixel is modelled as ``colour * gain_i + bias_i`` per sRGB channel (premultiplied:
the bias scales with the opacity).  Log gains and biases are kept mean-free over the photos, so
the field's own colours (what renders, meshes and textures show) are the photos' mean appearance.
On in a fit with ``--set appearance=true`` (TrainConfig.appearance).
"""
from __future__ import annotations

import torch
from torch import nn


class Appearance(nn.Module):
    def __init__(self, photos: int):
        super().__init__()
        self.log_gain = nn.Parameter(torch.zeros(photos, 3))
        self.bias = nn.Parameter(torch.zeros(photos, 3))

    def transforms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gain (N, 3), bias (N, 3)) of every photo, mean-free (log gain) over the photos."""
        return (self.log_gain - self.log_gain.mean(0)).exp(), self.bias - self.bias.mean(0)

    def forward(self, rgb: torch.Tensor, opacity: torch.Tensor, photo: torch.Tensor) -> torch.Tensor:
        """Rendered premultiplied colour (R, 3) with opacity (R,) as photo ``photo`` (R,) saw it."""
        gain, bias = self.transforms()
        # index_select: its backward adds with atomics (camera_refine.py's forward says why)
        return rgb * gain.index_select(0, photo) + bias.index_select(0, photo) * opacity[:, None]

    def penalty(self) -> torch.Tensor:
        """Mean square of the log gains and biases: keeps them from explaining what the field should."""
        return self.log_gain.pow(2).mean() + self.bias.pow(2).mean()

    def summary(self) -> dict:
        """Per-photo gains and biases, rounded, for the run's record."""
        gain, bias = self.transforms()
        return {"gain": gain.detach().cpu().numpy().round(4).tolist(), "bias": bias.detach().cpu().numpy().round(4).tolist()}
