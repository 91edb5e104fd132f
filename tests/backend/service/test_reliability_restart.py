"""Jobs outlive their client and their backend: disconnect and reattach, results that wait until
an expiry, kill -9 and resume from the last checkpoint, atomic files.  (issue 6, part 2)

Real backend subprocesses and real ZeroMQ sockets; the resume test trains for real on the CPU.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from fit_implicit.backend.service import checkpoint
from fit_implicit.blender_addon.client import JobClient
from helpers import TEST_TOKEN, BackendProcess, RawPeer, make_submit
from fit_implicit.shared import protocol

pytestmark = pytest.mark.timeout(300)

FAST = dict(heartbeat_interval=0.25, dead_after=2.0, token=TEST_TOKEN)   # one user's clients
TETRAHEDRON = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)   # helpers.fake_runner's mesh


def poll_until(client: JobClient, stop, timeout: float = 30.0) -> list:
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = client.poll()
        out += new
        if any(stop(m) for m in new) or client.finished:
            return out
        time.sleep(0.01)
    raise TimeoutError(f"gave up after {timeout} s: {[m.TYPE for m in out]}")


def status(address: str) -> protocol.StatusReply:
    with RawPeer(address, token=TEST_TOKEN) as peer:
        return peer.request(protocol.Status())


def wait_idle(address: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while status(address).state != "idle":
        assert time.monotonic() < deadline, "the backend stayed busy"
        time.sleep(0.05)


def attach(address: str, job_id: str, timeout: float = 60.0) -> tuple[JobClient, list]:
    client = JobClient(address, **FAST)
    client.attach(job_id)
    messages = client.wait(timeout)
    client.close()
    assert client.finished, [m.TYPE for m in messages]
    return client, messages


# ---- client disconnect ----------------------------------------------------------------------------
def test_a_job_survives_its_client_and_its_results_wait_until_fetched_then_expire(backend_factory):
    keep = 3.0   # seconds (--keep-hours takes fractions)
    backend = backend_factory(fake=True, args=["--keep-hours", str(keep / 3600)])
    first = JobClient(backend.address, **FAST)
    first.start(make_submit(steps=150, eval_count=1))   # ~1.5 s of fake training
    poll_until(first, lambda m: isinstance(m, protocol.Progress))
    job_id = first.job_id
    first.detach()                                       # Blender goes away; the job goes on
    assert status(backend.address).running_job == job_id
    wait_idle(backend.address)
    ended_at = time.monotonic()

    # A new client (Blender restarted) fetches the results, twice: they wait until the expiry.
    for _ in range(2):
        second, messages = attach(backend.address, job_id)
        kinds = [m.TYPE for m in messages]
        assert kinds[:2] == ["welcome", "attached"] and messages[1].state == "done", kinds
        assert kinds[2:] == ["mesh", "render", "done"], kinds      # each result once, then the end
        assert np.array_equal(messages[2].vertices, TETRAHEDRON) and messages[-1].summary["steps"] == 150
    folder = Path(backend.runs_dir) / job_id
    assert (folder / "job.json").exists() and json.loads((folder / "job.json").read_text())["state"] == "done"
    assert not (folder / "submit.npz").exists()   # only kept while the job may still need to resume

    # After the expiry the results are gone, with a clear text, and so is the job's folder.
    time.sleep(max(0.0, keep + 1.5 - (time.monotonic() - ended_at)))
    late, _ = attach(backend.address, job_id, timeout=10)
    assert "no job" in late.error and "expired" in late.error and "kept for" in late.error
    assert not folder.exists()


def test_reattach_while_running_gets_every_result_exactly_once(backend_factory):
    backend = backend_factory(fake=True)
    first = JobClient(backend.address, **FAST)
    first.start(make_submit(steps=150, eval_count=3))
    poll_until(first, lambda m: isinstance(m, protocol.Progress))
    first.detach()
    second = JobClient(backend.address, **FAST)
    second.attach(first.job_id)
    messages = second.wait(30)
    second.close()
    kinds = [m.TYPE for m in messages]
    assert messages[1].TYPE == "attached" and messages[1].state == "running"
    assert "progress" in kinds and kinds[-1] == "done" and not second.error
    assert kinds.count("mesh") == 1 and sorted(m.index for m in messages if m.TYPE == "render") == [0, 1, 2]


def test_attach_to_an_unknown_job_fails_clearly(fake_backend):
    client, _ = attach(fake_backend.address, "0123456789ab", timeout=10)
    assert "refused the job" in client.error and "no job '0123456789ab'" in client.error


# ---- atomic files ---------------------------------------------------------------------------------------
def test_files_are_replaced_atomically(tmp_path):
    target = tmp_path / "checkpoint.pt"
    checkpoint.atomic_write_bytes(target, b"old state")

    def crash_midway(f):
        f.write(b"half of the new st")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.atomic_write(target, crash_midway)
    assert target.read_bytes() == b"old state"                 # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]   # no temporary left behind
    checkpoint.atomic_write_bytes(target, b"new state")
    assert target.read_bytes() == b"new state"


def test_a_saved_submit_round_trips_without_pickle(tmp_path):
    submit = make_submit(n=3, size=8, eval_count=1, name="chair", steps=7)
    checkpoint.save_submit(tmp_path, submit)
    with np.load(tmp_path / "submit.npz", allow_pickle=False) as npz:   # plain arrays only
        assert set(npz.files) >= {"images", "intrinsics", "poses", "aabb"}
    loaded = checkpoint.load_submit(tmp_path)
    assert loaded.name == "chair" and loaded.steps == 7 and np.array_equal(loaded.images, submit.images)
    # A tampered file is refused with the reason, never half-loaded.
    scalars = json.loads((tmp_path / "submit.json").read_text())
    (tmp_path / "submit.json").write_text(json.dumps({**scalars, "steps": -5}))
    with pytest.raises(checkpoint.CheckpointError, match=r"not valid: submit\.steps"):
        checkpoint.load_submit(tmp_path)


# ---- backend killed, restarted: the job resumes -------------------------------------------------------------
STEPS = 80   # ~0.15 s a step on a 2-core CPU: the kill lands near step 12, far from the end


@pytest.mark.slow   # two backend starts (torch import) and 80 real training steps on the CPU: ~30-120 s
@pytest.mark.timeout(600)
def test_kill_minus_9_then_restart_resumes_from_the_last_checkpoint(tmp_path):
    import torch

    interval = 0.5   # seconds between checkpoints
    args = ["--runs-dir", str(tmp_path), "--checkpoint-seconds", str(interval)]
    backend = BackendProcess(fake=False, args=args)
    try:
        client = JobClient(backend.address, heartbeat_interval=0.25, dead_after=10.0, token=TEST_TOKEN)
        client.start(make_submit(n=6, size=24, steps=STEPS, mesh_resolution=24))
        progress = []
        while not (progress and progress[-1].elapsed >= 3.5 * interval and progress[-1].step >= 4
                   and list(tmp_path.glob("*/checkpoint.pt"))):
            new = [m for m in poll_until(client, lambda m: isinstance(m, protocol.Progress))
                   if isinstance(m, protocol.Progress)]
            assert not client.finished, client.error
            assert all(m.stage == "train" for m in new), "training ended before the kill (machine too slow?)"
            progress += new
        job_id = client.job_id
        backend.kill()                                  # kill -9, mid-training
        last = progress[-1]
        client.wait(15)
        assert client.finished and "stopped answering" in client.error
        client.close()
    finally:
        backend.close()

    folder = tmp_path / job_id
    assert json.loads((folder / "job.json").read_text())["state"] == "running"
    saved = torch.load(folder / "checkpoint.pt", weights_only=True)
    lost_seconds = last.elapsed - saved["elapsed"]
    print(f"killed after >= step {last.step} ({last.elapsed:.2f} s); last checkpoint: step {saved['step']} "
          f"({saved['elapsed']:.2f} s); lost <= {lost_seconds:.2f} s + the time since the last progress")
    assert 0 < saved["step"] <= last.step + 50
    # At most one interval lost (plus one progress interval and the write itself).
    assert lost_seconds <= interval + 0.75

    backend = BackendProcess(fake=False, args=args)     # the same runs dir: the job is re-queued
    try:
        client, messages = attach(backend.address, job_id, timeout=400)
    finally:
        backend.close()
    kinds = [m.TYPE for m in messages]
    assert messages[1].TYPE == "attached" and kinds[-1] == "done" and not client.error, kinds
    done = messages[-1]
    assert done.summary["resumed_from_step"] == saved["step"]
    assert done.summary["steps"] >= saved["step"]
    trained = [m for m in messages if m.TYPE == "progress" and m.stage == "train" and m.step > 0]
    # Progress after the restart carries on from the checkpoint's step and clock, to the end.
    assert trained and all(m.step >= saved["step"] and m.elapsed >= saved["elapsed"] for m in trained)
    assert done.summary["steps"] == STEPS   # (the client keeps only the newest Progress between polls)
    assert kinds.count("mesh") == 1
    mesh = next(m for m in messages if m.TYPE == "mesh")
    assert np.isfinite(mesh.vertices).all()   # (80 draft steps may not be dense enough for faces yet)
    assert (folder / "model.pt").exists() and not (folder / "checkpoint.pt").exists()
    from fit_implicit.backend.fitting.runs import load_run  # later jobs load the fitted model from there
    assert load_run(folder, "cpu").meta["resumed_from_step"] == saved["step"]
    assert json.loads((folder / "job.json").read_text())["state"] == "done"


# ---- damaged files: nothing lost, nothing left forever ------------------------------------------------------
def test_a_damaged_job_record_is_salvaged_on_restart(tmp_path):
    """job.json cut short: a job whose Submit is intact is queued again (and runs); a folder with
    a fitted model is kept; anything else ends, so its folder expires like any ended job."""
    from fit_implicit.backend.service import jobs
    from fit_implicit.backend.service.outbox import Outbox

    intact, fitted, empty = (tmp_path / name for name in ("aaaaaaaaaaaa", "bbbbbbbbbbbb", "cccccccccccc"))
    for folder in (intact, fitted, empty):
        folder.mkdir()
        (folder / "job.json").write_bytes(b'{"format": 1, "id": "tr')          # truncated by a crash
    checkpoint.save_submit(intact, make_submit(n=2, size=8, name="intact"))
    (fitted / "run.json").write_text("{}")
    (fitted / "model.pt").write_bytes(b"PK\x03\x04")
    queue = jobs.JobQueue(lambda msg, ctx: {}, Outbox(), device="cpu", runs_dir=tmp_path, keep_seconds=3600)
    requeued, kept = queue.restore()
    assert (requeued, kept) == (1, 2)
    assert [job.id for job in queue.waiting()] == ["aaaaaaaaaaaa"]
    states = {f.name: checkpoint.read_job_record(f)["state"] for f in (intact, fitted, empty)}
    assert states == {"aaaaaaaaaaaa": "queued", "bbbbbbbbbbbb": "done", "cccccccccccc": "failed"}
    assert sorted(queue.expire(now=time.time() + 7200)) == ["bbbbbbbbbbbb", "cccccccccccc"]
    assert not fitted.exists() and not empty.exists() and intact.exists()


def test_a_checkpoint_that_reads_but_does_not_fit_starts_the_fit_over(tmp_path):
    """A checkpoint of another fit (or damaged inside) is not a crash: the fit starts over."""
    import torch

    import synthetic
    from fit_implicit.backend.fitting.config import make_config
    from fit_implicit.backend.fitting.data import load_transforms
    from fit_implicit.backend.fitting.loop import fit

    data = load_transforms(synthetic.write_transforms(tmp_path / "data", count=4, size=12).parent)
    cfg = make_config("nerf", "draft", device="cpu", steps=3)
    wrong = {"step": 2, "elapsed": 1.0, "field": {"nope": torch.zeros(1)}, "rays": 64}
    model = fit(data, cfg, resume=wrong)
    assert model.meta["steps"] == 3 and "resumed_from_step" not in model.meta
