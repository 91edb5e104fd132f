"""Camera refinement (issue 15, item 2): each training photo's pose corrected while the field is
fitted, as iNeRF and BARF do, for poses from COLMAP, a phone or a tracker that are close but not
exact.

Each photo has a correction in the WORLD frame: a rotation (a rotation vector, radians) about
its own camera centre and a shift of that centre (in units of the box's half-size, so one
learning rate suits every scene); rays move as the camera does: ``d' = R d``, ``o' = o + t``.
The corrections are kept free of what a similarity of the whole capture (a rotation about the
box's centre, a shift, a scale) would do to the views: the field could follow any of those
instead.  "What it does to the views" is measured as the photos see it: the angles by which
points of the box (its centre and the corners of its middle half) appear to move from each
camera.  A projection in that measure, not in the corrections' own numbers, is what keeps the
field where the capture put it: from exact poses, cameras that all turn to look a little above
the centre move the views as a lift of the whole capture would, with a mean rotation of zero,
and the field followed such a mode by 0.05 box half-sizes while the held-out views, rendered from
the true cameras, fell from 31 to 18 dB (benchmarks/lego.py on the CPU proxy, docs/benchmarks.md).
Removing it keeps the refined cameras, the field and its mesh in the capture's own frame and
scale (the frame the artist's scene and the imported cameras are in).

Coarse to fine (BARF's remedy for poses that would lock onto high frequencies too early, here on
a hash grid): while poses are refined the radiance field's hash levels are faded in over the
first ``camera_anneal_share`` of the fit (NerfField.set_level_weights), and with camera_refine "on"
its grid starts coarser (fitting/config.py ``CAMERA_BASE_RES``); surface fields bring their levels
in on their own schedule already (fitting/surface_trainer.py, ``start_levels``).  The eager and the
CUDA-graph steps both refine (fitting/graph_trainer.py).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def rotation_matrices(w: torch.Tensor) -> torch.Tensor:
    """(K, 3) rotation vectors -> (K, 3, 3) rotation matrices (Rodrigues; exact near zero)."""
    theta2 = (w * w).sum(-1, keepdim=True)[..., None]                        # (K, 1, 1)
    theta = theta2.clamp_min(1e-12).sqrt()
    small = theta2 < 1e-8
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(1e-12))
    x, y, z = w.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(-1, 3, 3)
    eye = torch.eye(3, dtype=w.dtype, device=w.device).expand_as(k)
    return eye + a * k + b * (k @ k)


def gauge_projection(centres: np.ndarray, scale: float, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a similarity of the whole capture does to the corrections, and how to find it in them.

    A correction ``x_i`` = (rotation vector, shift / scale) of camera ``i`` moves the views of a
    point ``p`` by the angle ``P ((p - c_i) x w - t) / |p - c_i|`` (``P``: the plane across the line
    of sight).  Over anchor points of the box (its centre and the corners of its middle half) that
    is a measure ``M_i`` of each correction.  A similarity ``g`` (a rotation about ``centre``, a
    shift, a scale; 7 numbers in radians and box half-sizes) moves camera ``i`` by ``B_i g``.  The
    part of the corrections a similarity explains best in that measure is ``g = A sum_i B_i^T M_i
    x_i`` with ``A = (sum_i B_i^T M_i B_i)^+``; the corrections keep ``x_i - B_i g``.

    Returns (``B`` (N, 6, 7), ``A B_i^T M_i`` (N, 7, 6)), float64."""
    c = np.asarray(centres, np.float64).reshape(-1, 3)
    n = len(c)
    corners = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    anchors = centre + scale * np.concatenate([np.zeros((1, 3)), corners])      # (K, 3) world
    r = anchors[None, :, :] - c[:, None, :]                                      # (N, K, 3) camera -> anchor
    depth = np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), 0.1 * scale)
    u = r / depth
    across = np.eye(3) - u[..., :, None] * u[..., None, :]                        # (N, K, 3, 3)
    # the anchor's apparent motion: -(w x r) - t  ==  [r]x w - t ; in radians: divided by the depth
    cross = np.stack([np.cross(r, e) for e in np.eye(3)], axis=-1)              # (N, K, 3, 3) [r]x
    jac = np.concatenate([cross, -scale * np.broadcast_to(np.eye(3), cross.shape)], axis=-1)   # (N, K, 3, 6)
    jac = across @ jac / depth[..., None]
    metric = np.einsum("nkai,nkaj->nij", jac, jac)                               # (N, 6, 6)
    arm = (c - centre) / scale                                                    # box half-sizes
    basis = np.zeros((n, 6, 7))
    for axis in range(3):
        e = np.eye(3)[axis]
        basis[:, :3, axis] = e                                                    # a turn about the centre ...
        basis[:, 3:, axis] = np.cross(e, arm)                                     # ... carries the camera round
        basis[:, 3 + axis, 3 + axis] = 1.0                                        # a shift
    basis[:, 3:, 6] = arm                                                         # a scale about the centre
    weighted = np.einsum("nji,njk->nik", basis, metric)                           # (N, 7, 6) B^T M
    inverse = np.linalg.pinv(np.einsum("nij,njk->ik", weighted, basis), rcond=1e-9)
    return basis, np.einsum("ij,njk->nik", inverse, weighted)


class CameraRefiner(nn.Module):
    """Per-photo pose corrections.  ``forward(photo, origins, dirs)`` -> the rays of the
    corrected cameras (world units; ``scale`` = the box's half-size in world units)."""

    def __init__(self, count: int, centres: np.ndarray, scale: float, rotations: np.ndarray | None = None,
                 centre: np.ndarray | None = None):
        """``centres``: (N, 3) the cameras' centres (world); ``scale``: the box's half-size and
        ``centre`` its centre (world; None: the origin); ``rotations``: (N, 3, 3) the cameras'
        rotations, given to refine the focal length too."""
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(int(count), 6))               # rotation vector, shift / scale
        # The focal length too (camera_refine "focal") when the cameras' rotations are given: one
        # factor exp(log_focal) for every photo (a capture's photos share a lens far more often than
        # not; one factor each would trade against each camera's distance).
        self.focal = rotations is not None
        if self.focal:
            self.log_focal = nn.Parameter(torch.zeros(()))
            self.register_buffer("rotations", torch.as_tensor(np.asarray(rotations), dtype=torch.float32),
                                 persistent=False)
        self.scale = float(scale)
        self.register_buffer("centres", torch.as_tensor(np.asarray(centres), dtype=torch.float32))
        basis, across = gauge_projection(np.asarray(centres, np.float64), self.scale,
                                         np.zeros(3) if centre is None else np.asarray(centre, np.float64))
        self.register_buffer("gauge_basis", torch.as_tensor(basis, dtype=torch.float32), persistent=False)
        self.register_buffer("gauge_across", torch.as_tensor(across, dtype=torch.float32), persistent=False)

    def corrections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rotation vectors (N, 3), world shifts (N, 3)) without the part that a similarity of
        the whole capture would explain (:func:`gauge_projection`)."""
        d = self.delta
        g = torch.einsum("nkj,nj->k", self.gauge_across, d)                   # (7,) the similarity
        d = d - torch.einsum("njk,k->nj", self.gauge_basis, g)
        return d[:, :3], d[:, 3:] * self.scale

    @torch.no_grad()
    def view_change(self, before: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(how far each camera turned since ``before`` (N,) degrees, the corrections' own numbers;
        None: since the start), the corrections now (N, 6) to compare with later)."""
        now = self.delta.detach().clone()
        was = torch.zeros_like(now) if before is None else before
        return (now[:, :3] - was[:, :3]).norm(dim=-1) * (180.0 / math.pi), now

    def penalty(self) -> torch.Tensor:
        """Mean square of the corrections (radians; box half-sizes)."""
        w, t = self.corrections()
        return (w * w).mean() + (t * t).mean() / (self.scale * self.scale)

    def forward(self, photo: torch.Tensor, origins: torch.Tensor, dirs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        w, t = self.corrections()
        if self.focal:      # in each camera's frame: a longer lens narrows the rays (x, y over -z)
            cam = self.rotations[photo]                                      # (R, 3, 3) camera to world
            local = (cam.transpose(1, 2) @ dirs[..., None])[..., 0]
            local = torch.cat([local[:, :2] * torch.exp(-self.log_focal), local[:, 2:]], dim=-1)
            dirs = (cam @ local[..., None])[..., 0]
            dirs = dirs / dirs.norm(dim=-1, keepdim=True)
        # index_select, not rot[photo]: its backward adds with atomics, where indexing's backward
        # sorts the rays by photo and sums each photo's run in one thread (30 ms a step for 4,096 rays
        # on an H100, docs/benchmarks.md "The gather's backward")
        rot = rotation_matrices(w).index_select(0, photo)                    # (R, 3, 3)
        centre = self.centres[photo]
        # A rotation about the camera's centre moves an origin off the centre (a lens-shifted
        # or distorted ray starts there too) with it; then the centre shifts.
        o = centre + (rot @ (origins - centre)[..., None])[..., 0] + t.index_select(0, photo)
        d = (rot @ dirs[..., None])[..., 0]
        return o, d

    @torch.no_grad()
    def refined_poses(self, poses: np.ndarray) -> np.ndarray:
        """(N, 4, 4) camera-to-world poses with the corrections applied (float64)."""
        w, t = self.corrections()
        rot = rotation_matrices(w).double().cpu().numpy()
        out = np.array(poses, dtype=np.float64, copy=True)
        out[:, :3, :3] = rot @ out[:, :3, :3]
        out[:, :3, 3] = out[:, :3, 3] + t.double().cpu().numpy()
        return out

    @torch.no_grad()
    def summary(self, poses: np.ndarray) -> dict:
        """How far each camera moved: rotation in degrees and shift in world units, per photo
        and as mean / largest (JSON-able, for run.json and the job's report)."""
        w, t = self.corrections()
        # the angle of each rotation (a rotation vector's length may pass pi: the same turn the other way)
        turn = w.norm(dim=-1).double().remainder(2.0 * math.pi)
        degrees = (torch.minimum(turn, 2.0 * math.pi - turn) * 180.0 / math.pi).cpu().numpy()
        shifts = t.norm(dim=-1).cpu().numpy()
        focal = {"focal_scale": round(float(torch.exp(self.log_focal)), 6)} if self.focal else {}
        return {**focal, "rotation_deg": [round(float(v), 4) for v in degrees], "shift": [round(float(v), 6) for v in shifts],
                "mean_rotation_deg": round(float(degrees.mean()), 4), "max_rotation_deg": round(float(degrees.max()), 4),
                "mean_shift": round(float(shifts.mean()), 6), "max_shift": round(float(shifts.max()), 6),
                "poses": self.refined_poses(poses).tolist()}


SETTLE_WINDOW = 100      # steps between two looks at how far the cameras turned (LevelFade)
SETTLE_SPEEDUP = 5.0     # how much faster the levels come in while the cameras are settled


class LevelFade:
    """How far a radiance field's hash levels have faded in while poses are refined, 0 to 1.

    The time schedule brings them in over ``share`` of the fit.  With ``settle`` > 0 the fade runs
    ``SETTLE_SPEEDUP`` times faster while the cameras are settled: in the last ``SETTLE_WINDOW``
    steps no camera turned by more than ``settle`` of the most its learning rate ``lr`` (radians a
    step) lets Adam turn it (``lr`` times the window; CameraRefiner.view_change).  Adam moves a
    parameter by about its rate a step when its gradient keeps one sign and by far less when the
    gradient is noise: cameras far off turn steadily towards their poses, cameras that already
    agree with the coarse field only jitter, and gain nothing from waiting for the fine levels
    (exact poses lose what the wait costs; docs/benchmarks.md "Levels that wait for the cameras").
    Never slower than the time schedule."""

    def __init__(self, share: float, settle: float = 0.0, lr: float = 0.0):
        self.share, self.settle, self.lr = float(share), float(settle), float(lr)
        self.progress, self.fraction = 0.0, 0.0
        self.done_at: float | None = None       # the fraction of the fit where every level was in
        self.settled = False
        self.seen: torch.Tensor | None = None   # the corrections at the last look
        self.seen_step = 0
        self.moves: list[tuple[int, float]] = []   # (step, the largest camera turn of the window, degrees)

    def advance(self, step: int, fraction: float, cameras: "CameraRefiner") -> float:
        """The fade's progress before step ``step`` at ``fraction`` of the fit."""
        if self.settle > 0 and step - self.seen_step >= SETTLE_WINDOW:
            turned, self.seen = cameras.view_change(self.seen)
            most = float(turned.max())                     # one look a window: the only sync it costs
            self.moves.append((int(step), round(most, 4)))
            allowed = math.degrees(self.lr * (step - self.seen_step))
            self.settled, self.seen_step = most < self.settle * allowed, int(step)
        rate = SETTLE_SPEEDUP if self.settled else 1.0
        gained = max(fraction - self.fraction, 0.0) / self.share * rate
        self.progress = min(1.0, max(self.progress + gained, fraction / self.share))
        self.fraction = fraction
        if self.progress >= 1.0 and self.done_at is None:
            self.done_at = fraction
        return self.progress

    def decay_start(self) -> float:
        """Where the corrections' learning rate starts to decay: once every level is in (the time
        schedule's ``share`` where the fade never ran: a surface field brings its own levels in)."""
        if self.fraction == 0.0:
            return self.share
        return 1.0 if self.done_at is None else self.done_at

    def state_dict(self) -> dict:
        return {"progress": self.progress, "fraction": self.fraction, "done_at": self.done_at}

    def load_state_dict(self, state: dict) -> None:
        self.progress, self.fraction = float(state["progress"]), float(state["fraction"])
        self.done_at = None if state["done_at"] is None else float(state["done_at"])


def level_fade(active: float, levels: int) -> torch.Tensor:
    """(levels,) weights of the hash levels when ``active`` of them are in (BARF's window:
    level l is off below l, fades in over [l, l + 1] with a half cosine, then stays at 1)."""
    x = (active - torch.arange(levels, dtype=torch.float32)).clamp(0.0, 1.0)
    return 0.5 * (1.0 - torch.cos(math.pi * x))
