"""Pay a backend process's one-time costs before its first job.

The first fit in a process pays for things no later fit pays for again: the CUDA context, the
import of torch's compiler stack (``torch.optim`` pulls in ``torch._dynamo``: 2-4 s), loading or
compiling the Triton kernels, cuBLAS set-up and the first CUDA-graph capture.  On a GPU that is
5-7 s, against 0.3 s from a job's arrival to its first preview afterwards (docs/benchmarks.md).
The server runs :func:`warm_up` on its job worker before it takes the first job, so an artist's
first fit starts as fast as the later ones.
"""
from __future__ import annotations

import logging
import time

import numpy as np

log = logging.getLogger(__name__)


def tiny_scene(views: int = 4, size: int = 32):
    """A grey ball seen by ``views`` cameras on a ring: (images, intrinsics, poses, aabb)."""
    from fit_implicit.shared import cameras

    center = np.zeros(3)
    positions = cameras.ring_positions(center, 3.0, views, elevations_deg=(20.0,))
    poses = np.stack([cameras.look_at(p, center) for p in positions])
    k = cameras.intrinsics_from_fov(0.8, size, size)
    images = np.zeros((views, size, size, 4), np.uint8)
    for i, pose in enumerate(poses):
        o, d = cameras.pixel_rays(k, pose, size, size)
        b = np.einsum("hwc,hwc->hw", o - center, d)
        hit = b * b - (np.einsum("hwc,hwc->hw", o - center, o - center) - 0.5 ** 2) >= 0
        images[i][hit] = (160, 160, 160, 255)
    return images, np.repeat(k[None], views, 0), poses, np.array([[-1.0, -1, -1], [1, 1, 1]])


def warm_up(device: str, preset: str = "standard", steps: int = 12) -> float:
    """Fit a tiny scene for a few steps with a preview on ``device``; returns the seconds taken.

    Runs every code path of a real fit that has a first-use cost (same preset, so the same
    kernel specialisations).  Only worth it on CUDA; a no-op elsewhere.
    """
    if not str(device).startswith("cuda"):
        return 0.0
    start = time.perf_counter()
    from fit_implicit.backend.fitting.config import make_config
    from fit_implicit.backend.fitting.data import PosedImages
    from fit_implicit.backend.fitting.loop import fit

    images, ks, poses, aabb = tiny_scene()
    data = PosedImages(images, ks, poses, aabb, [f"warm_{i}" for i in range(len(images))])
    cfg = make_config("nerf", preset, device=device, steps=steps, preview_size=32, preview_interval=0.05)
    model = fit(data, cfg)
    model.render(ks[0], poses[0], 32, 32)
    del model
    import torch

    torch.cuda.empty_cache()
    seconds = time.perf_counter() - start
    log.info("warmed up on %s in %.1f s", device, seconds)
    return seconds
