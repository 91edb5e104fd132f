"""Closing what no camera saw (backend/export/unseen.py): a pedestal whose fitted underside
balloons, seen only from above, gets a flat bottom at its rim; caps a camera would see are never
added; bad input is a no-op."""
import numpy as np
import torch

from fit_implicit.backend.export.cleanup import is_watertight
from fit_implicit.backend.export.marching_cubes import marching_cubes
from fit_implicit.backend.export.unseen import Views, close_unseen, seen_faces, visible_points
from fit_implicit.backend.render.raster import rasterize
from fit_implicit.shared.cameras import look_at

N = 72                      # grid points a side over [-1, 1]^3
SIZE = 64                   # pixels a side of the test views


def _mesh(inside) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(-1.0, 1.0, N)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    vol = torch.as_tensor(inside(x, y, z).astype(np.float32))
    vol = torch.nn.functional.pad(vol, (1,) * 6, value=-1.0)
    step = 2.0 / (N - 1)
    v, f = marching_cubes(vol, origin=(-1.0 - step,) * 3, spacing=(step,) * 3)
    return v.numpy().astype(np.float32), f.numpy().astype(np.int64)


def _views(elevations_deg, count=8, distance=4.0) -> Views:
    poses = []
    for elev in elevations_deg:
        for k in range(count if elev < 89 else 1):
            az = 2 * np.pi * (k + 0.5 * (elev > 45)) / count
            e = np.radians(elev)
            eye = distance * np.array([np.cos(e) * np.cos(az), np.cos(e) * np.sin(az), np.sin(e)])
            up = (0.0, 1.0, 0.0) if elev >= 89 else (0.0, 0.0, 1.0)
            poses.append(look_at(eye, np.zeros(3), up))
    f = SIZE * 1.6
    intr = np.tile([f, f, SIZE / 2, SIZE / 2], (len(poses), 1))
    return Views(intr, np.stack(poses), SIZE, SIZE)


def _pedestal_with_balloon(x, y, z):
    """Inside > 0: a slab |x|, |y| <= 0.5, 0 <= z <= 0.3, and under it a ball (centre z = -0.1,
    radius 0.3) inside the shadow of the slab's rim for cameras 60 degrees up and higher."""
    slab = np.minimum(np.minimum(0.5 - np.abs(x), 0.5 - np.abs(y)), np.minimum(z, 0.3 - z))
    ball = 0.3 - np.sqrt(x ** 2 + y ** 2 + (z + 0.1) ** 2)
    return np.maximum(slab, ball)


def _draw(verts, faces, views):
    v, f = torch.as_tensor(verts), torch.as_tensor(faces)
    return [rasterize(v, f, views.intrinsics[i], views.poses[i], SIZE, SIZE) for i in range(len(views))]


def test_a_balloon_no_camera_saw_becomes_a_flat_bottom_and_the_views_do_not_change():
    verts, faces = _mesh(_pedestal_with_balloon)
    views = _views([60, 90])
    assert verts[:, 2].min() < -0.35                        # the fitted balloon reaches down to -0.4
    out_v, out_f, facts = close_unseen(verts, faces, views)
    assert facts["regions"] == 1 and facts["kept_regions"] == 0, facts
    # Flat against the rim: nothing lower than the slab's bottom (within a grid step).
    step = 2.0 / (N - 1)
    assert out_v[:, 2].min() > -step, out_v[:, 2].min()
    assert is_watertight(out_f)
    # The views see the same depths (the slab's visible faces are untouched).
    before, after = _draw(verts, faces, views), _draw(out_v, out_f, views)
    for b, a in zip(before, after):
        assert torch.equal(b.mask, a.mask)
        assert torch.allclose(b.depth[b.mask], a.depth[a.mask], atol=1e-5)
    # The slab's own box, the balloon gone: the part of the surface under z = 0 is the cap.
    lo, hi = out_v.min(0), out_v.max(0)
    np.testing.assert_allclose(lo[:2], [-0.5, -0.5], atol=step)
    np.testing.assert_allclose(hi, [0.5, 0.5, 0.3], atol=step)


def test_a_cap_a_camera_would_see_is_not_added():
    """A ring (torus) seen only from above: its unseen underside has two rims; the outer rim's
    cap would cover the ring's hole, which the top view sees through, so it stays as fitted."""
    def torus(x, y, z):
        return 0.25 - np.sqrt((np.sqrt(x ** 2 + y ** 2) - 0.6) ** 2 + z ** 2)
    verts, faces = _mesh(torus)
    views = _views([75, 90])
    seen = seen_faces(verts, faces, views)
    assert 0 < seen.sum() < len(faces)                      # the underside is unseen
    out_v, out_f, facts = close_unseen(verts, faces, views)
    assert facts["regions"] == 0 and facts["kept_regions"] >= 1, facts
    assert len(out_f) == len(faces) and np.array_equal(out_v, verts)


def test_visible_points_are_those_on_the_seen_side():
    verts, faces = _mesh(lambda x, y, z: 0.5 - np.sqrt(x ** 2 + y ** 2 + z ** 2))
    views = _views([90])                                    # one camera straight above
    top, bottom = np.array([[0, 0, 0.5]]), np.array([[0, 0, -0.5]])
    seen = visible_points(np.concatenate([top, bottom]), verts, faces, views)
    assert seen.tolist() == [True, False]


def test_no_faces_no_views_or_a_camera_looking_away_change_nothing():
    verts, faces = _mesh(_pedestal_with_balloon)
    away = _views([60])
    away.poses = np.stack([look_at(p[:3, 3], p[:3, 3] * 2, (0.0, 0.0, 1.0)) for p in away.poses])
    for v, f, views in ((verts, faces[:0], _views([60])), (verts, faces, Views(np.zeros((0, 4)), np.zeros((0, 4, 4)),
                                                                                SIZE, SIZE)),
                        (verts, faces, away)):
        out_v, out_f, facts = close_unseen(v, f, views)
        assert facts["regions"] == 0 and len(out_f) == len(f) and np.isfinite(out_v).all()


def test_chamfer_over_what_the_cameras_see_leaves_the_unseen_balloon_out():
    from fit_implicit.backend.fitting.metrics import chamfer
    truth_v, truth_f = _mesh(lambda x, y, z: np.minimum(np.minimum(0.5 - np.abs(x), 0.5 - np.abs(y)),
                                                        np.minimum(z, 0.3 - z)))
    verts, faces = _mesh(_pedestal_with_balloon)
    s = chamfer(truth_v, truth_f, verts, faces, samples=20_000, views=_views([60, 90]))
    step = 2.0 / (N - 1)
    assert s["fscore"] < 0.9 and s["chamfer"] > 0.02          # the balloon counts over everything
    # Over what is seen the meshes agree up to the samples' spacing (about 0.013 apart here).
    assert s["seen_fscore"] > 0.97 and s["seen_chamfer"] < 0.3 * s["chamfer"] and s["seen_chamfer"] < step, s
    assert 0.5 < s["seen_share"] < 0.9                         # the slab's bottom is not seen
