"""Shared fixtures.  Helpers behind them live in tests/helpers.py (documented there).

* ``fake_backend`` (module scope): a backend subprocess whose jobs run helpers.fake_runner
  (no torch, fast).  Tests sharing it must let their jobs end (or cancel them).
* ``backend_factory``: start extra backends, ``backend_factory(fake=True, args=[...])``; all
  are stopped at the end of the test.
* ``clip_fit`` (session scope, one fit shared by the xdist workers): a tiny fit over time through the
  job queue (tests/job_runs.py moving_submit, mesh_time 1): (the Submit, the messages its job sent,
  the runs folder, the job id); its saved field is in ``runs folder / job id``.
"""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The tests' own helpers (tests/*.py) import by their names from every test folder.  (The project
# itself is installed: `make test` sets it up in .venv.)
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))

from helpers import BackendProcess  # noqa: E402


def pytest_configure(config):
    """`make test` runs two pytest-xdist workers on a 2-core machine, each test file on one worker
    (``--dist loadfile``: a file's module-scoped fixtures are built once; the session's ``clip_fit``
    once a worker that needs it).  Each worker, and every backend or Blender it starts, computes on
    one thread: two workers of two threads each fight over the cores, and a backend takes every
    core unless FIT_IMPLICIT_THREADS says otherwise (backend/service/fit_job.py)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FIT_IMPLICIT_THREADS"):
            os.environ[name] = "1"
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)


# Seconds each slow test file takes in `make test` (its tests and fixtures summed, one worker of two
# busy beside it; measured 2026-12-06 with `pytest --durations=0 -n 2 --dist loadfile`, before the
# trims of that day).  pytest-xdist hands whole files to the workers in collection order (the Makefile
# passes --no-loadscope-reorder: its default order, most tests first, left the slowest files, which hold
# few tests, to the end, one worker finishing them alone for ~3 minutes), so the collection starts with
# these, slowest first: the longest-first rule, within ~1 file of the ideal split.  Files not named
# follow in their usual order.  Refresh when a file's time changes a lot.
FILE_SECONDS = {
    "tests/backend/fitting/test_points_fit.py": 330,
    "tests/backend/fitting/test_dynamic_fit.py": 307,
    "tests/system/test_end_to_end_bpy.py": 238,
    "tests/backend/fitting/test_background.py": 171,
    "tests/backend/fitting/test_camera_refine.py": 150,
    "tests/backend/fitting/test_sdf.py": 143,
    "tests/backend/test_cli.py": 142,
    "tests/benchmarks/test_lego_mesh_bench.py": 132,
    "tests/addon/test_render_back.py": 130,
    "tests/backend/fitting/test_appearance.py": 120,
    "tests/backend/export/test_materials.py": 113,
    "tests/addon/test_points_fit_bpy.py": 107,
    "tests/backend/fields/test_encodings.py": 83,
    "tests/backend/fields/test_warm_start.py": 64,
    "tests/backend/service/test_reliability_jobs.py": 63,
    "tests/backend/service/test_reliability_restart.py": 62,
    "tests/backend/service/test_workers.py": 60,
    "tests/backend/fitting/test_fit.py": 56,
    "tests/addon/test_photo_fit_bpy.py": 49,
    "tests/addon/test_addon_ui_bpy.py": 49,
    "tests/backend/fitting/test_occupancy_field.py": 45,
    "tests/backend/fitting/test_surface_model.py": 43,
    "tests/addon/test_curve_addon_bpy.py": 42,
    "tests/backend/fitting/test_distortion.py": 38,
    "tests/backend/service/test_fit_job_photos.py": 37,
    "tests/backend/service/test_points_job.py": 36,
    "tests/backend/test_triton_kernels.py": 34,
    "tests/backend/service/test_server.py": 32,
}


def pytest_collection_modifyitems(session, config, items):
    """The slowest files first (FILE_SECONDS); a stable sort keeps each file's tests in order."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.nodeid.split("::", 1)[0], 0))


@pytest.fixture(autouse=True)
def _own_runs_dir(tmp_path_factory, monkeypatch):
    """Backends started by a test keep their job folders in a fresh folder (not the user's cache),
    so no unfinished job of one test is resumed by another test's backend."""
    monkeypatch.setenv("FIT_IMPLICIT_RUNS_DIR", str(tmp_path_factory.mktemp("runs")))


@pytest.fixture(scope="module")
def fake_backend():
    backend = BackendProcess(fake=True)
    yield backend
    backend.close()


@pytest.fixture
def backend_factory():
    started = []

    def start(**kwargs) -> BackendProcess:
        started.append(BackendProcess(**kwargs))
        return started[-1]

    yield start
    for backend in started:
        backend.close()


@pytest.fixture(scope="session")
def clip_fit(tmp_path_factory, worker_id):
    """Under pytest-xdist the workers share one fit (~80 s of make test): the first to ask runs it into
    a folder beside the workers' own, under a file lock; each worker then reads the messages back (as
    the wire decodes them) and works on its own copy of the runs folder."""
    import shutil

    from filelock import FileLock
    from job_runs import moving_submit, run_jobs
    from fit_implicit.shared import protocol

    runs = tmp_path_factory.mktemp("clip_runs")
    submit = moving_submit(mesh_time=1.0)
    if worker_id == "master":
        (sent,) = run_jobs(runs, submit)
        return submit, sent, runs, sent[-1].job_id
    shared = tmp_path_factory.getbasetemp().parent / "clip_fit"
    with FileLock(f"{shared}.lock"):
        if not (shared / "done").exists():
            shutil.rmtree(shared, ignore_errors=True)
            (shared / "runs").mkdir(parents=True)
            (sent,) = run_jobs(shared / "runs", submit)
            for i, message in enumerate(sent):
                for j, frame in enumerate(message.to_frames()):
                    (shared / f"message_{i:04d}_{j:02d}.bin").write_bytes(bytes(frame))
            (shared / "done").touch()
    frames: dict[int, list] = {}
    for path in sorted(shared.glob("message_*.bin")):
        frames.setdefault(int(path.stem.split("_")[1]), []).append(path.read_bytes())
    sent = [protocol.decode_message(frames[i]) for i in sorted(frames)]
    shutil.copytree(shared / "runs", runs, dirs_exist_ok=True)
    return submit, sent, runs, sent[-1].job_id
