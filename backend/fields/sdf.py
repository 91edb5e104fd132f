"""Surface fields on an encoding (the hash grid by default): the shared geometry network and the
signed distance field.

Both work in the trainer's NORMALISED frame (positions in [-1, 1]^3, distances in normalised
units).  :class:`SurfaceField` holds what the SDF and the occupancy field share:

* geometry network: ``value = |x| - init_radius + MLP([x, encoding(x)])[0]`` and geometry
  features ``MLP(...)[1:]`` (softplus activations).  Geometric initialisation: the MLP's value
  output starts at exactly zero, so the field starts as a sphere with unit gradients everywhere
  (SAL / IGR get there with a wide MLP's initial weights; a 64-wide one only roughly does); far
  from the object the field stays distance-like, which keeps the occupancy band honest;
* progressive activation of hash levels: features of levels above ``active_levels`` are zeroed
  (coarse to fine), set by the trainer's ``update_step``;
* gradients and Laplacians by finite differences on a tetrahedron (4 extra evaluations),
  Neuralangelo-style: they use the fast table-only hash grid path (Triton on CUDA) and their
  step shrinks with the finest active level, which smooths early training;
* heads: radiance ``(features, normal, SH(direction)) -> sRGB`` (with ``color_reflection`` also
  SH of the view direction mirrored about the normal, as Ref-NeRF feeds its colour network: a
  highlight then depends on one direction instead of the pair; that input enters the first layer
  through its own weights, zero at the start, so a warm start applies unchanged), diffuse albedo
  ``features -> sRGB`` and roughness ``(features, x) -> [0, 1]`` (each trained only when a pass
  supervises it: albedo, roughness; the roughness head's inputs are detached, so its pass never
  moves the geometry).

:class:`SdfField` adds NeuS's learnable sharpness ``inv_s = exp(10 * variance)``, and with
``local_sharpness`` a sharpness that varies in space (Adaptive Shells, Wang et al. 2023): a linear head
on the geometry features gives each point a softness ``b`` in [0, ln SOFTEST] and NeuS's density there
has sharpness ``inv_s * exp(-b)``.  The head starts near ``b = 0`` (the global sharpness everywhere);
the trainer's ``sharpness_weight`` charges each visible sample's softness, so the density stays sharp
except where the photos pay for a softer one (outlines and parts thinner than a pixel, whose pixels
are area averages).  The surface itself (the zero level, which gets meshed) is unchanged by it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fit_implicit.backend.render.surface import neus_optical_depth
from fit_implicit.backend.fields.layers import FieldConfig, mlp, sh_encode
from fit_implicit.backend.fields.motion import Deformation, add_motion_groups

# Tetrahedron corners: sum v v^T = 4 I, so sum_i v_i f(x + h v_i) ~= 4 h grad f and
# sum_i f(x + h v_i) ~= 4 f(x) + 2 h^2 laplacian f.
TETRA = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0]])


@dataclass
class SurfaceFieldConfig(FieldConfig):
    """A surface field's settings: :class:`FieldConfig` and its geometric initialisation."""

    init_radius: float = 0.5    # geometric initialisation: a sphere of this radius (normalised)
    init_variance: float = 0.3  # sdf: NeuS sharpness inv_s = exp(10 * variance) at the start
    color_reflection: bool = False  # the radiance head also reads the reflected view direction (module doc)
    local_sharpness: bool = False   # sdf: NeuS's sharpness varies in space, down to inv_s / SOFTEST (module doc)

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.init_radius < 1.0:
            raise ValueError(f"init_radius must be in (0, 1) (normalised units), got {self.init_radius}")


class SurfaceField(nn.Module):
    """Geometry network + radiance and albedo heads (see the module docstring).

    Shapes: x (N, 3) float32 normalised; d (N, 3) float32 unit directions; values (N,) float32;
    features (N, geo_features) float32; colours (N, 3) float32 sRGB in [0, 1].
    """

    #: "sdf" or "occupancy"; the sign convention of :meth:`inside`.
    kind = "surface"
    # What a warm start holds (fields/warm_start.py): the geometry MLP (its distance output zeroed
    # again after loading: :meth:`after_warm_start`) and the radiance head; the albedo and
    # roughness heads train only under their passes and stay as built.
    warm_parts = ("geometry_net", "color_net")

    def __init__(self, cfg: SurfaceFieldConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or SurfaceFieldConfig()
        self.encoding = cfg.build_encoding()
        self.geometry_net = mlp([3 + self.encoding.out_dim, cfg.hidden, 1 + cfg.geo_features])
        self.color_net = mlp([cfg.geo_features + 3 + 16] + [cfg.hidden] * cfg.color_layers + [3])
        self.albedo_net = mlp([cfg.geo_features, cfg.hidden, 3])
        with torch.random.fork_rng(devices=[]):     # built on the CPU: later draws stay as they were
            self.roughness_net = mlp([cfg.geo_features + 3, cfg.hidden, 1])
            self.reflection_in = None               # SH(reflected direction) -> the radiance head's first layer
            if cfg.color_reflection:
                self.reflection_in = nn.Linear(16, self.color_net[0].out_features, bias=False)
                nn.init.zeros_(self.reflection_in.weight)
        self.deformation: Deformation | None = None         # a dynamic fit's motion (fields/motion.py)
        self.register_buffer("level_mask", torch.ones(self.encoding.out_dim))
        self.set_active_levels(self.encoding.levels)
        self._geometric_init()

    # ---- set-up --------------------------------------------------------------------------
    @torch.no_grad()
    def _geometric_init(self) -> None:
        """The MLP's value output starts at zero: value(x) = |x| - init_radius exactly."""
        self.after_warm_start()
        # softplus(beta=100) instead of ReLU: smooth, so that gradients and curvature exist
        for i, layer in enumerate(self.geometry_net):
            if isinstance(layer, nn.ReLU):
                self.geometry_net[i] = nn.Softplus(beta=100.0)

    @torch.no_grad()
    def after_warm_start(self) -> None:
        """Warm-started weights keep the geometric initialisation: the value output starts at zero."""
        last = self.geometry_net[-1]
        last.weight[:1].zero_()
        last.bias[:1].zero_()

    @torch.no_grad()
    def set_active_levels(self, count: int) -> None:
        """Use only the ``count`` coarsest encoding levels (the others read zero).  Also sets
        ``fd_step``, the finite-difference step: the finest active level's detail (the cell size
        of a hash level; fields/encodings.py), in normalised units."""
        count = max(1, min(int(count), self.encoding.levels))
        self.active_levels = count
        self.level_mask.zero_()
        self.level_mask[: count * self.encoding.level_width] = 1.0
        self.fd_step = 2.0 * self.encoding.detail(count - 1)

    def restore_active_levels(self) -> None:
        """Re-derive ``active_levels`` from the ``level_mask`` buffer (after load_state_dict)."""
        self.set_active_levels(round(float(self.level_mask.sum())) // self.encoding.level_width)

    # ---- geometry ------------------------------------------------------------------------
    def geometry(self, x: torch.Tensor, t: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, 3) -> raw value (N,) (SDF: signed distance; occupancy: minus the logit before
        its scale) and features (N, geo_features).  t: (N,) times of a dynamic field (its
        ``deformation``, fields/motion.py) or None: its current ``time``; a still field ignores t."""
        if self.deformation is not None:
            x = self.deformation(x, t)
        enc = self.encoding((x + 1.0) * 0.5) * self.level_mask
        h = self.geometry_net(torch.cat([x, enc], dim=-1))
        return x.norm(dim=-1) - self.cfg.init_radius + h[:, 0], h[:, 1:]

    def value(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """The raw geometry value (N,) only."""
        return self.geometry(x, t)[0]

    def geometry_with_derivatives(self, x: torch.Tensor, h: float, t: torch.Tensor | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Value, features, gradient and Laplacian of the raw value by finite differences.

        Args:
            x: (N, 3) float32.  h: finite-difference step (normalised units).  t: see :meth:`geometry`
                (the derivatives are in the scene's frame at that time).
        Returns:
            value (N,), features (N, G), gradient (N, 3), laplacian (N,) -- all float32.
        """
        n = x.shape[0]
        offsets = TETRA.to(x.device, x.dtype) * h                            # (4, 3)
        pts = torch.cat([x, (x[None] + offsets[:, None]).reshape(-1, 3)])     # (5N, 3)
        v, feat = self.geometry(pts, None if t is None else t.repeat(5))
        v0, vt = v[:n], v[n:].reshape(4, n)
        grad = torch.einsum("kn,kc->nc", vt, TETRA.to(x.device, x.dtype)) / (4.0 * h)
        lap = (vt.sum(0) - 4.0 * v0) / (2.0 * h * h)
        return v0, feat[:n], grad, lap

    # ---- heads ---------------------------------------------------------------------------
    def radiance(self, features: torch.Tensor, normals: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
        """(N, G), (N, 3) unit outward normals, (N, 3) unit view directions -> (N, 3) sRGB."""
        x = torch.cat([features, normals, sh_encode(dirs)], dim=-1)
        if self.reflection_in is None:
            return torch.sigmoid(self.color_net(x))
        mirrored = dirs - 2.0 * (dirs * normals).sum(-1, keepdim=True) * normals
        h = self.color_net[0](x) + self.reflection_in(sh_encode(mirrored))
        return torch.sigmoid(self.color_net[1:](h))

    def albedo(self, features: torch.Tensor) -> torch.Tensor:
        """(N, G) -> (N, 3) diffuse albedo, sRGB in [0, 1]."""
        return torch.sigmoid(self.albedo_net(features))

    def roughness(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(N, G) features and (N, 3) normalised positions -> (N, 1) material roughness in [0, 1].

        Both inputs are detached: roughness supervision trains this head only and never moves the
        geometry (the position lets it place materials the features do not tell apart)."""
        return torch.sigmoid(self.roughness_net(torch.cat([features.detach(), x.detach()], dim=-1)))

    # ---- conventions (overridden) --------------------------------------------------------
    def inside(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) positive inside, negative outside, zero on the surface (normalised units)."""
        raise NotImplementedError

    def outward_normals(self, grad: torch.Tensor) -> torch.Tensor:
        """Unit outward normals (N, 3) from the raw value's gradient (N, 3)."""
        raise NotImplementedError

    def optical_depth(self, value: torch.Tensor, grad: torch.Tensor, dirs: torch.Tensor, delta: float,
                      softness: torch.Tensor | None = None) -> torch.Tensor:
        """Optical depth tau (N,) of one sample's segment (opacity 1 - exp(-tau)); ``softness`` (N,)
        from :meth:`softness`, where the field has one (the SDF's local sharpness)."""
        raise NotImplementedError

    def deep_inside(self, value: torch.Tensor, delta: float, softness: torch.Tensor | None = None) -> torch.Tensor:
        """(N,) bool: a ray that reaches this sample is already opaque (later samples are useless)."""
        raise NotImplementedError

    def softness(self, features: torch.Tensor) -> torch.Tensor | None:
        """(N,) how much softer than the field's global sharpness its density is at each point, or
        None where the field has one sharpness (only the SDF's ``local_sharpness`` has one)."""
        return None

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by optimiser treatment: hash tables, MLP weights, scalar extras."""
        enc = self.encoding.param_groups()
        groups = {"grid": enc["grid"],
                  "mlp": [*enc["mlp"], *self.geometry_net.parameters(), *self.color_net.parameters(),
                          *self.albedo_net.parameters(), *self.roughness_net.parameters(),
                          *(self.reflection_in.parameters() if self.reflection_in is not None else ())],
                  "extra": []}
        return add_motion_groups(groups, self.deformation)


SOFTEST = 16.0         # local_sharpness: the softest density is NeuS's inv_s / SOFTEST
SOFTNESS_START = -4.0  # ... its head's bias at the start: softness ln(SOFTEST) * sigmoid(-4) = 0.05


class SdfField(SurfaceField):
    """Signed distance field (positive outside), rendered the NeuS way.

    ``variance`` is learnt: NeuS's logistic density has sharpness ``inv_s = exp(10 * variance)``
    (per normalised unit), which grows as the surface becomes certain.  ``cos_anneal`` (set by
    the trainer, 0 -> 1) blends NeuS's annealed slope estimate into the true one.
    """

    kind = "sdf"

    def __init__(self, cfg: SurfaceFieldConfig | None = None):
        super().__init__(cfg)
        self.variance = nn.Parameter(torch.tensor(float(self.cfg.init_variance)))
        self.cos_anneal = 1.0
        self.softness_net = None
        if self.cfg.local_sharpness:
            with torch.random.fork_rng(devices=[]):     # later draws stay as they were
                self.softness_net = nn.Linear(self.cfg.geo_features, 1)
            nn.init.zeros_(self.softness_net.weight)
            nn.init.constant_(self.softness_net.bias, SOFTNESS_START)

    def inv_s(self) -> torch.Tensor:
        """0-d tensor: the sharpness of the logistic density (per normalised unit)."""
        return torch.exp(self.variance * 10.0).clamp(1e-3, 1e6)

    def softness(self, features: torch.Tensor) -> torch.Tensor | None:
        """(N, G) geometry features -> (N,) softness b in [0, ln SOFTEST] (local sharpness
        ``inv_s * exp(-b)``), or None without ``local_sharpness``."""
        if self.softness_net is None:
            return None
        return math.log(SOFTEST) * torch.sigmoid(self.softness_net(features)[:, 0])

    def reach(self, softness: torch.Tensor | None = None) -> torch.Tensor | float:
        """How far from the surface NeuS's density stays above ~2 % of its peak: 4 / sharpness
        (normalised units); (N,) where the sharpness varies in space (``softness`` from :meth:`softness`)."""
        if softness is None:
            return 4.0 / float(self.inv_s())
        return 4.0 * torch.exp(softness) / self.inv_s().detach()

    def inside(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        return -self.value(x, t)

    def outward_normals(self, grad: torch.Tensor) -> torch.Tensor:
        return F.normalize(grad, dim=-1, eps=1e-12)

    def optical_depth(self, value, grad, dirs, delta, softness=None):
        inv_s = self.inv_s() if softness is None else self.inv_s() * torch.exp(-softness)
        return neus_optical_depth(value, (dirs * grad).sum(-1), delta, inv_s, self.cos_anneal)

    def deep_inside(self, value, delta, softness=None):
        # Crossing from outside to sdf = -4 / sharpness makes a ray at least 98% opaque.
        reach = self.reach(softness)
        margin = torch.clamp(reach, min=2.0 * delta) if torch.is_tensor(reach) else max(reach, 2.0 * delta)
        return value < -margin

    def param_groups(self):
        groups = super().param_groups()
        groups["extra"] = [self.variance]
        if self.softness_net is not None:
            groups["mlp"] = [*groups["mlp"], *self.softness_net.parameters()]
        return groups
