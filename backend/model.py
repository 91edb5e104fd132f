"""A fitted field with everything needed to use it in WORLD coordinates: render, save, load.

Internally the field lives in a normalised frame: ``x_n = (x_world - center) / scale`` with
``center`` the middle of the scene box and ``scale`` half its longest side, so the box fits in
[-1, 1]^3 and keeps its proportions.  Only this class converts; callers see world units.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared import cameras

from .fields.nerf import NerfField, NerfFieldConfig
from .occupancy import OccupancyGrid
from .render import RayOutput, render_rays, render_rays_segmented

FORMAT = 1
WEIGHTS_FILE = "model.pt"
RUN_FILE = "run.json"


def build_field(cfg: Any) -> NerfField:
    """The field a FitConfig describes (untrained)."""
    if cfg.method != "nerf":
        raise ValueError(f"unknown method {cfg.method!r} (known: nerf)")
    return NerfField(NerfFieldConfig(levels=cfg.levels, features=cfg.features, log2_table=cfg.log2_table,
                                     base_res=cfg.base_res, max_res=cfg.max_res, hidden=cfg.hidden,
                                     geo_features=cfg.geo_features, color_layers=cfg.color_layers))


def build_occupancy(cfg: Any) -> OccupancyGrid:
    return OccupancyGrid(cfg.occupancy_resolution, cfg.occupancy_threshold, cfg.occupancy_decay)


def pick_device(device: str | torch.device | None) -> torch.device:
    """The given device, or CUDA if available, else the CPU."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but PyTorch sees no CUDA device")
    return dev


class FittedField:
    """A radiance field, its occupancy grid and its scene box (world units).

    Args:
        field: the network, in normalised coordinates.  occupancy: its occupancy grid.
        aabb: (2, 3) float64 world box.  config: the FitConfig it was trained with.
        meta: JSON-able facts about the run (training size, steps, time, PSNR, ...).
    """

    def __init__(self, field: NerfField, occupancy: OccupancyGrid, aabb: np.ndarray, config: Any,
                 meta: dict | None = None):
        self.field, self.occupancy, self.config = field, occupancy, config
        self.meta = dict(meta or {})
        self.aabb = np.asarray(aabb, dtype=np.float64)
        self.center = 0.5 * (self.aabb[0] + self.aabb[1])
        self.scale = float(0.5 * np.max(self.aabb[1] - self.aabb[0]))
        self.device = next(field.parameters()).device
        box = (self.aabb - self.center) / self.scale
        self.box = torch.tensor(box, dtype=torch.float32, device=self.device)       # (2, 3) normalised
        self.step_size = 2.0 * math.sqrt(3.0) / config.march_steps                  # normalised units
        self.max_steps = int(config.march_steps)

    # ---- frames --------------------------------------------------------------------------
    def to_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3) world positions -> normalised (same dtype/device)."""
        c = torch.as_tensor(self.center, dtype=x.dtype, device=x.device)
        return (x - c) / self.scale

    # ---- rendering -------------------------------------------------------------------------
    def trace(self, origins: torch.Tensor, dirs: torch.Tensor, jitter: torch.Tensor | None = None,
              differentiable: bool = True) -> RayOutput:
        """Render world rays; origins (R, 3), dirs (R, 3) unit, float32 on the model's device.

        ``depth`` comes back in world units.  ``differentiable=False`` renders in segments with
        early ray termination, without gradients.
        """
        o = self.to_normalised(origins)
        if differentiable:
            out = render_rays(self.field, self.occupancy.occupied, o, dirs, self.box, self.step_size,
                              self.max_steps, jitter)
        else:
            out = render_rays_segmented(self.field, self.occupancy.occupied, o, dirs, self.box,
                                        self.step_size, self.max_steps)
        out.depth = out.depth * self.scale
        return out

    @torch.no_grad()
    def render(self, intrinsics, c2w, width: int, height: int) -> np.ndarray:
        """Render a view.

        Args:
            intrinsics: (4,) fx, fy, cx, cy in pixels (OpenCV pixel frame).
            c2w: (4, 4) camera-to-world, Blender convention.
        Returns:
            (H, W, 4) float32: premultiplied rgb (sRGB) and alpha, in [0, 1].
        """
        width, height = int(width), int(height)
        if width < 1 or height < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        o, d = cameras.pixel_rays(np.asarray(intrinsics, np.float64), np.asarray(c2w, np.float64), width, height)
        o = torch.from_numpy(o.reshape(-1, 3)).float().to(self.device)
        d = torch.from_numpy(d.reshape(-1, 3)).float().to(self.device)
        was_training = self.field.training
        self.field.eval()
        try:
            parts = []
            for oc, dc in zip(o.split(self.config.render_chunk), d.split(self.config.render_chunk)):
                out = self.trace(oc, dc, differentiable=False)
                parts.append(torch.cat([out.rgb, out.opacity[:, None]], dim=-1))
        finally:
            self.field.train(was_training)
        img = torch.cat(parts).clamp(0.0, 1.0).reshape(height, width, 4)
        return img.cpu().numpy().astype(np.float32)

    # ---- persistence -----------------------------------------------------------------------
    def save(self, run_dir: str | Path) -> None:
        """Write ``run_dir/model.pt`` (tensors only) and ``run_dir/run.json``."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"format": FORMAT, "field": self.field.state_dict(),
                    "occupancy": self.occupancy.state_dict()}, run_dir / WEIGHTS_FILE)
        doc = {"format": FORMAT, "method": self.config.method, "aabb": self.aabb.tolist(),
               "config": asdict(self.config), "meta": self.meta}
        (run_dir / RUN_FILE).write_text(json.dumps(doc, indent=2))

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device | None = None) -> "FittedField":
        """Load a run written by :meth:`save` onto ``device`` (default: CUDA if available)."""
        from .train import FitConfig  # train imports this module

        run_dir = Path(run_dir)
        if not (run_dir / RUN_FILE).is_file() or not (run_dir / WEIGHTS_FILE).is_file():
            raise ValueError(f"{run_dir}: not a run folder (needs {RUN_FILE} and {WEIGHTS_FILE})")
        doc = json.loads((run_dir / RUN_FILE).read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{run_dir}: run format {doc.get('format')!r} is not {FORMAT}")
        dev = pick_device(device)
        cfg = FitConfig.from_dict({**doc["config"], "device": str(dev)})
        state = torch.load(run_dir / WEIGHTS_FILE, map_location=dev, weights_only=True)
        field, occupancy = build_field(cfg).to(dev), build_occupancy(cfg).to(dev)
        field.load_state_dict(state["field"])
        occupancy.load_state_dict(state["occupancy"])
        return cls(field, occupancy, np.asarray(doc["aabb"]), cfg, doc.get("meta", {}))
