"""Renders as images: premultiplied float RGBA (what FittedField.render gives) to 8-bit."""
from __future__ import annotations

import numpy as np


def to_rgba8(image: np.ndarray) -> np.ndarray:
    """(H, W, 4) float premultiplied RGBA in [0, 1] -> (H, W, 4) uint8 straight alpha."""
    alpha = np.clip(image[..., 3:4], 0.0, 1.0)
    rgb = np.where(alpha > 1e-6, image[..., :3] / np.maximum(alpha, 1e-6), 0.0)
    out = np.concatenate([np.clip(rgb, 0.0, 1.0), alpha], axis=-1)
    return (out * 255.0 + 0.5).astype(np.uint8)


# ---- OpenEXR files (the OpenEXR package): linear light, premultiplied alpha --------------------
EXR_COMPRESSION = "ZIP_COMPRESSION"


def exr_size(path) -> tuple[int, int]:
    """(width, height) of an .exr file, from its header."""
    import OpenEXR

    try:
        with OpenEXR.File(str(path), header_only=True) as f:
            lo, hi = f.header()["dataWindow"]
    except Exception as exc:  # noqa: BLE001 - OpenEXR raises RuntimeError and others for a bad file
        raise ValueError(f"{path}: not a readable OpenEXR file ({exc})") from None
    return int(hi[0] - lo[0] + 1), int(hi[1] - lo[1] + 1)


def read_exr(path) -> np.ndarray:
    """An .exr's colour as (H, W, 4) float32 LINEAR, PREMULTIPLIED RGBA (alpha 1 where it has
    none): its "RGBA" / "RGB" channels, or those of its first layer that has them (Blender's
    multilayer files: "ViewLayer.Combined.R", ...), or a single "Y" channel as grey.  Raises
    ValueError naming the channels it has otherwise."""
    import OpenEXR

    try:
        with OpenEXR.File(str(path)) as f:
            channels = {k: np.nan_to_num(np.asarray(v.pixels, np.float32), nan=0.0, posinf=1e4, neginf=0.0)
                        for k, v in f.channels().items()}
    except Exception as exc:  # noqa: BLE001 - OpenEXR raises RuntimeError and others for a bad file
        raise ValueError(f"{path}: not a readable OpenEXR file ({exc})") from None
    for name in sorted(channels, key=lambda k: (k.count("."), k)):
        tail = name.rsplit(".", 1)[-1]
        if tail in ("RGBA", "RGB"):
            px = channels[name]
            alpha = px[..., 3:4] if tail == "RGBA" else np.ones_like(px[..., :1])
            return np.concatenate([px[..., :3], alpha], -1)
    if "Y" in channels:
        y = channels["Y"][..., None]
        a = channels.get("A", np.ones_like(channels["Y"]))[..., None]
        return np.concatenate([y, y, y, a], -1)
    raise ValueError(f"{path}: no RGB, RGBA or Y channels in this EXR (it has {', '.join(sorted(channels)) or 'none'})")


def exr_to_rgba8(linear: np.ndarray) -> np.ndarray:
    """Linear premultiplied float RGBA (:func:`read_exr`) -> (H, W, 4) uint8 sRGB, straight alpha
    (what photos become in PosedImages).  Values above 1 are clipped: no tone mapping."""
    from fit_implicit.shared.color import linear_to_srgb

    alpha = np.clip(linear[..., 3:4], 0.0, 1.0)
    straight = np.where(alpha > 1e-6, linear[..., :3] / np.maximum(alpha, 1e-6), 0.0)
    rgb = linear_to_srgb(np.clip(straight, 0.0, 1.0))
    return (np.concatenate([np.clip(rgb, 0.0, 1.0), alpha], -1) * 255.0 + 0.5).astype(np.uint8)


def write_exr(path, image: np.ndarray) -> None:
    """A render (premultiplied sRGB float RGBA, what FittedField.render gives) as a 32-bit float
    .exr in linear light with premultiplied alpha, the convention of EXR and of Blender's
    compositor."""
    import OpenEXR

    from fit_implicit.shared.color import srgb_to_linear

    alpha = np.clip(image[..., 3:4], 0.0, 1.0)
    straight = np.where(alpha > 1e-6, image[..., :3] / np.maximum(alpha, 1e-6), 0.0)
    linear = srgb_to_linear(np.clip(straight, 0.0, 1.0)) * alpha
    rgba = np.ascontiguousarray(np.concatenate([linear, alpha], -1), dtype=np.float32)
    header = {"compression": getattr(OpenEXR, EXR_COMPRESSION), "type": OpenEXR.scanlineimage}
    with OpenEXR.File(header, {"RGBA": rgba}) as f:
        f.write(str(path))
