"""Many jobs, many workers, one address (issue 20, item 2): ``serve --workers N`` / ``--gpus``.

Real backend subprocesses, real worker processes and real ZeroMQ sockets.  The workers run the
fake runner (tests/helpers.py) except in the last test, which trains for real on the CPU and
kills a worker mid-fit.  (``--gpus`` needs CUDA: here only its settings are checked; the GPU
figures come from benchmarks/gpu_suite.sh.)
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fit_implicit.backend.service import security, server
from fit_implicit.backend.service.workers import worker_devices
from fit_implicit.blender_addon.client import JobClient
from helpers import TEST_TOKEN, BackendProcess, RawPeer, make_submit
from fit_implicit.shared import protocol

pytestmark = pytest.mark.timeout(300)


def client_of(address: str, user: int) -> JobClient:
    """A client of user ``user`` (its own token: fairness is between users)."""
    return JobClient(address, heartbeat_interval=0.25, dead_after=10.0, token=f"{user:02d}" * 16)


def status(address: str) -> protocol.StatusReply:
    with RawPeer(address, token=TEST_TOKEN) as peer:
        return peer.request(protocol.Status())


def wait_all(clients: list[JobClient], timeout: float = 120.0) -> dict[JobClient, list]:
    seen: dict[JobClient, list] = {c: [] for c in clients}
    deadline = time.monotonic() + timeout
    while not all(c.finished for c in clients):
        assert time.monotonic() < deadline, {c.job_id: [m.TYPE for m in seen[c]] for c in clients}
        for c in clients:
            seen[c] += c.poll()
        time.sleep(0.01)
    for c in clients:
        seen[c] += c.poll()
    return seen


def worker_pids(backend: BackendProcess) -> list[int]:
    """The backend's worker processes (Linux: /proc)."""
    tasks = Path(f"/proc/{backend.proc.pid}/task").glob("*/children")   # each thread's (workers start their own)
    return [int(pid) for task in tasks for pid in task.read_text().split()]


def test_worker_settings_name_devices_and_refuse_what_cannot_be():
    assert worker_devices("all", 0, "cpu", 2) == ["cuda:0", "cuda:1"]
    assert worker_devices("0,1", 4, "cpu", 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_devices("1", 0, "cpu", 2) == ["cuda:0"] and worker_devices("1,", 0, "cpu", 2) == ["cuda:1"]
    assert worker_devices(None, 2, "cpu", 0) == ["cpu", "cpu"] and worker_devices(None, 0, "cuda", 1) == []
    for gpus, count, words in (("all", 0, "no CUDA GPU"), ("3,", 2, "GPU 3 does not exist"),
                               ("0,0", 2, "named twice"), ("x", 2, "a count, or GPU indices"),
                               ("4", 2, "sees 2 CUDA GPU")):
        with pytest.raises(ValueError, match=words):
            worker_devices(gpus, 0, "cpu", count)
    args = argparse.Namespace(bind="tcp://127.0.0.1:0", device="cpu", max_queue=4, gpus="all",
                              runs_dir=None)
    if not __import__("torch").cuda.is_available():   # what `serve --gpus all` says on this machine
        with pytest.raises(server.ConfigError, match="no CUDA GPU visible"):
            server.config_from_args(args)


def test_workers_may_join_from_other_hosts_only_with_their_keys_allowed(tmp_path):
    args = argparse.Namespace(bind="tcp://127.0.0.1:0", device="cpu", max_queue=4, runs_dir=str(tmp_path / "runs"),
                              worker_bind="tcp://0.0.0.0:5600", keys_dir=str(tmp_path / "keys"))
    with pytest.raises(server.ConfigError, match="refusing to let workers join at tcp://0.0.0.0:5600 without "
                                                 "CurveZMQ: .*no worker is allowed in .*authorized_workers"):
        server.config_from_args(args)
    args.worker_bind = "tcp://127.0.0.1:5600"           # this host's workers only: plain, as for clients
    assert server.config_from_args(args).worker_curve is None


def test_two_workers_run_four_users_jobs_at_once_and_in_fair_turns(backend_factory):
    backend = backend_factory(args=["--workers", "2", "--max-queue", "8"])
    blockers = [client_of(backend.address, 9) for _ in range(2)]
    for c in blockers:                       # both workers busy while the others queue
        c.start(make_submit(steps=120, name="blocker"))
    deadline = time.monotonic() + 30
    while status(backend.address).state != "busy" or len(status(backend.address).workers.split("busy")) < 3:
        assert time.monotonic() < deadline, status(backend.address)
        time.sleep(0.02)
    states = status(backend.address).workers
    assert states.startswith("w0 cpu busy") and "w1 cpu busy" in states, states
    users = [client_of(backend.address, user) for user in range(4) for _ in range(2)]   # each user queues two
    for c in users:
        c.start(make_submit(steps=30, name=f"user{c.token[:2]}"))
    seen = wait_all(blockers + users)
    dones = {c: seen[c][-1] for c in users + blockers}
    assert all(isinstance(d, protocol.Done) for d in dones.values()), {c.job_id: c.error for c in dones}
    pids = {d.summary["pid"] for d in dones.values()}
    assert len(pids) == 2, pids            # two worker processes, and only two, ran them all
    # Round-robin across users: every user's first job began before any user's second one.
    began = sorted(users, key=lambda c: dones[c].summary["began"])
    assert len({c.token for c in began[:4]}) == 4, [c.token[:2] for c in began]
    assert max(dones[c].summary["began"] for c in blockers) < dones[began[0]].summary["began"]
    for c in blockers + users:
        c.close()


def test_a_killed_worker_is_restarted_and_its_job_runs_again_the_others_go_on(backend_factory):
    backend = backend_factory(args=["--workers", "2"])
    dying, other = client_of(backend.address, 1), client_of(backend.address, 2)
    dying.start(make_submit(steps=60, name="die-once"))    # kills its worker half-way, the first time
    other.start(make_submit(steps=80, name="steady"))
    seen = wait_all([dying, other])
    assert isinstance(seen[other][-1], protocol.Done) and not other.error
    done = seen[dying][-1]
    assert isinstance(done, protocol.Done) and not dying.error, dying.error
    notes = [m.note for m in seen[dying] if isinstance(m, protocol.Progress) and m.note]
    assert any("stopped (killed by SIGKILL" in n and "runs again" in n for n in notes), notes
    assert seen[other][-1].summary["pid"] in worker_pids(backend)            # its worker lived on
    assert done.summary["pid"] in worker_pids(backend)                        # a new worker (or the other) ran it
    assert "(restarted 1x)" in status(backend.address).workers
    # A job that kills every worker it runs on ends, with the reason, after the second death.
    killer = client_of(backend.address, 3)
    killer.start(make_submit(steps=20, name="die"))
    seen = wait_all([killer])
    assert isinstance(seen[killer][-1], protocol.Failed) and seen[killer][-1].code == "worker_died"
    assert "died 2 times" in killer.error and "killed by SIGKILL" in killer.error, killer.error
    deadline = time.monotonic() + 30
    while len(worker_pids(backend)) < 2:     # both workers are back for the next jobs
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for c in (dying, other, killer):
        c.close()


@pytest.mark.slow   # a worker's torch import (twice) and 80 real training steps on the CPU: ~40-90 s
@pytest.mark.timeout(600)
def test_a_fit_whose_worker_is_killed_resumes_from_its_checkpoint_in_a_new_worker(tmp_path):
    interval = 0.5   # seconds between checkpoints
    backend = BackendProcess(fake=False, args=["--runs-dir", str(tmp_path), "--checkpoint-seconds", str(interval),
                                               "--workers", "1"])
    try:
        client = JobClient(backend.address, heartbeat_interval=0.25, dead_after=10.0, token=TEST_TOKEN)
        client.start(make_submit(n=6, size=24, steps=80, mesh_resolution=24))
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("*/checkpoint.pt")):
            assert time.monotonic() < deadline and not client.finished, client.error
            client.poll()
            time.sleep(0.05)
        [worker] = worker_pids(backend)
        os.kill(worker, signal.SIGKILL)                       # the worker, not the server
        messages = client.wait(400)
        assert client.finished and not client.error, client.error
        done = messages[-1]
        assert done.TYPE == "done" and done.summary["resumed_from_step"] > 0 and done.summary["steps"] == 80
        assert done.summary["device"] == "cpu"
        assert [m.TYPE for m in messages].count("mesh") == 1
        assert worker_pids(backend) and worker not in worker_pids(backend)
        client.close()
    finally:
        backend.close()


# ---- workers on other hosts (serve --worker-bind, fit-implicit worker) ---------------------------------------
def start_remote_worker(address: str, server_key: bytes, keys: Path, name: str) -> subprocess.Popen:
    """``fit-implicit worker`` with the fake runner (tests/helpers.py), as a TD would start it on another box."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "fit_implicit.backend", "worker", "--server", address, "--server-key",
           server_key.decode(), "--keys-dir", str(keys), "--device", "cpu", "--name", name, "--timeout", "10",
           "--runner", "helpers:fake_runner"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_worker_on_another_host_joins_over_curvezmq_takes_jobs_and_its_loss_requeues_its_job(backend_factory,
                                                                                                 tmp_path):
    server_keys, box_keys, stranger_keys = tmp_path / "server", tmp_path / "box", tmp_path / "stranger"
    server_public, _ = security.ensure_server_keys(server_keys)
    box_public, _ = security.ensure_server_keys(box_keys, stem="worker")
    security.ensure_server_keys(stranger_keys, stem="worker")
    (server_keys / "authorized_workers").write_text(box_public.decode() + "\n")
    # A worker silent for 10 s is gone, and so is the backend for the worker (start_remote_worker;
    # both ends beat every second): on two loaded cores shorter timeouts dropped box2 for a late beat
    # (the two jobs below then both ran here).  Its loss below is seen sooner: the next beat sent to
    # a closed connection fails (worker_door.py).
    backend = backend_factory(args=["--worker-bind", "tcp://0.0.0.0:0", "--keys-dir", str(server_keys),
                                    "--worker-timeout", "10"])
    door = backend.worker_address.replace("0.0.0.0", "127.0.0.1")
    assert door.startswith("tcp://127.0.0.1:"), backend.worker_address
    box = start_remote_worker(door, server_public, box_keys, "box2")
    stranger = start_remote_worker(door, server_public, stranger_keys, "stranger")   # its key is not allowed
    try:
        deadline = time.monotonic() + 60
        while "cpu@box2 idle" not in status(backend.address).workers:
            assert time.monotonic() < deadline and box.poll() is None, (status(backend.address), backend.log()[-2000:])
            time.sleep(0.05)
        while "refused a worker: its public key" not in backend.log():   # the stranger's key: refused, and logged
            assert time.monotonic() < deadline, backend.log()[-2000:]
            time.sleep(0.05)
        assert "stranger" not in status(backend.address).workers
        # Two users' jobs at once (~3 s each, so that the first is still running when the second
        # comes): one on this host's worker, one on box2.
        users = [client_of(backend.address, u) for u in (1, 2)]
        for c in users:
            c.start(make_submit(steps=300, name="both"))
        seen = wait_all(users)
        pids = {seen[c][-1].summary["pid"] for c in users}
        assert pids == {backend.proc.pid, box.pid}, (pids, backend.proc.pid, box.pid, backend.log()[-2000:])
        assert {seen[c][-1].summary["device"] for c in users} == {"cpu", "cpu@box2"}
        # box2 is lost mid-job (its connection closes; across a network, or a box that hangs, its
        # silence for --worker-timeout says the same): the job is queued again and finishes here.
        pair = [client_of(backend.address, 3), client_of(backend.address, 4)]
        for c in pair:
            c.start(make_submit(steps=300, name="pair"))     # ~3 s each, one on each worker
        deadline = time.monotonic() + 30
        while not all(w in status(backend.address).workers for w in ("w0 cpu busy", "cpu@box2 busy")):
            assert time.monotonic() < deadline and not any(c.finished for c in pair), status(backend.address)
            time.sleep(0.02)
        box.kill()
        seen = wait_all(pair)
        assert all(isinstance(seen[c][-1], protocol.Done) and seen[c][-1].summary["pid"] == backend.proc.pid
                   for c in pair), [c.error for c in pair]
        notes = [m.note for c in pair for m in seen[c] if isinstance(m, protocol.Progress) and m.note]
        assert len(notes) == 1 and "cpu@box2 stopped (left: " in notes[0] and "runs again" in notes[0], notes
        assert "box2" not in status(backend.address).workers
        for c in [*users, *pair]:
            c.close()
    finally:
        for proc in (box, stranger):
            proc.kill()
            proc.wait()


def test_a_model_sent_back_by_a_remote_worker_is_checked_before_it_is_kept(tmp_path):
    import json
    from types import SimpleNamespace

    import zmq

    from fit_implicit.backend.service.workers import keep_model

    ctx = SimpleNamespace(folder=tmp_path, job_id="abc")
    run = {"format": 2, "method": "nerf", "config": {}, "aabb": [[-1, -1, -1], [1, 1, 1]]}
    weights = b"PK\x03\x04" + bytes(60)     # a zip's signature: check_run_files never loads it
    keep_model(ctx, [zmq.Frame(b"{not json"), zmq.Frame(weights)])
    assert not list(tmp_path.iterdir())     # refused (and logged): nothing written
    keep_model(ctx, [zmq.Frame(json.dumps(run).encode()), zmq.Frame(weights)])
    assert json.loads((tmp_path / "run.json").read_text()) == run and (tmp_path / "model.pt").read_bytes() == weights
