"""Surfaces from scans: this project's fit to points against screened Poisson reconstruction, on
the same points (issue 16; docs/benchmarks.md "Surfaces from points").

Each case is an analytic shape (benchmarks/point_cases.py) scanned from a few viewpoints with
range noise, holes where no viewpoint looks and a share of outliers.  Both methods get the same
points; with ``--unoriented`` neither gets the true normals (Poisson then estimates and orients
them itself, as a user of Open3D would; the fit is sign-agnostic).  Scored against the true
surface: Chamfer distance and F-score at 1 % of the diagonal (backend/fitting/metrics.py), normal
consistency (mean |cos| between each result triangle's normal and the true normal at its
nearest true point), and time.

Screened Poisson is Open3D's (``create_from_point_cloud_poisson``, depth ``--poisson-depth``,
the lowest ``--poisson-trim`` quantile of its density removed, as its tutorial does): a
benchmark-only dependency (``pip install open3d``), never the project's.  Ours is closed
(a watertight asset) where Poisson's trim opens holes; ``--trim D`` also scores ours with the
faces farther than D (a share of the diagonal) from every scan point removed, the like-for-like
comparison on a real scan whose reference itself has holes (the bunny's base).

    python benchmarks/points_vs_poisson.py --device cuda --out points.json
    python benchmarks/points_vs_poisson.py --device cpu --preset draft --cases sphere,torus
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import point_cases  # noqa: E402  (benchmarks/point_cases.py)


def normal_consistency(shape: point_cases.Shape | None, verts: np.ndarray, faces: np.ndarray, truth,
                       count: int = 40000) -> float:
    """Mean |cos| between the result's face normals at area-uniform samples and the true normals
    there: the shape's SDF gradient (exact near the surface), or for a real scan (``shape`` None)
    the normal of the nearest of 200k samples of the truth mesh."""
    from scipy.spatial import cKDTree

    from fit_implicit.backend.fitting.point_cloud import mesh_surface_points

    pts, nrm, _ = mesh_surface_points(verts, faces, count, seed=3)
    if shape is not None:
        true = point_cases.gradient(shape, pts)
    else:
        tp, tn, _ = mesh_surface_points(*truth, 200_000, seed=4)
        true = tn[cKDTree(tp).query(pts)[1]]
    return float(np.abs(np.einsum("ij,ij->i", nrm, true)).mean())


def score(shape, verts, faces, truth) -> dict:
    from fit_implicit.backend.fitting.metrics import chamfer

    tv, tf = truth
    diag = float(np.linalg.norm(tv.max(0) - tv.min(0)))
    if not len(faces):
        return {"chamfer_pct": None, "fscore": 0.0, "normal_consistency": None, "faces": 0}
    c = chamfer(tv, tf, verts, faces, samples=100_000)
    return {"chamfer_pct": round(100 * c["chamfer"] / diag, 4), "fscore": round(c["fscore"], 4),
            "accuracy_pct": round(100 * c["accuracy"] / diag, 4), "completeness_pct": round(100 * c["completeness"] / diag, 4),
            "normal_consistency": round(normal_consistency(shape, verts, faces, truth), 4), "faces": int(len(faces))}


def observed_scores(pts: np.ndarray, verts: np.ndarray, faces: np.ndarray, truth) -> dict:
    """For a real scan, whose truth has holes where no scan looked (the bunny's base): Chamfer and
    F-score at 1 % of the diagonal judging the result's accuracy only where the scan observed the
    object (result samples within 1 % of the diagonal of an input point), as DTU's evaluation masks
    unobserved space; completeness over the whole truth."""
    from scipy.spatial import cKDTree

    from fit_implicit.backend.fitting.point_cloud import mesh_surface_points

    tv, tf = truth
    diag = float(np.linalg.norm(tv.max(0) - tv.min(0)))
    ours, _, _ = mesh_surface_points(verts, faces, 100_000, seed=5)
    true, _, _ = mesh_surface_points(tv, tf, 100_000, seed=6)
    seen = cKDTree(pts).query(ours)[0] <= 0.01 * diag
    to_truth = cKDTree(true).query(ours[seen])[0]
    to_ours = cKDTree(ours).query(true)[0]
    precision, recall = float((to_truth <= 0.01 * diag).mean()), float((to_ours <= 0.01 * diag).mean())
    return {"observed_chamfer_pct": round(50 * (to_truth.mean() + to_ours.mean()) / diag, 4),
            "observed_fscore": round(2 * precision * recall / max(precision + recall, 1e-12), 4),
            "observed_share": round(float(seen.mean()), 4)}


def run_ours(pts, nrm, args) -> tuple[np.ndarray, np.ndarray, dict]:
    import torch

    from fit_implicit.backend.export.mesh import extract_mesh
    from fit_implicit.backend.fitting.point_cloud import make_cloud
    from fit_implicit.backend.fitting.points_fit import fit_points, points_config

    cfg = points_config(args.preset, device=args.device, steps=args.steps, seconds=args.seconds)
    cfg.set(**cfg.parse(args.set))
    t0 = time.perf_counter()
    model = fit_points(make_cloud(pts, nrm), cfg)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t0
    verts, faces, _ = extract_mesh(model, args.resolution)
    total = time.perf_counter() - t0
    if args.trim > 0:                     # the surface no scan point supports, removed (see the module doc)
        verts, faces = trim_unsupported(verts, faces, pts, args.trim)
    return verts, faces, {"fit_s": round(fit_s, 2), "seconds": round(total, 2), "steps": model.meta["steps"],
                          "outliers_removed": model.meta["points"].get("outliers_removed", 0)}


def trim_unsupported(verts: np.ndarray, faces: np.ndarray, pts: np.ndarray, share: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``faces`` without those whose three corners all lie farther than ``share`` of the points'
    diagonal from every point of ``pts`` (vertices kept: unused ones do not count in the scores)."""
    from scipy.spatial import cKDTree

    reach = share * float(np.linalg.norm(pts.max(0) - pts.min(0)))
    far = cKDTree(pts).query(verts, workers=-1)[0] > reach
    return verts, faces[~far[faces].all(1)]


def run_poisson(pts, nrm, args) -> tuple[np.ndarray, np.ndarray, dict]:
    import open3d as o3d

    t0 = time.perf_counter()
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(pts))
    if nrm is not None:
        pcd.normals = o3d.utility.Vector3dVector(nrm.astype(np.float64))
    else:
        pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(30))
        pcd.orient_normals_consistent_tangent_plane(30)
    mesh, density = o3d.geometry.TriangleMesh.create_from_point_cloud_poisson(pcd, depth=args.poisson_depth)
    density = np.asarray(density)
    if args.poisson_trim > 0:
        mesh.remove_vertices_by_mask(density < np.quantile(density, args.poisson_trim))
    return (np.asarray(mesh.vertices), np.asarray(mesh.triangles),
            {"seconds": round(time.perf_counter() - t0, 2)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="sphere,torus,rounded_box,thin_plate",
                    help="shapes (point_cases.SHAPES), or bunny: the Stanford bunny's real range scans (--bunny)")
    ap.add_argument("--bunny", default=".data/bunny", help="folder of the bunny's scans (point_cases.stanford_bunny)")
    ap.add_argument("--views", type=int, default=6, help="scanner positions around each shape")
    ap.add_argument("--rays", type=int, default=160, help="rays a side per view (160: ~60k points a case)")
    ap.add_argument("--noise", type=float, default=0.003, help="range noise, world units (shapes ~1.5 across)")
    ap.add_argument("--outliers", type=float, default=0.02, help="share of outliers over 1.5x the box")
    ap.add_argument("--unoriented", action="store_true", help="give neither method the true normals")
    ap.add_argument("--device", default=None)
    ap.add_argument("--preset", default="standard")
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=0.0)
    ap.add_argument("--resolution", type=int, default=256, help="our marching-cubes grid")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--trim", type=float, default=0.0, metavar="D",
                    help="ours: drop faces farther than D (share of the diagonal) from every scan point (0: none)")
    ap.add_argument("--poisson-depth", type=int, default=9)
    ap.add_argument("--poisson-trim", type=float, default=0.02, help="density quantile removed (0: none)")
    ap.add_argument("--no-poisson", action="store_true", help="ours only (Open3D not installed)")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args()
    rows = []
    for name in args.cases.split(","):
        if name == "bunny":         # a real scan: no normals, the zippered reconstruction as the truth
            shape, nrm = None, None
            pts, truth = point_cases.stanford_bunny(args.bunny)
        else:
            shape = point_cases.SHAPES[name]()
            pts, nrm = point_cases.scan(shape, point_cases.viewpoints(shape, args.views), rays=args.rays,
                                        noise=args.noise, outliers=args.outliers)
            truth = point_cases.truth(shape, 256)
        given = None if args.unoriented else nrm
        methods = [("ours", run_ours)] + ([] if args.no_poisson else [("poisson", run_poisson)])
        for method, fn in methods:
            verts, faces, facts = fn(pts, given, args)
            row = {"case": name, "method": method, "points": len(pts), "oriented": given is not None,
                   **score(shape, verts, faces, truth), **facts}
            if shape is None:
                row.update(observed_scores(pts, verts, faces, truth))
            rows.append(row)
            print(f"{name:>12} {method:>8} {len(pts):>7} pts  chamfer {row['chamfer_pct']} %  F {row['fscore']}  "
                  f"normals {row['normal_consistency']}  {row['seconds']} s  {row['faces']} faces"
                  + (f"  (observed: chamfer {row['observed_chamfer_pct']} %  F {row['observed_fscore']})"
                     if shape is None else ""), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
