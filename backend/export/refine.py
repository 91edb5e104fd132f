"""The base-colour texture refined against the training views (the second stage of nerf2mesh,
with the mesh held fixed).

The bake (export/texture.py) asks the field what colour each texel has.  What the imported asset
shows is that texture seen through the mesh, whose surface is not exactly the field's: every
texel the cameras see is instead optimised so that the textured mesh, rasterised from each
training camera (backend/render/raster.py), gives that camera's image.  The target is the view's
base colour where there is one (scene mode: Blender's albedo pass, so the texture stays free of
lighting), else its photo (the lighting stays baked in, as in the bake).  Only pixels inside the
view's mask (alpha >= 0.5) that the mesh covers count; texels no camera sees keep their bake.

Colours are optimised as they are stored, sRGB in [0, 1], with Adam on the texels; the loss is
the mean squared error over a random batch of (view, pixel) samples a step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from fit_implicit.backend.export.texture import BakedTextures, UVMesh
from fit_implicit.backend.render.raster import interpolate, rasterize, sample_texture

BATCH = 1 << 16          # (view, pixel) samples a step
MAX_SAMPLES = 1 << 27    # samples kept in memory at most (a random subset beyond it)


@dataclass
class TextureRefineConfig:
    """How the base-colour texture is refined after the bake (0 steps: not at all)."""

    texture_refine_steps: int = 0       # Adam steps on the texels; 0 = keep the bake
    texture_refine_lr: float = 0.02     # Adam learning rate (sRGB units)

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.texture_refine_steps < 0:
            raise ValueError(f"texture_refine_steps must not be negative, got {self.texture_refine_steps}")
        if not self.texture_refine_lr > 0:
            raise ValueError(f"texture_refine_lr must be positive, got {self.texture_refine_lr}")


def view_samples(mesh, data, device: torch.device, target: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The texture coordinates and target colours of every masked pixel of every view of
    ``data`` (PosedImages) that the mesh covers.

    Args:
        mesh: a UVMesh (vertices, faces, uvs).  target: "albedo" (the albedo pass), "image" (the
            photos) or "auto" (the albedo pass where the data has one).
    Returns:
        uv (P, 2) float32 and colour (P, 3) float32 sRGB in [0, 1], on ``device``.
    """
    passes = getattr(data, "passes", {}) or {}
    use_albedo = (target == "albedo") or (target == "auto" and "albedo" in passes and len(passes["albedo"]))
    if use_albedo and "albedo" not in passes:
        raise ValueError("the data has no albedo pass to refine the base colour against")
    verts = torch.as_tensor(np.asarray(mesh.vertices, np.float32), device=device)
    faces = torch.as_tensor(np.asarray(mesh.faces, np.int64), device=device)
    uvs = torch.as_tensor(np.asarray(mesh.uvs, np.float32), device=device)
    all_uv, all_rgb = [], []
    for i in range(len(data)):
        frags = rasterize(verts, faces, data.intrinsics[i], data.poses[i], data.width, data.height)
        rgba = torch.as_tensor(data.images[i], device=device)
        keep = frags.mask & (rgba[..., 3] >= 128)
        if not keep.any():
            continue
        colour = torch.as_tensor(passes["albedo"][i], device=device) if use_albedo else rgba[..., :3]
        uv = interpolate(uvs, verts, faces, frags, data.intrinsics[i], data.poses[i])
        all_uv.append(uv[keep[frags.mask]])
        all_rgb.append(colour[keep].float() / 255.0)
    if not all_uv:
        return torch.zeros((0, 2), device=device), torch.zeros((0, 3), device=device)
    uv, rgb = torch.cat(all_uv), torch.cat(all_rgb)
    if len(uv) > MAX_SAMPLES:
        pick = torch.randperm(len(uv), device=device)[:MAX_SAMPLES]
        uv, rgb = uv[pick], rgb[pick]
    return uv, rgb


def refine_albedo(albedo: np.ndarray, uv: torch.Tensor, rgb: torch.Tensor, steps: int, lr: float = 0.02,
                  batch: int = BATCH) -> tuple[np.ndarray, dict]:
    """Optimise the (S, S, 3) uint8 sRGB ``albedo`` texture so that its bilinear reads at ``uv``
    (P, 2) give ``rgb`` (P, 3).  Returns the refined texture (uint8) and facts: "samples",
    "mse_before", "mse_after" (over all samples), "seconds"."""
    start = time.perf_counter()
    dev = uv.device
    tex = torch.as_tensor(albedo[..., :3], device=dev).float().div(255.0).requires_grad_(True)
    facts = {"samples": int(len(uv)), "steps": int(steps)}
    if not len(uv) or steps <= 0:
        return albedo, {**facts, "seconds": 0.0}
    facts["mse_before"] = _mse(tex, uv, rgb)
    opt = torch.optim.Adam([tex], lr=lr, betas=(0.9, 0.99))
    for _ in range(int(steps)):
        pick = torch.randint(0, len(uv), (min(batch, len(uv)),), device=dev)
        loss = torch.nn.functional.mse_loss(sample_texture(tex, uv[pick]), rgb[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            tex.clamp_(0.0, 1.0)
    facts["mse_after"] = _mse(tex, uv, rgb)
    out = np.array(albedo, copy=True)
    out[..., :3] = (tex.detach().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
    facts["seconds"] = round(time.perf_counter() - start, 3)
    return out, facts


@torch.no_grad()
def _mse(tex: torch.Tensor, uv: torch.Tensor, rgb: torch.Tensor, chunk: int = 1 << 20) -> float:
    total = sum(float(((sample_texture(tex, u) - c) ** 2).sum()) for u, c in zip(uv.split(chunk), rgb.split(chunk)))
    return total / max(rgb.numel(), 1)


def refine_textures(mesh: UVMesh, baked: BakedTextures, data, cfg: TextureRefineConfig,
                    device: str | torch.device = "cpu") -> tuple[BakedTextures, dict]:
    """The bake with its base colour refined against ``data`` (the fit's PosedImages) as
    ``cfg`` says; returns it and facts for the job's summary (nothing refined: the bake itself).
    Cameras with lens distortion are not refined against (the rasteriser is a pinhole camera)."""
    if cfg.texture_refine_steps <= 0:
        return baked, {}
    if getattr(data, "lens_models", None) is not None and np.any(np.asarray(data.lens_models) != 0):
        return baked, {"texture_refine_skipped": "lens distortion"}
    uv, rgb = view_samples(mesh, data, torch.device(device))
    albedo, facts = refine_albedo(baked.albedo, uv, rgb, cfg.texture_refine_steps, cfg.texture_refine_lr)
    out = BakedTextures(albedo, baked.normal, baked.roughness, baked.coverage, dict(baked.timings))
    out.timings["refine"] = facts.get("seconds", 0.0)
    return out, {f"texture_refine_{k}": v for k, v in facts.items()}
