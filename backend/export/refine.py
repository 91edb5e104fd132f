"""The textured mesh refined against the training views (the second stage of nerf2mesh).

Two steps, each off at 0 steps:

* **Vertices and texture together** (:func:`refine_mesh`, ``mesh_refine_steps``): each step draws
  the textured mesh from one training camera (backend/render/raster.py: z-buffer, perspective-
  correct UVs, bilinear texels, and the anti-aliasing pass that gives the outline a gradient),
  composites it on white and compares it with the photo on white, every pixel (with Blender's
  albedo pass in place of the photo where the views have one, as for the texture below; against
  a photo without a mask only the pixels inside the mesh's outline count).  Adam moves
  per-vertex offsets (one per welded vertex, so UV seams do not tear) and the texels; a Laplacian
  term keeps the offsets smooth and each offset stays within ``MAX_OFFSET`` of the mesh's
  bounding-box diagonal, so the asset keeps its place and scale.
  Where the views carry Blender's other passes (scene mode), the same steps also fit what a
  relit asset needs beyond its base colour: the **normal map** (tangent-space texels, read on the
  moving mesh's smooth normals and UV tangents as Blender shades them) against the ``normal``
  pass (1 - cos, weight ``mesh_refine_normal_weight``), and the **roughness** texels against the
  ``roughness`` pass (squared error where it has a value).  Each view's pixels count where the
  mask is whole (alpha >= ``SOLID``), so outline pixels that mix in the background do not.
  Afterwards every texture's texels off the charts are grown again from the charts
  (export/texture.py ``dilate``), so chart borders do not show the bake's old padding.
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

from fit_implicit.backend.export import remesh
from fit_implicit.backend.export.texture import (DEFAULT_PADDING, BakedTextures, UVMesh, dilate, smooth_normals,
                                                 uv_tangents)
from fit_implicit.backend.render.raster import (Fragments, antialias, face_adjacency, interpolate, project, rasterize,
                                                sample_texture)
from fit_implicit.shared.protocol import SOLID_ALPHA

BATCH = 1 << 16          # (view, pixel) samples a step
MAX_SAMPLES = 1 << 27    # samples kept in memory at most (a random subset beyond it)
MAX_OFFSET = 0.02        # furthest a vertex moves, as a share of the mesh's bounding-box diagonal
SOLID = SOLID_ALPHA      # alpha (of 255) from which a pixel is all surface, for the normal and roughness terms
TEXELS_FROM_SOLID = True    # the texels learn only from those pixels (the outline's teach the vertices)
# Remeshing rounds (mesh_refine_remesh; _remesh below)
SPLIT_SHARE = 0.1        # a round cuts at most this share of the faces' edges (each cut adds two faces)
SPLIT_MIN_PIXELS = 8.0   # a face is cut only where the views see it at least this many pixels large
COLLAPSE_SHARE = 0.25    # edges shorter than this share of the starting mean edge collapse where the views agree


@dataclass
class RefineConfig:
    """How the textured mesh is refined against the training views after the bake (0 steps:
    not at all)."""

    mesh_refine_steps: int = 0          # steps moving the vertices and the texels together; 0 = keep the mesh
    mesh_refine_lr: float = 1e-3        # Adam learning rate of the vertex offsets, share of the bbox diagonal
    mesh_refine_smooth: float = 4.0     # Laplacian weight: a one-edge-long spike costs this many pixels' error
    mesh_refine_normal_weight: float = 1.0  # normal map and shading vs the normal pass (1 - cos), where given; 0 = off
    # remeshing rounds during those steps (cut where wrong, collapse slivers; export/remesh.py); 0 = off
    # (lego, H100: +0.13 dB held out for 12 % more triangles than the face budget, docs/benchmarks.md)
    mesh_refine_remesh: int = 0
    texture_refine_steps: int = 0       # then Adam steps on the texels alone; 0 = keep the bake
    texture_refine_lr: float = 0.02     # Adam learning rate of the texels (sRGB units)

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        for name in ("mesh_refine_steps", "texture_refine_steps", "mesh_refine_remesh"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("mesh_refine_lr", "texture_refine_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("mesh_refine_smooth", "mesh_refine_normal_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


def _pass(data, name: str) -> np.ndarray | None:
    passes = getattr(data, "passes", {}) or {}
    value = passes.get(name)
    return value if value is not None and len(value) else None


def has_albedo_pass(data) -> bool:
    """Whether ``data`` (PosedImages) carries Blender's albedo pass: the refinement's colour target
    then (the base colour, free of light) in place of the photos."""
    return _pass(data, "albedo") is not None


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
    use_albedo = (target == "albedo") or (target == "auto" and has_albedo_pass(data))
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
    mesh, the textures and facts for the job's summary (nothing refined: the inputs themselves;
    "refine_target": "albedo" where the base colour now follows Blender's albedo pass, free of
    light, else "image").  Cameras with lens distortion are not refined against (the rasteriser is a pinhole camera)."""
    if cfg.texture_refine_steps <= 0 and cfg.mesh_refine_steps <= 0:
        return mesh, baked, {}
    if getattr(data, "lens_models", None) is not None and np.any(np.asarray(data.lens_models) != 0):
        return mesh, baked, {"refine_skipped": "lens distortion"}
    dev = torch.device(device)
    facts: dict = {"refine_target": "albedo" if has_albedo_pass(data) else "image"}
    timings = dict(baked.timings)
    if cfg.mesh_refine_steps > 0 and len(mesh.faces):
        mesh, baked, moved = refine_mesh(mesh, baked, data, cfg, dev)
        facts.update({f"mesh_refine_{k}": v for k, v in moved.items()})
        timings["refine_mesh"] = moved["seconds"]
    albedo = baked.albedo
    if cfg.texture_refine_steps > 0:
        uv, rgb = view_samples(mesh, data, dev)
        albedo, tex = refine_albedo(albedo, uv, rgb, cfg.texture_refine_steps, cfg.texture_refine_lr)
        facts.update({f"texture_refine_{k}": v for k, v in tex.items()})
        timings["refine"] = tex.get("seconds", 0.0)
    return mesh, BakedTextures(albedo, baked.normal, baked.roughness, baked.coverage, timings), facts


@dataclass
class _Surface:
    """The mesh under refinement: its UV vertices' positions before the offsets (V, 3), faces
    (F, 3), UVs (V, 2), tangents (V, 4; None without a normal map), and its welded topology (one
    vertex per point of the surface, so UV seams move together; export/remesh.py): each UV
    vertex's welded vertex (V,), the welded faces (F, 3), neighbour pairs (E, 2) both ways, each
    welded vertex's neighbour count (N,), one UV vertex of each welded vertex (N,), and the welded
    faces' adjacency (render/raster.py)."""

    base: torch.Tensor
    faces: torch.Tensor
    uvs: torch.Tensor
    tangents: torch.Tensor | None
    weld: torch.Tensor
    wf: torch.Tensor
    pairs: torch.Tensor
    count: torch.Tensor
    rows: torch.Tensor
    adjacency: torch.Tensor


def _surface(base: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor, tangents: torch.Tensor | None,
             weld: torch.Tensor) -> _Surface:
    wf = weld[faces]
    pairs = torch.cat([wf[:, [0, 1]], wf[:, [1, 2]], wf[:, [2, 0]]])
    pairs = torch.unique(torch.cat([pairs, pairs.flip(1)]), dim=0)
    count = torch.bincount(pairs[:, 0], minlength=int(weld.max()) + 1).clamp_min(1)
    return _Surface(base, faces, uvs, tangents, weld, wf, pairs, count, _weld_rows(weld), face_adjacency(wf))


def _remesh(surf: _Surface, offsets: torch.Tensor, opt: torch.optim.Optimizer, face_err: torch.Tensor,
            face_px: torch.Tensor, face_hits: torch.Tensor, edge: float) -> tuple[_Surface, torch.Tensor, dict]:
    """One remeshing round (export/remesh.py) from what the steps since the last one saw: the
    faces the views see large enough (``SPLIT_MIN_PIXELS``) and wrong (mean squared error per
    pixel above the median) get their longest edge cut, the worst first, up to ``SPLIT_SHARE`` of
    the faces; then edges shorter than ``COLLAPSE_SHARE`` of the starting mean ``edge`` collapse
    where the views agree with the mesh (or do not see it).  The offsets and their Adam moments
    are carried to the new vertices.  Returns the new surface, the new offsets and counts."""
    points = (surf.base[surf.rows] + offsets).detach().double().cpu().numpy()
    faces, weld = surf.faces.cpu().numpy(), surf.weld.cpu().numpy()
    hits = face_hits.cpu().numpy()
    seen = hits > 0
    err = (face_err / face_px.clamp_min(1)).cpu().numpy()
    size = face_px.cpu().numpy() / np.maximum(hits, 1)
    median = float(np.median(err[seen])) if seen.any() else np.inf
    lengths = remesh.edge_lengths(points, faces, weld)
    cut = seen & (size >= SPLIT_MIN_PIXELS) & (err > median)
    priority = np.zeros_like(lengths)
    priority[np.arange(len(faces)), lengths.argmax(1)] = np.where(cut, err, 0.0)
    split = remesh.split_edges(faces, weld, priority, int(SPLIT_SHARE * len(faces)))
    surf, offsets = _carry(split, surf, offsets, opt)
    points = remesh.carry(points, split.parents)
    lengths = remesh.edge_lengths(points, split.faces, split.weld)
    calm = ~seen[split.face_parents] | (err[split.face_parents] <= median)
    priority = np.where((lengths < COLLAPSE_SHARE * edge) & calm[:, None], 1.0 / np.maximum(lengths, 1e-30), 0.0)
    collapsed = remesh.collapse_edges(points, split.faces, split.weld, priority, len(split.faces) // 10)
    surf, offsets = _carry(collapsed, surf, offsets, opt)
    return surf, offsets, {"split": split.changed, "collapsed": collapsed.changed}


def _carry(r: remesh.Remeshed, surf: _Surface, offsets: torch.Tensor, opt: torch.optim.Optimizer):
    """``surf`` and the ``offsets`` (with their optimiser state) on ``r``'s new vertices."""
    if not r.changed:
        return surf, offsets
    dev = surf.base.device
    up = torch.as_tensor(r.uv_parents, device=dev)
    wp = torch.as_tensor(r.parents, device=dev)
    moved = remesh.carry(offsets.detach(), wp).requires_grad_(True)
    state = opt.state.pop(offsets, None)
    for group in opt.param_groups:
        group["params"] = [moved if p is offsets else p for p in group["params"]]
    if state:
        opt.state[moved] = {k: remesh.carry(v, wp) if torch.is_tensor(v) and v.shape == offsets.shape else v
                            for k, v in state.items()}
    tangents = None if surf.tangents is None else remesh.carry(surf.tangents, up)
    new = _surface(remesh.carry(surf.base, up), torch.as_tensor(r.faces, device=dev), remesh.carry(surf.uvs, up),
                   tangents, torch.as_tensor(r.weld, device=dev))
    return new, moved


def _laplacian(x: torch.Tensor, pairs: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Uniform Laplacian of per-vertex values ``x`` (N, C): each minus the mean of its ``count``
    neighbours listed in ``pairs``."""
    total = torch.zeros_like(x).index_add(0, pairs[:, 0], x[pairs[:, 1]])
    return x - total / count[:, None]


def draw(vertices: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor, texture: torch.Tensor, intrinsics, c2w,
         width: int, height: int) -> torch.Tensor:
    """The textured mesh unlit on white, (H, W, 3), differentiable in the vertices (through the
    UVs each pixel reads and through the outline) and in the texels."""
    return _draw(vertices, faces, uvs, texture, intrinsics, c2w, width, height)[0]


def _draw(vertices, faces, uvs, texture, intrinsics, c2w, width: int, height: int, adjacency=None, background=None,
          texels_learn=None):
    """:func:`draw`, and what it found on the way: the fragments and the UVs (K, 2) of the K
    pixels that see the mesh (row order).  ``adjacency``: render/raster.py ``face_adjacency`` of
    the welded faces (found from the vertices' positions when not given); ``background`` (H, W, 3)
    what the mesh is drawn over (default white); ``texels_learn`` (H, W) bool: the pixels whose
    colour passes a gradient to the texels (None: all; elsewhere only to the vertices)."""
    frags = rasterize(vertices.detach(), faces, intrinsics, c2w, width, height)
    if background is None:
        image = torch.ones((height * width, 3), dtype=texture.dtype, device=texture.device)
    else:
        image = background.reshape(height * width, 3).to(texture.dtype)
    seen = frags.mask
    uv = None
    if seen.any():
        uv = interpolate(uvs, vertices, faces, frags, intrinsics, c2w)
        colour = sample_texture(texture, uv)
        if texels_learn is not None:
            colour = torch.where(texels_learn[seen][:, None], colour, colour.detach())
        image = image.index_put((torch.nonzero(seen.reshape(-1)).squeeze(1),), colour)
    pix, _ = project(vertices, intrinsics, c2w)
    return antialias(image.reshape(height, width, 3), frags, pix, faces, adjacency=adjacency), frags, uv


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Differentiable :func:`export.texture.smooth_normals`: (V, 3) unit normals, face normals
    weighted by the corner angle (Blender's smooth shading); (0, 0, 1) where a vertex has none."""
    p = vertices[faces]                                                          # (F, 3, 3)
    cross = torch.linalg.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    area2 = cross.norm(dim=-1, keepdim=True)
    # a (nearly) flat triangle has no normal to speak of: it adds nothing, and gives no gradient
    # (1 / its area would send the optimiser's moments to infinity)
    flat = area2 <= 1e-10 * (p.detach() - p.detach().mean(1, keepdim=True)).square().sum((1, 2)).mean()
    fn = torch.where(flat, 0.0, cross / torch.where(flat, 1.0, area2))
    out = torch.zeros_like(vertices)
    for i in range(3):
        a, b = p[:, (i + 1) % 3] - p[:, i], p[:, (i + 2) % 3] - p[:, i]
        angle = torch.atan2(torch.linalg.cross(a, b).norm(dim=-1), (a * b).sum(-1))     # smooth where acos is not
        out = out.index_add(0, faces[:, i], fn * angle[:, None])
    norm = out.norm(dim=-1, keepdim=True)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=out.dtype, device=out.device)
    return torch.where(norm > 1e-20, out / norm.clamp_min(1e-30), up)


def shading_normals(normal_map: torch.Tensor, uv: torch.Tensor, normals: torch.Tensor, tangents: torch.Tensor,
                    vertices: torch.Tensor, faces: torch.Tensor, frags, intrinsics, c2w) -> torch.Tensor:
    """World normals (K, 3) a renderer shades the K seen pixels with: the tangent-space
    ``normal_map`` (S, S, 3) in [-1, 1] read at ``uv`` (K, 2), in the frame of the interpolated
    vertex ``normals`` (V, 3) and ``tangents`` (V, 4) (export/texture.py's conventions, as the
    bake writes them).  Differentiable in the texels, the normals and the vertex positions."""
    frame = interpolate(torch.cat([normals, tangents], dim=-1), vertices, faces, frags, intrinsics, c2w)  # one pass
    n, tw = torch.nn.functional.normalize(frame[:, :3], dim=-1, eps=1e-12), frame[:, 3:]
    t = tw[:, :3] - n * (n * tw[:, :3]).sum(-1, keepdim=True)
    t = torch.nn.functional.normalize(t, dim=-1, eps=1e-12)
    sign = torch.where(tw[:, 3:] < 0, -1.0, 1.0)
    b = sign * torch.linalg.cross(n, t)
    local = torch.nn.functional.normalize(sample_texture(normal_map, uv), dim=-1, eps=1e-12)
    world = local[:, :1] * t + local[:, 1:2] * b + local[:, 2:] * n
    return torch.nn.functional.normalize(world, dim=-1, eps=1e-12)


def refine_mesh(mesh: UVMesh, baked: BakedTextures, data, cfg: RefineConfig, device: torch.device,
                seed: int = 0) -> tuple[UVMesh, BakedTextures, dict]:
    """Move the vertices and the texels so that the textured mesh drawn from each training view
    of ``data`` matches its photo on white, and (where the views have those passes) its normal
    map and roughness match Blender's normal and roughness passes (see the module doc).  Returns
    the moved mesh (normals and tangents recomputed), the textures (uint8) and facts: "steps",
    "seconds", "loss_before", "loss_after" (mean of the first and last tenth of the steps),
    "offset_max" (share of the bounding-box diagonal); with the normal pass "normal_deg_before" /
    "normal_deg_after" (mean angle to the pass over the first and last tenth of the steps), with
    the roughness pass "roughness_mse_before" / "roughness_mse_after"."""
    start = time.perf_counter()
    dev = torch.device(device)
    base = torch.as_tensor(np.asarray(mesh.vertices, np.float32), device=dev)
    faces = torch.as_tensor(np.asarray(mesh.faces, np.int64), device=dev)
    _, weld = np.unique(np.asarray(mesh.source), return_inverse=True)
    weld = torch.as_tensor(weld.reshape(-1), dtype=torch.long, device=dev)
    diag = float(torch.linalg.norm(base.amax(0) - base.amin(0))) or 1.0
    edge = float(torch.linalg.norm(base[faces[:, 0]] - base[faces[:, 1]], dim=-1).mean()) or diag
    offsets = torch.zeros((int(weld.max()) + 1, 3), device=dev, requires_grad=True)
    tex = torch.as_tensor(baked.albedo[..., :3], device=dev).float().div(255.0).requires_grad_(True)
    texels = [tex]
    normal_pass = _pass(data, "normal") if cfg.mesh_refine_normal_weight > 0 and baked.normal is not None else None
    rough_pass = _pass(data, "roughness") if baked.roughness is not None else None
    nmap = rough = None
    if normal_pass is not None:
        nmap = torch.as_tensor(baked.normal[..., :3], device=dev).float().div(127.5).sub(1.0).requires_grad_(True)
        texels.append(nmap)
    if rough_pass is not None:
        rough = torch.as_tensor(baked.roughness[..., :1], device=dev).float().div(255.0).requires_grad_(True)
        texels.append(rough)
    tangents = None if nmap is None else torch.as_tensor(np.asarray(mesh.tangents, np.float32), device=dev)
    surf = _surface(base, faces, torch.as_tensor(np.asarray(mesh.uvs, np.float32), device=dev), tangents, weld)
    steps = int(cfg.mesh_refine_steps)
    rounds = min(int(cfg.mesh_refine_remesh), steps // 4)
    remesh_at = {steps * (r + 1) // (rounds + 2): r for r in range(rounds)}     # the first half of the steps
    face_stats = torch.zeros((3, len(faces)), device=dev) if rounds else None   # error, pixels, sightings
    remeshed = {"split": 0, "collapsed": 0}
    opt = torch.optim.Adam([{"params": [offsets], "lr": cfg.mesh_refine_lr * diag},
                            {"params": texels, "lr": cfg.texture_refine_lr}], betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * i / max(steps, 1))))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(data)) for _ in range(steps // max(len(data), 1) + 1)])[:steps]
    losses, angles, rough_errors, seen_views = [], [], [], 0
    pixels = float(np.mean(np.prod(data.sizes, axis=1)))     # the loss per pixel of an average view
    albedo_pass = _pass(data, "albedo")
    for step, i in enumerate(order):
        if step in remesh_at:
            surf, offsets, counts = _remesh(surf, offsets, opt, *face_stats, edge)
            remeshed = {k: remeshed[k] + v for k, v in counts.items()}
            face_stats = torch.zeros((3, len(surf.faces)), device=dev)
        w, h = data.size(i)
        photo = torch.as_tensor(data.images[i, :h, :w], device=dev).float() / 255.0
        colour = photo[..., :3] if albedo_pass is None else torch.as_tensor(albedo_pass[i, :h, :w], device=dev).float() / 255.0
        # Photos with a mask: the mesh over white against the view on white.  Opaque photos (a
        # room, a wall behind the object): the mesh over the photo itself, and only the pixels
        # the mesh covers count, less its outline (whose photo pixels mix the object with the wall
        # behind, which nothing shows alone: drawn over them, the mesh shrank by 2 %).
        masked = photo.shape[-1] == 4 and bool((photo[..., 3] < 1.0).any())
        target = colour * photo[..., 3:] + (1.0 - photo[..., 3:]) if masked else colour
        verts = surf.base + offsets[surf.weld]
        # The texels learn from the pixels that are all surface; an outline pixel (the photo's
        # coverage partial, or none where the mesh is too fat) teaches only the vertices: where it
        # also taught the texels, a fat outline was met by lightening the texels along it, and the
        # mesh never came in (the still life: 0.08 pixel too wide on every outline after 400 steps).
        learn = photo[..., 3] >= SOLID / 255.0 if masked else None
        image, frags, uv = _draw(verts, surf.faces, surf.uvs, tex, data.intrinsics[i], data.poses[i], w, h,
                                 surf.adjacency, background=None if masked else colour,
                                 texels_learn=learn if TEXELS_FROM_SOLID else None)
        err = (image - target) ** 2
        if not masked:      # the photo's outline pixels mix in the object: no background to compare them with
            err = err * _off_outline(frags.mask)[..., None]
        if face_stats is not None and frags.mask.any():
            _count_face_errors(face_stats, err.detach().sum(-1), frags)
        loss = err.sum() / pixels
        seen_views += uv is not None
        total = loss + (_laplacian(offsets, surf.pairs, surf.count) / edge).pow(2).sum() * (cfg.mesh_refine_smooth / pixels)
        if uv is not None and (nmap is not None or rough is not None):
            seen = frags.mask
            solid = (photo[..., 3] >= SOLID / 255.0 if photo.shape[-1] == 4 else torch.ones_like(seen))[seen]
            if nmap is not None:
                want = torch.as_tensor(normal_pass[i, :h, :w], device=dev).float()[seen]
                has = solid & (want.norm(dim=-1) > 0.5)
                if bool(has.any()):
                    vn = vertex_normals(surf.base[surf.rows] + offsets, surf.wf)[surf.weld]
                    got = shading_normals(nmap, uv[has], vn, surf.tangents, verts, surf.faces, _only(frags, seen, has),
                                          data.intrinsics[i], data.poses[i])
                    cos = (got * torch.nn.functional.normalize(want[has], dim=-1)).sum(-1).clamp(-1.0, 1.0)
                    total = total + cfg.mesh_refine_normal_weight * (1.0 - cos).sum() / pixels
                    angles.append(float(torch.rad2deg(torch.acos(cos.detach())).mean()))
            if rough is not None:
                want = torch.as_tensor(rough_pass[i, :h, :w], device=dev).float()[seen]
                has = solid & (want >= 0)
                if bool(has.any()):
                    err = ((sample_texture(rough, uv[has])[:, 0] - want[has]) ** 2)
                    total = total + err.sum() / pixels
                    rough_errors.append(float(err.detach().mean()))
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(total):
            total.backward()
            opt.step()
        sched.step()
        with torch.no_grad():
            for t in texels:
                t.clamp_(-1.0 if t is nmap else 0.0, 1.0)
            norm = offsets.norm(dim=-1, keepdim=True)
            offsets.mul_((MAX_OFFSET * diag / norm.clamp_min(1e-12)).clamp(max=1.0))
        losses.append(float(loss.detach()) / 3.0)
    with torch.no_grad():
        moved = (surf.base + offsets[surf.weld]).cpu().numpy()
    weld_np = surf.weld.cpu().numpy()
    welded = moved[surf.rows.cpu().numpy()]
    normals = smooth_normals(welded, surf.wf.cpu().numpy())[weld_np]
    if any(remeshed.values()):      # new triangles: their UVs and the welded vertices as the source
        out_faces, out_uvs, source = surf.faces.cpu().numpy().astype(np.int32), surf.uvs.cpu().numpy(), weld_np
    else:
        out_faces, out_uvs, source = mesh.faces, mesh.uvs, mesh.source
    tangents_out = uv_tangents(moved, np.asarray(out_faces), np.asarray(out_uvs), normals)
    out_mesh = UVMesh(moved.astype(np.float32), out_faces, out_uvs, source, normals.astype(np.float32), tangents_out)
    covered = torch.as_tensor(baked.coverage, device=dev)

    def texture_out(t: torch.Tensor, old: np.ndarray, encode) -> np.ndarray:
        """The refined texels, grown again from the charts as the bake grew them (the padding
        follows them), as uint8; the old texture where no view saw the mesh."""
        if not seen_views:
            return old
        grown = dilate(t.detach(), covered, DEFAULT_PADDING) if bool(covered.any()) else t.detach()
        out = np.array(old, copy=True)
        out[..., :grown.shape[-1]] = (encode(grown).clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
        return out

    albedo = texture_out(tex, baked.albedo, lambda t: t)
    normal = baked.normal if nmap is None else texture_out(
        nmap, baked.normal, lambda t: torch.nn.functional.normalize(t, dim=-1, eps=1e-12) * 0.5 + 0.5)
    roughness = baked.roughness if rough is None else texture_out(rough, baked.roughness, lambda t: t)

    def ends(values: list[float], name: str, digits: int) -> dict:
        k = max(1, len(values) // 10)
        return {f"{name}_before": round(float(np.mean(values[:k])), digits),
                f"{name}_after": round(float(np.mean(values[-k:])), digits)} if values else {}

    facts = {"steps": steps, "seconds": round(time.perf_counter() - start, 3),
             "loss_before": None, "loss_after": None, **ends(losses, "loss", 6),
             "offset_max": round(float(offsets.detach().norm(dim=-1).max()) / diag, 5) if len(offsets) else 0.0,
             **({"remesh_split": remeshed["split"], "remesh_collapsed": remeshed["collapsed"],
                 "faces": int(len(surf.faces))} if rounds else {}),
             **ends(angles, "normal_deg", 3), **ends(rough_errors, "roughness_mse", 6)}
    return out_mesh, BakedTextures(albedo, normal, roughness, baked.coverage, baked.timings), facts


def _count_face_errors(stats: torch.Tensor, err: torch.Tensor, frags) -> None:
    """Add one view's squared error (H, W) to ``stats`` (3, F): each face's summed error and pixel
    count over the pixels it covers, and one sighting for every face the view sees."""
    covered = frags.mask
    face = frags.face[covered]
    stats[0].index_add_(0, face, err[covered].to(stats.dtype))
    stats[1].index_add_(0, face, torch.ones_like(face, dtype=stats.dtype))
    stats[2][torch.unique(face)] += 1.0


def _off_outline(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) float: 1 where a pixel and its 8 neighbours all see the mesh or all do not, else 0."""
    m = mask.float()[None, None]
    grown = torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)
    shrunk = -torch.nn.functional.max_pool2d(-m, 3, stride=1, padding=1)
    return (grown == shrunk)[0, 0].float()


def _weld_rows(weld: torch.Tensor) -> torch.Tensor:
    """(N,) for each welded vertex, one of its UV vertices (where its base position is read)."""
    rows = torch.empty(int(weld.max()) + 1, dtype=torch.long, device=weld.device)
    rows[weld] = torch.arange(len(weld), device=weld.device)
    return rows


def _only(frags, seen: torch.Tensor, keep: torch.Tensor):
    """The fragments reduced to the seen pixels where ``keep`` (a mask over the seen pixels) holds."""
    mask = torch.zeros_like(seen)
    mask[seen] = keep
    return Fragments(torch.where(mask, frags.face, torch.full_like(frags.face, -1)), frags.depth)
