"""Where the backend keeps its jobs, and the one check every path from a message goes through.

Each job has its own folder ``<runs_dir>/<job_id>/``; only paths confined to it
are ever opened for that job.  A job id comes from the wire (Attach, Cancel, render requests),
so it is checked against :data:`JOB_ID_PATTERN` before it names a folder, and every file name
is resolved with :func:`confined` (no ``..``, no absolute paths, no symlink that leads out).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

RUNS_DIR_ENV = "FIT_IMPLICIT_RUNS_DIR"
#: Job ids the backend makes (``uuid4().hex[:12]``).  Anything else never names a folder.
JOB_ID_PATTERN = re.compile(r"[0-9a-f]{12}")


class PathError(ValueError):
    """A path from a message would leave its job's folder (or is not a valid name)."""


def default_runs_dir() -> Path:
    """``$FIT_IMPLICIT_RUNS_DIR``, else ``$XDG_CACHE_HOME/fit_implicit/runs`` (``~/.cache/...``)."""
    if os.environ.get(RUNS_DIR_ENV):
        return Path(os.environ[RUNS_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "fit_implicit" / "runs"


def is_job_id(job_id: object) -> bool:
    return isinstance(job_id, str) and JOB_ID_PATTERN.fullmatch(job_id) is not None


def job_folder(runs_dir: str | Path, job_id: str) -> Path:
    """``<runs_dir>/<job_id>``, resolved.  Raises PathError for anything that is not a job id."""
    if not is_job_id(job_id):
        shown = job_id[:64] if isinstance(job_id, str) else type(job_id).__name__
        raise PathError(f"{shown!r} is not a job id (12 lowercase hexadecimal characters)")
    return confined(runs_dir, job_id)


def confined(root: str | Path, relative: str | os.PathLike) -> Path:
    """``root / relative`` resolved (symlinks followed), or PathError if it is not inside ``root``.

    Refused: absolute paths, empty names, NUL bytes, ``..`` that climbs out, and symlinks (at
    any level) that point outside ``root``.  The result may not exist yet.
    """
    text = os.fspath(relative)
    if not isinstance(text, str) or not text or "\x00" in text:
        raise PathError(f"{text!r} is not a valid file name")
    if os.path.isabs(text) or text.startswith(("~", "\\")) or re.match(r"^[A-Za-z]:", text):
        raise PathError(f"{text[:200]!r} is an absolute path; only names inside the job's folder are allowed")
    base = Path(root).resolve()
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise PathError(f"{text[:200]!r} leads outside the job's folder")
    return target
