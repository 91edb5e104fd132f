"""Fit SDF to Points (issue 16, item 3): the active object's points, or its surface, fitted with a
signed distance field on the backend; the clean, closed mesh comes back as a new object with the
source's transform, so it lands exactly on it.

What is sent (shared/protocol.py PointsJob), in the object's LOCAL frame:
* a mesh with faces: its vertices and triangles (the backend samples its surface; normals from
  the winding where it is consistent, else a sign-agnostic fit);
* a mesh without faces (an imported scan: PLY and OBJ point clouds come in that way) or a Point
  Cloud object: its points, with the colours of its first colour attribute on points, if any.
Settings (``scene.implicit``): ``points_detail`` (the backend's setting of that name: 0 fills holes
smoothly, 1 keeps every detail), ``points_voxel_size`` (the mesh's resolution as a voxel size in
the object's local units, as Voxel Remesh; 0: the quality preset's), ``preset``, ``encoding``, ``max_faces``.
"""
from __future__ import annotations

import time

import numpy as np

from ._shared import protocol

RESULT_SUFFIX = " SDF"


class PointsFitError(Exception):
    """Why the object cannot be fitted, in words for the artist."""


def object_points(ob) -> dict:
    """The PointsJob arrays of ``ob`` (module doc), local coordinates.  Raises PointsFitError."""
    if ob is None:
        raise PointsFitError("Select a mesh or point-cloud object to fit.")
    if ob.type == "MESH":
        me = ob.data
        verts = np.empty(len(me.vertices) * 3, np.float32)
        me.vertices.foreach_get("co", verts)
        verts = verts.reshape(-1, 3)
        if len(me.polygons):
            me.calc_loop_triangles()
            tris = np.empty(len(me.loop_triangles) * 3, np.int32)
            me.loop_triangles.foreach_get("vertices", tris)
            return {"vertices": verts, "faces": tris.reshape(-1, 3)}
        return {"points": verts, **_point_colours(me.color_attributes, len(verts))}
    if ob.type == "POINTCLOUD":
        pc = ob.data
        pts = np.empty(len(pc.points) * 3, np.float32)
        pc.attributes["position"].data.foreach_get("vector", pts)
        return {"points": pts.reshape(-1, 3), **_point_colours(getattr(pc, "color_attributes", None) or [], len(pc.points))}
    raise PointsFitError(f"'{ob.name}' is a {ob.type.lower()} object: select a mesh (a scan, a sculpt, a kitbash) "
                         "or a point cloud.")


def _point_colours(attributes, count: int) -> dict:
    """{"colors": (N, 3) uint8 sRGB} from the first colour attribute stored on points, or {}."""
    for attr in attributes:
        if attr.domain == "POINT" and len(attr.data) == count and count:
            rgba = np.empty(count * 4, np.float32)
            attr.data.foreach_get("color_srgb", rgba)
            return {"colors": np.clip(rgba.reshape(-1, 4)[:, :3] * 255.0 + 0.5, 0, 255).astype(np.uint8)}
    return {}


def points_job(ob, settings) -> protocol.PointsJob:
    """The PointsJob for ``ob`` with the scene's settings (``scene.implicit``)."""
    arrays = object_points(ob)
    pts = arrays.get("points", arrays.get("vertices"))
    if len(pts) < 16 and "faces" not in arrays:
        raise PointsFitError(f"'{ob.name}' has {len(pts)} points: at least 16 are needed to fit a surface.")
    job = protocol.PointsJob(name=ob.name[:protocol.MAX_NAME], preset=settings.preset, detail=settings.points_detail,
                             encoding=getattr(settings, "encoding", "hashgrid"),
                             voxel_size=float(settings.points_voxel_size),   # the backend's box decides the resolution
                             max_faces=max(settings.max_faces, protocol.MIN_FACES) if settings.max_faces else 0,
                             **arrays)
    try:
        return job.validate()
    except protocol.ProtocolError as exc:
        raise PointsFitError(f"'{ob.name}' cannot be sent: {exc}") from None


def import_result(scene, source, mesh: protocol.MeshResult, summary: dict):
    """The fitted mesh as a new object beside ``source`` with its transform (the mesh is in the
    source's local frame); returns it."""
    from .importer import import_mesh, tag_asset

    ob = import_mesh(scene, mesh.vertices, mesh.faces, mesh.colors if len(mesh.colors) else None,
                     name=source.name + RESULT_SUFFIX)
    ob.matrix_world = source.matrix_world.copy()
    tag_asset(ob, {"source": source.name, "method": "points", **{k: v for k, v in summary.items()
                                                                  if isinstance(v, (int, float, str, bool))}})
    return ob


class PointsFit:
    """One fit of one object: ``start()``, then ``tick()`` from a timer (or ``run()`` blocking)
    until ``finished``; ``result`` is the imported object, ``error`` the reason it failed."""

    def __init__(self, context, source, address: str):
        from . import ownership
        from .client import JobClient, probe
        from .preferences import connection_kwargs

        self.scene, self.source = context.scene, source
        self.job = points_job(source, context.scene.implicit)
        keys = connection_kwargs(context)
        probe(address, **keys)      # BackendError (its code "unreachable": none answers) before anything is sent
        self.client = JobClient(address, token=ownership.scene_token(context.scene), **keys)
        self.status, self.fraction = "Sending points", 0.0
        self.mesh: protocol.MeshResult | None = None
        self.result = None
        self.error: str | None = None
        self.finished = False

    def start(self) -> None:
        self.client.start(self.job)

    def tick(self) -> bool:
        """Take what arrived; import the mesh at the end.  Returns ``finished``."""
        for m in self.client.poll():
            if isinstance(m, protocol.Progress):
                self.fraction = float(m.fraction)
                self.status = f"Fitting points: {m.stage} {100 * m.fraction:.0f} %"
            elif isinstance(m, protocol.MeshResult):
                self.mesh = m
            elif isinstance(m, protocol.Done):
                if self.mesh is None:
                    self.error = "the backend sent no mesh"
                else:
                    self.result = import_result(self.scene, self.source, self.mesh, m.summary)
                    self.status = (f"Fitted '{self.source.name}': {len(self.mesh.faces):,} triangles "
                                   f"in {m.summary.get('seconds', 0):.0f} s")
                self.finished = True
            elif isinstance(m, (protocol.Failed, protocol.Cancelled)):
                self.error = m.message if isinstance(m, protocol.Failed) else "cancelled"
                self.finished = True
        if self.finished:
            self.client.close()
        return self.finished

    def run(self, timeout: float | None = None) -> None:
        """Blocking: start and tick until finished (scripts, background mode)."""
        self.start()
        deadline = None if not timeout else time.monotonic() + timeout
        while not self.tick():
            if deadline is not None and time.monotonic() > deadline:
                self.client.cancel()
                self.error = f"no result within {timeout:g} s"
                self.client.close()
                return
            time.sleep(0.05)

    def cancel(self) -> None:
        self.client.cancel()
