"""A fitted model on disk: a run folder holds ``run.json`` (format, method, world box, the
FitConfig, facts about the fit) and ``model.pt`` (tensors only: field weights and occupancy grid).

``FORMAT`` moves whenever what a run holds changes:

* 1: FitConfig as one flat dict; surface fields saved before the roughness head lack its weights.
* 2: FitConfig nested as it composes its parts (fitting/config.py); every field has all its weights.

A format-1 run still loads: its flat settings find their places by name, and a surface field
without roughness-head weights keeps the head untrained (such runs never had a roughness pass,
so nothing reads the head).  A run of any other format is refused with a message naming both
formats.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from fit_implicit.backend.fields.sdf import SurfaceField
from fit_implicit.backend.fitting.config import FitConfig
from fit_implicit.backend.fitting.model import FittedField, build_field, pick_device

log = logging.getLogger(__name__)

FORMAT = 2
READABLE_FORMATS = (1, 2)
WEIGHTS_FILE = "model.pt"
RUN_FILE = "run.json"


DIGEST_MAX_BYTES = 8 << 30     # a dataset larger than this is not hashed (the digest says so)


def dataset_digest(path: str | Path, skip: str | Path | None = None) -> str:
    """SHA-256 over a dataset's transforms files and every file beside them, in path order
    (names and bytes): two fits with the same digest saw the same data.  ``skip``: a folder left
    out (a run folder inside the dataset).  Files that cannot be read are named, not hashed;
    past DIGEST_MAX_BYTES the digest is "too large" (hashing would hold the fit up)."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    skip_dir = Path(skip).resolve() if skip is not None else None
    h, total = hashlib.sha256(), 0
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        if skip_dir is not None and skip_dir in f.resolve().parents:
            continue
        h.update(str(f.relative_to(root)).encode() + b"\0")
        try:
            total += f.stat().st_size
            if total > DIGEST_MAX_BYTES:
                return f"too large (over {DIGEST_MAX_BYTES >> 30} GiB)"
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            h.update(b"unreadable\0")
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of one file's bytes ("too large" past DIGEST_MAX_BYTES)."""
    path = Path(path)
    if path.stat().st_size > DIGEST_MAX_BYTES:
        return f"too large (over {DIGEST_MAX_BYTES >> 30} GiB)"
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def provenance(data_path: str | Path, argv: list[str], device: str, skip: str | Path | None = None,
               single_file: bool = False) -> dict:
    """Where a fit came from, for its run.json: the command line, the dataset's path and digest
    (``single_file``: of that file alone, as for a point cloud; else of its folder), the versions
    of what trained it and the device."""
    import platform
    from importlib import metadata

    try:
        version = metadata.version("fit-implicit")
    except metadata.PackageNotFoundError:
        version = None
    dev = torch.device(device)
    return {"command": list(map(str, argv)), "dataset": str(Path(data_path).resolve()),
            "dataset_sha256": file_digest(data_path) if single_file else dataset_digest(data_path, skip),
            "fit_implicit": version, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version(), "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"}


def save_run(model: FittedField, run_dir: str | Path) -> None:
    """Write ``run_dir/model.pt`` and ``run_dir/run.json``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "field": model.field.state_dict(), "occupancy": model.occupancy.state_dict()}
    if model.background is not None:
        state["background"] = model.background.state_dict()
    torch.save(state, run_dir / WEIGHTS_FILE)
    doc = {"format": FORMAT, "method": model.config.method, "aabb": model.aabb.tolist(),
           "config": model.config.to_dict(), "meta": model.meta}
    (run_dir / RUN_FILE).write_text(json.dumps(doc, indent=2))


def is_run(run_dir: str | Path) -> bool:
    """Whether the folder holds both files of a run."""
    return (Path(run_dir) / RUN_FILE).is_file() and (Path(run_dir) / WEIGHTS_FILE).is_file()


def read_run_files(run_dir: str | Path) -> tuple[bytes, bytes]:
    """The bytes of a run's run.json and model.pt, as they travel (shared/protocol.py ModelFile)."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise ValueError(f"{run_dir}: not a run folder (needs {RUN_FILE} and {WEIGHTS_FILE})")
    return (run_dir / RUN_FILE).read_bytes(), (run_dir / WEIGHTS_FILE).read_bytes()


def check_run_files(run_json: bytes, weights: bytes) -> dict:
    """Check a run that arrived as bytes before it is written anywhere: run.json an object of a
    readable format naming a known method, model.pt a torch archive (a zip; its tensors are only
    ever loaded with weights_only).  Returns the parsed run.json; raises ValueError saying what
    is wrong."""
    from fit_implicit.shared.methods import METHODS

    try:
        doc = json.loads(bytes(run_json).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"run.json is not JSON text ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") not in READABLE_FORMATS:
        raise ValueError(f"run.json is not a run of a readable format ({', '.join(map(str, READABLE_FORMATS))})")
    if doc.get("method") not in METHODS or not isinstance(doc.get("config"), dict):
        raise ValueError(f"run.json names no known method ({', '.join(METHODS)}) or has no config")
    aabb = np.asarray(doc.get("aabb", []), dtype=np.float64) if isinstance(doc.get("aabb"), list) else None
    if aabb is None or aabb.shape != (2, 3) or not np.isfinite(aabb).all() or not (aabb[1] > aabb[0]).all():
        raise ValueError("run.json has no valid 'aabb' ([[min x, y, z], [max x, y, z]])")
    if bytes(weights[:4]) != b"PK\x03\x04":
        raise ValueError("model.pt is not a torch archive")
    meta = doc.get("meta", {})
    cams = meta.get("cameras") if isinstance(meta, dict) else None
    if cams is not None:     # the training cameras meshing reads (export/unseen.py Views.of_run)
        from fit_implicit.shared.protocol import MAX_IMAGES

        k = cams.get("intrinsics") if isinstance(cams, dict) else None
        if not isinstance(k, list) or len(k) > MAX_IMAGES:
            raise ValueError(f"run.json: meta.cameras must hold at most {MAX_IMAGES} cameras")
    return doc


def load_run(run_dir: str | Path, device: str | torch.device | None = None) -> FittedField:
    """Load a run written by :func:`save_run` (or by a format-1 backend) onto ``device``
    (default: CUDA if available).  Raises ValueError saying what is wrong with the folder."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise ValueError(f"{run_dir}: not a run folder (needs {RUN_FILE} and {WEIGHTS_FILE})")
    doc = json.loads((run_dir / RUN_FILE).read_text())
    version = doc.get("format")
    if version not in READABLE_FORMATS:
        raise ValueError(f"{run_dir}: run format {version!r} cannot be read by this backend, which writes "
                         f"format {FORMAT} and reads formats {', '.join(map(str, READABLE_FORMATS))}")
    dev = pick_device(device)
    method = doc.get("method", doc["config"].get("method", "nerf"))
    cfg = FitConfig.from_dict({**doc["config"], "method": method, "device": str(dev)})
    state = torch.load(run_dir / WEIGHTS_FILE, map_location=dev, weights_only=True)
    field = build_field(cfg, int(doc.get("meta", {}).get("time_resolution") or 0)).to(dev)    # (dynamic fits)
    missing, unexpected = field.load_state_dict(state["field"], strict=False)
    if version == 1 and any(k.startswith("roughness_net.") for k in missing):
        log.info("%s: a format-1 run without roughness-head weights: the head stays untrained", run_dir)
        missing = [k for k in missing if not k.startswith("roughness_net.")]
    if missing or unexpected:
        raise ValueError(f"{run_dir}: the weights do not fit the {method} field (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    occupancy = cfg.occupancy.build().to(dev)
    occupancy.load_state_dict(state["occupancy"])
    if isinstance(field, SurfaceField):
        field.restore_active_levels()
    background = None
    if "background" in state:       # the fit modelled what lies outside its box (fields/background.py)
        background = cfg.outside.build().to(dev)
        try:
            background.load_state_dict(state["background"])
        except RuntimeError as exc:
            raise ValueError(f"{run_dir}: the background weights do not fit its settings ({exc})") from None
    return FittedField(field, occupancy, np.asarray(doc["aabb"]), cfg, doc.get("meta", {}), background)
