"""What a job leaves in its folder, so that it survives a restart of the backend.

``<runs_dir>/<job_id>/``::

    job.json         state (queued | running | done | failed | cancelled), times, end text
    submit.json      the Submit's scalar fields      } written when the job is queued, removed when
    submit.npz       the Submit's arrays              } it ends; np.load(allow_pickle=False), re-validated
    checkpoint.pt    training state every N seconds (weights, occupancy, optimiser, step,
                     elapsed, RNG); torch.load(weights_only=True); removed once the model is saved
    model.pt, run.json   the fitted model (FittedField.save), for later jobs (renders back)
    results/NNN.msg  the job's results (MeshResult, TextureResult, MaterialResult, RenderResult, CamerasResult,
                     EnvironmentResult, then its end), in wire format, so that a client that reattaches gets them
                     again (decoded with protocol.decode_message: the same checks as anything
                     received)

Every file is written atomically: a temporary file in the same folder, flushed and fsync-ed,
then ``os.replace``-d over the old one (and the folder fsync-ed), so a kill at any moment leaves
either the old or the new file, never half of one.  Nothing here unpickles.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fit_implicit.shared import protocol, wire

from fit_implicit.backend.service.paths import confined

JOB_FILE = "job.json"
SUBMIT_JSON, SUBMIT_NPZ = "submit.json", "submit.npz"
CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_DIR = "results"
FORMAT = 1
# results, then job ends
STORED_TYPES = ("mesh", "texture", "material", "render", "cameras", "environment", "done", "failed", "cancelled")


class CheckpointError(ValueError):
    """A job folder's file is missing, corrupt or from another format; the text says which."""


# ---- atomic writes ------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then swap it in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- job.json -------------------------------------------------------------------------------------
def write_job_record(folder: Path, **values: Any) -> None:
    """Merge ``values`` into job.json (id, state, created, ended, message: JSON scalars)."""
    record = read_job_record(folder) if (folder / JOB_FILE).exists() else {"format": FORMAT}
    record.update(values)
    atomic_write_bytes(folder / JOB_FILE, json.dumps(record).encode())


def read_job_record(folder: Path) -> dict:
    try:
        record = json.loads((folder / JOB_FILE).read_bytes()[: 1 << 20])
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder / JOB_FILE}: unreadable ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{folder / JOB_FILE}: not a job record of format {FORMAT}")
    return record


# ---- the Submit -----------------------------------------------------------------------------------
#: The job messages a job folder keeps (Submit, or PointsJob: a fit to points), by their TYPE.
JOB_MESSAGES = {protocol.Submit.TYPE: protocol.Submit, protocol.PointsJob.TYPE: protocol.PointsJob}


def save_submit(folder: Path, submit: protocol.Submit | protocol.PointsJob) -> None:
    arrays, scalars = {}, {"_type": submit.TYPE}
    for f in dataclasses.fields(submit):
        value = getattr(submit, f.name)
        (arrays if isinstance(value, np.ndarray) else scalars)[f.name] = value
    atomic_write(folder / SUBMIT_NPZ, lambda out: np.savez(out, **arrays))
    atomic_write_bytes(folder / SUBMIT_JSON, json.dumps(scalars).encode())


def load_submit(folder: Path) -> protocol.Submit | protocol.PointsJob:
    """The saved job message, checked like one received from the wire.  Raises CheckpointError."""
    try:
        scalars = json.loads((folder / SUBMIT_JSON).read_bytes()[: 1 << 20])
        with np.load(folder / SUBMIT_NPZ, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{folder}: the saved job cannot be read ({exc})") from exc
    if not isinstance(scalars, dict):
        raise CheckpointError(f"{folder / SUBMIT_JSON}: not an object")
    cls = JOB_MESSAGES.get(scalars.get("_type", protocol.Submit.TYPE))    # folders of before PointsJob: Submit
    if cls is None:
        raise CheckpointError(f"{folder / SUBMIT_JSON}: unknown job type {str(scalars.get('_type'))[:64]!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in {**scalars, **arrays}.items() if k in names}
    try:
        return cls(**values).validate()
    except (TypeError, protocol.ProtocolError) as exc:
        raise CheckpointError(f"{folder}: the saved job is not valid: {exc}") from exc


def remove_submit(folder: Path) -> None:
    for name in (SUBMIT_NPZ, SUBMIT_JSON):
        try:
            (folder / name).unlink()
        except FileNotFoundError:
            pass


# ---- training checkpoints ---------------------------------------------------------------------------
def save_checkpoint(folder: Path, state: dict) -> float:
    """Write the training state atomically; returns the seconds it took."""
    import torch

    t0 = time.perf_counter()
    atomic_write(folder / CHECKPOINT_FILE, lambda f: torch.save({"format": FORMAT, **state}, f))
    return time.perf_counter() - t0


def load_checkpoint(folder: Path, device: str) -> dict | None:
    """The last checkpoint (tensors on ``device``), None if there is none.  Raises CheckpointError."""
    import torch

    path = folder / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file: say which
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT or "step" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of format {FORMAT}")
    return state


def remove_checkpoint(folder: Path) -> None:
    try:
        (folder / CHECKPOINT_FILE).unlink()
    except FileNotFoundError:
        pass


# ---- results (wire format on disk) --------------------------------------------------------------------
def store_message(folder: Path, index: int, message: protocol.Message) -> None:
    """Write one result as ``results/NNN.msg``: a count, then (length, bytes) per wire frame."""
    if message.TYPE not in STORED_TYPES:
        raise ValueError(f"{message.TYPE} messages are not stored")

    def write(f):
        frames = [memoryview(fr).cast("B") for fr in message.to_frames()]
        f.write(struct.pack("<I", len(frames)))
        for fr in frames:
            f.write(struct.pack("<Q", fr.nbytes))
            f.write(fr)

    atomic_write(confined(folder, f"{RESULTS_DIR}/{index:04d}.msg"), write)


def stored_messages(folder: Path, limits: wire.Limits = wire.DEFAULT_LIMITS) -> list[protocol.Message]:
    """The stored results, oldest first, decoded and validated.  Raises CheckpointError."""
    out = []
    results = folder / RESULTS_DIR
    names = sorted(p.name for p in results.glob("*.msg")) if results.is_dir() else []
    for name in names:
        path = confined(folder, f"{RESULTS_DIR}/{name}")
        try:
            frames = _read_frames(path, limits)
            message = protocol.decode_message(frames, limits)
        except (OSError, ValueError) as exc:   # WireError/ProtocolError are ValueErrors
            raise CheckpointError(f"{path}: stored result cannot be read ({exc})") from exc
        if message.TYPE not in STORED_TYPES:
            raise CheckpointError(f"{path}: holds a {message.TYPE!r} message")
        out.append(message)
    return out


def _read_frames(path: Path, limits: wire.Limits) -> list[bytes]:
    size = path.stat().st_size
    if size > limits.max_total_bytes + (1 << 20):
        raise ValueError(f"{size} bytes is more than the message limit")
    data = io.BytesIO(path.read_bytes())
    (count,) = struct.unpack("<I", data.read(4))
    if count > limits.max_frames + 1:
        raise ValueError(f"{count} frames")
    frames = []
    for _ in range(count):
        (length,) = struct.unpack("<Q", data.read(8))
        frame = data.read(length)
        if len(frame) != length:
            raise ValueError("truncated")
        frames.append(frame)
    return frames
