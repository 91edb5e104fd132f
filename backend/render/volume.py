"""Sampling and volume rendering: pure functions of tensors, shapes documented.

The radiance field and the occupancy test come in as callbacks, so nothing here knows a model:

* ``field_fn(x (M, 3), d (M, 3)) -> (sigma (M,), rgb (M, 3))``
* ``occupied_fn(x (..., 3)) -> (...,) bool``

Samples are taken at a uniform step along each ray, from where the ray enters the box: a fixed
grid of candidate positions per ray, of which those outside the box or in empty cells are
masked out before the field is queried.  Compositing is the usual quadrature

    tau_i = sigma_i * delta_i,   T_i = exp(-sum_{j<i} tau_j),   w_i = T_i * (1 - exp(-tau_i)),

with ``rgb = sum w_i c_i`` (premultiplied), ``opacity = sum w_i`` and ``depth = sum w_i t_i``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

try:  # Triton is optional: the CPU build of PyTorch ships without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - machines without Triton
    triton = None
    tl = None

# Training on CUDA marches rays with a Triton kernel that emits only the candidates inside
# occupied cells, packed ray after ray, instead of a dense (rays x candidates) grid; it needs the
# occupancy bits, which it takes from ``occupied_fn.__self__.march_bits()`` (OccupancyGrid).
# False forces the dense path everywhere (for comparisons).
PACKED = True

FieldFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
OccupiedFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MarchConfig:
    """How finely rays are sampled: ``march_steps`` samples along the normalised cube's diagonal
    set the step (``2 sqrt(3) / march_steps`` normalised units)."""

    march_steps: int = 1024         # samples along the normalised cube's diagonal in training
    render_march_steps: int = 0     # the same when rendering (previews, evaluation, renders); 0 = march_steps
    render_chunk: int = 1 << 18     # rays per chunk when rendering

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        for name in ("march_steps", "render_chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.render_march_steps < 0:
            raise ValueError(f"render_march_steps must not be negative, got {self.render_march_steps}")

    def step_size(self, rendering: bool = False) -> float:
        """The marching step in normalised units, for training or for rendering."""
        return 2.0 * math.sqrt(3.0) / self.max_steps(rendering)

    def max_steps(self, rendering: bool = False) -> int:
        return int(self.render_march_steps or self.march_steps) if rendering else int(self.march_steps)


@dataclass
class RayOutput:
    """Per-ray results.  rgb (R, 3) premultiplied; opacity (R,); depth (R,) expected distance
    along the ray (not divided by opacity); samples: number of field queries made."""

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    samples: int
    distortion: torch.Tensor | None = None  # (R,) :func:`distortion` of each ray's weights, when asked for


def ray_aabb(origins: torch.Tensor, dirs: torch.Tensor, aabb: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test of rays against an axis-aligned box.

    Args:
        origins: (R, 3) float32.  dirs: (R, 3) float32 (need not be unit; t is in its units).
        aabb: (2, 3) float32, min row then max row.
    Returns:
        t_near (R,) float32 clamped at 0 (rays starting inside begin at their origin),
        t_far (R,) float32, hit (R,) bool (the box is ahead of the origin and met with t_far > t_near).
        The distances carry no gradient: they place the samples, and a ray that moves (a refined
        camera, fitting/camera_refine.py) moves its samples' points, not where they sit along it.
    """
    origins, dirs = origins.detach(), dirs.detach()
    tiny = 1e-12
    safe = torch.where(dirs.abs() < tiny, torch.full_like(dirs, tiny), dirs)
    inv = 1.0 / safe
    t0 = (aabb[0] - origins) * inv
    t1 = (aabb[1] - origins) * inv
    t_near = torch.minimum(t0, t1).amax(-1).clamp_min(0.0)
    t_far = torch.maximum(t0, t1).amin(-1)
    return t_near, t_far, t_far > t_near


def composite(sigmas: torch.Tensor, deltas: torch.Tensor, t_prior: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Compositing weights along rays.

    Args:
        sigmas: (R, K) float32 densities (0 where there is no sample).
        deltas: (R, K) or broadcastable float32 segment lengths.
        t_prior: (R,) float32 optical depth already accumulated before the first sample, or None.
    Returns:
        weights (R, K) float32, and the optical depth (R,) float32 accumulated after the last
        sample (transmittance = exp(-that)).
    """
    tau = sigmas * deltas
    total = tau.cumsum(-1)
    before = total - tau                                        # exclusive cumulative sum
    if t_prior is not None:
        before = before + t_prior[:, None]
        total = total + t_prior[:, None]
    weights = torch.exp(-before) * (1.0 - torch.exp(-tau))      # T_i * alpha_i
    return weights, total[:, -1]


def distortion(weights: torch.Tensor, t: torch.Tensor, step: float, first: torch.Tensor, into: torch.Tensor,
               rows: int) -> torch.Tensor:
    """mip-NeRF 360's distortion of each ray's compositing weights, for samples at a uniform step:

        L = sum_i sum_j w_i w_j |t_i - t_j| + step / 3 * sum_i w_i^2,

    small when a ray's weight gathers in one short stretch (a surface), large when it is spread
    along the ray (fog, floaters).  The double sum in O(samples) with prefix sums within each ray:
    2 sum_i w_i (t_i W_i - (wt)_i), W_i and (wt)_i the sums of w_j and w_j t_j over the ray's
    samples in front of i.

    Args:
        weights, t: (S,) float32, each ray's samples contiguous and in order along it (weights 0 in
            unused slots).  step: the distance between samples.
        first: (S,) int64 slot of the first sample of each slot's ray.  into: (S,) int64 row of
            each slot's ray in the result.  rows: rows of the result.
    Returns:
        (rows,) float32.
    """
    w, wt = weights.double(), (weights * t).double()
    mass = torch.cumsum(w, 0) - w                               # exclusive prefix sums over the batch,
    moment = torch.cumsum(wt, 0) - wt                           # then from each ray's first sample
    mass, moment = (mass - mass[first]).to(weights.dtype), (moment - moment[first]).to(weights.dtype)
    per = 2.0 * weights * (t * mass - moment) + weights * weights * (step / 3.0)
    return weights.new_zeros(rows).index_add(0, into, per)


def sample_grid(t_near: torch.Tensor, step: float, first: int, count: int,
                offset: torch.Tensor | float = 0.5) -> torch.Tensor:
    """Candidate distances ``t_near + (k + offset) * step`` for k in [first, first + count).

    Args:
        t_near: (R,) float32.  offset: (R, 1) float32 in [0, 1) (jitter) or a number.
    Returns:
        (R, count) float32.
    """
    k = torch.arange(first, first + count, device=t_near.device, dtype=t_near.dtype)
    return t_near[:, None] + (k[None, :] + offset) * step


def _query(field_fn: FieldFn, occupied_fn: OccupiedFn, origins, dirs, t, t_far, positions_only: bool = False,
           times: torch.Tensor | None = None):
    """Mask candidates (beyond t_far or in empty cells), query the field on the rest
    (``positions_only``: ``field_fn(x)``, e.g. a geometry pass, else ``field_fn(x, d)``, and
    ``field_fn(x, d, time)`` with the rays' ``times`` (R,) of a dynamic field).

    Returns sigma (R, K) dense with zeros, rgb (M, 3) (or the field's second output) of the valid
    ones, mask (R, K), ray id (M,).
    """
    x = origins[:, None, :] + t[..., None] * dirs[:, None, :]                 # (R, K, 3)
    mask = (t < t_far[:, None]) & occupied_fn(x)
    ray = mask.nonzero()[:, 0]
    if positions_only:
        sig, rgb = field_fn(x[mask])
    else:
        sig, rgb = field_fn(x[mask], dirs.index_select(0, ray), *(() if times is None else (times[ray],)))
    dense = torch.zeros_like(t).masked_scatter(mask, sig.to(t.dtype))
    return dense, rgb, mask, ray


if triton is not None:

    @triton.jit
    def _march_kernel(o_ptr, d_ptr, tn_ptr, tf_ptr, j_ptr, occ_ptr, start_ptr, count_ptr,
                      t_out, x_out, ray_out, step, n_cand, res, cap,
                      WRITE: tl.constexpr, BLOCK: tl.constexpr):
        # One program per ray: candidates t = t_near + (k + jitter) * step, k < n_cand, kept where
        # t < t_far and the point lies in an occupied cell.  WRITE=False counts them; WRITE=True
        # stores them at start[ray] onwards, in order of k, unless they would end past ``cap``
        # (then the whole ray is left out).  The loop stops one block after t_far.
        r = tl.program_id(0)
        ox = tl.load(o_ptr + 3 * r)
        oy = tl.load(o_ptr + 3 * r + 1)
        oz = tl.load(o_ptr + 3 * r + 2)
        dx = tl.load(d_ptr + 3 * r)
        dy = tl.load(d_ptr + 3 * r + 1)
        dz = tl.load(d_ptr + 3 * r + 2)
        tn = tl.load(tn_ptr + r)
        tf = tl.load(tf_ptr + r)
        jit = tl.load(j_ptr + r)
        # Candidates past t_far are never kept: +2 covers rounding of t against the bound.
        span = tl.maximum((tf - tn) / step - jit, 0.0)
        n_ray = tl.minimum(tl.floor(span).to(tl.int32) + 2, n_cand)
        base = 0
        if WRITE:
            base = tl.load(start_ptr + r)
            n_ray = tl.where(base + tl.load(count_ptr + r) <= cap, n_ray, 0)
        n = 0
        half = 0.5 * res
        for k0 in range(0, n_ray, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            t = tn + (k.to(tl.float32) + jit) * step
            valid = (k < n_cand) & (t < tf)
            x = ox + t * dx
            y = oy + t * dy
            z = oz + t * dz
            gx = tl.floor((x + 1.0) * half).to(tl.int32)
            gy = tl.floor((y + 1.0) * half).to(tl.int32)
            gz = tl.floor((z + 1.0) * half).to(tl.int32)
            inside = (gx >= 0) & (gx < res) & (gy >= 0) & (gy < res) & (gz >= 0) & (gz < res)
            valid = valid & inside
            idx = gx + res * (gy + res * gz)
            occ = tl.load(occ_ptr + idx, mask=valid, other=0)
            keep = valid & (occ != 0)
            ki = keep.to(tl.int32)
            if WRITE:
                pos = (base + n + tl.cumsum(ki, 0) - 1).to(tl.int64)
                tl.store(t_out + pos, t, mask=keep)
                tl.store(x_out + 3 * pos, x, mask=keep)
                tl.store(x_out + 3 * pos + 1, y, mask=keep)
                tl.store(x_out + 3 * pos + 2, z, mask=keep)
                tl.store(ray_out + pos, r, mask=keep)
            n += tl.sum(ki, 0)
        if not WRITE:
            tl.store(count_ptr + r, n)


def _march_count(origins, dirs, t_near, t_far, offset, step, count, bits, resolution):
    """The marcher's counting pass: (its contiguous inputs, samples per ray (R,) int32, block)."""
    inputs = (origins.contiguous(), dirs.contiguous(), t_near.contiguous(), t_far.contiguous(),
              offset.reshape(-1).contiguous().float())
    o, d, tn, tf, j = inputs
    counts = torch.empty(origins.shape[0], dtype=torch.int32, device=origins.device)
    block = 256 if count > 128 else 128
    _march_kernel[(origins.shape[0],)](o, d, tn, tf, j, bits, counts, counts, tn, tn, counts, float(step),
                                       int(count), int(resolution), 0, WRITE=False, BLOCK=block, num_warps=4)
    return inputs, counts, block


def march_packed(origins: torch.Tensor, dirs: torch.Tensor, t_near: torch.Tensor, t_far: torch.Tensor,
                 offset: torch.Tensor, step: float, count: int, bits: torch.Tensor, resolution: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates of :func:`sample_grid` (k < count) that lie before t_far and in occupied
    cells, packed ray after ray (CUDA, Triton).

    Args:
        origins, dirs: (R, 3) float32.  t_near, t_far: (R,) float32.  offset: (R,) float32 jitter.
        bits: (res^3,) uint8 occupancy, x fastest, over [-1, 1]^3.
    Returns:
        t (M,) float32, x (M, 3) float32 positions, ray (M,) int64 ray ids (non-decreasing),
        counts (R,) int64 samples per ray.
    """
    r = origins.shape[0]
    dev = origins.device
    (o, d, tn, tf, j), counts, block = _march_count(origins, dirs, t_near, t_far, offset, step, count, bits,
                                                    resolution)
    ends = counts.cumsum(0)
    m = int(ends[-1]) if r else 0
    starts = (ends - counts).to(torch.int32)
    t = torch.empty(m, dtype=torch.float32, device=dev)
    x = torch.empty(m, 3, dtype=torch.float32, device=dev)
    ray = torch.empty(m, dtype=torch.int32, device=dev)
    if m:
        _march_kernel[(r,)](o, d, tn, tf, j, bits, starts, counts, t, x, ray, float(step), int(count),
                            int(resolution), m, WRITE=True, BLOCK=block, num_warps=4)
    return t, x, ray.long(), counts.long()


@dataclass
class FixedSamples:
    """Samples of a ray batch packed into a fixed number of slots (see :func:`march_fixed`).

    t (S,) float32 and x (S, 3) float32 of each slot; ray (S,) int64 ray id, ``R`` (one past the
    last ray) for unused slots; counts (R,) int64 samples kept per ray (0 for rays left out);
    kept (R,) bool rays whose samples all fit; used () int64 slots in use.
    """

    t: torch.Tensor
    x: torch.Tensor
    ray: torch.Tensor
    counts: torch.Tensor
    kept: torch.Tensor
    used: torch.Tensor


def march_fixed(origins: torch.Tensor, dirs: torch.Tensor, t_near: torch.Tensor, t_far: torch.Tensor,
                offset: torch.Tensor, step: float, count: int, bits: torch.Tensor, resolution: int,
                capacity: int, kernel: bool | None = None) -> FixedSamples:
    """:func:`march_packed` into ``capacity`` slots, with no host synchronisation (fixed shapes,
    so a training step can be captured in a CUDA graph).

    Rays are taken in order while their samples fit; a ray that would overflow is left out whole
    (with all rays after it), so every kept ray is composited exactly.  Triton on CUDA; the same
    result from plain PyTorch elsewhere (:func:`march_fixed_reference`).  ``kernel`` True forces
    the Triton kernel (e.g. on the CPU under TRITON_INTERPRET=1), False the reference.
    """
    if kernel is None:
        kernel = triton is not None and origins.is_cuda
    if not kernel:
        return march_fixed_reference(origins, dirs, t_near, t_far, offset, step, count, bits, resolution,
                                     capacity)
    r, dev = origins.shape[0], origins.device
    (o, d, tn, tf, j), counts, block = _march_count(origins, dirs, t_near, t_far, offset, step, count, bits,
                                                    resolution)
    ends = counts.cumsum(0)
    kept = ends <= capacity
    starts = (ends - counts).to(torch.int32)
    t = torch.zeros(capacity, dtype=torch.float32, device=dev)
    x = torch.zeros(capacity, 3, dtype=torch.float32, device=dev)
    ray = torch.full((capacity,), r, dtype=torch.int32, device=dev)
    _march_kernel[(r,)](o, d, tn, tf, j, bits, starts, counts, t, x, ray, float(step), int(count),
                        int(resolution), int(capacity), WRITE=True, BLOCK=block, num_warps=4)
    counts = torch.where(kept, counts, 0).long()
    return FixedSamples(t, x, ray.long(), counts, kept, counts.sum())


def march_fixed_reference(origins, dirs, t_near, t_far, offset, step, count, bits, resolution, capacity
                          ) -> FixedSamples:
    """Plain PyTorch :func:`march_fixed` (dense candidate grid; same arguments and result)."""
    r, dev = origins.shape[0], origins.device
    t = sample_grid(t_near, step, 0, count, offset.reshape(-1, 1))
    x = origins[:, None, :] + t[..., None] * dirs[:, None, :]
    g = ((x + 1.0) * (0.5 * resolution)).floor().long()
    inside = ((g >= 0) & (g < resolution)).all(-1)
    g = g.clamp(0, resolution - 1)
    occ = bits[g[..., 0] + resolution * (g[..., 1] + resolution * g[..., 2])] != 0
    mask = (t < t_far[:, None]) & inside & occ
    counts = mask.sum(1)
    kept = counts.cumsum(0) <= capacity
    mask &= kept[:, None]
    counts = torch.where(kept, counts, 0)
    used = counts.sum()
    ray_id = mask.nonzero()[:, 0]
    m = ray_id.shape[0]
    out_t = torch.zeros(capacity, dtype=torch.float32, device=dev)
    out_x = torch.zeros(capacity, 3, dtype=torch.float32, device=dev)
    out_ray = torch.full((capacity,), r, dtype=torch.long, device=dev)
    out_t[:m], out_x[:m], out_ray[:m] = t[mask], x[mask], ray_id
    return FixedSamples(out_t, out_x, out_ray, counts.long(), kept, used.long())


def transmittance_fixed(sigmas: torch.Tensor, step: float, samples: FixedSamples) -> torch.Tensor:
    """Transmittance (S,) float32 in front of each slot of :func:`march_fixed` (1 in unused slots).

    Args:
        sigmas: (S,) float32 densities of the slots.
    """
    valid, _, before = _optical_depth(sigmas, step, samples)
    return torch.where(valid, torch.exp(-before), 1.0)


def _optical_depth(sigmas: torch.Tensor, step: float, samples: FixedSamples):
    """(valid (S,) bool, tau (S,), optical depth in front of each slot along its ray (S,)), the
    sums in float64 (they run over the whole batch before each ray's start is subtracted)."""
    valid = samples.ray < samples.counts.shape[0]
    tau = torch.where(valid, sigmas * step, 0.0)
    before = torch.cumsum(tau.double(), 0) - tau.double()
    return valid, tau, (before - before[_ray_first_slot(samples)]).to(tau.dtype)


def _ray_first_slot(samples: FixedSamples) -> torch.Tensor:
    """(S,) int64: the slot of the first sample of each slot's ray; an unused slot points at
    itself (so that the gather's backward does not pile every unused slot onto one row)."""
    r = samples.counts.shape[0]
    starts = samples.counts.cumsum(0) - samples.counts
    slot = torch.arange(samples.ray.shape[0], device=samples.ray.device)
    own = torch.cat([starts, starts.new_zeros(1)])[samples.ray]
    return torch.where(samples.ray < r, own, slot)


def terminate_fixed(samples: FixedSamples, transmittance: torch.Tensor, capacity: int,
                    min_transmittance: float = 1e-4) -> FixedSamples:
    """Early ray termination of fixed-slot samples, repacked into ``capacity`` slots.

    Keeps each ray's samples while the transmittance in front of them is above
    ``min_transmittance`` (a prefix of the ray: transmittance only falls), then packs rays in
    order while they fit, as :func:`march_fixed` does.  No host synchronisation.

    Args:
        samples: (S1 slots) from :func:`march_fixed`.  transmittance: (S1,) float32 from
            :func:`transmittance_fixed` with the field's densities.
    Returns:
        FixedSamples with ``capacity`` slots over the same rays.
    """
    r, dev, m = samples.counts.shape[0], samples.t.device, samples.t.shape[0]
    keep = (samples.ray < r) & (transmittance > min_transmittance)
    slot = torch.arange(m, device=dev)
    # Kept samples are a prefix of each ray's: the last kept one of a ray writes the ray's count.
    # (Scatters below send what they drop to distinct spare slots: piling millions of writes onto
    # one address serialises them.)
    same_next = torch.cat([samples.ray[1:] == samples.ray[:-1], keep.new_zeros(1)])
    last = keep & ~(torch.cat([keep[1:], keep.new_zeros(1)]) & same_next)
    old_starts = torch.cat([samples.counts.cumsum(0) - samples.counts, slot.new_zeros(1)])
    counts = torch.zeros(r + m, dtype=torch.long, device=dev).index_copy_(
        0, torch.where(last, samples.ray, r + slot), slot - old_starts[samples.ray] + 1)[:r]
    ends = counts.cumsum(0)
    kept = samples.kept & (ends <= capacity)
    counts = torch.where(kept, counts, 0)
    new_starts = torch.cat([ends - counts, ends.new_zeros(1)])
    pos = new_starts[samples.ray] + (slot - old_starts[samples.ray])
    kept_ext = torch.cat([kept, kept.new_zeros(1)])
    pos = torch.where(keep & kept_ext[samples.ray], pos, capacity + slot)      # spare slots
    t = torch.zeros(capacity + m, dtype=samples.t.dtype, device=dev).index_copy_(0, pos, samples.t)
    x = torch.zeros(capacity + m, 3, dtype=samples.x.dtype, device=dev).index_copy_(0, pos, samples.x)
    ray = torch.full((capacity + m,), r, dtype=torch.long, device=dev).index_copy_(0, pos, samples.ray)
    return FixedSamples(t[:capacity], x[:capacity], ray[:capacity], counts, kept, counts.sum())


def scatter_index(samples: FixedSamples) -> torch.Tensor:
    """(S,) int64 ray ids with each unused slot sent to its own spare row ``R + slot``, for
    ``index_add`` into (R + S, ...) buffers without piling atomics onto one row."""
    r = samples.counts.shape[0]
    slot = torch.arange(samples.ray.shape[0], device=samples.ray.device)
    return torch.where(samples.ray < r, samples.ray, r + slot)


def composite_fixed(sigmas: torch.Tensor, step: float, samples: FixedSamples) -> torch.Tensor:
    """Compositing weights (S,) float32 of :func:`march_fixed`'s slots (0 in unused ones).

    Args:
        sigmas: (S,) float32 densities of the slots (those of unused slots are ignored).
    """
    valid, tau, before = _optical_depth(sigmas, step, samples)
    return torch.where(valid, torch.exp(-before) * (1.0 - torch.exp(-tau)), 0.0)


def distortion_fixed(weights: torch.Tensor, step: float, samples: FixedSamples) -> torch.Tensor:
    """:func:`distortion` (R,) of each ray of :func:`march_fixed`'s slots, from their weights (S,)
    (:func:`composite_fixed`)."""
    r = samples.counts.shape[0]
    return distortion(weights, samples.t, step, _ray_first_slot(samples), scatter_index(samples),
                      r + samples.ray.shape[0])[:r]


def composite_packed(sigmas: torch.Tensor, deltas: float | torch.Tensor, ray: torch.Tensor,
                     counts: torch.Tensor) -> torch.Tensor:
    """Compositing weights of packed samples (those of each ray contiguous, in order).

    Args:
        sigmas: (M,) float32.  deltas: number or (M,) float32.  ray: (M,) int64 ray ids.
        counts: (R,) int64 samples per ray (sum M).
    Returns:
        weights (M,) float32, as :func:`composite` gives for each ray.
    """
    tau = sigmas * deltas
    total = torch.cumsum(tau.double(), 0)       # float64: the sum runs over every ray of the batch
    before = total - tau.double()
    starts = (counts.cumsum(0) - counts).clamp(max=max(tau.shape[0] - 1, 0))
    before = (before - before[starts].index_select(0, ray)).to(tau.dtype)
    return torch.exp(-before) * (1.0 - torch.exp(-tau))


def _march_bits(occupied_fn) -> tuple[torch.Tensor, int] | None:
    owner = getattr(occupied_fn, "__self__", None)
    bits = getattr(owner, "march_bits", None)
    return bits() if callable(bits) else None


def render_rays(field_fn: FieldFn, occupied_fn: OccupiedFn, origins: torch.Tensor, dirs: torch.Tensor,
                aabb: torch.Tensor, step: float, max_steps: int,
                jitter: torch.Tensor | None = None, times: torch.Tensor | None = None,
                with_distortion: bool = False) -> RayOutput:
    """Render rays in one pass, differentiably (training).

    Args:
        origins, dirs: (R, 3) float32, dirs unit.  aabb: (2, 3) float32.
        step: distance between samples.  max_steps: most samples a ray can take.
        jitter: (R, 1) float32 in [0, 1): random shift of every ray's sample grid, or None (0.5).
        times: (R,) float32 time of each ray (a dynamic field: ``field_fn(x, d, time)``), or None.
        with_distortion: also each ray's :func:`distortion` (``RayOutput.distortion``).
    """
    r = origins.shape[0]
    t_near, t_far, hit = ray_aabb(origins, dirs, aabb)
    t_far = torch.where(hit, t_far, t_near)
    span = float((t_far - t_near).detach().max()) if r else 0.0
    count = min(max_steps, int(span / step) + 1)
    zeros = origins.new_zeros(r)
    if r == 0 or span <= 0.0:
        return RayOutput(origins.new_zeros(r, 3), zeros, zeros, 0)
    grid = _march_bits(occupied_fn) if PACKED and triton is not None and origins.is_cuda else None
    if grid is not None:
        offset = jitter if jitter is not None else origins.new_full((r, 1), 0.5)
        t, x, ray, counts = march_packed(origins, dirs, t_near, t_far, offset, step, count, *grid)
        if t.shape[0] == 0:
            return RayOutput(origins.new_zeros(r, 3), zeros, zeros, 0)
        if origins.requires_grad or dirs.requires_grad:     # refined cameras: positions carry the gradient
            x = origins.index_select(0, ray) + t[:, None] * dirs.index_select(0, ray)
        sig, rgb = field_fn(x, dirs.index_select(0, ray), *(() if times is None else (times[ray],)))
        w = composite_packed(sig.to(t.dtype), step, ray, counts)
        color = origins.new_zeros(r, 3).index_add(0, ray, w[:, None] * rgb.to(w.dtype))
        spread = distortion(w, t, step, (counts.cumsum(0) - counts)[ray], ray, r) if with_distortion else None
        return RayOutput(color, zeros.index_add(0, ray, w), zeros.index_add(0, ray, w * t), int(t.shape[0]), spread)
    t = sample_grid(t_near, step, 0, count, 0.5 if jitter is None else jitter)
    sigma, rgb, mask, ray = _query(field_fn, occupied_fn, origins, dirs, t, t_far, times=times)
    weights, _ = composite(sigma, step)
    w = weights[mask]
    color = origins.new_zeros(r, 3).index_add(0, ray, w[:, None] * rgb.to(w.dtype))
    spread = None
    if with_distortion:         # the dense grid, row after row (empty candidates weigh 0)
        rows = torch.arange(r, device=t.device).repeat_interleave(count)
        spread = distortion(weights.reshape(-1), t.reshape(-1), step, rows * count, rows, r)
    return RayOutput(color, weights.sum(-1), (weights * t).sum(-1), int(ray.shape[0]), spread)


@torch.no_grad()
def render_rays_segmented(field_fn: FieldFn, occupied_fn: OccupiedFn, origins: torch.Tensor,
                          dirs: torch.Tensor, aabb: torch.Tensor, step: float, max_steps: int,
                          segment: int = 64, min_transmittance: float = 1e-4,
                          split: tuple[Callable, Callable] | None = None, min_weight: float = 1e-4) -> RayOutput:
    """Render rays ``segment`` samples at a time, dropping rays once they are opaque (inference).

    Same arguments and result as :func:`render_rays` (no jitter); gives the same values up to
    the contribution of samples behind ``min_transmittance``.  ``split``: the field as
    ``(geometry(x) -> (sigma, features), colour(features, d) -> rgb)``; then colour is evaluated
    only for samples whose weight is at least ``min_weight`` (their colour changes a pixel by
    less than that; opacity and depth are exact).
    """
    r = origins.shape[0]
    t_near, t_far, hit = ray_aabb(origins, dirs, aabb)
    color, opacity, depth = origins.new_zeros(r, 3), origins.new_zeros(r), origins.new_zeros(r)
    optical = origins.new_zeros(r)
    active = hit.nonzero()[:, 0]
    first, samples = 0, 0
    max_optical = -math.log(min_transmittance) if min_transmittance > 0 else math.inf
    while active.numel() and first < max_steps:
        count = min(segment, max_steps - first)
        o, d, tn, tf = origins[active], dirs[active], t_near[active], t_far[active]
        t = sample_grid(tn, step, first, count)
        if split is None:
            sigma, rgb, mask, ray = _query(field_fn, occupied_fn, o, d, t, tf)
        else:
            sigma, features, mask, ray = _query(split[0], occupied_fn, o, d, t, tf, positions_only=True)
        if ray.numel():
            weights, after = composite(sigma, step, optical[active])
            w = weights[mask]
            if split is not None:       # colour only where it shows
                keep = (w >= min_weight).nonzero()[:, 0]
                w, ray_c = w[keep], ray[keep]
                rgb = split[1](features[keep], d[ray_c]) if keep.numel() else w.new_zeros(0, 3)
            else:
                ray_c = ray
            color.index_add_(0, active, torch.zeros_like(o).index_add_(0, ray_c, w[:, None] * rgb.to(w.dtype)))
            opacity.index_add_(0, active, weights.sum(-1))
            depth.index_add_(0, active, (weights * t).sum(-1))
            optical[active] = after
            samples += int(ray.shape[0])
        first += count
        alive = (t[:, -1] + step < tf) & (optical[active] < max_optical)
        active = active[alive]
    return RayOutput(color, opacity, depth, samples)
