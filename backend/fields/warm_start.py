"""Warm starts: meta-learned initial weights for a field's MLPs, shipped with the package.

A fresh fit starts its MLPs (not its hash tables: those are the scene) from weights learned by
this project over many small random scenes (scripts/train_warm_starts.py, Reptile: the weights a
few hundred steps of fitting move towards, averaged over scenes), as Learned Initializations and
MetaSDF do.  The MLPs then begin the fit already mapping encoded positions to plausible densities,
distances and colours, and the first seconds go to the scene.

One file per field architecture in ``warm_starts/`` beside this module:
``<kind>-<encoding>-<key>.npz`` (numpy arrays by parameter name, plus ``__meta__``: a JSON text
naming the architecture and how the weights were trained).  :func:`signature` says which
architecture a field has; a field whose architecture has no file starts from PyTorch's default
initialisation.  Files are read with ``allow_pickle=False`` and checked (names, shapes, finite
values, size) before any weight is copied.

Surface fields keep their geometric initialisation (fields/sdf.py): the distance output's weights
are zeroed after loading, so the field still starts as a sphere; only the hidden layer, the
geometry features and the colour head are warm.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

WARM_START_DIR = Path(__file__).resolve().parent / "warm_starts"
MAX_FILE_BYTES = 8 << 20            # a warm start is a few small MLPs (tens of KB)
FORMAT = 1


def signature(field: nn.Module) -> dict:
    """What a warm start must match: the field's kind, its encoding and that encoding's settings
    (hash tables' row count aside: it changes collisions, not what a level's features mean) and
    the shapes of every warm-started parameter."""
    cfg = field.cfg
    if cfg.encoding == "hashgrid":
        enc = {k: v for k, v in asdict(cfg.grid).items() if k != "log2_table"}
    else:
        enc = asdict(cfg.spectral)
    shapes = {name: list(p.shape) for name, p in parameters(field).items()}
    return {"kind": field.kind, "encoding": cfg.encoding, "encoding_settings": enc, "shapes": shapes}


def file_name(sig: dict) -> str:
    """The file that holds the warm start of an architecture (see the module doc)."""
    key = hashlib.sha1(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:10]
    return f"{sig['kind']}-{sig['encoding']}-{key}.npz"


def parameters(field: nn.Module) -> dict[str, nn.Parameter]:
    """The warm-started parameters by state-dict name (``density_net.0.weight``, ...): those of the
    field class's ``warm_parts``."""
    return {f"{part}.{name}": p for part in field.warm_parts
            for name, p in getattr(field, part).named_parameters()}


def find(field: nn.Module, folder: Path | None = None) -> Path | None:
    """The warm-start file for ``field``'s architecture, or None where there is none."""
    path = Path(folder or WARM_START_DIR) / file_name(signature(field))
    return path if path.is_file() else None


def read(path: Path, field: nn.Module) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays by parameter name, meta) of a warm-start file, checked against ``field``.

    Raises ValueError naming the file and what is wrong: too large, not a numpy archive,
    another architecture, a missing or misshapen array, a value that is not finite."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"warm start {path}: {size} bytes, more than the {MAX_FILE_BYTES} a warm start may hold")
    want = parameters(field)
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["__meta__"]))
            arrays = {name: np.asarray(archive[name]) for name in want if name in archive.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ValueError(f"warm start {path} does not read as a warm-start file: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"warm start {path}: format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                         f"this version reads {FORMAT}")
    if meta.get("signature") != signature(field):
        raise ValueError(f"warm start {path} is for another field architecture")
    for name, p in want.items():
        if name not in arrays:
            raise ValueError(f"warm start {path} lacks {name}")
        a = arrays[name]
        if tuple(a.shape) != tuple(p.shape) or a.dtype != np.float32:
            raise ValueError(f"warm start {path}: {name} is {a.dtype} {tuple(a.shape)}, "
                             f"the field's is float32 {tuple(p.shape)}")
        if not np.isfinite(a).all():
            raise ValueError(f"warm start {path}: {name} holds values that are not finite")
    return arrays, meta


@torch.no_grad()
def apply(field: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Copy checked arrays (:func:`read`) into ``field``'s parameters, then let the field restore
    what its own initialisation guarantees (``after_warm_start``: a surface field's sphere)."""
    for name, p in parameters(field).items():
        p.copy_(torch.from_numpy(arrays[name]).to(p.device))
    restore = getattr(field, "after_warm_start", None)
    if restore is not None:
        restore()


def warm_start(field: nn.Module, folder: Path | None = None) -> str | None:
    """Start ``field``'s MLPs from the shipped warm start of its architecture; returns the file's
    name, or None where its architecture has none (the field keeps its default initialisation)."""
    path = find(field, folder)
    if path is None:
        return None
    arrays, _ = read(path, field)
    apply(field, arrays)
    return path.name


def save(path: Path, field: nn.Module, arrays: dict[str, np.ndarray], info: dict) -> Path:
    """Write a warm-start file of ``field``'s architecture (``info``: how it was trained)."""
    sig = signature(field)
    meta = {"format": FORMAT, "signature": sig, **info}
    missing = set(sig["shapes"]) - set(arrays)
    if missing:
        raise ValueError(f"warm start lacks {', '.join(sorted(missing))}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = {name: np.ascontiguousarray(arrays[name], dtype=np.float32) for name in sig["shapes"]}
    np.savez(path, __meta__=np.array(json.dumps(meta, sort_keys=True)), **values)
    return path


def current(field: nn.Module) -> dict[str, np.ndarray]:
    """``field``'s warm-started parameters as float32 arrays (what :func:`save` writes)."""
    return {name: p.detach().float().cpu().numpy().copy() for name, p in parameters(field).items()}
