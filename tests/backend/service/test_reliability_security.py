"""Nothing from a message opens a path outside its job's folder; nothing received is unpickled
or evaluated.  (issue 6, part 4)"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest

from fit_implicit.backend.service import checkpoint
from fit_implicit.backend.service.paths import PathError, confined, job_folder
from helpers import REPO, RawPeer, make_submit
from fit_implicit.shared import protocol

ESCAPES = ["../secret", "../../etc/passwd", "a/../../secret", "/etc/passwd", "//etc/passwd", "~/x",
           "C:\\Windows", "\\\\server\\share", "", "a\x00b", "results/../../other/job.json"]


@pytest.mark.parametrize("name", ESCAPES)
def test_paths_that_leave_the_folder_are_refused(tmp_path, name):
    with pytest.raises(PathError):
        confined(tmp_path / "job", name)


def test_names_inside_the_folder_are_allowed(tmp_path):
    root = tmp_path / "job"
    assert confined(root, "results/0001.msg") == (root / "results" / "0001.msg").resolve()
    assert confined(root, "a/../b.json") == (root / "b.json").resolve()   # stays inside: fine


def test_symlinks_out_of_the_folder_are_refused(tmp_path):
    root, outside = tmp_path / "job", tmp_path / "outside"
    (root / "results").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("s")
    os.symlink(outside, root / "link")                       # a folder link pointing out
    os.symlink(outside / "secret.txt", root / "file.txt")    # a file link pointing out
    os.symlink(root / "results", root / "inner")              # a link that stays inside is fine
    for name in ("link/secret.txt", "file.txt", "link"):
        with pytest.raises(PathError, match="outside the job's folder"):
            confined(root, name)
    assert confined(root, "inner/x.msg") == (root / "results" / "x.msg").resolve()


@pytest.mark.parametrize("job_id", ["../0123456789", "0123456789ab/..", "/tmp/x", "..", "0123456789AB", "a" * 300,
                                    "0123456789a", "0123456789ab\x00"])
def test_only_real_job_ids_name_folders(tmp_path, job_id):
    with pytest.raises(PathError, match="is not a job id"):
        job_folder(tmp_path, job_id)


def test_a_symlinked_job_folder_is_not_followed_at_start_up(tmp_path):
    """A job folder that is a link elsewhere is neither re-queued nor served."""
    from fit_implicit.backend.service.jobs import JobQueue
    from fit_implicit.backend.service.outbox import Outbox

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    checkpoint.save_submit(elsewhere, make_submit())
    checkpoint.write_job_record(elsewhere, id="0123456789ab", state="queued")
    runs = tmp_path / "runs"
    runs.mkdir()
    os.symlink(elsewhere, runs / "0123456789ab")
    jobs = JobQueue(lambda s, c: {}, Outbox(), device="cpu", runs_dir=runs)
    assert jobs.restore() == (0, 0)


def test_attach_and_cancel_with_paths_for_ids_are_refused_over_the_socket(fake_backend, tmp_path):
    with RawPeer(fake_backend.address) as peer:
        for job_id in ["../../etc", "/etc/passwd", "..", "0123456789ab/../x", "%2e%2e%2f"]:
            reply = peer.request(protocol.Attach(job_id=job_id))
            assert isinstance(reply, protocol.Error) and reply.code == "unknown_job", reply
            assert "is not a job id" in reply.message
            reply = peer.request(protocol.Cancel(job_id=job_id))
            assert isinstance(reply, protocol.Error) and reply.code == "unknown_job"
        assert isinstance(peer.request(protocol.Ping()), protocol.Pong)   # still serving


# ---- no pickle, no eval ---------------------------------------------------------------------------
WIRE_CODE = ["shared/wire.py", "shared/protocol.py", "backend/service/server.py", "backend/service/jobs.py", "backend/service/outbox.py",
             "backend/service/checkpoint.py", "backend/service/paths.py", "backend/service/security.py", "blender_addon/client.py"]
FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}


@pytest.mark.parametrize("path", WIRE_CODE)
def test_wire_code_has_no_pickle_and_no_eval(path):
    tree = ast.parse((REPO / path).read_text(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & FORBIDDEN_MODULES, (path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in FORBIDDEN_MODULES, (path, node.lineno)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if isinstance(func, ast.Name):            # the builtins eval(), exec(), compile(), __import__()
                assert name not in FORBIDDEN_CALLS, (path, node.lineno, name)
            assert name != "loads" or _is_json_loads(func), (path, node.lineno, name)   # only json.loads
            if name == "load" and isinstance(func, ast.Attribute):   # np.load / torch.load
                kwargs = {k.arg: k.value for k in node.keywords}
                owner = getattr(func.value, "id", "")
                if owner in ("np", "numpy"):
                    assert isinstance(kwargs.get("allow_pickle"), ast.Constant) and kwargs["allow_pickle"].value is False
                if owner == "torch":
                    assert isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True


def _is_json_loads(func) -> bool:
    return isinstance(func, ast.Attribute) and func.attr == "loads" and getattr(func.value, "id", "") == "json"


def test_a_pickle_sent_to_the_backend_is_refused_and_never_run(fake_backend, tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    with RawPeer(fake_backend.address) as peer:
        blob = pickle.dumps(Payload())
        for frames in ([blob], [b'{"v": %d, "type": "ping", "arrays": [{"name": "x", "dtype": "object", "shape": [1]}]}'
                                % protocol.PROTOCOL_VERSION,
                                blob]):
            reply = peer.request(frames)
            assert isinstance(reply, protocol.Error)
    assert not marker.exists()


def test_saved_jobs_are_read_without_pickle(tmp_path):
    """A submit.npz that holds an object array (a pickle) is refused, not loaded."""
    np.save(tmp_path / "x.npy", np.array([1]))
    checkpoint.save_submit(tmp_path, make_submit())
    with np.load(tmp_path / "submit.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["images"] = np.array([object()], dtype=object)
    np.savez(tmp_path / "submit.npz", **arrays)
    with pytest.raises(checkpoint.CheckpointError, match="cannot be read"):
        checkpoint.load_submit(tmp_path)
