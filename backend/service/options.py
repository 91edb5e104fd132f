"""Options of ``fit-implicit serve``, kept free of pyzmq so the CLI can build its parser
without importing the server.  backend/cli.py: ``serve_options.add_arguments(serve_parser)``.
"""
from __future__ import annotations

import argparse

DEFAULT_BIND = "tcp://127.0.0.1:5599"        # the add-on's default (blender_addon/preferences.py)
DEFAULT_MAX_MESSAGE_MB = 4096                 # one received message (ZMQ_MAXMSGSIZE and wire limits)
DEFAULT_MAX_QUEUE = 8
DEFAULT_CLIENT_TIMEOUT = 0.0                  # jobs outlive their client (it may reattach)
DEFAULT_CHECKPOINT_SECONDS = 60.0
DEFAULT_KEEP_HOURS = 24.0
DEFAULT_STALL_SECONDS = 60.0                  # an unfinished message with no new byte this long is dropped
DEFAULT_WORKER_TIMEOUT = 10.0                 # a worker on another host silent this long is gone (worker_door.py)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bind", default=DEFAULT_BIND,
                        help=f"ZeroMQ address to listen on; port 0 picks a free port (default {DEFAULT_BIND})")
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:N | mps: where to train (default: cuda if available, else Apple's GPU "
                             "(mps) if available, else cpu)")
    parser.add_argument("--gpus", default=None,
                        help="run jobs in worker processes, one on each of these GPUs: 'all', a count N (the first "
                             "N), or indices such as 0,2 ('2,' for GPU 2 alone); several jobs run at once, and a "
                             "worker that dies is restarted and its job resumes from its last checkpoint")
    parser.add_argument("--workers", type=int, default=0,
                        help="worker processes in all: spread over --gpus (default one a GPU), or on --device "
                             "without --gpus (default 0: jobs run one at a time in the server's own process)")
    parser.add_argument("--worker-bind", default=None,
                        help="also let workers on other hosts join at this address (`fit-implicit worker --server "
                             "ADDRESS` on each; CurveZMQ with their keys in authorized_workers unless loopback)")
    parser.add_argument("--worker-timeout", type=float, default=DEFAULT_WORKER_TIMEOUT,
                        help="seconds a worker on another host may be silent before its job is queued again "
                             f"(default {DEFAULT_WORKER_TIMEOUT:g})")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"jobs that may wait behind the running one (default {DEFAULT_MAX_QUEUE})")
    parser.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_MB,
                        help=f"largest message accepted, in MiB (default {DEFAULT_MAX_MESSAGE_MB})")
    parser.add_argument("--stall-seconds", type=float, default=DEFAULT_STALL_SECONDS,
                        help="drop a connection whose unfinished message has had no new byte for this many "
                             f"seconds (Linux; default {DEFAULT_STALL_SECONDS:g})")
    parser.add_argument("--max-clients", type=int, default=0,
                        help="connections served at once; more get a too_many_clients error (default 0: as many "
                             "as the open-file limit allows, which the backend raises to its hard limit)")
    parser.add_argument("--client-timeout", type=float, default=DEFAULT_CLIENT_TIMEOUT,
                        help="cancel the jobs of a client not heard from for this many seconds "
                             f"(0: never, the job keeps running and its results wait for the client to "
                             f"reattach; default {DEFAULT_CLIENT_TIMEOUT:g})")
    parser.add_argument("--runs-dir", default=None,
                        help="folder of the job folders <runs-dir>/<job_id>/ (saved job, checkpoints, model, "
                             "results); unfinished jobs found there resume at start-up "
                             "(default: $FIT_IMPLICIT_RUNS_DIR, else ~/.cache/fit_implicit/runs)")
    parser.add_argument("--checkpoint-seconds", type=float, default=DEFAULT_CHECKPOINT_SECONDS,
                        help="seconds between training checkpoints; a killed backend loses at most this much "
                             f"training (0: none; default {DEFAULT_CHECKPOINT_SECONDS:g})")
    parser.add_argument("--keep-hours", type=float, default=DEFAULT_KEEP_HOURS,
                        help="hours an ended job's results and model are kept for a client to fetch "
                             f"(Attach) before its folder is deleted (default {DEFAULT_KEEP_HOURS:g})")
    parser.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                        help="skip the start-up warm-up (a tiny fit on the GPU that pays the process's one-time "
                             "costs before the first job: imports, kernel compilation, graph capture)")
    parser.add_argument("--curve", action="store_true",
                        help="require CurveZMQ even on loopback (always required on any other address): "
                             "encrypted, and only clients listed in authorized_keys are admitted")
    parser.add_argument("--keys-dir", default=None,
                        help="folder of the server's CurveZMQ key pair (generated on first run) and of "
                             "authorized_keys, one client public key (Z85) per line "
                             "(default: $FIT_IMPLICIT_KEYS_DIR, else ~/.config/fit_implicit/)")


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fit-implicit worker`` (a worker on another host)."""
    parser.add_argument("--server", required=True, help="the backend's worker address (its serve --worker-bind), "
                                                        "e.g. tcp://gpu-head:5600")
    parser.add_argument("--server-key", default="", help="the backend's public key (Z85) or its server.key file; "
                                                          "needed for any address but this host's")
    parser.add_argument("--keys-dir", default=None, help="folder of this worker's key pair worker.key / "
                                                         "worker.key_secret (made on first run; none given: "
                                                         "$FIT_IMPLICIT_KEYS_DIR, else ~/.config/fit_implicit/)")
    parser.add_argument("--device", default="cuda", help="cpu | cuda | cuda:N | mps")
    parser.add_argument("--name", default="", help="how the backend's Status names this worker (''): the host name")
    parser.add_argument("--scratch", default=None, help="folder for running jobs' checkpoints (none given: a temporary one)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_WORKER_TIMEOUT,
                        help="seconds of silence after which the backend counts as gone")
    parser.add_argument("--runner", default="", help=argparse.SUPPRESS)   # module:function of a job runner (tests)
