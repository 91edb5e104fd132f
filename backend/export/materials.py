"""Materials from photos alone: base colour, roughness and metallic textures and the light that lit
them, estimated jointly from the photos on the fitted mesh (inverse rendering, after nvdiffrec's
split of a photo into geometry, materials and an environment light; visibility as NeRV adds it).

Without Blender's passes a photo is material times light: the bake (export/texture.py) stores the
product, so the asset looks right only under the light it was photographed in.  Here the mesh is
fixed and the photos are explained by physically based shading instead:

* **light**: an environment of ``light_rows`` x 2 ``light_rows`` equirectangular bins with
  Blender's World mapping (export/environment.py: azimuth ``atan2(y, x) = pi - 2 pi u``, the top
  row looking up +Z), one RGB radiance each (HDR, positive), and a **sun** (``material_sun``): a
  small directional light gathered from the strongest bins once the light alone has been fitted,
  its direction then searched where its shadows fit the photos best (a sun between bins spreads
  over several, and each casts its shadow from its own centre), and its angular size too (a sun
  of some degrees across casts soft shadow edges: its visibility is the mean of SUN_DISC shadow
  maps over its disc);
* **visibility**: for every surface sample and every bin, whether the mesh itself blocks the way
  (one orthographic shadow map a bin, rendered once: the geometry does not move), so a shadow is
  explained by the light being blocked, not painted into the base colour;
* **shading** (linear): Lambert for ``albedo * (1 - metallic)``, times what the specular layer
  leaves (:func:`specular_albedo`, as Blender's Principled BSDF layers them), plus a GGX microfacet lobe
  (Smith-Schlick visibility, Schlick Fresnel with ``F0 = lerp(0.04, albedo, metallic)``), each bin
  lighting as a small area light of its solid angle; the lobe is widened by the bin's angular
  size so that a bin-sized light still gives a highlight (the light's resolution limits how sharp
  a reflection can be: rough materials are what it recovers);
* **materials**: texels of the textures themselves (:class:`Texels`), or with ``material_field``
  a hash-grid field over the surface read at each texel (:class:`MaterialField`);
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
from fit_implicit.shared.protocol import SOLID_ALPHA

BATCH = 1 << 13          # (view, pixel) samples a step
MAX_SAMPLES = 1 << 19    # surface samples kept at most (a random subset beyond it; each holds K bins' bounce)
SOLID = SOLID_ALPHA      # alpha (of 255) from which a pixel is all surface (outlines mix in the background)
METALLIC_PRIOR = 0.01    # weight of the mean metallic: a dielectric unless the photos say otherwise
PADDING = 4              # texels the textures grow past their charts
# The light first: over this share of the steps only the light moves (the textures keep their
# start), so that shading and shadows are explained by where the light comes from before the
# texels, which can explain any one pixel alone, take the rest.
LIGHT_FIRST = 0.25
UNASKED = 1e-3          # a bin lighting less than this share of the most-lighting bin's samples is not estimated
LIGHT_LR_SCALE = 5.0     # the light's learning rate over the texels' (log radiance: one bin may need x100)
ROUGHNESS_START, METALLIC_START = 0.6, 0.02
# MaterialField: a hash grid over the mesh's box (cube, this share wider on each side), its finest
# level as fine as the textures' side; the MLP's width; its learning rate over the texels'; the
# smoothness's reach (the random offset's spread, a share of the box's side)
BOX_MARGIN = 0.01
FIELD_LEVELS, FIELD_LOG2_TABLE, FIELD_WIDTH = 16, 19, 64
FIELD_LR_SCALE = 0.5
SMOOTH_REACH = 0.005
# The sun (MaterialConfig.material_sun): a directional light beside the bins, shading as a light of
# SUN_SOLID (its radiance over that solid angle is its power), drawn into the written environment as
# a disc of its estimated angular size holding the same power.
# Its direction is searched, not followed down the gradient: what places a sun is where its
# shadows fall, and a shadow map has no gradient (the shading's gradient alone moved it towards
# the zenith, where it lights a ground more evenly: 27-43 degrees off on the still life).  Every
# SUN_REFRESH steps the direction and four neighbours a step away are compared on SUN_SEARCH
# samples, each with its own shadow map; the step halves when the direction stays.  The written
# environment's rows (the bins upsampled, the sun drawn in): ENVIRONMENT_ROWS.
# Its angular size: the visibility is averaged over SUN_DISC directions spread over the disc (a
# 10-degree sun's soft edges: the still life's albedo at the held-out pixels under the scene's own
# light, 24.37 dB as a point, 25.06 with 8 directions at 10 degrees, 24.85 at 5, 24.45 at 20:
# docs/benchmarks.md "A soft sun"); searched after the direction each refresh, starting at SUN_ANGLE,
# among the size and the size a factor larger and smaller (the factor square-rooted, down to
# SUN_ANGLE_FINEST, when the size stays), within SUN_ANGLE_RANGE.  Once a refresh leaves both where
# they were at their finest steps, the sun is settled and no longer searched (8 candidates of 8 maps
# a refresh are most of a small mesh's time on a CPU).
SUN_ANGLE = math.radians(5.0)
SUN_DISC = 8
SUN_ANGLE_RANGE = (math.radians(0.25), math.radians(30.0))
SUN_ANGLE_FACTOR, SUN_ANGLE_FINEST = 2.0, 2.0 ** 0.125
SUN_SOLID = 2.0 * math.pi * (1.0 - math.cos(SUN_ANGLE / 2))
SUN_REFRESH = 25
SUN_GATHER = 2.0       # the sun's seed gathers the bins within this many bin sizes of the strongest
SUN_SEARCH = 1 << 14   # samples (a fixed random subset) on which candidate sun directions are compared
SUN_FINEST = math.radians(0.5)   # the direction search's smallest step
ENVIRONMENT_ROWS = 64
# shadow_side: SHADOW_TEXELS shadow-map texels across a photo's pixel on the surface (the 3 x 3
# filter's soft edge then stays within about a pixel and a half; finer maps draw edges the photos cannot
# show), the next power of two within SHADOW_SIDES.  tests/backend/export/test_materials.py's scene
# (2026-12-07): one texel a pixel gives 128, the shadowed plane's base colour over the lit one 0.936;
# two give 256, 0.963.
SHADOW_TEXELS = 2.0
SHADOW_SIDES = (64, 1024)


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
    # the materials as a field over the surface (MaterialField), else texels (Texels).  Off: it explains
    # the still life's photos 1.4-1.5 dB better but puts more light into the base colour (docs/benchmarks.md
    # "A sun of its own")
    material_field: bool = False
    # a sun beside the bins (module doc; SUN_*): the test scene's sun between bins at 8 rows: shadowed /
    # lit plane 0.63 -> 0.91, the light 13.3 -> 0.7 degrees off
    material_sun: bool = True
    material_smoothness: float = 0.1    # weight of the base colour's smoothness (Texels: total variation)
    light_white: float = 0.01           # weight of the light's chroma (a white-ish light)
    shadow_size: int = 0                # pixels a side of each bin's shadow map; 0: from the photos (shadow_side)

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.material_steps < 0:
            raise ValueError(f"material_steps must not be negative, got {self.material_steps}")
        if not self.material_lr > 0:
            raise ValueError(f"material_lr must be positive, got {self.material_lr}")
        if not 2 <= int(self.light_rows) <= 64:
            raise ValueError(f"light_rows must be in [2, 64], got {self.light_rows}")
        if int(self.shadow_size) != 0 and not 16 <= int(self.shadow_size) <= 4096:
            raise ValueError(f"shadow_size must be 0 (from the photos) or in [16, 4096], got {self.shadow_size}")
        for name in ("material_smoothness", "light_white"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


@dataclass
class Materials:
    """What the estimate gives: (S, S, 3) uint8 sRGB base colour, (S, S, 1) uint8 roughness and
    metallic (Non-Color), top row first; ``environment`` (H, 2 H, 3) float32 linear radiance
    (Blender's World mapping, top row first: the bins, and the sun drawn in); ``bins`` (rows, 2 rows,
    3) the bins alone and ``sun`` (direction (3,), radiance (3,) over SUN_SOLID, angle: its size across in
    radians) or None, as the estimate shades with them; ``facts``: loss, the light's dominant direction,
    the sun's size in degrees, timings."""

    albedo: np.ndarray
    roughness: np.ndarray
    metallic: np.ndarray
    environment: np.ndarray
    facts: dict = field(default_factory=dict)
    bins: np.ndarray | None = None
    sun: dict | None = None

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


def disc_directions(direction: torch.Tensor, angle: float, count: int = SUN_DISC) -> torch.Tensor:
    """``count`` unit directions (count, 3) spread evenly (a Fibonacci spiral, equal areas) over a
    disc of ``angle`` radians across centred on the unit ``direction``; the centre alone when
    ``angle`` is 0."""
    if angle <= 0.0 or count <= 1:
        return direction[None]
    e1, e2 = _basis(direction)
    i = torch.arange(count, dtype=torch.float32, device=direction.device) + 0.5
    radius = torch.sqrt(i / count) * math.tan(angle / 2)
    turn = i * math.pi * (3.0 - math.sqrt(5.0))                            # the golden angle
    offset = radius[:, None] * (turn.cos()[:, None] * e1 + turn.sin()[:, None] * e2)
    return torch.nn.functional.normalize(direction[None] + offset, dim=-1)


def sun_visibility(vertices: torch.Tensor, faces: torch.Tensor, uvs: torch.Tensor, points: torch.Tensor,
                   normals: torch.Tensor, direction: torch.Tensor, angle: float, size: int = 256) -> torch.Tensor:
    """How much of a sun of ``angle`` radians across, towards the unit ``direction``, each point
    sees (N,) in [0, 1]: :func:`visibility` averaged over :func:`disc_directions`."""
    dirs = disc_directions(direction, angle)
    return visibility(vertices, faces, uvs, points, normals, dirs, size)[0].mean(1)


def surface_samples(mesh: UVMesh, data, device: torch.device) -> dict[str, torch.Tensor]:
    """Every whole-mask pixel of every view that the mesh covers: its texture coordinate ``uv``
    (P, 2), surface point ``x`` (P, 3), unit normal ``n`` (P, 3), unit direction to the camera
    ``v`` (P, 3), photo colour ``rgb`` (P, 3) sRGB in [0, 1] and ``footprint`` (P,), the width
    of the photo's pixel there (world units, across the viewing direction)."""
    verts = torch.as_tensor(np.asarray(mesh.vertices, np.float32), device=device)
    faces = torch.as_tensor(np.asarray(mesh.faces, np.int64), device=device)
    attrs = torch.cat([torch.as_tensor(np.asarray(mesh.uvs, np.float32), device=device), verts,
                       torch.as_tensor(np.asarray(mesh.normals, np.float32), device=device)], 1)
    parts: dict[str, list] = {"uv": [], "x": [], "n": [], "v": [], "rgb": [], "footprint": []}
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
        to_camera = origin - x
        distance = to_camera.norm(dim=-1, keepdim=True)
        v = to_camera / distance.clamp_min(1e-12)
        footprint = distance[:, 0] / float(min(data.intrinsics[i][0], data.intrinsics[i][1]))
        n = torch.nn.functional.normalize(at[:, 5:8], dim=-1)
        n = torch.where(((n * v).sum(-1) < 0)[:, None], -n, n)          # the side the camera sees
        for key, value in (("uv", at[:, :2]), ("x", x), ("n", n), ("v", v), ("rgb", rgba[keep][:, :3].float() / 255.0),
                           ("footprint", footprint)):
            parts[key].append(value)
    if not parts["uv"]:
        raise ValueError("no view sees the mesh inside its mask: nothing to estimate materials from")
    out = {key: torch.cat(value) for key, value in parts.items()}
    if len(out["uv"]) > MAX_SAMPLES:
        pick = torch.randperm(len(out["uv"]), device=device)[:MAX_SAMPLES]
        out = {key: value[pick] for key, value in out.items()}
    return out


def _mesh_tensors(mesh: UVMesh, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mesh's vertices (V, 3) float32, faces (F, 3) int64 and texture coordinates (V, 2) float32 on ``device``."""
    return (torch.as_tensor(np.asarray(mesh.vertices, np.float32), device=device),
            torch.as_tensor(np.asarray(mesh.faces, np.int64), device=device),
            torch.as_tensor(np.asarray(mesh.uvs, np.float32), device=device))


def shadow_side(vertices: torch.Tensor, footprint: torch.Tensor) -> int:
    """Pixels a side of a shadow map of the mesh ``vertices`` (V, 3) with SHADOW_TEXELS texels across
    the photos' median pixel ``footprint`` (P,) on the surface: the next power of two, within SHADOW_SIDES."""
    diagonal = float((vertices.amax(0) - vertices.amin(0)).norm()) * 1.02
    texels = SHADOW_TEXELS * diagonal / max(float(footprint.median()), 1e-12)
    side = 2 ** math.ceil(math.log2(max(texels, 1.0)))
    return int(min(max(side, SHADOW_SIDES[0]), SHADOW_SIDES[1]))


def _lit_samples(mesh: UVMesh, albedo_init: np.ndarray, data, rows: int, shadow_size: int, device: torch.device):
    """The photos' surface samples (:func:`surface_samples`), how open each is towards each light
    bin (N, K) and the radiance arriving where the way is blocked (N, K, 3) float16, with the bins'
    directions and solid angles, and the shadow maps' side (``shadow_size``, or :func:`shadow_side` for 0)."""
    samples = surface_samples(mesh, data, device)
    verts, faces, uvs = _mesh_tensors(mesh, device)
    shadow_size = int(shadow_size) or shadow_side(verts, samples["footprint"])
    dirs, solid = light_bins(rows, device)
    vis, blocker = visibility(verts, faces, uvs, samples["x"], samples["n"], dirs, shadow_size)
    # Light that bounces: where the mesh blocks a bin, what arrives is that surface's radiance as
    # photographed, which the bake holds (one bounce, fixed: the bake does not change).
    linear0 = to_linear(torch.as_tensor(albedo_init, device=device).float() / 255.0)
    bounced = torch.zeros(vis.shape + (3,), dtype=torch.float16, device=device)
    for lo in range(0, len(vis), 1 << 14):
        part = blocker[lo:lo + (1 << 14)]
        bounced[lo:lo + len(part)] = sample_texture(linear0, part.reshape(-1, 2)).reshape(part.shape[:2] + (3,)).half()
    return samples, vis, bounced, dirs, solid, shadow_size


def _widen(solid: torch.Tensor) -> float:
    """The squared GGX width a bin's angular size adds: (half the bin's angular radius)^2."""
    return (0.5 * math.sqrt(float(solid.max()) / math.pi)) ** 2


@torch.no_grad()
def reshade(mesh: UVMesh, albedo_init: np.ndarray, got: "Materials", data, device: torch.device,
            shadow_size: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The estimate drawn again: every whole-mask pixel of ``data``'s views that the mesh covers,
    shaded with ``got``'s textures under its light (as :func:`estimate_materials` shades), and the
    photos' colours there: (P, 3) sRGB each.  How well the estimate explains photos (the training
    ones, or held-out ones under the same light)."""
    bins = got.bins if got.bins is not None else got.environment
    samples, vis, bounced, dirs, solid, shadow_size = _lit_samples(mesh, albedo_init, data, bins.shape[0], shadow_size,
                                                                   device)
    maps = [torch.as_tensor(t, device=device).float() / 255.0 for t in (got.albedo, got.roughness, got.metallic)]
    light = torch.as_tensor(bins, device=device).reshape(-1, 3)
    sun = None
    if got.sun is not None:
        sun = [torch.as_tensor(got.sun[k], dtype=torch.float32, device=device) for k in ("direction", "radiance")]
        verts, faces, uvs = _mesh_tensors(mesh, device)
        sun.append(sun_visibility(verts, faces, uvs, samples["x"], samples["n"], sun[0], float(got.sun["angle"]),
                                  shadow_size))
    pred = torch.empty_like(samples["rgb"])
    for lo in range(0, len(pred), BATCH):
        sl = slice(lo, lo + BATCH)
        uv = samples["uv"][sl]
        albedo = to_linear(sample_texture(maps[0], uv))
        open_ = vis[sl][..., None]
        lit = (dirs, solid, open_ * light[None] + (1.0 - open_) * bounced[sl].float())
        if sun is not None:
            lit = _add_sun(*lit, sun[0], sun[1], sun[2][sl])
        pred[sl] = to_srgb(shade(albedo, sample_texture(maps[1], uv), sample_texture(maps[2], uv), lit[2], lit[0], lit[1],
                                 samples["n"][sl], samples["v"][sl], _widen(solid)))
    return pred, samples["rgb"]


def to_srgb(x: torch.Tensor) -> torch.Tensor:
    """Linear in [0, 1] -> sRGB-encoded (differentiable; shared/color.py's transfer function)."""
    x = x.clamp(0.0, 1.0)
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp_min(1e-8).pow(1.0 / 2.4) - 0.055)


def to_linear(c: torch.Tensor) -> torch.Tensor:
    c = c.clamp(0.0, 1.0)
    return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055).pow(2.4))


DIELECTRIC_F0 = 0.04     # head-on reflectance of Blender's Principled BSDF at its default IOR of 1.5


def specular_albedo(nv: torch.Tensor, roughness: torch.Tensor, f0: float) -> torch.Tensor:
    """The share of light a GGX specular layer of reflectance ``f0`` head-on reflects towards a
    view at cosine ``nv`` (its directional albedo), by the analytic fit to the split-sum table of
    Lazarov (2013) as Karis gives it (2014); nv, roughness (B, 1) -> (B, 1)."""
    r0 = roughness * -1.0 + 1.0
    r1 = roughness * -0.0275 + 0.0425
    a004 = torch.minimum(r0 * r0, torch.exp2(-9.28 * nv)) * r0 + r1
    scale = -1.04 * a004 + (roughness * -0.572 + 1.04)
    bias = 1.04 * a004 + (roughness * 0.022 - 0.04)
    return (f0 * scale + bias).clamp(0.0, 1.0)


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
    # The diffuse layer gets what the dielectric specular layer above it leaves, as in Blender's
    # Principled BSDF, which shades the asset: without it the base colour came out darker by that
    # share (4 % head-on, more at grazing angles) and Blender took the share off again.
    left = 1.0 - specular_albedo(nv, roughness, DIELECTRIC_F0)
    diffuse = albedo * (1.0 - metallic) * left / math.pi * (arrive[..., None] * incoming).sum(1)
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


class Texels:
    """The materials as texels of the textures themselves (base colour, roughness and metallic
    logits), smoothed by the base colour's total variation between neighbouring covered texels."""

    def __init__(self, size: int, covered: torch.Tensor, flat: torch.Tensor):
        dev = covered.device
        self.albedo = _logit(flat.clamp(0.03, 0.97)).expand(size, size, 3).clone().requires_grad_(True)
        self.rough = torch.full((size, size, 1), _logit(torch.tensor(ROUGHNESS_START)).item(), device=dev,
                                requires_grad=True)
        self.metal = torch.full((size, size, 1), _logit(torch.tensor(METALLIC_START)).item(), device=dev,
                                requires_grad=True)
        self.pairs_x = covered[:, 1:] & covered[:, :-1]
        self.pairs_y = covered[1:] & covered[:-1]
        self.lr_scale = 1.0

    def parameters(self) -> list[torch.Tensor]:
        return [self.albedo, self.rough, self.metal]

    def at(self, x: torch.Tensor, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Base colour (B, 3) linear, roughness (B, 1), metallic (B, 1) at samples (surface points, texture coordinates)."""
        return (sample_texture(torch.sigmoid(self.albedo), uv), sample_texture(torch.sigmoid(self.rough), uv),
                sample_texture(torch.sigmoid(self.metal), uv))

    def smoothness(self, x: torch.Tensor, albedo: torch.Tensor) -> torch.Tensor:
        tex = torch.sigmoid(self.albedo)
        return ((tex[:, 1:] - tex[:, :-1]).abs().sum(-1)[self.pairs_x].mean()
                + (tex[1:] - tex[:-1]).abs().sum(-1)[self.pairs_y].mean())

    def metallic_mean(self, metal: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.metal).mean()

    @torch.no_grad()
    def textures(self, mesh: UVMesh, size: int) -> list[torch.Tensor]:
        """Base colour (linear), roughness and metallic (S, S, C) in [0, 1], undilated."""
        return [torch.sigmoid(t) for t in (self.albedo, self.rough, self.metal)]


class MaterialField(torch.nn.Module):
    """The materials as a function of the surface point (nvdiffrec's choice): a hash grid
    (fields/hashgrid.py) over the mesh's box and a small MLP giving base colour, roughness and
    metallic.  Every sample trains the grid cells around it and the MLP that all share, so a
    texture far larger than the photos' samples still gets a value at every texel (a texel no
    sample lands on takes its neighbourhood's), and the textures are the field read at each
    texel's point.  Smoothed as nvdiffrec smooths its base colour: the difference between the
    field at a point and at a random point near it."""

    def __init__(self, vertices: torch.Tensor, flat: torch.Tensor, finest: int, generator: torch.Generator | None = None):
        super().__init__()
        from fit_implicit.backend.fields.hashgrid import HashGrid
        from fit_implicit.backend.fields.layers import mlp

        lo, hi = vertices.amin(0), vertices.amax(0)
        side = float((hi - lo).max()) * (1.0 + 2 * BOX_MARGIN) + 1e-6
        self.register_buffer("lo", (lo + hi) / 2 - side / 2)
        self.side = side
        self.grid = HashGrid(levels=FIELD_LEVELS, features=2, log2_table=FIELD_LOG2_TABLE, base_res=16,
                             max_res=max(int(finest), 32))
        with torch.no_grad():
            self.grid.table.uniform_(-1e-4, 1e-4, generator=generator)
        self.head = mlp([self.grid.out_dim, FIELD_WIDTH, FIELD_WIDTH, 5])
        last = self.head[-1]
        torch.nn.init.zeros_(last.weight)         # starts flat: the bake's mean base colour everywhere
        with torch.no_grad():
            last.bias.copy_(torch.cat([_logit(flat.clamp(0.03, 0.97)).cpu(),
                                       _logit(torch.tensor([ROUGHNESS_START, METALLIC_START]))]))
        self.to(vertices.device)
        self.lr_scale = FIELD_LR_SCALE

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        unit = ((x - self.lo) / self.side).clamp(0.0, 1.0)
        out = torch.sigmoid(self.head(self.grid(unit)))
        return out[:, :3], out[:, 3:4], out[:, 4:5]

    def at(self, x: torch.Tensor, uv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self(x)

    def smoothness(self, x: torch.Tensor, albedo: torch.Tensor) -> torch.Tensor:
        near = x + torch.randn_like(x) * (SMOOTH_REACH * self.side)
        return (self(near)[0] - albedo).abs().sum(-1).mean()

    def metallic_mean(self, metal: torch.Tensor) -> torch.Tensor:
        return metal.mean()

    @torch.no_grad()
    def textures(self, mesh: UVMesh, size: int) -> list[torch.Tensor]:
        dev = self.lo.device
        face, bary = rasterize_uv(mesh.uvs, mesh.faces, size, dev)
        covered = face >= 0
        tri = torch.as_tensor(np.asarray(mesh.faces, np.int64), device=dev)[face[covered]]
        verts = torch.as_tensor(np.asarray(mesh.vertices, np.float32), device=dev)
        points = (verts[tri] * bary[covered][..., None]).sum(1)
        out = [torch.zeros(size, size, c, device=dev) for c in (3, 1, 1)]
        parts = [torch.cat(p) for p in zip(*(self(points[i:i + (1 << 18)]) for i in range(0, len(points), 1 << 18)))]
        for image, values in zip(out, parts):
            image[covered] = values
        return out


def _seed_sun(light_log: torch.Tensor, dirs: torch.Tensor, solid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sun's start, gathered from the bins: a sun between bins spreads over the strongest one
    and its neighbours.  The bins within SUN_GATHER bin sizes of the strongest give the sun what they
    hold above the median bin (their power-weighted direction, their summed excess as its log
    radiance over SUN_SOLID) and drop to the median (in place)."""
    with torch.no_grad():
        light = light_log.exp()
        power = light.mean(-1) * solid
        k = int(power.argmax())
        rows = int(round(math.sqrt(len(dirs) / 2)))
        near = dirs @ dirs[k] >= math.cos(SUN_GATHER * math.pi / rows)
        floor = light.median(0).values
        excess = (light[near] - floor).clamp_min(0.0) * solid[near][:, None]       # (n, 3) irradiance
        weight = excess.mean(-1)
        direction = torch.nn.functional.normalize((dirs[near] * weight[:, None]).sum(0) + 1e-6 * dirs[k], dim=0)
        light_log[near] = torch.minimum(light_log[near], floor.log())
    return direction, (excess.sum(0).clamp_min(1e-4) / SUN_SOLID).log()


def _search_sun(direction: torch.Tensor, reach: float, score) -> tuple[torch.Tensor, float, float]:
    """One round of the sun's direction search: ``direction`` and its four neighbours ``reach``
    radians away (along two directions across it) scored by ``score`` (lower is better); the best,
    the next round's reach (halved, down to SUN_FINEST, when ``direction`` stays) and the best's score."""
    e1, e2 = _basis(direction)
    candidates = [direction] + [torch.nn.functional.normalize(direction * math.cos(reach) + e * (sign * math.sin(reach)),
                                                              dim=0) for e in (e1, e2) for sign in (1.0, -1.0)]
    scores = [score(c) for c in candidates]
    best = int(np.argmin(scores))
    return candidates[best], (max(reach / 2, SUN_FINEST) if best == 0 else reach), scores[best]


def _search_angle(angle: float, factor: float, score, scored: float) -> tuple[float, float]:
    """One round of the sun's size search: ``angle`` (whose score is ``scored``) and the angles
    ``factor`` times larger and smaller (within SUN_ANGLE_RANGE) scored by ``score`` (lower is
    better); the best, and the next round's factor (square-rooted, down to SUN_ANGLE_FINEST, when
    ``angle`` stays)."""
    lo, hi = SUN_ANGLE_RANGE
    candidates = [angle] + [a for a in (angle * factor, angle / factor) if lo <= a <= hi]
    scores = [scored] + [score(a) for a in candidates[1:]]
    best = int(np.argmin(scores))
    return candidates[best], (max(math.sqrt(factor), SUN_ANGLE_FINEST) if best == 0 else factor)


def _add_sun(dirs: torch.Tensor, solid: torch.Tensor, incoming: torch.Tensor, direction: torch.Tensor,
             radiance: torch.Tensor, open_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bins with the sun as one more: directions (K + 1, 3), solid angles (K + 1,) and the
    radiance arriving (B, K + 1, 3), the sun's where ``open_`` (B,) says its way is open."""
    return (torch.cat([dirs, direction[None]]), torch.cat([solid, solid.new_tensor([SUN_SOLID])]),
            torch.cat([incoming, open_[:, None, None] * radiance[None, None]], 1))


def environment_rows(light_rows: int) -> int:
    """Rows of the written environment for ``light_rows`` rows of bins: a whole multiple of them, at
    least ENVIRONMENT_ROWS."""
    rows = int(light_rows)
    return rows * -(-ENVIRONMENT_ROWS // rows)


def draw_environment(bins: torch.Tensor, sun: tuple[torch.Tensor, torch.Tensor, float] | None) -> torch.Tensor:
    """The light as an environment image (H, 2 H, 3), H at least ENVIRONMENT_ROWS: the bins (rows,
    2 rows, 3) upsampled, and the sun (direction, radiance over SUN_SOLID, angle across in radians)
    drawn in as a disc of its angle across holding the same power (at least the pixel nearest its
    direction), so that the World's shadows are as soft as the estimate's."""
    rows = bins.shape[0]
    factor = environment_rows(rows) // rows
    env = bins.repeat_interleave(factor, 0).repeat_interleave(factor, 1).clone()
    if sun is not None:
        direction, radiance, angle = sun
        pdirs, psolid = light_bins(rows * factor, bins.device)
        cos = pdirs @ direction
        inside = cos >= math.cos(angle / 2)
        if not inside.any():
            inside = cos == cos.max()
        flat = env.reshape(-1, 3)
        flat[inside] += radiance * SUN_SOLID / psolid[inside].sum()
    return env


def estimate_materials(mesh: UVMesh, albedo_init: np.ndarray, data, cfg: MaterialConfig, device: torch.device,
                       seed: int = 0, log=None) -> Materials:
    """Estimate base colour, roughness and metallic textures (the size of ``albedo_init``, the
    baked base colour (S, S, 3) uint8 sRGB, the start) and the light from the photos of ``data``
    (PosedImages, no passes needed) on the fixed ``mesh`` (module doc).  ``log(step, loss)`` is
    called now and then."""
    cfg.validate()
    start = time.monotonic()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    samples, vis, bounced, dirs, solid, shadow_size = _lit_samples(mesh, albedo_init, data, cfg.light_rows,
                                                                   cfg.shadow_size, device)
    verts, faces, uvs = _mesh_tensors(mesh, device)
    linear0 = to_linear(torch.as_tensor(albedo_init, device=device).float() / 255.0)
    prepared = time.monotonic()
    size = albedo_init.shape[0]
    covered = rasterize_uv(mesh.uvs, mesh.faces, size, device)[0] >= 0
    # The base colour starts flat (the bake's mean): starting from the bake, its baked shadows and
    # shading would already explain the photos, and the light would never take them over.
    flat = linear0[covered].mean(0) if covered.any() else linear0.new_full((3,), 0.5)
    materials = MaterialField(verts, flat, size, gen) if cfg.material_field else Texels(size, covered, flat)
    # the light starts white and uniform, bright enough that a mid-grey base colour gives the photos' mean
    mean = float(to_linear(samples["rgb"]).mean())
    light_log = torch.full((dirs.shape[0], 3), math.log(max(mean, 1e-3) / 0.5), device=device, requires_grad=True)
    lr = cfg.material_lr * materials.lr_scale
    opt = torch.optim.Adam([{"params": list(materials.parameters()), "lr": lr},
                            {"params": [light_log], "lr": cfg.material_lr * LIGHT_LR_SCALE}])
    light_only = int(LIGHT_FIRST * cfg.material_steps)
    widen = _widen(solid)
    count = len(samples["uv"])
    loss_value = float("nan")
    sun_dir = sun_log = sun_open = None
    sun_angle, angle_factor = SUN_ANGLE, SUN_ANGLE_FACTOR
    settled = False     # both searches stayed put at their finest steps: the sun is no longer searched
    refreshed = 0
    for step in range(int(cfg.material_steps)):
        opt.param_groups[0]["lr"] = 0.0 if step < light_only else lr
        if cfg.material_sun and sun_dir is None and step == light_only and step > 0:
            sun_dir, sun_log = _seed_sun(light_log, dirs, solid)
            sun_log.requires_grad_(True)
            opt.add_param_group({"params": [sun_log], "lr": cfg.material_lr * LIGHT_LR_SCALE})
            refreshed, reach = step - SUN_REFRESH, math.pi / (2 * cfg.light_rows)      # half a bin
            subset = torch.randperm(count, generator=gen)[:SUN_SEARCH].to(device)
        if sun_dir is not None and not settled and step - refreshed >= SUN_REFRESH:   # where its shadows fit best
            with torch.no_grad():       # what does not depend on the sun's direction, once for the candidates
                part = {k: samples[k][subset] for k in ("x", "uv", "n", "v", "rgb")}
                held = materials.at(part["x"], part["uv"])
                o = vis[subset][..., None]
                bins_in = o * light_log.exp()[None] + (1.0 - o) * bounced[subset].float()
                sun_radiance = sun_log.exp()

                def score(direction: torch.Tensor, angle: float) -> float:
                    open_sun = sun_visibility(verts, faces, uvs, part["x"], part["n"], direction, angle, shadow_size)
                    lit = _add_sun(dirs, solid, bins_in, direction, sun_radiance, open_sun)
                    pred = shade(*held, lit[2], lit[0], lit[1], part["n"], part["v"], widen)
                    return float((to_srgb(pred) - part["rgb"]).pow(2).mean())

                finest, before = reach <= SUN_FINEST and angle_factor <= SUN_ANGLE_FINEST, (sun_dir, sun_angle)
                sun_dir, reach, scored = _search_sun(sun_dir, reach, lambda d: score(d, sun_angle))
                sun_angle, angle_factor = _search_angle(sun_angle, angle_factor, lambda a: score(sun_dir, a), scored)
                stayed = sun_dir is before[0] and sun_angle == before[1]
                settled = finest and stayed
                if sun_open is None or not stayed:      # the whole set's sun, where the search moved it
                    sun_open = sun_visibility(verts, faces, uvs, samples["x"], samples["n"], sun_dir, sun_angle,
                                              shadow_size)
            refreshed = step
        pick = torch.randint(0, count, (min(BATCH, count),), generator=gen).to(device)
        x = samples["x"][pick]
        albedo, rough, metal = materials.at(x, samples["uv"][pick])
        light = light_log.exp()
        open_ = vis[pick][..., None]
        incoming = open_ * light[None] + (1.0 - open_) * bounced[pick].float()
        lit = (dirs, solid, incoming)
        if sun_dir is not None:
            lit = _add_sun(dirs, solid, incoming, sun_dir, sun_log.exp(), sun_open[pick])
        pred = shade(albedo, rough, metal, lit[2], lit[0], lit[1], samples["n"][pick], samples["v"][pick], widen)
        loss = (to_srgb(pred) - samples["rgb"][pick]).pow(2).mean()
        loss_value = float(loss.detach())
        chroma = (light_log - light_log.mean(-1, keepdim=True)).pow(2).mean()
        total = loss + cfg.light_white * chroma + METALLIC_PRIOR * materials.metallic_mean(metal)
        if step >= light_only and cfg.material_smoothness > 0:
            total = total + cfg.material_smoothness * materials.smoothness(x, albedo)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if log is not None and (step % 100 == 0 or step == cfg.material_steps - 1):
            log(step, loss_value)
    with torch.no_grad():
        albedo_t, rough_t, metal_t = materials.textures(mesh, size)
        textures = [dilate(t, covered, PADDING) for t in (to_srgb(albedo_t), rough_t, metal_t)]
        light = light_log.exp()
        # Bins that light nothing any camera saw (below a ground, behind a wall) were never asked:
        # they get the median of the others, a neutral guess, not their untouched start.
        support = torch.zeros(len(dirs), device=device)
        for lo in range(0, count, 1 << 15):
            support += ((samples["n"][lo:lo + (1 << 15)] @ dirs.T).clamp_min(0.0) * vis[lo:lo + (1 << 15)]).sum(0)
        asked = support > UNASKED * support.max()
        if asked.any() and not asked.all():
            light[~asked] = light[asked].median(0).values
        power = light.mean(-1) * solid
        top = int(power.argmax())
        direction, share = dirs[top], float(power[top] / power.sum())
        sun = None
        if sun_dir is not None:
            sun = (sun_dir, sun_log.detach().exp(), sun_angle)
            sun_power = float(sun[1].mean()) * SUN_SOLID
            if sun_power > float(power[top]):
                direction, share = sun[0], sun_power / (float(power.sum()) + sun_power)
        rows = int(cfg.light_rows)
        bins = light.reshape(rows, 2 * rows, 3)
        environment = draw_environment(bins, sun)
    to_u8 = [(t.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy() for t in textures]
    facts = {"material_loss": loss_value, "light_direction": direction.tolist(), "light_share": share,
             "material_samples": count, "shadow_size": shadow_size, "visibility_seconds": round(prepared - start, 3),
             "material_seconds": round(time.monotonic() - start, 3)}
    if sun is not None:
        facts["sun_angle_degrees"] = round(math.degrees(sun_angle), 3)
    sun_doc = None if sun is None else {"direction": sun[0].cpu().numpy(), "radiance": sun[1].cpu().numpy(),
                                        "angle": float(sun_angle)}
    return Materials(to_u8[0], to_u8[1], to_u8[2], environment.cpu().numpy().astype(np.float32), facts,
                     bins.cpu().numpy().astype(np.float32), sun_doc)


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


__all__ = ["MaterialConfig", "Materials", "MaterialField", "Texels", "estimate_materials", "reshade", "draw_environment",
           "environment_rows", "light_bins", "visibility", "shade", "write_hdr", "read_hdr"]
