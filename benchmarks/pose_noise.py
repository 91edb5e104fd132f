"""Perturbed cameras for the pose-refinement benchmark (issue 15, BARF's protocol), used by
benchmarks/lego.py ``--pose-noise``.

* :func:`perturb`: each camera-to-world pose gets a random rotation about its own centre and a
  random shift, both drawn per component from N(0, sigma^2) (radians and scene units), as BARF
  perturbs NeRF-synthetic's cameras (sigma 0.15: about 14 degrees and 0.24 units on average).
* :func:`align`: the similarity (scale, rotation, shift) that best maps the true camera centres
  onto the estimated ones (Umeyama's least squares): refinement is free of the gauge (what moves
  every camera together), so estimates are compared after it, as BARF does.
* :func:`errors`: mean, median and largest rotation error (degrees), the share of cameras within
  1 degree, and mean centre error (scene units) of estimated poses against true ones, after that
  alignment.
* :func:`refine_view`: a held-out view's pose fitted against the frozen field (BARF scores its
  held-out views after this test-time optimisation, from the aligned poses; lego.py
  ``--refine-test-poses``).

Poses are (N, 4, 4) float64 camera-to-world matrices (Blender's camera convention; only the
rotation block and the centre matter here).
"""
from __future__ import annotations

import numpy as np


def rotations(axis_angles: np.ndarray) -> np.ndarray:
    """(N, 3) rotation vectors (radians) -> (N, 3, 3) rotation matrices (Rodrigues)."""
    w = np.asarray(axis_angles, dtype=np.float64)
    angle = np.linalg.norm(w, axis=-1, keepdims=True)
    k = w / np.maximum(angle, 1e-12)
    kx = np.zeros(w.shape[:-1] + (3, 3))
    kx[..., 0, 1], kx[..., 0, 2], kx[..., 1, 2] = -k[..., 2], k[..., 1], -k[..., 0]
    kx = kx - np.swapaxes(kx, -1, -2)
    s, c = np.sin(angle)[..., None], np.cos(angle)[..., None]
    return np.eye(3) + s * kx + (1.0 - c) * (kx @ kx)


def perturb(poses: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """``poses`` with each camera turned about its centre by N(0, sigma^2) per rotation-vector
    component (radians) and shifted by N(0, sigma^2) per axis (scene units)."""
    poses = np.array(poses, dtype=np.float64, copy=True)
    if sigma <= 0:
        return poses
    rng = np.random.default_rng(seed)
    n = len(poses)
    turn = rotations(rng.normal(0.0, sigma, (n, 3)))
    poses[:, :3, :3] = turn @ poses[:, :3, :3]
    poses[:, :3, 3] += rng.normal(0.0, sigma, (n, 3))
    return poses


def align(true: np.ndarray, estimated: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(scale s, rotation R (3, 3), shift t (3,)) minimising sum |s R c_true + t - c_est|^2 over
    the camera centres (Umeyama 1991).  Needs three or more cameras not on one line."""
    a = np.asarray(true, dtype=np.float64)[:, :3, 3]
    b = np.asarray(estimated, dtype=np.float64)[:, :3, 3]
    if len(a) < 3:
        raise ValueError(f"aligning cameras needs at least 3 of them, got {len(a)}")
    ma, mb = a.mean(0), b.mean(0)
    da, db = a - ma, b - mb
    cov = db.T @ da / len(a)
    u, d, vt = np.linalg.svd(cov)
    fix = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        fix[2, 2] = -1.0
    rot = u @ fix @ vt
    var = float((da ** 2).sum() / len(a))
    if var <= 0:
        raise ValueError("the cameras' centres coincide: nothing to align")
    scale = float(np.trace(np.diag(d) @ fix) / var)
    return scale, rot, mb - scale * rot @ ma


def apply(poses: np.ndarray, scale: float, rot: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """``poses`` moved by the similarity: orientation R @ R_cam, centre s R c + t."""
    out = np.array(poses, dtype=np.float64, copy=True)
    out[:, :3, :3] = rot @ out[:, :3, :3]
    out[:, :3, 3] = scale * out[:, :3, 3] @ rot.T + shift
    return out


def turn_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) degrees between the orientations of two stacks of poses (N, 4, 4)."""
    rel = np.swapaxes(np.asarray(a, np.float64)[:, :3, :3], -1, -2) @ np.asarray(b, np.float64)[:, :3, :3]
    return np.degrees(np.arccos(np.clip((np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)))


def errors(true: np.ndarray, estimated: np.ndarray) -> dict:
    """Mean and largest rotation error (degrees) and mean centre error (in the true poses' units)
    of ``estimated`` against ``true`` after :func:`align`."""
    scale, rot, shift = align(true, estimated)
    moved = apply(true, scale, rot, shift)
    deg = turn_deg(moved, estimated)
    centre = np.linalg.norm(moved[:, :3, 3] - np.asarray(estimated)[:, :3, 3], axis=-1) / scale
    return {"rotation_deg": round(float(deg.mean()), 4), "max_rotation_deg": round(float(deg.max()), 4),
            "median_rotation_deg": round(float(np.median(deg)), 4),
            "within_1_deg": round(float((deg <= 1.0).mean()), 4),      # share of the cameras that came back
            "centre_error": round(float(centre.mean()), 6), "scale": round(scale, 6)}


def refine_view(model, image: np.ndarray, intrinsics, pose: np.ndarray, steps: int = 150, rays: int = 4096,
                lr: float = 2e-3, seed: int = 0) -> np.ndarray:
    """``pose`` (4, 4) refined against ``image`` ((H, W, 4) uint8, straight alpha) with the field
    frozen: BARF's test-time photometric optimisation of a held-out view's pose (a turn about the
    camera's centre and a shift, as fitting/camera_refine.py corrects training cameras), Adam on
    ``rays`` random pixels a step, both on white, the rate falling to a tenth along a cosine."""
    import torch

    from fit_implicit.backend.fitting.camera_refine import rotation_matrices
    from fit_implicit.backend.fitting.data import camera_rays

    dev = model.device
    h, w = image.shape[:2]
    rays = min(int(rays), h * w)            # no more rays a step than the view has pixels
    target = torch.from_numpy(np.ascontiguousarray(image)).to(dev).float().reshape(-1, 4) / 255.0
    target = target[:, :3] * target[:, 3:] + (1.0 - target[:, 3:])
    k = torch.tensor(np.asarray(intrinsics, np.float64), dtype=torch.float32, device=dev)
    c2w = torch.tensor(np.asarray(pose, np.float64), dtype=torch.float32, device=dev)
    delta = torch.zeros(6, device=dev, requires_grad=True)          # rotation vector, shift (world units)
    opt = torch.optim.Adam([delta], lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    frozen = [p for p in model.field.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        for step in range(int(steps)):
            for group in opt.param_groups:
                group["lr"] = lr * (0.1 + 0.45 * (1.0 + np.cos(np.pi * step / max(steps, 1))))
            pix = torch.randint(0, h * w, (rays,), generator=gen).to(dev)
            u, v = (pix % w).float() + 0.5, (pix // w).float() + 0.5
            o, d = camera_rays(k.expand(rays, 4), c2w.expand(rays, 4, 4), u, v)
            rot = rotation_matrices(delta[None, :3])[0]
            out = model.trace(o + delta[3:], d @ rot.T, differentiable=True)
            pred = out.rgb + (1.0 - out.opacity[:, None])
            loss = ((pred - target[pix]) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        rot = rotation_matrices(delta[None, :3].double())[0].cpu().numpy()
        shift = delta[3:].double().cpu().numpy()
    out = np.array(pose, dtype=np.float64, copy=True)
    out[:3, :3] = rot @ out[:3, :3]
    out[:3, 3] = out[:3, 3] + shift
    return out
