"""A local backend started from Blender: ``fit-implicit serve`` as a child process.

No bpy here (testable without Blender).  The add-on keeps at most one per address
(:func:`get` / :func:`start`); the log (stdout and stderr) goes to a file the user can open.

    proc = start(python, "tcp://127.0.0.1:5599", device="cuda:0", log_path=path, source_dirs=[repo])
    proc.ready()        # True once the log says "backend listening on ..."
    proc.stop()         # SIGTERM (CTRL_BREAK on Windows), wait, then kill
"""
from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

READY_LINE = re.compile(r"backend listening on (\S+)")
DEVICE_RE = re.compile(r"(cpu|cuda|cuda:\d+|all-gpus)")
STOP_GRACE = 10.0     # the server gives a running job 5 s to stop, then exits

_PROCESSES: dict[str, "LocalBackend"] = {}
_LOCK = threading.Lock()


class BackendProcessError(RuntimeError):
    """The backend could not be started or stopped; the text is meant for the user."""


# Runs ``fit_implicit.backend`` from the checkout named by its first argument: the import name
# fit_implicit stands for that folder, so its backend/ and shared/ are fit_implicit.backend and
# fit_implicit.shared (pyproject.toml maps them so when the project is installed).
FROM_CHECKOUT = ("import runpy, sys, types; pkg = types.ModuleType('fit_implicit'); pkg.__path__ = [sys.argv.pop(1)]; "
                 "sys.modules['fit_implicit'] = pkg; runpy.run_module('fit_implicit.backend', run_name='__main__', "
                 "alter_sys=True)")


def default_source_dir() -> Path | None:
    """The checkout that holds ``backend/`` next to this add-on (a development install), or None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "backend" / "__main__.py").is_file() else None


def local_bind(address: str) -> str:
    """The address itself if a backend on this machine can listen there, else BackendProcessError."""
    host, sep, port = address.removeprefix("tcp://").rpartition(":")
    if not address.startswith("tcp://") or not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise BackendProcessError(f"{address!r} is not an address a local backend can listen on "
                                  "(expected tcp://127.0.0.1:PORT)")
    if host not in ("127.0.0.1", "localhost", "[::1]", "::1"):
        raise BackendProcessError(f"the backend address {address} is not on this machine: start the backend there "
                                  "(fit-implicit serve), or set the address to tcp://127.0.0.1:PORT")
    return address


MISSING_MODULE = re.compile(r"No module named '?([\w.]+)'?")


class LocalBackend:
    """One ``fit-implicit serve`` child process.

    Args:
        python: the backend's Python executable (it needs torch and pyzmq).
        address: loopback tcp address to bind.
        device: "" (the backend picks: cuda if available), "cpu", "cuda", "cuda:N" or "all-gpus" (a
            worker process on every GPU, ``serve --gpus all``).
        log_path: file that receives the process's stdout and stderr (truncated at start).
        source_dirs: a checkout (the first folder) whose backend/ and shared/ run, as
            fit_implicit.backend and fit_implicit.shared, whatever ``python`` has installed; the
            folders also go first on PYTHONPATH.
    """

    def __init__(self, python: str, address: str, *, device: str = "", log_path: str,
                 source_dirs: list[str] | None = None, extra_args: list[str] | None = None):
        if device and not DEVICE_RE.fullmatch(device):
            raise BackendProcessError(f"the GPU choice {device!r} is not one of cpu, cuda, cuda:N, all-gpus")
        self.python = python
        self.address = local_bind(address)
        self.device = device
        self.log_path = str(log_path)
        self.source_dirs = [str(d) for d in (source_dirs or []) if d]
        self.extra_args = list(extra_args or [])
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0

    @staticmethod
    def command_for(python: str, address: str, device: str = "") -> list[str]:
        cmd = [python, "-u", "-m", "fit_implicit.backend", "serve", "--bind", address]
        if device == "all-gpus":
            return cmd + ["--gpus", "all"]
        return cmd + (["--device", device] if device else [])

    @property
    def command(self) -> list[str]:
        cmd = self.command_for(self.python, self.address, self.device) + self.extra_args
        if self.source_dirs:    # "-m fit_implicit.backend" of the checkout, not of what is installed
            cmd[2:4] = ["-c", FROM_CHECKOUT, self.source_dirs[0]]
        return cmd

    def start(self) -> None:
        """Launch the process (returns at once; see :meth:`ready`).  Raises BackendProcessError."""
        if self.running:
            return
        if not self.python or not (os.path.isfile(self.python) or _which(self.python)):
            raise BackendProcessError(f"the backend Python {self.python!r} was not found: set it in the add-on "
                                      "preferences (a Python with torch and pyzmq, e.g. the project's .venv/bin/python)")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONHOME", None)     # Blender's own Python must not leak into the backend's
        paths = self.source_dirs + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths)
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        kwargs = {}
        if sys.platform == "win32":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True     # Ctrl+C in Blender's terminal does not reach it
        try:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         cwd=self.source_dirs[0] if self.source_dirs else None, **kwargs)
        except OSError as exc:
            raise BackendProcessError(f"could not start the backend ({' '.join(self.command)}): {exc}") from exc
        finally:
            log.close()
        self.started_at = time.monotonic()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def ready(self) -> bool:
        """True once the backend listens.  Raises BackendProcessError if it exited."""
        if self.proc is None:
            return False
        if READY_LINE.search(self.log_tail(1 << 16)):
            return self.running
        if not self.running:
            raise BackendProcessError(self.exit_text())
        return False

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.1) -> None:
        """Block until the backend listens (scripts and background mode)."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise BackendProcessError(f"the backend did not start listening within {timeout:g} s; "
                                          f"see its log: {self.log_path}")
            time.sleep(interval)

    def exit_text(self) -> str:
        tail = self.log_tail(600).strip()
        last = tail.splitlines()[-1] if tail else "no output"
        missing = MISSING_MODULE.search(last)
        if missing:     # the usual first-run problem: a Python without the backend (or torch, pyzmq)
            what = "Fit Implicit backend" if missing.group(1).startswith("fit_implicit") else missing.group(1)
            return (f"the backend Python {self.python} has no {what} installed: set Backend Python in the add-on "
                    "preferences to the Python of the environment where you installed the backend (pip install "
                    f"-e '.[server]' there; README, 'The backend on its own') (full log: {self.log_path})")
        return (f"the backend exited (code {self.returncode}) before it was ready: {last} "
                f"(full log: {self.log_path})")

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """Ask the backend to stop (it fails its waiting jobs, stops the running one), wait up to
        ``grace`` seconds, then kill it.  Returns the exit code (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.CTRL_BREAK_EVENT if sys.platform == "win32" else signal.SIGTERM)
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5.0)
            except OSError:
                pass
        return self.proc.returncode


def _which(name: str) -> str | None:
    import shutil
    return shutil.which(name)


# --------------------------------------------------------------------------------------------
# The add-on's processes, one per address
# --------------------------------------------------------------------------------------------
def get(address: str) -> LocalBackend | None:
    with _LOCK:
        return _PROCESSES.get(address)


def start(python: str, address: str, **kwargs) -> LocalBackend:
    """Start a backend on ``address`` (or return the one already running there)."""
    with _LOCK:
        proc = _PROCESSES.get(address)
        if proc is not None and proc.running:
            return proc
        proc = LocalBackend(python, address, **kwargs)
        proc.start()
        if not _PROCESSES:
            atexit.register(stop_all)     # Blender quits: no backend left behind
        _PROCESSES[address] = proc
        return proc


def stop(address: str, grace: float = STOP_GRACE) -> int | None:
    with _LOCK:
        proc = _PROCESSES.pop(address, None)
    return None if proc is None else proc.stop(grace)


def stop_all(grace: float = STOP_GRACE) -> None:
    with _LOCK:
        procs = list(_PROCESSES.values())
        _PROCESSES.clear()
    for proc in procs:
        proc.stop(grace)
