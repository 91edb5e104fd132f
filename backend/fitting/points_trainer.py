"""Signed distance fields fitted to points (issue 16): scans, point clouds, a mesh's surface.
The settings (:class:`PointsConfig`) and the trainer; fitting/points_fit.py runs a fit.

The field is the SDF of photo fits (fields/sdf.py: hash grid + MLP, geometric initialisation as
a sphere, gradients and Laplacians by finite differences), so a fit to points is a run like any
other (method "sdf"): ``fit-implicit mesh`` and the add-on's import read it unchanged.

A cloud without normals gets estimated ones first (``points_orientation`` auto: PCA of each
point's neighbours, signs made to agree along a spanning tree; fitting/point_cloud.py); with
``unoriented`` it is fitted sign-agnostically instead (SAL), which on a hash grid keeps the
initial sphere's topology (a torus's hole stays shut: 2 % Chamfer against 0.25 % for estimated
normals, CPU test scan, 2026-12-04).  Each step evaluates the field at three kinds of points
(normalised frame, the box's half-size 1):

* the cloud's points ``p``: the distance there is zero (an L1 term, so that noise pulls as a
  median does) and the gradient points along their normals (IGR's normal term,
  ``points_normal_weight``); the albedo head learns the points' colours;
* points near the cloud, ``p + sigma_p * e`` with ``sigma_p`` the distance from ``p`` to its
  ``points_outlier_k``-th neighbour (IGR's local scale, capped for isolated points; a quarter of
  them 10x farther): the value is the distance to the nearest point of the cloud, signed by that
  point's normal (SAL: only its size) (``points_distance_weight``);
* points anywhere in the box: inside or outside as the cloud's generalised winding number says
  (robust to holes in the scan), and never farther from the surface than from the nearest point
  (a bound, not a target: across a hole the surface is nearer than the points, so unseen caps
  keep their shape); SAL: the size of that distance, at a tenth of the weight.

Everywhere the gradient has unit length (the eikonal term, ``points_eikonal_weight``).  The
"keep detail / fill holes" control ``points_detail`` (1 = all detail) sets how many hash levels
the fit reaches and how strongly a curvature term (the mean absolute Laplacian, off at 1)
smooths what the points do not pin down.  Scans' outliers: statistical outlier removal first
(fitting/point_cloud.py), then the L1 surface term and the mesh's small-part removal
(export/mesh.py ``min_component``) deal with what remains.

Progress reports the mean squared distance of the points to the surface (normalised units) as
``mse``: its "psnr" is the surface's, with the box's half-size as the peak.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from fit_implicit.backend.fitting.model import FittedField, pick_device
from fit_implicit.backend.fitting.point_cloud import PointCloud, estimate_normals, remove_outliers, winding_numbers
from fit_implicit.shared.methods import POINTS_ORIENTATIONS as ORIENTATIONS

if TYPE_CHECKING:   # annotations only: fitting/config.py imports this module
    from fit_implicit.backend.fitting.config import FitConfig

FAR_SHARE = 0.25            # of the near samples: drawn at 10x the local scale
UNIFORM_WEIGHT = 1.0        # the box-wide term, relative to points_distance_weight (sign by winding numbers, size bound)
UNIFORM_WEIGHT_SAL = 0.1    # ... unsigned (SAL): across holes that distance is too large
CURVATURE_MAX = 0.02        # curvature weight at points_detail 0
COLOUR_WEIGHT = 0.5
NORMAL_NEIGHBOURS = 16      # points a normal is estimated from, where the cloud has none (orientation auto)
SIGMA_CAP = 4.0             # near samples' local scale: at most this many times its median (isolated points)


@dataclass
class PointsConfig:
    """A fit to points: what it samples and the weights of its terms (module doc)."""

    points_orientation: str = "auto"    # auto | oriented | unoriented: use the cloud's normals (auto: if it has them)
    points_detail: float = 0.5          # 0 = fill holes smoothly .. 1 = keep every detail (hash levels, curvature)
    points_batch: int = 1 << 13         # cloud points a step
    points_space_batch: int = 1 << 13   # points off the cloud a step (3/4 near it, 1/4 anywhere in the box)
    points_normal_weight: float = 1.0   # gradient along the given normals (IGR's tau)
    points_eikonal_weight: float = 0.1  # unit gradient everywhere (IGR's lambda)
    points_distance_weight: float = 1.0  # near points: the (signed or unsigned, SAL) distance to the cloud
    points_outlier_k: int = 12          # neighbours for the outlier filter and the local sampling scale
    points_outlier_std: float = 6.0     # outlier filter: drop points this many deviations (MAD) above the typical
                                        # neighbour distance; 0 = off
    points_max: int = 1 << 21           # points trained on (a random subset of larger clouds)
    points_padding: float = 0.1         # box margin around the points, as a share of their extent
    points_mesh_samples: int = 250_000  # points sampled on a mesh's surface when a mesh is the input

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.points_orientation not in ORIENTATIONS:
            raise ValueError(f"points_orientation {self.points_orientation!r} is not one of {', '.join(ORIENTATIONS)}")
        if not 0.0 <= self.points_detail <= 1.0:
            raise ValueError(f"points_detail must be in [0, 1], got {self.points_detail}")
        for name in ("points_batch", "points_space_batch", "points_outlier_k", "points_max", "points_mesh_samples"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("points_normal_weight", "points_eikonal_weight", "points_distance_weight",
                     "points_outlier_std", "points_padding"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")


def cloud_box(cloud, padding: float) -> np.ndarray:
    """(2, 3) the box a fit to ``cloud`` works in: its points' bounds, ``padding`` of their largest
    extent added on every side (setting points_padding)."""
    lo, hi = cloud.aabb
    pad = float(padding) * float(np.max(hi - lo))
    return np.stack([lo - pad, hi + pad])


def final_levels(levels: int, detail: float) -> int:
    """Hash levels a fit reaches: half of them at detail 0, all at detail 1."""
    low = max(1, levels // 2)
    return int(round(low + detail * (levels - low)))


class PointsTrainer:
    """One fit to points: the model, the sample pools (on the fit's device) and the optimiser.
    Has the hooks fitting/loop.py ``train`` calls."""

    def __init__(self, cloud: PointCloud, cfg: FitConfig):
        pc, self.cfg = cfg.points, cfg
        self.device = pick_device(cfg.device)
        facts = {"points_in": len(cloud), **cloud.facts}
        cloud = remove_outliers(cloud, int(pc.points_outlier_k), float(pc.points_outlier_std))
        facts.update(cloud.facts)
        rng = np.random.default_rng(cfg.seed)
        if len(cloud) > pc.points_max:
            cloud = cloud.subset(np.sort(rng.choice(len(cloud), size=int(pc.points_max), replace=False)))
            facts["points_subset"] = int(pc.points_max)
        if len(cloud) < 2 * int(pc.points_outlier_k):
            raise ValueError(f"only {len(cloud)} points are left after the outlier filter: too few to fit a surface")
        if pc.points_orientation == "oriented" and cloud.normals is None:
            raise ValueError("points_orientation is 'oriented' but the points have no usable normals")
        if pc.points_orientation == "auto" and cloud.normals is None:
            cloud = estimate_normals(cloud, NORMAL_NEIGHBOURS)
            facts["normals"] = cloud.facts["normals"]
        self.oriented = cloud.normals is not None and pc.points_orientation != "unoriented"
        aabb = cloud_box(cloud, pc.points_padding)
        self.has_colors = cloud.colors is not None
        facts.update(points_used=len(cloud), oriented=self.oriented, colors=self.has_colors)
        meta = {"source": "points", "points": facts, "lighting_baked": False, "views": 0}
        self.model = FittedField.build(cfg, aabb, meta, self.device)
        self.model.field.set_active_levels(max(1, final_levels(cfg.field.all_levels, pc.points_detail) // 2))
        self._pools(cloud, rng)
        groups = self.model.field.param_groups()
        tc = cfg.train
        self.optimizer = torch.optim.Adam([
            {"params": groups["grid"], "lr": tc.grid_lr, "eps": tc.grid_eps, "weight_decay": 0.0},
            {"params": groups["mlp"], "lr": tc.mlp_lr, "eps": tc.mlp_eps, "weight_decay": tc.mlp_weight_decay}],
            betas=(0.9, 0.99))
        self.base_lrs = [tc.grid_lr, tc.mlp_lr]
        self.rays = int(pc.points_batch)            # the fit loop reports it as the batch
        self.curvature_weight = CURVATURE_MAX * (1.0 - float(pc.points_detail)) ** 2

    # ---- set-up ---------------------------------------------------------------------------------
    def _pools(self, cloud: PointCloud, rng: np.random.Generator) -> None:
        """The cloud (normalised), and points near it and in the box with their targets (fixed for
        the fit: built once with a k-d tree on the CPU)."""
        from scipy.spatial import cKDTree

        m = self.model
        p = (cloud.points - m.center) / m.scale
        tree = cKDTree(p)
        k = int(min(self.cfg.points.points_outlier_k, len(p) - 1))
        near_dist = tree.query(p, k=k + 1, workers=-1)[0]
        nearest = near_dist[:, 1][near_dist[:, 1] > 0]            # the typical spacing, world units (meta)
        m.meta["points"]["spacing"] = float(np.median(nearest)) * m.scale if len(nearest) else 0.0
        local = np.clip(near_dist[:, -1], 1e-4, SIGMA_CAP * np.median(near_dist[:, -1]))
        count = int(min(max(2 * len(p), 1 << 18), 1 << 22))
        idx = rng.integers(0, len(p), count)
        sigma = local[idx] * np.where(rng.random(count) < FAR_SHARE, 10.0, 1.0)
        near = p[idx] + sigma[:, None] * rng.standard_normal((count, 3))
        dist, nn = tree.query(near, workers=-1)
        if self.oriented:
            side = np.einsum("ij,ij->i", near - p[nn], cloud.normals[nn])
            dist = np.where(side < 0, -dist, dist)
        box = ((m.aabb - m.center) / m.scale).astype(np.float64)
        uniform = box[0] + (box[1] - box[0]) * rng.random((count // 16, 3))
        udist = tree.query(uniform, workers=-1)[0]
        if self.oriented:       # inside or out, whatever the holes: the winding number's sign
            inside = winding_numbers(p, cloud.normals, uniform, k, device=str(self.device), seed=self.cfg.seed) > 0.5
            udist = np.where(inside, -udist, udist)

        def dev(a, dtype=torch.float32):
            return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=self.device)

        self.points = dev(p)
        self.normals = dev(cloud.normals) if self.oriented else None
        self.colors = dev(cloud.colors.astype(np.float32) / 255.0) if self.has_colors else None
        self.near, self.near_target = dev(near), dev(dist)
        self.uniform, self.uniform_target = dev(uniform), dev(udist)

    # ---- the fit loop's hooks (fitting/loop.py) -------------------------------------------------
    def preview_ready(self, step: int) -> bool:
        return False

    def update_step(self, step: int, fraction: float) -> None:
        """Learning rates (warm-up, decay) and the hash levels, coarse to fine over the first half."""
        factor = self.cfg.train.lr_factor(step, fraction)
        for group, lr in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = lr * factor
        top = final_levels(self.cfg.field.all_levels, self.cfg.points.points_detail)
        levels = max(1, top // 2) + int((top - max(1, top // 2)) * min(2.0 * fraction, 1.0))
        field = self.model.field
        if levels != field.active_levels:
            field.set_active_levels(levels)

    def step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimisation step: (loss, mean squared surface distance, field evaluations)."""
        pc, field, dev = self.cfg.points, self.model.field, self.device
        b, s = int(pc.points_batch), int(pc.points_space_batch)
        i = torch.randint(0, len(self.points), (b,), device=dev)
        j = torch.randint(0, len(self.near), (s - s // 4,), device=dev)
        u = torch.randint(0, len(self.uniform), (s // 4,), device=dev)
        x = torch.cat([self.points[i], self.near[j], self.uniform[u]])
        value, feat, grad, lap = field.geometry_with_derivatives(x, field.fd_step)
        vp, vn, vu = value[:b], value[b:b + len(j)], value[b + len(j):]
        loss = vp.abs().mean()
        if self.oriented and pc.points_normal_weight > 0:
            cos = torch.nn.functional.cosine_similarity(grad[:b], self.normals[i], dim=-1, eps=1e-8)
            loss = loss + pc.points_normal_weight * (1.0 - cos).mean()
        target = self.near_target[j]
        near_err = (vn - target) if self.oriented else (vn.abs() - target)
        bound = self.uniform_target[u]
        if self.oriented:   # the sign of the winding number, and never farther than the nearest point
            side = torch.sign(bound)
            far = (torch.relu(-side * vu) + torch.relu(side * vu - bound.abs())).mean() * UNIFORM_WEIGHT
        else:               # SAL: the size of the distance to the nearest point
            far = (vu.abs() - bound).abs().mean() * UNIFORM_WEIGHT_SAL
        loss = loss + pc.points_distance_weight * (near_err.abs().mean() + far)
        if pc.points_eikonal_weight > 0:
            loss = loss + pc.points_eikonal_weight * ((grad.norm(dim=-1) - 1.0) ** 2).mean()
        if self.curvature_weight > 0:
            loss = loss + self.curvature_weight * lap[b:].abs().mean()
        if self.colors is not None:
            loss = loss + COLOUR_WEIGHT * ((field.albedo(feat[:b]) - self.colors[i]) ** 2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), (vp.detach() ** 2).mean(), 5 * len(x)

    def finish(self) -> None:
        """After the last step: without colours the albedo head reads exactly mid grey."""
        if not self.has_colors:
            last = self.model.field.albedo_net[-1]
            with torch.no_grad():
                last.weight.zero_()
                last.bias.zero_()
        self.model.meta["points"]["mean_distance"] = self.mean_distance()

    @torch.no_grad()
    def mean_distance(self, count: int = 1 << 16) -> float:
        """Mean |SDF| at (up to ``count`` of) the cloud's points, world units: how far the surface
        passes from them."""
        field = self.model.field
        idx = torch.randperm(len(self.points), device=self.device)[:count]
        return float(field.value(self.points[idx]).abs().mean()) * self.model.scale

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"field": self.model.field.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.field.load_state_dict(state["field"])
        self.model.field.restore_active_levels()
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
