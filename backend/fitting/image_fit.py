"""Fitting a 2D image with the fields' encodings (issue 16 item 4): the first experiment of the SIREN
and Fourier-features papers, and the encodings' test bed.

An :class:`ImageField` is what a field is made of, on a plane: the encoding of fields/encodings.py
(chosen and sized by the same settings: ``encoding``, the hash grid's, the spectral ones, ``hidden``)
followed by an MLP to sRGB.  The image lies on the plane z = 1/2 of the unit cube the encodings read,
pixel (row i, column j) of a W x H image at ``((j + 1/2) / W, (i + 1/2) / H)``, so the reconstruction
can be rendered at any resolution (:func:`render_image`).

:func:`fit_image` trains on the pixels (all of them each step when ``batch_pixels`` covers the
image, else a random batch) with Adam (the fields' grid and MLP learning rates, decayed
exponentially to ``lr_final`` of them), and records the PSNR of the whole image against steps and
training time (evaluation time excluded).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fit_implicit.backend.fields.layers import FieldConfig, mlp
from fit_implicit.backend.fitting.settings import NamedSettings
from fit_implicit.shared.quality import psnr

MAX_PIXELS = 1 << 26        # 64 Mpx: larger images are refused (memory), or shrink them first
# Fourier features' scale on images, in cycles per image width: the Fourier-features paper's best for
# natural images (the fields' default, fields/encodings.py, is for 3D boxes and much smoother).
IMAGE_FOURIER_SCALE = 10.0


@dataclass
class ImageFitConfig(NamedSettings):
    """The settings of an image fit, by name as for fits (fitting/settings.py); ``field`` holds the
    encoding's (fields/layers.py).  :func:`image_config` sizes it for an image."""

    steps: int = 2000               # optimisation steps; the fit stops at `steps` or `seconds`
    seconds: float = 0.0            # wall-clock budget of training; 0 = none
    batch_pixels: int = 1 << 18     # pixels a step (all of them when the image has fewer)
    grid_lr: float = 1e-2           # Adam learning rate of the hash tables
    mlp_lr: float = 1e-2            # Adam learning rate of the MLPs (SIREN's layers: fields/encodings.py)
    lr_final: float = 0.1           # the learning rates decay exponentially to this share of themselves
    image_layers: int = 2           # hidden layers of the MLP from the features to sRGB
    eval_every: int = 250           # steps between PSNR records (also at steps 1, 2, 4, ... and the end)
    device: str = "cpu"
    seed: int = 0
    field: FieldConfig = field(default_factory=FieldConfig)

    def validate(self) -> "ImageFitConfig":
        self.field.validate()
        for name in ("steps", "batch_pixels", "image_layers", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seconds < 0 or not 0.0 < self.lr_final <= 1.0:
            raise ValueError("seconds must not be negative and lr_final must be in (0, 1]")
        return self

    def owner(self) -> str:
        return "an image fit"


def image_config(width: int, height: int, encoding: str = "hashgrid", **settings) -> ImageFitConfig:
    """An image fit's config sized to the image's pixels, then ``settings`` by name: the hash grid's
    finest level at the pixels (``max_res``, the longest side: finer levels would only add
    collisions), positional octaves up to a cycle every 4 pixels or so (finer ones alias to noise),
    Fourier features of scale IMAGE_FOURIER_SCALE."""
    cfg = ImageFitConfig()
    cfg.field.encoding = encoding
    longest = max(int(width), int(height))
    cfg.field.grid.max_res = max(int(cfg.field.grid.base_res), longest)
    cfg.field.spectral.positional_frequencies = max(1, round(math.log2(max(longest, 2))) - 1)
    cfg.field.spectral.fourier_scale = IMAGE_FOURIER_SCALE
    return cfg.set(**settings).validate()


class ImageField(nn.Module):
    """``forward(uv) -> rgb``: uv (N, 2) float32 in [0, 1] (x right, y down) -> (N, 3) sRGB in [0, 1]."""

    def __init__(self, cfg: ImageFitConfig):
        super().__init__()
        self.encoding = cfg.field.build_encoding()
        self.net = mlp([self.encoding.out_dim] + [cfg.field.hidden] * cfg.image_layers + [3])

    def forward(self, uv: torch.Tensor) -> torch.Tensor:
        x = torch.cat([uv, torch.full_like(uv[:, :1], 0.5)], dim=1)
        return torch.sigmoid(self.net(self.encoding(x)))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        enc = self.encoding.param_groups()
        return {"grid": enc["grid"], "mlp": enc["mlp"] + list(self.net.parameters())}


def pixel_centres(width: int, height: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """(H * W, 2) float32 uv of the pixel centres, row by row."""
    u = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    v = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    return torch.stack(torch.meshgrid(u, v, indexing="xy"), dim=-1).reshape(-1, 2)


@torch.no_grad()
def render_image(model: ImageField, width: int, height: int, chunk: int = 1 << 18) -> np.ndarray:
    """The fitted image at any size: (height, width, 3) float32 sRGB in [0, 1]."""
    if width < 1 or height < 1 or width * height > MAX_PIXELS:
        raise ValueError(f"cannot render {width}x{height} pixels (1 to {MAX_PIXELS} pixels)")
    uv = pixel_centres(width, height, next(model.net.parameters()).device)
    return predict(model, uv, chunk).reshape(height, width, 3).float().cpu().numpy()


@torch.no_grad()
def predict(model: ImageField, uv: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """The model's colours (N, 3) at ``uv`` (N, 2), in chunks of ``chunk`` points."""
    return torch.cat([model(part) for part in uv.split(chunk)])


@dataclass
class ImageFit:
    """What :func:`fit_image` returns: the model, and the PSNR record ``curve``: (step, training
    seconds, PSNR dB) rows; ``psnr`` is the last one."""

    model: ImageField
    curve: list[tuple[int, float, float]]
    steps: int
    seconds: float

    @property
    def psnr(self) -> float:
        return self.curve[-1][2]


def fit_image(image: np.ndarray, cfg: ImageFitConfig) -> ImageFit:
    """Fit ``image`` ((H, W, 3 or 4) uint8 or float in [0, 1]; alpha is dropped) with ``cfg``."""
    cfg.validate()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 2 or image.shape[1] < 2:
        raise ValueError(f"expected an (H, W, 3 or 4) image of at least 2x2 pixels, got shape {image.shape}")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ValueError(f"the image has {image.shape[0] * image.shape[1]} pixels, over the cap of {MAX_PIXELS}")
    rgb = image[..., :3].astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)
    if not np.isfinite(rgb).all():
        raise ValueError("the image has NaN or infinite values")
    height, width = rgb.shape[:2]
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = ImageField(cfg).to(device)
    target = torch.from_numpy(rgb).to(device).reshape(-1, 3)
    uv = pixel_centres(width, height, device)
    groups = model.param_groups()
    optimizer = torch.optim.Adam([
        {"params": groups["grid"], "lr": cfg.grid_lr, "eps": 1e-15},
        {"params": groups["mlp"], "lr": cfg.mlp_lr, "eps": 1e-15}], betas=(0.9, 0.99))
    base = [cfg.grid_lr, cfg.mlp_lr]
    n, full = target.shape[0], cfg.batch_pixels >= target.shape[0]
    curve: list[tuple[int, float, float]] = []

    def record(step: int, seconds: float) -> None:
        curve.append((step, seconds, psnr(float(((predict(model, uv) - target) ** 2).mean()))))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    trained, step = 0.0, 0
    while step < cfg.steps and not (cfg.seconds and trained >= cfg.seconds):
        sync()
        start = time.perf_counter()
        fraction = trained / cfg.seconds if cfg.seconds else step / cfg.steps
        for group, lr in zip(optimizer.param_groups, base):
            group["lr"] = lr * cfg.lr_final ** min(fraction, 1.0)
        if full:
            pred, true = model(uv), target
        else:
            pick = torch.randint(0, n, (cfg.batch_pixels,), device=device)
            pred, true = model(uv[pick]), target[pick]
        loss = ((pred - true) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        sync()
        trained += time.perf_counter() - start
        if step & (step - 1) == 0 or step % cfg.eval_every == 0:
            record(step, trained)
    if not curve or curve[-1][0] != step:
        record(step, trained)
    return ImageFit(model, curve, step, trained)


__all__ = ["ImageFitConfig", "image_config", "ImageField", "ImageFit", "fit_image", "render_image", "pixel_centres",
           "predict", "MAX_PIXELS"]
