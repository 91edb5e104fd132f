"""One mesh through time: where each vertex of a mesh taken at one instant of a field over time
is at other instants, through the field's deformation (backend/fields/motion.py).

A dynamic field shows the point ``x`` at time ``t`` as its canonical field shows ``warp(x, t) =
x + D(x, t)``.  A vertex ``v`` of the mesh taken at time ``t0`` sits at the canonical point
``c = warp(v, t0)``; at time ``t`` it is where the scene's frame meets that same canonical point:
the ``x`` with ``warp(x, t) = c``.  Each vertex's ``x`` is found by Newton's method on that
equation (the 3x3 Jacobian ``I + dD/dx`` by central differences, a step kept only where it lowers
the residual, else the plain fixed-point step ``x - (warp(x, t) - c)``), starting from its positions
at the two neighbouring instants extrapolated: the instants are walked outward from ``t0``, so each
solve starts close.  Where the residual is zero the vertex lies exactly on the surface the field shows at
``t`` (the same canonical point, so the same inside/outside value and the same colour): one mesh,
one texture (the canonical field's), a position per vertex per instant, as shape keys or a point
cache.  Where the motion is not one-to-one (parts that merge or split, surfaces that appear) no
solution exists; the residual says where, and the caller's "lost" share tells whether a mesh per
frame (export/mesh.py at each instant) is the better choice.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

LOST = 2e-3          # a vertex whose residual is above this share of the box's diagonal is "lost"
MAX_ITERATIONS = 12
TOLERANCE = 1e-4     # normalised units (the box spans [-1, 1], a 256-cell mesh's voxel is 0.008): converged
DELTA = 1e-3         # central-difference step of the Jacobian, normalised units


def _solve3(jac: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(N, 3) solutions of jac (N, 3, 3) @ s = r (N, 3) by Cramer's rule (batched LAPACK calls are
    slow on the CPU for 3x3 systems); nearly singular systems give the plain step r."""
    a, b, c = jac[:, :, 0], jac[:, :, 1], jac[:, :, 2]
    det = (a * torch.cross(b, c, dim=1)).sum(1)
    ok = det.abs() > 1e-6
    det = torch.where(ok, det, torch.ones_like(det))[:, None]
    s = torch.stack([(r * torch.cross(b, c, dim=1)).sum(1), (a * torch.cross(r, c, dim=1)).sum(1),
                     (a * torch.cross(b, r, dim=1)).sum(1)], 1) / det
    return torch.where(ok[:, None] & torch.isfinite(s), s, r)


def _solve(warp, target: torch.Tensor, x: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, 3) with warp(x) = target, from the start x: (solution, residual norms (N,)).  Only the
    points not yet converged (and still improving) are worked on."""
    r = warp(x) - target
    err = r.norm(dim=1)
    x = x.clone()
    active = torch.nonzero(~(err <= TOLERANCE)).squeeze(1)        # NaN residuals count as unconverged
    eye = torch.eye(3, dtype=x.dtype, device=x.device) * DELTA
    for _ in range(iterations):
        if not len(active):
            break
        xa, ra, ea, n = x[active], r[active], err[active], len(active)
        probes = torch.cat([xa + e for e in eye] + [xa - e for e in eye])
        w = warp(probes).view(6, n, 3)
        jac = ((w[:3] - w[3:]) / (2 * DELTA)).permute(1, 2, 0)           # (n, 3, 3): d warp_i / d x_j
        candidates = torch.cat([xa - _solve3(jac, ra), xa - ra]).clamp(-1.0, 1.0)   # Newton, fixed point
        rc = (warp(candidates) - target[active].repeat(2, 1)).view(2, n, 3)
        ec = rc.norm(dim=2)
        pick = ec.argmin(0)
        best_e = ec.gather(0, pick[None])[0]
        better = best_e < ea
        rows = torch.arange(n, device=x.device)
        x[active] = torch.where(better[:, None], candidates.view(2, n, 3)[pick, rows], xa)
        r[active] = torch.where(better[:, None], rc[pick, rows], ra)
        err[active] = torch.where(better, best_e, ea)
        active = active[~(err[active] <= TOLERANCE) & (best_e < 0.999 * ea)]
    return x, err


def size_error(instants: int, vertices: int, cap: int) -> str:
    """Why following ``vertices`` through ``instants`` is too large for ``cap`` positions ('' if not)."""
    if instants * vertices <= cap:
        return ""
    return (f"following {vertices} vertices through {instants} instants is more than {cap} positions: "
            "ask fewer instants or fewer faces")


@torch.no_grad()
def follow_vertices(model, verts: np.ndarray, times: Sequence[float], reference_time: float | None = None,
                    iterations: int = MAX_ITERATIONS, chunk: int = 1 << 17) -> tuple[np.ndarray, dict]:
    """Where the vertices ``verts`` (V, 3) world, taken at ``reference_time`` (None: the model's
    ``time``), are at each of ``times`` (T instants in [0, 1]) (module doc).

    Returns (positions (T, V, 3) float32 world, facts): ``track_residual`` the mean distance left
    between a vertex's canonical point and where its position maps (world units, over all
    instants, the finite ones), ``track_lost`` the share of (vertex, instant) pairs whose residual
    is above LOST of the box's diagonal (or not finite).  Raises ValueError for a field of one instant or times out of [0, 1].
    """
    if not getattr(model, "dynamic", False):
        raise ValueError("only a fit over time has motion to follow; this field is of one instant")
    times = np.asarray(times, np.float64).reshape(-1)
    if not len(times) or not np.all((times >= 0.0) & (times <= 1.0)):
        raise ValueError(f"follow the vertices through instants in [0, 1], got {times.tolist()[:8]}")
    deformation = model.field.deformation
    t0 = float(model.time if reference_time is None else reference_time)
    order = np.argsort(times, kind="stable")
    split = int(np.searchsorted(times[order], t0))
    # outward from t0: the later instants in increasing order, the earlier ones in decreasing
    walks = [order[split:], order[:split][::-1]]
    v = torch.as_tensor(np.asarray(verts, np.float32), device=model.device)
    out = np.empty((len(times), len(v), 3), np.float32)
    errors = np.empty((len(times), len(v)), np.float32)
    for lo in range(0, len(v), chunk):
        x0 = model.to_normalised(v[lo:lo + chunk])
        canonical = deformation(x0, t0)
        for walk in walks:
            x = before = x0
            for i in walk:      # each solve starts where the last two instants' positions point
                start = (2.0 * x - before).clamp(-1.0, 1.0)
                before, (x, err) = x, _solve(lambda p, t=float(times[i]): deformation(p, t), canonical, start,
                                             iterations)
                out[i, lo:lo + len(x)] = (x * model.scale + torch.as_tensor(model.center, dtype=x.dtype,
                                                                            device=x.device)).cpu().numpy()
                errors[i, lo:lo + len(x)] = torch.nan_to_num(err * model.scale, nan=np.inf).cpu().numpy()
    diagonal = float(np.linalg.norm(np.asarray(model.aabb[1]) - np.asarray(model.aabb[0])))
    finite = np.isfinite(errors)
    facts = {"track_residual": float(errors[finite].mean()) if finite.any() else 0.0,
             "track_lost": float((~(errors <= LOST * diagonal)).mean()) if errors.size else 0.0}
    return out, facts


def write_pc2(path, positions: np.ndarray, start_frame: float = 0.0, sample_rate: float = 1.0) -> None:
    """Write positions (T, V, 3) as a Point Cache 2 file (.pc2: the format Blender's Mesh Cache
    modifier, 3ds Max and Houdini read): a 32-byte little-endian header ("POINTCACHE2\\0", version
    1, the vertex count, the first frame, the frames between samples, the sample count), then
    float32 x, y, z per vertex per sample."""
    positions = np.asarray(positions, np.float32)
    if positions.ndim != 3 or positions.shape[2] != 3:
        raise ValueError(f"positions must be (samples, vertices, 3), got {positions.shape}")
    header = np.zeros(1, dtype=[("magic", "S12"), ("version", "<i4"), ("points", "<i4"),
                                ("start", "<f4"), ("rate", "<f4"), ("samples", "<i4")])
    header[0] = (b"POINTCACHE2\0", 1, positions.shape[1], start_frame, sample_rate, positions.shape[0])
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.ascontiguousarray(positions, dtype="<f4").tobytes())


def write_cache_for(mesh_path, positions: np.ndarray) -> Path:
    """Write positions (T, V, 3) world (Z up) of the vertices of the mesh file ``mesh_path`` as
    ``<stem>.pc2`` beside it, in that file's own frame (a point cache replaces the imported mesh's
    coordinates as they are in the file: OBJ files are Y up, export/textured.py z_up_to_y_up, and
    Blender's OBJ importer keeps them so and turns the object; its glTF importer turns glTF's Y up
    into the mesh's Z up, and PLY files are Z up).  Returns the path."""
    from fit_implicit.backend.export.textured import z_up_to_y_up

    mesh_path = Path(mesh_path)
    if mesh_path.suffix.lower() == ".obj":
        positions = np.stack([z_up_to_y_up(p) for p in np.asarray(positions, np.float32)])
    cache = mesh_path.with_suffix(".pc2")
    write_pc2(cache, positions)
    return cache


def read_pc2(path) -> tuple[np.ndarray, float, float]:
    """(positions (T, V, 3) float32, first frame, frames between samples) of a .pc2 file
    (:func:`write_pc2`); raises ValueError for a file that is not one."""
    data = open(path, "rb").read()
    if len(data) < 32 or data[:12] != b"POINTCACHE2\0":
        raise ValueError(f"{path}: not a Point Cache 2 file")
    version, points = np.frombuffer(data, "<i4", 2, 12)
    start, rate = np.frombuffer(data, "<f4", 2, 20)
    samples = int(np.frombuffer(data, "<i4", 1, 28)[0])
    if version != 1 or points < 0 or samples < 0 or len(data) != 32 + 12 * int(points) * samples:
        raise ValueError(f"{path}: a Point Cache 2 header that does not match its size")
    positions = np.frombuffer(data, "<f4", offset=32).reshape(samples, int(points), 3).copy()
    return positions, float(start), float(rate)


__all__ = ["follow_vertices", "write_pc2", "write_cache_for", "read_pc2", "LOST"]
