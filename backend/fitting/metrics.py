"""Quality measures with the conventions of docs/benchmarks.md (numpy and scipy only).

* PSNR on 8-bit sRGB in [0, 1], prediction and target composited on white (:func:`psnr_white`,
  from shared/quality.py; :func:`evaluate` scores a model's renders of a dataset's views that way);
  SSIM the same way (:func:`ssim_white`).
* Chamfer distance: mean of both directions over area-uniform surface samples, and F-score at
  a distance threshold (1% of the ground-truth bounding-box diagonal by default).
"""
from __future__ import annotations

import numpy as np

from fit_implicit.backend.fitting.point_cloud import mesh_surface_points
from fit_implicit.backend.render.image import to_rgba8
from fit_implicit.shared.quality import on_white, psnr, psnr_white  # noqa: F401 - re-exported


def ssim_white(pred: np.ndarray, target: np.ndarray) -> float:
    """SSIM of two (H,W,4|3) uint8 images, both on white and rounded to 8 bits as for
    :func:`psnr_white` (scikit-image, Gaussian window of sigma 1.5 as in the NeRF papers' tables)."""
    from skimage.metrics import structural_similarity

    if pred.shape[:2] != target.shape[:2]:
        raise ValueError(f"image sizes differ: {pred.shape[:2]} vs {target.shape[:2]}")
    p = np.round(on_white(pred) * 255.0) / 255.0
    t = np.round(on_white(target) * 255.0) / 255.0
    if min(p.shape[:2]) < 7:
        raise ValueError(f"SSIM needs images of at least 7x7 pixels, got {p.shape[1]}x{p.shape[0]}")
    return float(structural_similarity(p, t, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


def evaluate(model, data, supersample: int = 1) -> list[float]:
    """:func:`psnr_white` of each view of ``data`` (a PosedImages) rendered by ``model`` (a
    FittedField, ``supersample`` x ``supersample`` rays a pixel, at the view's time) against the view's image."""
    return [psnr_white(to_rgba8(model.render(data.intrinsics[i], data.poses[i], *data.size(i), supersample=supersample,
                                             time=data.time(i))), data.image(i)) for i in range(len(data))]


def sample_surface(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` points (count, 3) uniformly by area on a triangle mesh (V,3) / (F,3)."""
    return mesh_surface_points(vertices, faces, count, seed)[0]


def chamfer(ref_vertices, ref_faces, vertices, faces, samples: int = 200_000,
            threshold: float | None = None, views=None) -> dict:
    """Chamfer distance and F-score between a reference mesh and a result mesh (world units).

    Returns a dict: chamfer (mean of both directions), accuracy (result -> reference),
    completeness (reference -> result), fscore, threshold (default 1% of the reference box
    diagonal).  With ``views`` (the training cameras: PosedImages or export.unseen.Views) also
    the same over what the cameras see, as "seen_chamfer", "seen_accuracy", "seen_completeness",
    "seen_fscore": each mesh's samples that some view sees on that mesh (export/unseen.py
    visible_points), against all of the other mesh.
    """
    from scipy.spatial import cKDTree

    ref = sample_surface(ref_vertices, ref_faces, samples, seed=1)
    out = sample_surface(vertices, faces, samples, seed=2)
    if threshold is None:
        threshold = 0.01 * float(np.linalg.norm(ref.max(0) - ref.min(0)))
    d_out, _ = cKDTree(ref).query(out, workers=-1)     # accuracy
    d_ref, _ = cKDTree(out).query(ref, workers=-1)     # completeness
    result = {**_scores(d_out, d_ref, threshold), "threshold": threshold}
    if views is not None:
        from fit_implicit.backend.export.unseen import visible_points

        seen_out = visible_points(out, vertices, faces, views)
        seen_ref = visible_points(ref, ref_vertices, ref_faces, views)
        if seen_out.any() and seen_ref.any():
            seen = _scores(d_out[seen_out], d_ref[seen_ref], threshold)
            result.update({f"seen_{k}": v for k, v in seen.items()})
        result["seen_share"] = float(seen_ref.mean())
    return result


def _scores(d_out: np.ndarray, d_ref: np.ndarray, threshold: float) -> dict:
    precision = float(np.mean(d_out < threshold))
    recall = float(np.mean(d_ref < threshold))
    fscore = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"chamfer": 0.5 * float(d_out.mean() + d_ref.mean()), "accuracy": float(d_out.mean()),
            "completeness": float(d_ref.mean()), "fscore": fscore}
