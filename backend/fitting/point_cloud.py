"""Point clouds to fit a surface to (issue 16): :class:`PointCloud`, its checks and caps, a mesh's
surface as points, and the clean-up a scan needs before fitting (statistical outlier removal).

Every cloud that reaches a fit went through :func:`make_cloud`: finite points only (rows with a
NaN or an infinity are dropped and counted, as scanners write them for missed returns), at least
:data:`MIN_POINTS`, at most :data:`MAX_POINTS`, spread over a box that is not a point.  Normals,
where given, are unit vectors (rows of zero length or non-finite ones make the whole set unusable:
a fit then treats the cloud as unoriented).  Reading files is fitting/point_files.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MIN_POINTS = 16                 # fewer cannot pin a surface down
MAX_POINTS = 50_000_000         # ~1.2 GB as float64 xyz: far beyond a scan a fit needs (fits subsample)
NORMAL_DROP_SHARE = 0.01        # more unusable normals than this share: the cloud counts as unoriented


@dataclass
class PointCloud:
    """Points in world units.

    Attributes:
        points: (N, 3) float64.  normals: (N, 3) float32 unit vectors, or None (unoriented).
        colors: (N, 3) uint8 sRGB, or None.  facts: what reading and cleaning did (JSON-able:
        counts dropped, whether normals came from a mesh's faces, ...).
    """

    points: np.ndarray
    normals: np.ndarray | None = None
    colors: np.ndarray | None = None
    facts: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.points)

    @property
    def aabb(self) -> np.ndarray:
        """(2, 3) float64: the points' bounding box."""
        return np.stack([self.points.min(0), self.points.max(0)])

    def subset(self, keep: np.ndarray) -> "PointCloud":
        """The points where ``keep`` (bool mask or indices) selects, with their normals and colours."""
        return PointCloud(self.points[keep], None if self.normals is None else self.normals[keep],
                          None if self.colors is None else self.colors[keep], dict(self.facts))


def make_cloud(points, normals=None, colors=None, facts: dict | None = None) -> PointCloud:
    """A checked :class:`PointCloud` (see the module doc); raises ValueError saying what is wrong.

    Args:
        points: (N, 3) numbers.  normals: (N, 3) or None.  colors: (N, 3) or (N, 4) numbers, 0-255
            integers or floats in [0, 1], or None.
    """
    facts = dict(facts or {})
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must be an (N, 3) array of x, y, z, got shape {pts.shape}")
    if not np.issubdtype(pts.dtype, np.number):
        raise ValueError(f"points must be numbers, got {pts.dtype}")
    if len(pts) > MAX_POINTS:
        raise ValueError(f"{len(pts):,} points is over the cap of {MAX_POINTS:,}: thin the cloud first "
                         f"(e.g. a voxel-grid downsample)")
    pts = pts.astype(np.float64, copy=False)
    finite = np.isfinite(pts).all(axis=1)
    dropped = int(len(pts) - finite.sum())
    if dropped:
        facts["non_finite_dropped"] = dropped
    if finite.sum() < MIN_POINTS:
        what = f"{int(finite.sum())} finite point{'s' if finite.sum() != 1 else ''}"
        raise ValueError(f"need at least {MIN_POINTS} points to fit a surface, got {what}"
                         + (f" ({dropped} with NaN or infinite coordinates)" if dropped else ""))
    nrm = None
    if normals is not None:
        nrm = np.asarray(normals, dtype=np.float64)
        if nrm.shape != pts.shape:
            raise ValueError(f"normals must match the points' shape {pts.shape}, got {nrm.shape}")
        nrm = nrm[finite]
        length = np.linalg.norm(nrm, axis=1)
        bad = ~np.isfinite(length) | (length < 1e-8)
        if bad.mean() > NORMAL_DROP_SHARE:
            facts["normals_ignored"] = f"{int(bad.sum())} of {len(nrm)} normals are zero or not finite"
            nrm = None
        else:
            nrm = np.where(bad[:, None], 0.0, nrm / np.where(bad, 1.0, length)[:, None]).astype(np.float32)
    col = None
    if colors is not None:
        col = np.asarray(colors)
        if col.ndim != 2 or col.shape[0] != len(pts) or col.shape[1] not in (3, 4):
            raise ValueError(f"colours must be (N, 3) or (N, 4) for {len(pts)} points, got {col.shape}")
        col = col[finite, :3]
        if np.issubdtype(col.dtype, np.floating):
            col = np.nan_to_num(col, nan=0.0)
            col = col * 255.0 if col.size and col.max() <= 1.0 else col
        col = np.clip(np.rint(col), 0, 255).astype(np.uint8)
    pts = pts[finite]
    extent = float(np.max(pts.max(0) - pts.min(0)))
    if not extent > 0.0:
        raise ValueError(f"all {len(pts)} points are at one place {pts[0].tolist()}: no surface to fit")
    return PointCloud(pts, nrm, col, facts)


PLANE_TOLERANCE = 3.0      # remove_outliers: on its neighbours' plane within 3x the typical range noise
NOISE_SAMPLE = 20000       # points whose neighbourhoods measure that noise


def _local_pca(points: np.ndarray, neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Principal axes of each neighbourhood: ``neighbours`` (M, k) indices into ``points`` ->
    centroids (M, 3), covariance eigenvalues (M, 3) ascending and eigenvectors (M, 3, 3) (columns;
    the first is the normal of the neighbourhood's least-squares plane)."""
    near = points[neighbours]                                          # (M, k, 3)
    mid = near.mean(axis=1)
    local = near - mid[:, None]
    vals, vecs = np.linalg.eigh(np.einsum("mki,mkj->mij", local, local) / neighbours.shape[1])
    return mid, vals, vecs


def _plane_fit(points: np.ndarray, neighbours: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For points ``which`` (M,) with ``neighbours`` (M, k) indices (themselves excluded): each
    one's distance from its neighbours' least-squares plane and those neighbours' spread across it
    (the square root of their covariance's smallest eigenvalue), both (M,) in the cloud's units."""
    mid, vals, vecs = _local_pca(points, neighbours)
    residual = np.abs(np.einsum("mi,mi->m", points[which] - mid, vecs[:, :, 0]))
    return residual, np.sqrt(np.maximum(vals[:, 0], 0.0))


def remove_outliers(cloud: PointCloud, neighbours: int, std_ratio: float) -> PointCloud:
    """Statistical outlier removal: a point whose mean distance to its ``neighbours`` nearest
    points lies more than ``std_ratio`` deviations above the cloud's typical value of that
    distance is dropped (as Open3D's and PCL's filters of that name, with the median and the
    median absolute deviation (scaled to a standard deviation) in place of the mean and the
    standard deviation: the outliers themselves would inflate those).  ``std_ratio`` 0: keep all.

    Sparse is not stray: where a scanner's rays graze a surface its points are far apart but still
    on it.  A point the test flags is kept when it lies on the surface its neighbours make: they
    spread in a plane (their least spread, the square root of their covariance's smallest
    eigenvalue, at most PLANE_TOLERANCE times the range noise) and the point is within that
    tolerance of their plane.  The range noise is the lower quartile of that spread over the cloud
    (not the median: on a part thinner than a neighbourhood, a thin plate, most neighbourhoods
    straddle both faces).
    The count dropped goes to ``facts["outliers_removed"]``."""
    if std_ratio <= 0 or len(cloud) <= neighbours + 1:
        return cloud
    from scipy.spatial import cKDTree

    p = cloud.points
    dist, nn = cKDTree(p).query(p, k=neighbours + 1, workers=-1)
    mean = dist[:, 1:].mean(axis=1)
    centre = np.median(mean)
    spread = 1.4826 * np.median(np.abs(mean - centre))
    keep = mean <= centre + std_ratio * max(spread, 1e-12)
    flagged = np.flatnonzero(~keep)
    if len(flagged):
        sample = np.random.default_rng(0).choice(len(p), min(len(p), NOISE_SAMPLE), replace=False)
        noise = float(np.percentile(_plane_fit(p, nn[sample, 1:], sample)[1], 25))
        residual, thickness = _plane_fit(p, nn[flagged, 1:], flagged)
        tolerance = PLANE_TOLERANCE * max(noise, 1e-12)
        keep[flagged[(thickness <= tolerance) & (residual <= tolerance)]] = True
    out = cloud.subset(keep)
    out.facts["outliers_removed"] = int(len(cloud) - keep.sum())
    return out


def estimate_normals(cloud: PointCloud, neighbours: int = 16) -> PointCloud:
    """A cloud without normals gets oriented ones: each point's normal is the direction of least
    spread of its ``neighbours`` nearest points (PCA), and the signs agree along a minimum spanning
    tree of the neighbour graph weighted by how far neighbouring normals are from parallel (Hoppe et
    al. 1992, as Open3D's orient_normals_consistent_tangent_plane), starting from the highest
    point of each connected part, whose normal points up (out).  ``facts["normals"]`` says so."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree
    from scipy.spatial import cKDTree

    p = cloud.points
    k = int(min(neighbours, len(p) - 1))
    _, nn = cKDTree(p).query(p, k=k + 1, workers=-1)
    normals = _local_pca(p, nn)[2][:, :, 0]                          # smallest eigenvalue's vector
    rows = np.repeat(np.arange(len(p)), k)
    cols = nn[:, 1:].reshape(-1)
    weight = 1.0 - np.abs(np.einsum("ij,ij->i", normals[rows], normals[cols])) + 1e-6
    graph = coo_matrix((weight, (rows, cols)), shape=(len(p), len(p))).tocsr()
    graph = graph.maximum(graph.T)
    tree = minimum_spanning_tree(graph)
    tree = tree.maximum(tree.T)
    parts, label = connected_components(tree, directed=False)
    sign = np.ones(len(p))
    for part in range(parts):
        members = np.flatnonzero(label == part)
        root = members[np.argmax(p[members, 2])]
        order, parent = breadth_first_order(tree, root, directed=False)
        child = order[1:]
        agree = np.where(np.einsum("ij,ij->i", normals[child], normals[parent[child]]) < 0, -1.0, 1.0)
        sign[root] = 1.0 if normals[root, 2] >= 0 else -1.0
        sign[child] = agree                          # relative to the parent, then made absolute:
        par = parent.tolist()
        for i in child.tolist():                     # parents come before their children
            sign[i] *= sign[par[i]]
    normals = normals * sign[:, None]
    out = PointCloud(p, normals.astype(np.float32), cloud.colors, dict(cloud.facts))
    out.facts["normals"] = f"estimated (PCA of {k} neighbours, oriented along a spanning tree)"
    return out


def winding_numbers(points: np.ndarray, normals: np.ndarray, queries: np.ndarray, neighbours: int = 12,
                    max_points: int = 5000, device: str = "cpu", seed: int = 0) -> np.ndarray:
    """The generalised winding number of an oriented point cloud at ``queries`` (Barill et al.
    2018's dipole sum): about 1 inside the surface the points sample, 0 outside, and robust to
    holes in the sampling.  Each point stands for a disc of area pi d^2 / k, d the distance to its
    k-th neighbour.  At most ``max_points`` points take part (a random subset: far from the
    surface, where this is used, a coarser sampling gives the same number).

    Args: points (N, 3), normals (N, 3) unit outward, queries (M, 3), all world units.
    Returns: (M,) float32."""
    import torch
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    if len(points) > max_points:
        keep = rng.choice(len(points), size=max_points, replace=False)
        points, normals = points[keep], normals[keep]
    k = int(min(neighbours, len(points) - 1))
    d = cKDTree(points).query(points, k=k + 1, workers=-1)[0][:, -1]
    area = np.pi * d * d / k
    dev = torch.device(device)
    p = torch.as_tensor(points, dtype=torch.float32, device=dev)
    an = torch.as_tensor(normals * area[:, None], dtype=torch.float32, device=dev)     # area-weighted normals
    out = []
    chunk = max(1, (1 << 21) // max(len(points), 1))
    for q in torch.as_tensor(np.asarray(queries, np.float32), device=dev).split(chunk):
        diff = p[None] - q[:, None]                                                     # (m, N, 3)
        r = diff.norm(dim=-1).clamp_min(1e-9)
        out.append(((diff * an[None]).sum(-1) / (4.0 * np.pi * r ** 3)).sum(-1))
    return torch.cat(out).cpu().numpy() if out else np.zeros(0)


def mesh_surface_points(vertices, faces, count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` points spread uniformly (by area) over a triangle mesh, with the normals of their
    faces (right-handed: counter-clockwise seen from outside) and the faces they lie on.

    Returns: points (count, 3) float64, normals (count, 3) float32, face index (count,) int64.
    Raises ValueError for a mesh without faces or of zero area."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if f.ndim != 2 or f.shape[1] != 3 or not len(f):
        raise ValueError(f"the mesh has no triangles (faces {f.shape})")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"the mesh's faces index vertices 0..{f.max()} but it has {len(v)}")
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    cross = np.cross(b - a, c - a)
    area = 0.5 * np.linalg.norm(cross, axis=1)
    area = np.where(np.isfinite(area), area, 0.0)
    if not area.sum() > 0:
        raise ValueError("the mesh's triangles have no area: no surface to sample")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(f), size=int(count), p=area / area.sum())
    r1, r2 = rng.random(count), rng.random(count)
    s = np.sqrt(r1)
    u, w = 1.0 - s, s * r2                                  # uniform over each triangle
    pts = a[face] * u[:, None] + b[face] * (s * (1.0 - r2))[:, None] + c[face] * w[:, None]
    normals = cross[face] / np.maximum(2.0 * area[face], 1e-30)[:, None]
    return pts, normals.astype(np.float32), face
