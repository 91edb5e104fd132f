"""The textured mesh refined against the training views (the second stage of nerf2mesh).

Two steps, each off at 0 steps:

* **Vertices and texture together** (:func:`refine_mesh`, ``mesh_refine_steps``): each step draws
  the textured mesh from one training camera (backend/render/raster.py: z-buffer, perspective-
  correct UVs, bilinear texels, and the anti-aliasing pass that gives the outline a gradient),
  composites it on white and compares it with the photo on white, every pixel (with Blender's
  albedo pass in place of the photo where the views have one, as for the texture below).  Adam moves
  per-vertex offsets (one per welded vertex, so UV seams do not tear) and the texels; a Laplacian
  term keeps the offsets smooth and each offset stays within ``MAX_OFFSET`` of the mesh's
  bounding-box diagonal, so the asset keeps its place and scale.
* **The texture alone** (:func:`refine_textures`, ``texture_refine_steps``), described below.

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

from fit_implicit.backend.export.texture import BakedTextures, UVMesh, smooth_normals, uv_tangents
from fit_implicit.backend.render.raster import antialias, interpolate, project, rasterize, sample_texture

BATCH = 1 << 16          # (view, pixel) samples a step
MAX_SAMPLES = 1 << 27    # samples kept in memory at most (a random subset beyond it)
MAX_OFFSET = 0.02        # furthest a vertex moves, as a share of the mesh's bounding-box diagonal


@dataclass
class RefineConfig:
    """How the textured mesh is refined against the training views after the bake (0 steps:
    not at all)."""

    mesh_refine_steps: int = 0          # steps moving the vertices and the texels together; 0 = keep the mesh
    mesh_refine_lr: float = 1e-3        # Adam learning rate of the vertex offsets, share of the bbox diagonal
    mesh_refine_smooth: float = 4.0     # Laplacian weight: a one-edge-long spike costs this many pixels' error
    texture_refine_steps: int = 0       # then Adam steps on the texels alone; 0 = keep the bake
    texture_refine_lr: float = 0.02     # Adam learning rate of the texels (sRGB units)

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        for name in ("mesh_refine_steps", "texture_refine_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("mesh_refine_lr", "texture_refine_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.mesh_refine_smooth < 0:
            raise ValueError(f"mesh_refine_smooth must not be negative, got {self.mesh_refine_smooth}")


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
        w, h = data.size(i)
        frags = rasterize(verts, faces, data.intrinsics[i], data.poses[i], w, h)
        rgba = torch.as_tensor(data.images[i, :h, :w], device=device)
        keep = frags.mask & (rgba[..., 3] >= 128)
        if not keep.any():
            continue
        colour = torch.as_tensor(passes["albedo"][i, :h, :w], device=device) if use_albedo else rgba[..., :3]
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


def refine_textures(mesh: UVMesh, baked: BakedTextures, data, cfg: RefineConfig,
                    device: str | torch.device = "cpu") -> tuple[UVMesh, BakedTextures, dict]:
    """The mesh and its bake refined against ``data`` (the fit's PosedImages) as ``cfg`` says:
    first the vertices with the texels (:func:`refine_mesh`), then the texels alone.  Returns the
    mesh, the textures and facts for the job's summary (nothing refined: the inputs themselves).
    Cameras with lens distortion are not refined against (the rasteriser is a pinhole camera)."""
    if cfg.texture_refine_steps <= 0 and cfg.mesh_refine_steps <= 0:
        return mesh, baked, {}
    if getattr(data, "lens_models", None) is not None and np.any(np.asarray(data.lens_models) != 0):
        return mesh, baked, {"refine_skipped": "lens distortion"}
    dev = torch.device(device)
    facts: dict = {}
    albedo = baked.albedo
    timings = dict(baked.timings)
    if cfg.mesh_refine_steps > 0 and len(mesh.faces):
        mesh, albedo, moved = refine_mesh(mesh, albedo, data, cfg, dev)
        facts.update({f"mesh_refine_{k}": v for k, v in moved.items()})
        timings["refine_mesh"] = moved["seconds"]
    if cfg.texture_refine_steps > 0:
        uv, rgb = view_samples(mesh, data, dev)
        albedo, tex = refine_albedo(albedo, uv, rgb, cfg.texture_refine_steps, cfg.texture_refine_lr)
        facts.update({f"texture_refine_{k}": v for k, v in tex.items()})
        timings["refine"] = tex.get("seconds", 0.0)
    return mesh, BakedTextures(albedo, baked.normal, baked.roughness, baked.coverage, timings), facts


def _welded(mesh: UVMesh, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index of each UV vertex's welded vertex (V,), welded faces (F, 3), neighbour pairs (E, 2)
    both ways, each welded vertex's neighbour count (N,)): the mesh as one surface, so seams move
    together."""
    _, weld = np.unique(np.asarray(mesh.source), return_inverse=True)
    weld = torch.as_tensor(weld.reshape(-1), dtype=torch.long, device=dev)
    wf = weld[torch.as_tensor(np.asarray(mesh.faces, np.int64), device=dev)]
    pairs = torch.cat([wf[:, [0, 1]], wf[:, [1, 2]], wf[:, [2, 0]]])
    pairs = torch.unique(torch.cat([pairs, pairs.flip(1)]), dim=0)
    count = torch.bincount(pairs[:, 0], minlength=int(weld.max()) + 1).clamp_min(1)
    return weld, wf, pairs, count


def _laplacian(x: torch.Tensor, pairs: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Uniform Laplacian of per-vertex values ``x`` (N, C): each minus the mean of its ``count``
    neighbours listed in ``pairs``."""
    total = torch.zeros_like(x).index_add(0, pairs[:, 0], x[pairs[:, 1]])
    return x - total / count[:, None]


def draw(vertices: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor, texture: torch.Tensor, intrinsics, c2w,
         width: int, height: int) -> torch.Tensor:
    """The textured mesh unlit on white, (H, W, 3), differentiable in the vertices (through the
    UVs each pixel reads and through the outline) and in the texels."""
    frags = rasterize(vertices.detach(), faces, intrinsics, c2w, width, height)
    image = torch.ones((height * width, 3), dtype=texture.dtype, device=texture.device)
    seen = frags.mask
    if seen.any():
        uv = interpolate(uvs, vertices, faces, frags, intrinsics, c2w)
        image = image.index_put((torch.nonzero(seen.reshape(-1)).squeeze(1),), sample_texture(texture, uv))
    pix, _ = project(vertices, intrinsics, c2w)
    return antialias(image.reshape(height, width, 3), frags, pix, faces)


def refine_mesh(mesh: UVMesh, albedo: np.ndarray, data, cfg: RefineConfig, device: torch.device,
                seed: int = 0) -> tuple[UVMesh, np.ndarray, dict]:
    """Move the vertices and the texels so that the textured mesh drawn from each training view
    of ``data`` matches its photo on white (see the module doc).  Returns the moved mesh (normals
    and tangents recomputed), the texture (uint8) and facts: "steps", "seconds", "loss_before",
    "loss_after" (mean of the first and last tenth of the steps), "offset_max" (share of the
    bounding-box diagonal)."""
    start = time.perf_counter()
    dev = torch.device(device)
    base = torch.as_tensor(np.asarray(mesh.vertices, np.float32), device=dev)
    faces = torch.as_tensor(np.asarray(mesh.faces, np.int64), device=dev)
    uvs = torch.as_tensor(np.asarray(mesh.uvs, np.float32), device=dev)
    weld, wf, pairs, count = _welded(mesh, dev)
    diag = float(torch.linalg.norm(base.amax(0) - base.amin(0))) or 1.0
    edge = float(torch.linalg.norm(base[faces[:, 0]] - base[faces[:, 1]], dim=-1).mean()) or diag
    offsets = torch.zeros((int(weld.max()) + 1, 3), device=dev, requires_grad=True)
    tex = torch.as_tensor(albedo[..., :3], device=dev).float().div(255.0).requires_grad_(True)
    steps = int(cfg.mesh_refine_steps)
    opt = torch.optim.Adam([{"params": [offsets], "lr": cfg.mesh_refine_lr * diag},
                            {"params": [tex], "lr": cfg.texture_refine_lr}], betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * i / max(steps, 1))))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(data)) for _ in range(steps // max(len(data), 1) + 1)])[:steps]
    losses = []
    pixels = float(np.mean(np.prod(data.sizes, axis=1)))     # the loss per pixel of an average view
    passes = getattr(data, "passes", {}) or {}
    albedo_pass = passes.get("albedo") if "albedo" in passes and len(passes["albedo"]) else None
    for i in order:
        w, h = data.size(i)
        photo = torch.as_tensor(data.images[i, :h, :w], device=dev).float() / 255.0
        colour = photo[..., :3] if albedo_pass is None else torch.as_tensor(albedo_pass[i, :h, :w], device=dev).float() / 255.0
        target = colour * photo[..., 3:] + (1.0 - photo[..., 3:]) if photo.shape[-1] == 4 else colour
        verts = base + offsets[weld]
        image = draw(verts, faces, uvs, tex, data.intrinsics[i], data.poses[i], w, h)
        loss = ((image - target) ** 2).sum() / pixels
        smooth = (_laplacian(offsets, pairs, count) / edge).pow(2).sum() * (cfg.mesh_refine_smooth / pixels)
        total = loss + smooth
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(total):
            total.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            tex.clamp_(0.0, 1.0)
            norm = offsets.norm(dim=-1, keepdim=True)
            offsets.mul_((MAX_OFFSET * diag / norm.clamp_min(1e-12)).clamp(max=1.0))
        losses.append(float(loss.detach()) / 3.0)
    with torch.no_grad():
        moved = (base + offsets[weld]).cpu().numpy()
    welded = np.zeros((len(offsets), 3), np.float32)
    welded[weld.cpu().numpy()] = moved
    normals = smooth_normals(welded, wf.cpu().numpy())[weld.cpu().numpy()]
    tangents = uv_tangents(moved, np.asarray(mesh.faces), np.asarray(mesh.uvs), normals)
    out_mesh = UVMesh(moved.astype(np.float32), mesh.faces, mesh.uvs, mesh.source, normals.astype(np.float32),
                      tangents)
    out = np.array(albedo, copy=True)
    out[..., :3] = (tex.detach().clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
    tenth = max(1, len(losses) // 10)
    facts = {"steps": steps, "seconds": round(time.perf_counter() - start, 3),
             "loss_before": round(float(np.mean(losses[:tenth])), 6) if losses else None,
             "loss_after": round(float(np.mean(losses[-tenth:])), 6) if losses else None,
             "offset_max": round(float(offsets.detach().norm(dim=-1).max()) / diag, 5) if len(offsets) else 0.0}
    return out_mesh, out, facts
