"""The imported asset checked against the held-out views, as an artist would check it.

After a fit whose evaluation cameras have reference renders (scene mode: Blender rendered them
before the job was sent, and they were never trained on), the fit session
(blender_addon/fit_session.py) renders the imported object from each of those cameras with the
scene's lights, the fitted source objects hidden (Cycles, the capture's render settings:
capture.render_view), and scores it and the field's own render against the reference
(shared/quality.py: 8-bit, on white, the mean over the views).  The image
"Implicit Held-out Check" shows, one row per view, reference | field | imported asset.
"""
from __future__ import annotations

import numpy as np

from . import capture, importer
from ._shared import quality

CHECK_IMAGE = "Implicit Held-out Check"


def render_asset_view(scene, camera_object, asset, hidden, path: str) -> np.ndarray:
    """Render ``asset`` (the imported object) from ``camera_object`` with the rest of the scene
    as it is, except the objects in ``hidden`` (the fitted source), which are left out of the
    render.  Render visibility is put back as it was.  Returns (H, W, 4) uint8 straight RGBA."""
    saved = [(ob, ob.hide_render) for ob in [*hidden, asset]]
    try:
        for ob in hidden:
            ob.hide_render = True
        asset.hide_render = False
        return capture.render_view(scene, camera_object, path)
    finally:
        for ob, was in saved:
            ob.hide_render = was


def scores(references, fields, assets) -> dict:
    """Held-out PSNR of the field's renders and of the asset's renders against the references
    (lists of (H, W, 4) uint8, a missing render is None and is left out).  Returns the summary
    entries: ``heldout_views``, ``heldout_field_psnr``, ``heldout_asset_psnr`` and
    ``heldout_gap_db`` (field minus asset: what the import loses), each None when not measured."""
    field = [quality.psnr_white(f, t) for f, t in zip(fields, references) if f is not None]
    asset = [quality.psnr_white(a, t) for a, t in zip(assets, references) if a is not None]
    f = round(float(np.mean(field)), 2) if field else None
    a = round(float(np.mean(asset)), 2) if asset else None
    return {"heldout_views": len(references), "heldout_field_psnr": f, "heldout_asset_psnr": a,
            "heldout_gap_db": round(f - a, 2) if f is not None and a is not None else None}


def check_text(entries: dict) -> str:
    """One sentence for the report, from :func:`scores`' entries ('' when nothing was measured)."""
    n, f, a = entries.get("heldout_views"), entries.get("heldout_field_psnr"), entries.get("heldout_asset_psnr")
    if not n or a is None:
        return ""
    views = f"{n} held-out view" + ("s" if n != 1 else "")
    text = f"Imported asset {a:.2f} dB on {views}"
    return text + (f" (the field {f:.2f} dB)." if f is not None else ".")


def comparison(references, fields, assets) -> np.ndarray:
    """(rows * H, 3 * W, 4) uint8: per view, reference | field | asset side by side (a missing
    render is left transparent); every image (H, W, 4) uint8 of one size."""
    rows = []
    for t, f, a in zip(references, fields, assets):
        blank = np.zeros_like(t)
        rows.append(np.concatenate([t, blank if f is None else f, blank if a is None else a], axis=1))
    return np.concatenate(rows, axis=0)


def show_comparison(references, fields, assets):
    """Write :func:`comparison` into the Image "Implicit Held-out Check" (made or updated)."""
    return importer.image_from_rgba(CHECK_IMAGE, comparison(references, fields, assets))
