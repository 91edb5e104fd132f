"""The background a fit modelled (backend/fields/background.py) as an environment image for
Blender's World: equirectangular, sRGB, twice as wide as high, top row first, its columns as
Blender's Environment Texture node maps them (shared.protocol.EnvironmentResult says how).
The fit job sends it (backend/service/fit_job.py); ``fit-implicit mesh`` writes it beside the mesh.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

ENVIRONMENT_HEIGHT = 512        # rows of the environment image (twice as many columns)
CPU_ENVIRONMENT_HEIGHT = 256    # the same on the CPU: 11 s there (draft, 2 cores); 512 rows cost four times that


def environment_height(intrinsics: np.ndarray | None = None, device: str = "cuda") -> int:
    """Rows of the environment image of a fit, on ``device``, of cameras ``intrinsics`` (N, 4)
    (fx, fy, cx, cy; None: not known).

    At most ENVIRONMENT_HEIGHT (512: a row every 0.35 degrees; 1024 x 512 pixels, 1.5 MB on the
    wire), enough for a World's light and a soft backdrop behind the object; on the CPU
    (``device`` "cpu...") at most CPU_ENVIRONMENT_HEIGHT, as the render's cost grows with its
    pixels.  Photos whose pixels are larger than that get fewer rows, as many as they resolve:
    one row per pixel at the centre of the sharpest photo (pi * fy rows span 180 degrees), at
    least 16.  Tiny fits (the tests' 16-pixel photos: 69 rows) then stay quick.
    """
    most = CPU_ENVIRONMENT_HEIGHT if str(device).startswith("cpu") else ENVIRONMENT_HEIGHT
    if intrinsics is None or not len(intrinsics):
        return most
    fy = float(np.max(np.asarray(intrinsics, np.float64)[:, 1]))
    return int(max(16, min(most, math.ceil(math.pi * fy))))


def environment_image(model, height: int) -> np.ndarray:
    """(height, 2 height, 3) uint8 sRGB: ``model``'s background (FittedField.environment).
    Raises ValueError when the model has none."""
    rgb = model.environment(int(height)).detach().cpu().numpy()
    return np.ascontiguousarray((np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def environment_path(mesh_path: str | Path) -> Path:
    """Where the environment goes beside a mesh file: ``<stem>_environment.png`` (as its
    textures go to ``<stem>_albedo.png``, export/textured.py)."""
    mesh_path = Path(mesh_path)
    return mesh_path.with_name(f"{mesh_path.stem}_environment.png")


def write_environment(model, mesh_path: str | Path, height: int) -> Path:
    """Write ``model``'s background as a PNG beside ``mesh_path`` (:func:`environment_path`)."""
    from fit_implicit.backend.export.textured import png_bytes

    path = environment_path(mesh_path)
    path.write_bytes(png_bytes(environment_image(model, height)))
    return path
