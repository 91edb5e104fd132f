"""Materials from photos alone: base colour, roughness and metallic textures and the light that lit
them, estimated jointly from the photos on the fitted mesh (inverse rendering, after nvdiffrec's
split of a photo into geometry, materials and an environment light; visibility as NeRV adds it).

Without Blender's passes a photo is material times light: the bake (export/texture.py) stores the
product, so the asset looks right only under the light it was photographed in.  Here the mesh is
fixed and the photos are explained by physically based shading instead:

* **light**: an environment of ``light_rows`` x 2 ``light_rows`` equirectangular bins with
  Blender's World mapping (export/environment.py: azimuth ``atan2(y, x) = pi - 2 pi u``, the top
  row looking up +Z), one RGB radiance each (HDR, positive);
* **visibility**: for every surface sample and every bin, whether the mesh itself blocks the way
  (one orthographic shadow map a bin, rendered once: the geometry does not move), so a shadow is
  explained by the light being blocked, not painted into the base colour;
* **shading** (linear): Lambert for ``albedo * (1 - metallic)`` plus a GGX microfacet lobe
  (Smith-Schlick visibility, Schlick Fresnel with ``F0 = lerp(0.04, albedo, metallic)``), each bin
  lighting as a small area light of its solid angle; the lobe is widened by the bin's angular
  size so that a bin-sized light still gives a highlight (the light's resolution limits how sharp
  a reflection can be: rough materials are what it recovers);
* **loss**: squared error in sRGB between the shaded mesh and the photo at every pixel whose mask
  is whole, on random batches of (view, pixel) samples; regularisers: total variation of the base
  colour (a shading gradient costs, an edge of the material much less), a light near white (each
  bin's chroma: a tinted photo is explained by a tinted base colour before a tinted light) and
  metallic towards 0.

Base colour and light share a scale per colour channel that no photo decides (a darker material
under a brighter light looks the same): metrics align it per channel, as the benchmarks of the
field do (docs/benchmarks.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fit_implicit.backend.export.texture import UVMesh, dilate, rasterize as rasterize_uv
from fit_implicit.backend.render.raster import interpolate, rasterize, rasterize_2d, sample_texture

BATCH = 1 << 13          # (view, pixel) samples a step
MAX_SAMPLES = 1 << 19    # surface samples kept at most (a random subset beyond it; each holds K bins' bounce)
SOLID = 250              # alpha (of 255) from which a pixel is all surface (outlines mix in the background)
METALLIC_PRIOR = 0.01    # weight of the mean metallic: a dielectric unless the photos say otherwise
PADDING = 4              # texels the textures grow past their charts
# The light first: over this share of the steps only the light moves (the textures keep their
# start), so that shading and shadows are explained by where the light comes from before the
# texels, which can explain any one pixel alone, take the rest.
LIGHT_FIRST = 0.25
UNASKED = 1e-3          # a bin lighting less than this share of the most-lighting bin's samples is not estimated
LIGHT_LR_SCALE = 5.0     # the light's learning rate over the texels' (log radiance: one bin may need x100)


@dataclass
class MaterialConfig:
    """How materials and light are estimated from photos without passes (module doc)."""

    material_steps: int = 0             # Adam steps estimating materials and light; 0 = off (light stays baked in)
    material_lr: float = 0.02           # Adam learning rate (texel logits, the light's log radiance)
    # the estimated light: rows x 2 rows bins (16: 11.25 degrees a bin).  A sun between two bins casts
    # its shadow up to half a bin off, and what the bins' shadows miss is painted into the base colour:
    # the CPU scene of tests/backend/export/test_materials.py with its sun between bins (elevation 45,
    # azimuth 22.5 degrees; 400 steps): shadowed / lit plane 0.63 at 8 rows, 0.82 at 16 (1 is right),
    # the light 13 -> 7 degrees off; 4x the bins' time (54 -> 227 s there; 14 s at 8 rows on an H100
    # for the still life, docs/benchmarks.md "Materials from photos alone")
    light_rows: int = 16
    material_smoothness: float = 0.1    # weight of the base colour's total variation
    light_white: float = 0.01           # weight of the light's chroma (a white-ish light)
    shadow_size: int = 256              # pixels a side of each bin's shadow map

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.material_steps < 0:
            raise ValueError(f"material_steps must not be negative, got {self.material_steps}")
        if not self.material_lr > 0:
            raise ValueError(f"material_lr must be positive, got {self.material_lr}")
        if not 2 <= int(self.light_rows) <= 64:
            raise ValueError(f"light_rows must be in [2, 64], got {self.light_rows}")
        if not 16 <= int(self.shadow_size) <= 4096:
            raise ValueError(f"shadow_size must be in [16, 4096], got {self.shadow_size}")
        for name in ("material_smoothness", "light_white"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


@dataclass
class Materials:
    """What the estimate gives: (S, S, 3) uint8 sRGB base colour, (S, S, 1) uint8 roughness and
    metallic (Non-Color), top row first; ``environment`` (rows, 2 rows, 3) float32 linear radiance
    (Blender's World mapping, top row first); ``facts``: loss, the light's dominant direction, timings."""

    albedo: np.ndarray
    roughness: np.ndarray
    metallic: np.ndarray
    environment: np.ndarray
    facts: dict = field(default_factory=dict)

    def on(self, baked):
        """The bake's textures (export/texture.py BakedTextures) with this base colour, roughness and metallic."""
        from dataclasses import replace

        return replace(baked, albedo=self.albedo, roughness=self.roughness, metallic=self.metallic)


def light_bins(rows: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Directions (K, 3) (unit, towards the light) and solid angles (K,) of the rows x 2 rows
    equirectangular bins, row-major from the top row (Blender's World mapping: module doc)."""
    rows = int(rows)
    edges = (0.5 - torch.arange(rows + 1, dtype=torch.float64) / rows) * math.pi     # latitude of row edges
    lat = 0.5 * (edges[:-1] + edges[1:])
    azimuth = math.pi - 2.0 * math.pi * (torch.arange(2 * rows, dtype=torch.float64) + 0.5) / (2 * rows)
    la, az = torch.meshgrid(lat, azimuth, indexing="ij")
    dirs = torch.stack([la.cos() * az.cos(), la.cos() * az.sin(), la.sin()], -1).reshape(-1, 3)
    band = (edges[:-1].sin() - edges[1:].sin()) * (2.0 * math.pi / (2 * rows))        # (rows,)
    solid = band[:, None].expand(rows, 2 * rows).reshape(-1)
    return dirs.float().to(device), solid.float().to(device)


def _basis(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unit vectors spanning the plane perpendicular to the unit ``w``."""
    a = torch.tensor([0.0, 0.0, 1.0] if abs(float(w[2])) < 0.9 else [1.0, 0.0, 0.0], device=w.device)
    e1 = torch.linalg.cross(w, a)
    e1 = e1 / e1.norm()
    return e1, torch.linalg.cross(w, e1)


@torch.no_grad()
def visibility(vertices: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor, points: torch.Tensor,
               normals: torch.Tensor, dirs: torch.Tensor, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """How open the way from each point towards each direction is, and what blocks it.

    One orthographic shadow map a direction (the mesh rasterised looking along ``-dir``, keeping
    each texel's height along ``dir``, face and barycentric weights); a point is blocked where the
    map holds a surface higher than itself by more than two texels.  Points are offset along their
    normal by a texel and read with a 3 x 3 percentage-closer filter, so lit surfaces do not
    shadow themselves (acne) and shadow edges are a texel soft.

    Args:
        vertices (V, 3), faces (F, 3) int64, uvs (V, 2): the mesh.  points (N, 3), normals (N, 3) unit.
        dirs (K, 3) unit, towards the light.  size: pixels a side of each map.
    Returns:
        open (N, K) float in [0, 1]; blocker (N, K, 2) the texture coordinate of the surface that
        the map's centre pixel shows above each point (meaningful where it is not open).
    """
    n = points.shape[0]
    out = torch.empty(n, dirs.shape[0], device=points.device)
    blocker = torch.zeros(n, dirs.shape[0], 2, device=points.device)
    for k, w in enumerate(dirs):
        e1, e2 = _basis(w)
        frame = torch.stack([e1, e2], 1)                                   # (3, 2)
        flat = vertices @ frame
        lo = flat.amin(0)
        extent = float((flat.amax(0) - lo).max()) * 1.02 + 1e-6
        texel = extent / size
        height = vertices @ w
        base = float(height.min()) - 1.0                                   # heights above it: positive
        face, bary = rasterize_2d((flat - lo) / extent * size, faces, size, size, inv_depth=height - base)
        corners = faces[face.clamp_min(0)]                                 # (S, S, 3)
        hmap = torch.where(face >= 0, (bary * (height - base)[corners]).sum(-1),
                           torch.full_like(bary[..., 0], -torch.inf))
        q = points + normals * texel
        pix = ((q @ frame - lo) / extent * size).floor().long().clamp(0, size - 1)
        qh = q @ w - base
        open_share = torch.zeros(n, device=points.device)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                x = (pix[:, 0] + dx).clamp(0, size - 1)
                y = (pix[:, 1] + dy).clamp(0, size - 1)
                open_share += (hmap[y, x] <= qh + 2.0 * texel).float()
        out[:, k] = open_share / 9.0
        at = (pix[:, 1], pix[:, 0])
        blocker[:, k] = (bary[at][..., None] * uvs[corners[at]]).sum(1)
    return out, blocker


def surface_samples(mesh: UVMesh, data, device: torch.device) -> dict[str, torch.Tensor]:
    """Every whole-mask pixel of every view that the mesh covers: its texture coordinate ``uv``
    (P, 2), surface point ``x`` (P, 3), unit normal ``n`` (P, 3), unit direction to the camera
    ``v`` (P, 3) and photo colour ``rgb`` (P, 3) sRGB in [0, 1]."""
    verts = torch.as_tensor(np.asarray(mesh.vertices, np.float32), device=device)
    faces = torch.as_tensor(np.asarray(mesh.faces, np.int64), device=device)
    attrs = torch.cat([torch.as_tensor(np.asarray(mesh.uvs, np.float32), device=device), verts,
                       torch.as_tensor(np.asarray(mesh.normals, np.float32), device=device)], 1)
    parts: dict[str, list] = {"uv": [], "x": [], "n": [], "v": [], "rgb": []}
    for i in range(len(data)):
        w, h = data.size(i)
        frags = rasterize(verts, faces, data.intrinsics[i], data.poses[i], w, h)
        rgba = torch.as_tensor(data.images[i, :h, :w], device=device)
        keep = frags.mask & (rgba[..., 3] >= SOLID)
        if not keep.any():
            continue
        at = interpolate(attrs, verts, faces, frags, data.intrinsics[i], data.poses[i])[keep[frags.mask]]
        x = at[:, 2:5]
        origin = torch.as_tensor(np.asarray(data.poses[i])[:3, 3], dtype=torch.float32, device=device)
        v = torch.nn.functional.normalize(origin - x, dim=-1)
        n = torch.nn.functional.normalize(at[:, 5:8], dim=-1)
        n = torch.where(((n * v).sum(-1) < 0)[:, None], -n, n)          # the side the camera sees
        for key, value in (("uv", at[:, :2]), ("x", x), ("n", n), ("v", v), ("rgb", rgba[keep][:, :3].float() / 255.0)):
            parts[key].append(value)
    if not parts["uv"]:
        raise ValueError("no view sees the mesh inside its mask: nothing to estimate materials from")
    out = {key: torch.cat(value) for key, value in parts.items()}
    if len(out["uv"]) > MAX_SAMPLES:
        pick = torch.randperm(len(out["uv"]), device=device)[:MAX_SAMPLES]
        out = {key: value[pick] for key, value in out.items()}
    return out


def to_srgb(x: torch.Tensor) -> torch.Tensor:
    """Linear in [0, 1] -> sRGB-encoded (differentiable; shared/color.py's transfer function)."""
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(1e-8).pow(1.0 / 2.4) - 0.055)


def to_linear(c: torch.Tensor) -> torch.Tensor:
    c = c.clamp(0.0, 1.0)
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055).pow(2.4))


def shade(albedo: torch.Tensor, roughness: torch.Tensor, metallic: torch.Tensor, incoming: torch.Tensor,
          dirs: torch.Tensor, solid: torch.Tensor, n: torch.Tensor, v: torch.Tensor, widen: float) -> torch.Tensor:
    """Linear radiance (B, 3) towards the camera (module doc).

    albedo (B, 3), roughness (B, 1), metallic (B, 1) in [0, 1]; incoming (B, K, 3) the radiance
    arriving from each bin (the light where the way is open, the blocking surface's where not);
    dirs (K, 3), solid (K,) from :func:`light_bins`; n, v (B, 3) unit; ``widen``: the squared GGX
    width added for a bin's angular size.
    """
    nl = (n @ dirs.T).clamp_min(0.0)                                       # (B, K)
    nv = (n * v).sum(-1, keepdim=True).clamp_min(1e-4)                     # (B, 1)
    arrive = nl * solid                                                    # (B, K): irradiance weights
    diffuse = albedo * (1.0 - metallic) / math.pi * (arrive[..., None] * incoming).sum(1)
    h = torch.nn.functional.normalize(dirs[None] + v[:, None], dim=-1)     # (B, K, 3)
    nh = (n[:, None] * h).sum(-1).clamp_min(0.0)
    vh = (v[:, None] * h).sum(-1).clamp_min(0.0)
    a2 = roughness.pow(4) + widen                                          # GGX alpha = roughness^2
    d = a2 / (math.pi * (nh * nh * (a2 - 1.0) + 1.0).pow(2))
    k = (roughness + 1.0).pow(2) / 8.0
    g = nl / (nl * (1.0 - k) + k) * nv / (nv * (1.0 - k) + k)
    f0 = 0.04 * (1.0 - metallic) + albedo * metallic                      # (B, 3)
    fresnel = f0[:, None] + (1.0 - f0[:, None]) * (1.0 - vh).pow(5)[..., None]      # (B, K, 3)
    lobe = d * g / (4.0 * nl * nv + 1e-6) * arrive                         # (B, K)
    specular = (fresnel * lobe[..., None] * incoming).sum(1)
    return diffuse + specular


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p) - torch.log1p(-p)


def estimate_materials(mesh: UVMesh, albedo_init: np.ndarray, data, cfg: MaterialConfig, device: torch.device,
                       seed: int = 0, log=None) -> Materials:
    """Estimate base colour, roughness and metallic textures (the size of ``albedo_init``, the
    baked base colour (S, S, 3) uint8 sRGB, the start) and the light from the photos of ``data``
    (PosedImages, no passes needed) on the fixed ``mesh`` (module doc).  ``log(step, loss)`` is
    called now and then."""
    cfg.validate()
    start = time.monotonic()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    samples = surface_samples(mesh, data, device)
    verts = torch.as_tensor(np.asarray(mesh.vertices, np.float32), device=device)
    faces = torch.as_tensor(np.asarray(mesh.faces, np.int64), device=device)
    uvs = torch.as_tensor(np.asarray(mesh.uvs, np.float32), device=device)
    dirs, solid = light_bins(cfg.light_rows, device)
    vis, blocker = visibility(verts, faces, uvs, samples["x"], samples["n"], dirs, cfg.shadow_size)
    # Light that bounces: where the mesh blocks a bin, what arrives is that surface's radiance as
    # photographed, which the bake holds (one bounce, fixed: the bake does not change).
    linear0 = to_linear(torch.as_tensor(albedo_init, device=device).float() / 255.0)
    bounced = torch.zeros(vis.shape + (3,), dtype=torch.float16, device=device)
    for lo in range(0, len(vis), 1 << 14):
        part = blocker[lo:lo + (1 << 14)]
        bounced[lo:lo + len(part)] = sample_texture(linear0, part.reshape(-1, 2)).reshape(part.shape[:2] + (3,)).half()
    del blocker
    prepared = time.monotonic()
    size = albedo_init.shape[0]
    covered = rasterize_uv(mesh.uvs, mesh.faces, size, device)[0] >= 0
    # The base colour starts flat (the bake's mean): starting from the bake, its baked shadows and
    # shading would already explain the photos, and the light would never take them over.
    flat = linear0[covered].mean(0) if covered.any() else linear0.new_full((3,), 0.5)
    albedo_logit = _logit(flat.clamp(0.03, 0.97)).expand(size, size, 3).clone().requires_grad_(True)
    rough_logit = torch.full((size, size, 1), _logit(torch.tensor(0.6)).item(), device=device, requires_grad=True)
    metal_logit = torch.full((size, size, 1), _logit(torch.tensor(0.02)).item(), device=device, requires_grad=True)
    # the light starts white and uniform, bright enough that a mid-grey base colour gives the photos' mean
    mean = float(to_linear(samples["rgb"]).mean())
    light_log = torch.full((dirs.shape[0], 3), math.log(max(mean, 1e-3) / 0.5), device=device, requires_grad=True)
    opt = torch.optim.Adam([{"params": [albedo_logit, rough_logit, metal_logit], "lr": cfg.material_lr},
                            {"params": [light_log], "lr": cfg.material_lr * LIGHT_LR_SCALE}])
    light_only = int(LIGHT_FIRST * cfg.material_steps)
    widen = (0.5 * math.sqrt(float(solid.max()) / math.pi)) ** 2            # (half the bin's angular radius)^2
    pairs_x = covered[:, 1:] & covered[:, :-1]
    pairs_y = covered[1:] & covered[:-1]
    count = len(samples["uv"])
    loss_value = float("nan")
    for step in range(int(cfg.material_steps)):
        opt.param_groups[0]["lr"] = 0.0 if step < light_only else cfg.material_lr
        pick = torch.randint(0, count, (min(BATCH, count),), generator=gen).to(device)
        tex = torch.sigmoid(albedo_logit)
        rough_tex, metal_tex = torch.sigmoid(rough_logit), torch.sigmoid(metal_logit)
        uv = samples["uv"][pick]
        albedo = sample_texture(tex, uv)
        rough = sample_texture(rough_tex, uv)
        metal = sample_texture(metal_tex, uv)
        light = light_log.exp()
        open_ = vis[pick][..., None]
        incoming = open_ * light[None] + (1.0 - open_) * bounced[pick].float()
        pred = shade(albedo, rough, metal, incoming, dirs, solid, samples["n"][pick], samples["v"][pick], widen)
        loss = (to_srgb(pred) - samples["rgb"][pick]).pow(2).mean()
        loss_value = float(loss.detach())
        tv = ((tex[:, 1:] - tex[:, :-1]).abs().sum(-1)[pairs_x].mean() + (tex[1:] - tex[:-1]).abs().sum(-1)[pairs_y].mean())
        chroma = (light_log - light_log.mean(-1, keepdim=True)).pow(2).mean()
        total = loss + cfg.material_smoothness * tv + cfg.light_white * chroma + METALLIC_PRIOR * metal_tex.mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if log is not None and (step % 100 == 0 or step == cfg.material_steps - 1):
            log(step, loss_value)
    with torch.no_grad():
        textures = [dilate(t, covered, PADDING) for t in (to_srgb(torch.sigmoid(albedo_logit)), torch.sigmoid(rough_logit),
                                                           torch.sigmoid(metal_logit))]
        light = light_log.exp()
        # Bins that light nothing any camera saw (below a ground, behind a wall) were never asked:
        # they get the median of the others, a neutral guess, not their untouched start.
        support = torch.zeros(len(dirs), device=device)
        for lo in range(0, count, 1 << 15):
            support += ((samples["n"][lo:lo + (1 << 15)] @ dirs.T).clamp_min(0.0) * vis[lo:lo + (1 << 15)]).sum(0)
        asked = support > UNASKED * support.max()
        if asked.any() and not asked.all():
            light[~asked] = light[asked].median(0).values
        power = (light.mean(-1) * solid)
        top = int(power.argmax())
    to_u8 = [(t.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy() for t in textures]
    rows = int(cfg.light_rows)
    facts = {"material_loss": loss_value, "light_direction": dirs[top].tolist(),
             "light_share": float(power[top] / power.sum()), "material_samples": count,
             "visibility_seconds": round(prepared - start, 3), "material_seconds": round(time.monotonic() - start, 3)}
    return Materials(to_u8[0], to_u8[1], to_u8[2], light.reshape(rows, 2 * rows, 3).cpu().numpy().astype(np.float32), facts)


def write_hdr(path: str | Path, rgb: np.ndarray) -> None:
    """Write linear ``rgb`` (H, W, 3) float as a Radiance .hdr (RGBE, flat scanlines, top row
    first): what Blender's Environment Texture reads as an HDR World."""
    rgb = np.maximum(np.asarray(rgb, np.float64), 0.0)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"an environment must be (H, W, 3), got {rgb.shape}")
    top = rgb.max(-1)
    mantissa, exponent = np.frexp(top)
    scale = np.where(top > 1e-32, mantissa * 256.0 / np.where(top > 1e-32, top, 1.0), 0.0)
    rgbe = np.zeros(rgb.shape[:2] + (4,), np.uint8)
    rgbe[..., :3] = np.clip(rgb * scale[..., None], 0, 255).astype(np.uint8)
    rgbe[..., 3] = np.where(top > 1e-32, exponent + 128, 0).astype(np.uint8)
    header = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {rgb.shape[0]} +X {rgb.shape[1]}\n".encode("ascii")
    Path(path).write_bytes(header + rgbe.tobytes())


def read_hdr(path: str | Path) -> np.ndarray:
    """Read a flat (not run-length encoded) Radiance .hdr as written by :func:`write_hdr`."""
    raw = Path(path).read_bytes()
    head, _, rest = raw.partition(b"\n\n")
    size_line, _, pixels = rest.partition(b"\n")
    parts = size_line.split()
    if not head.startswith(b"#?") or len(parts) != 4 or parts[0] != b"-Y" or parts[2] != b"+X":
        raise ValueError(f"{path}: not a flat Radiance .hdr")
    h, w = int(parts[1]), int(parts[3])
    if len(pixels) != h * w * 4:
        raise ValueError(f"{path}: {len(pixels)} bytes of pixels for {w}x{h}")
    rgbe = np.frombuffer(pixels, np.uint8).reshape(h, w, 4).astype(np.float64)
    scale = np.where(rgbe[..., 3] > 0, np.ldexp(1.0, rgbe[..., 3].astype(np.int64) - 136), 0.0)
    return ((rgbe[..., :3] + 0.5) * scale[..., None]).astype(np.float32)       # + 0.5: the writer floors (as Blender reads)


__all__ = ["MaterialConfig", "Materials", "estimate_materials", "light_bins", "visibility", "shade", "write_hdr",
           "read_hdr"]
