"""Fuzzing the backend's socket (issue 6, "bad input").

A real backend subprocess (helpers.BackendProcess, fake runner: no training) receives
10,000 hypothesis-generated malformed messages over one DEALER socket: 20 per example
(two of each kind below), 500 examples.  Every message must get an Error reply whose text
matches the case's pattern (what was wrong); afterwards the backend still answers Ping and
Status, and its resident memory stays bounded.  docs/reliability.md quotes these figures.

Kinds: wrong types, truncated or missing frames, declared sizes far larger than the frames,
negative/NaN/infinite values in poses and intrinsics, dtype and shape mismatches, unknown
message types, wrong protocol versions, zero images, 100,000 images, empty and enormous strings.
A message over the backend's maximum message size (ZMQ_MAXMSGSIZE) cannot be answered (libzmq
drops the connection before the server sees it); :func:`test_a_message_over_the_cap_is_dropped`
shows that the backend keeps serving after one.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from helpers import BackendProcess, RawPeer, make_submit
from fit_implicit.shared import protocol, wire

BATCHES = 500              # hypothesis examples
PER_KIND = 2               # cases of each kind per example -> 500 * 10 * 2 = 10,000 messages
MAX_MESSAGE_MB = 1         # the fuzzed backend's --max-message-mb (the cap of the last test)
RSS_BOUND_MIB = 64         # allowed growth of the backend's VmRSS over the whole run
V = protocol.PROTOCOL_VERSION

# A valid job to derive malformed ones from (cases that stay valid would be accepted: a test failure).
_BASE = make_submit(n=3, size=4)
ARRAY_FIELDS = ("images", "intrinsics", "poses", "aabb")
REQUIRED = ARRAY_FIELDS


@dataclass
class Case:
    kind: str
    frames: list
    expect: str          # regex the Error text must match (case-insensitive)
    code: str = ""       # the Error code, when it must be a particular one
    undecodable: bool = True   # False: decodes, and a handler refuses it (not logged as "rejected")


def base_parts(n: int | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """(scalar header fields, arrays) of a valid Submit with n images (default 3)."""
    header = {"v": V, "type": "submit", "name": "fuzz", "preset": "draft",
              "steps": 20, "mesh_resolution": 16, "preview_size": 0}
    arrays = {k: np.array(getattr(_BASE, k)) for k in ARRAY_FIELDS}
    if n is not None:
        arrays["images"] = np.resize(arrays["images"], (n, *arrays["images"].shape[1:]))
        arrays["intrinsics"] = np.resize(arrays["intrinsics"], (n, 4))
        arrays["poses"] = np.resize(arrays["poses"], (n, 4, 4))
    return header, arrays


def pack(header: dict, arrays: dict[str, np.ndarray] | None = None, table: list | None = None,
         frames: list | None = None) -> list:
    """Frames of one message; ``table``/``frames`` override what ``arrays`` would give (mismatches)."""
    arrays = arrays or {}
    if table is None:
        table = [{"name": k, "dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays.items()]
    if frames is None:
        frames = [np.ascontiguousarray(a).tobytes() for a in arrays.values()]
    full = dict(header)
    full["arrays"] = table
    return [json.dumps(full).encode(), *frames]


# --------------------------------------------------------------------------------------------
# One strategy per kind
# --------------------------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**60, 2**60),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_values = st.one_of(json_scalars, st.lists(json_scalars, max_size=3),
                        st.dictionaries(st.text(max_size=4), json_scalars, max_size=2))
not_str = json_values.filter(lambda v: not isinstance(v, str))
not_int = json_values.filter(lambda v: isinstance(v, bool) or not isinstance(v, int))
not_num = json_values.filter(lambda v: isinstance(v, bool) or not isinstance(v, (int, float)))
not_bool_int = not_int


@st.composite
def wrong_types(draw) -> Case:
    target = draw(st.sampled_from(["ping.seq", "hello.client", "hello.protocol", "cancel.job_id",
                                   "submit.steps", "submit.seconds", "submit.name", "submit.preset",
                                   "submit.preview_size", "submit.mesh_resolution", "submit.preview_interval",
                                   "header", "nested", "arrays", "entry", "entry.name"]))
    kind = "wrong_types"
    if target == "nested":   # deeper than the JSON parser's stack, or just deep
        depth = draw(st.sampled_from([10, 1000, 40_000, 120_000]))   # (all under the 1 MiB message cap)
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        return Case(kind, [(opener * depth + "1" + closer * depth).encode()],
                    r"(nested too deeply|header must be a JSON object|header is \d+ bytes; at most"
                    r"|protocol version mismatch: peer speaks None)")
    if target == "header":   # the header is JSON, but not an object
        value = draw(st.one_of(json_scalars, st.lists(json_scalars, max_size=3)))
        return Case(kind, [json.dumps(value).encode()], r"header must be a JSON object")
    if target == "arrays":
        value = draw(json_values.filter(lambda v: not isinstance(v, list)))
        return Case(kind, [json.dumps({"v": V, "type": "ping", "arrays": value}).encode()],
                    r"'arrays' must be a list")
    if target == "entry":
        value = draw(json_values.filter(lambda v: not isinstance(v, dict)))
        return Case(kind, pack({"v": V, "type": "ping"}, table=[value], frames=[b""]), r"entry 0 must be an object")
    if target == "entry.name":
        value = draw(not_str)
        return Case(kind, pack({"v": V, "type": "ping"}, table=[{"name": value, "dtype": "uint8", "shape": [0]}],
                               frames=[b""]), r"'name' must be a string")
    mtype, fname = target.split(".")
    if fname in ("client", "job_id", "name", "preset"):
        value, expect = draw(not_str), "expected a string"
    elif fname in ("seconds", "preview_interval"):
        value, expect = draw(not_num), "expected a number"
    else:
        value, expect = draw(not_int), "expected an integer"
    if mtype == "submit":
        header, arrays = base_parts()
    else:
        header, arrays = {"v": V, "type": mtype, "job_id": "x"} if mtype == "cancel" else {"v": V, "type": mtype}, {}
    header[fname] = value
    return Case(kind, pack(header, arrays), rf"{mtype}\.{fname}: {expect}")


@st.composite
def truncated_frames(draw) -> Case:
    kind = "truncated_frames"
    header, arrays = base_parts(draw(st.integers(1, 3)))
    frames = pack(header, arrays)
    how = draw(st.sampled_from(["drop_frames", "cut_frame", "grow_frame", "cut_header", "missing_array",
                                "header_only", "empty_header", "too_many_frames"]))
    if how == "drop_frames":
        k = draw(st.integers(1, 4))
        return Case(kind, frames[:5 - k], rf"declares 4 arrays but the message carries {4 - k} data frames")
    if how in ("cut_frame", "grow_frame"):
        i = draw(st.integers(1, 4))
        size = len(frames[i])
        new = draw(st.integers(0, size - 1)) if how == "cut_frame" else size + draw(st.integers(1, 10_000))
        frames[i] = (frames[i] * (new // size + 1))[:new]
        return Case(kind, frames, rf"needs {size} bytes, frame has {new}")
    if how == "cut_header":
        frames[0] = frames[0][:draw(st.integers(0, len(frames[0]) - 1))]
        return Case(kind, frames, r"header is not valid UTF-8 JSON")
    if how == "missing_array":
        name = draw(st.sampled_from(REQUIRED))
        del arrays[name]
        return Case(kind, pack(header, arrays), rf"submit\.{name}: required field is missing")
    if how == "header_only":
        return Case(kind, pack(header), r"submit\.images: required field is missing")
    if how == "empty_header":
        return Case(kind, [b"", *frames[1:draw(st.integers(1, 5))]], r"header is not valid UTF-8 JSON")
    n = draw(st.integers(65, 200))
    return Case(kind, [frames[0], *([b""] * (n - 1))], rf"message has {n} frames; at most 64")


BYTES_TOO_MANY = r"(would be \d+ bytes; at most \d+|needs \d+ bytes, frame has \d+|add up to more than \d+ bytes)"


@st.composite
def oversized_declared(draw) -> Case:
    header, arrays = base_parts()
    table = [{"name": k, "dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays.items()]
    entry = draw(st.sampled_from(table))
    if draw(st.booleans()):
        entry["shape"][0] *= draw(st.integers(10, 10**9))
    else:
        entry["shape"] = draw(st.lists(st.integers(1000, 2**40 - 1), min_size=len(entry["shape"]),
                                       max_size=len(entry["shape"])))
    return Case("oversized_declared", pack(header, arrays, table=table), BYTES_TOO_MANY)


@st.composite
def bad_camera_values(draw) -> Case:
    header, arrays = base_parts()
    dtype = draw(st.sampled_from(["float64", "float32"]))
    field = draw(st.sampled_from(["intrinsics", "poses"]))
    arr = arrays[field].astype(dtype)
    n = arr.shape[0]
    how = draw(st.sampled_from(["nonfinite", "negative", "scale", "mirror", "last_row"] if field == "poses"
                               else ["nonfinite", "negative"]))
    i = draw(st.integers(0, n - 1))
    if how == "nonfinite":
        flat = arr.reshape(-1)
        flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        expect = rf"submit\.{field}: contains NaN or infinite values"
    elif field == "intrinsics":   # a non-positive focal length
        arr[i, draw(st.integers(0, 1))] = -draw(st.floats(0, 1e30, allow_nan=False))
        expect = r"submit\.intrinsics: focal lengths must be positive"
    elif how == "negative":       # a negative entry that breaks the rotation
        r, c = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        arr[i, r, c] = -abs(arr[i, r, c]) - draw(st.floats(0.01, 1e6))
        expect = r"submit\.poses: rotations must be orthonormal"
    elif how == "scale":
        arr[i, :3, :3] *= draw(st.one_of(st.floats(-1e6, 0.99), st.floats(1.01, 1e6)))
        expect = r"submit\.poses: rotations must be orthonormal"
    elif how == "mirror":
        arr[i, :3, draw(st.integers(0, 2))] *= -1
        expect = r"submit\.poses: rotations must be orthonormal and right-handed"
    else:
        arr[i, 3, draw(st.integers(0, 3))] += draw(st.sampled_from([-1.0, 1.0])) * draw(st.floats(0.01, 1e6))
        expect = r"submit\.poses: the last row of every pose must be \(0, 0, 0, 1\)"
    arrays[field] = arr
    return Case("bad_camera_values", pack(header, arrays), expect)


@st.composite
def dtype_shape_mismatch(draw) -> Case:
    kind = "dtype_shape_mismatch"
    header, arrays = base_parts()
    how = draw(st.sampled_from(["wrong_dtype", "foreign_dtype", "ndim", "axis", "n_mismatch", "bad_shape_entry",
                                "shape_not_list"]))
    if how == "wrong_dtype":
        field = draw(st.sampled_from(ARRAY_FIELDS))
        allowed = {"images": ("uint8",), "intrinsics": ("float64", "float32")}.get(field, ("float64", "float32"))
        dtype = draw(st.sampled_from([d for d in wire.ALLOWED_DTYPES if d not in allowed]))
        arrays[field] = arrays[field].astype(dtype)
        return Case(kind, pack(header, arrays), rf"submit\.{field}: dtype {dtype} is not allowed")
    if how == "foreign_dtype":
        table = [{"name": k, "dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays.items()]
        entry = draw(st.sampled_from(table))
        entry["dtype"] = draw(st.one_of(st.sampled_from(["object", "complex128", ">f8", "<f8", "f8", "O", "V8",
                                                         "float32 ", "FLOAT32", "bool", "int8", "U4"]),
                                        json_values).filter(lambda d: d not in wire.ALLOWED_DTYPES))
        return Case(kind, pack(header, arrays, table=table), r"dtype .* is not allowed \(allowed:")
    if how == "ndim":
        field = draw(st.sampled_from(ARRAY_FIELDS))
        a = arrays[field]
        arrays[field] = a.reshape(-1) if a.ndim > 1 and draw(st.booleans()) else a[..., None]
        return Case(kind, pack(header, arrays), rf"submit\.{field}: expected \d dimensions")
    if how == "axis":
        field, axis, sizes = draw(st.sampled_from([("images", 3, (1, 2, 5, 6)), ("intrinsics", 1, (1, 2, 3, 5, 9)),
                                                   ("poses", 1, (1, 3, 5)), ("poses", 2, (3, 5)),
                                                   ("aabb", 0, (1, 3)), ("aabb", 1, (2, 4))]))
        shape = list(arrays[field].shape)
        shape[axis] = draw(st.sampled_from(sizes))
        arrays[field] = np.resize(arrays[field], shape)
        return Case(kind, pack(header, arrays), rf"submit\.{field}: axis {axis} must be")
    if how == "n_mismatch":
        field = draw(st.sampled_from(["intrinsics", "poses"]))
        n = draw(st.integers(1, 6).filter(lambda k: k != 3))
        arrays[field] = np.resize(arrays[field], (n, *arrays[field].shape[1:]))
        return Case(kind, pack(header, arrays), rf"submit\.{field}: N = {n} does not match N = 3")
    table = [{"name": k, "dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays.items()]
    entry = draw(st.sampled_from(table))
    if how == "bad_shape_entry":
        i = draw(st.integers(0, len(entry["shape"]) - 1))
        entry["shape"][i] = draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**40), st.booleans(),
                                           st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=3),
                                           st.none()))
        return Case(kind, pack(header, arrays, table=table), r"shape .* must hold non-negative integers")
    entry["shape"] = draw(st.one_of(json_values.filter(lambda v: not isinstance(v, list)),
                                    st.lists(st.integers(1, 2), min_size=7, max_size=10)))
    return Case(kind, pack(header, arrays, table=table), r"shape must be a list of at most 6 sizes")


SERVER_TO_CLIENT = ("welcome", "pong", "accepted", "attached", "progress", "done", "failed", "cancelled", "ack",
                    "status_reply", "error")


@st.composite
def unknown_types(draw) -> Case:
    kind = "unknown_types"
    how = draw(st.sampled_from(["text", "not_a_string", "missing", "server_side"]))
    header = {"v": V}
    if how == "text":
        header["type"] = draw(st.text(max_size=40).filter(lambda t: t not in protocol.message_types()))
        expect = r"unknown message type"
    elif how == "not_a_string":
        header["type"] = draw(not_str)
        expect = r"unknown message type"
    elif how == "missing":
        expect = r"unknown message type None"
    else:   # a real type that only the backend sends
        header.update(type=draw(st.sampled_from(SERVER_TO_CLIENT)), job_id="j", request="r")
        expect = rf"the backend does not accept '{header['type']}' messages"
    if how == "server_side":
        return Case(kind, pack(header), expect, "unexpected_message", undecodable=False)
    return Case(kind, pack(header), expect, "unknown_type")


@st.composite
def wrong_versions(draw) -> Case:
    kind = "wrong_versions"
    v = V
    if draw(st.integers(0, 3)) == 0:   # the handshake's own field
        value = draw(st.integers(0, 2**31).filter(lambda x: x != v))
        return Case(kind, pack({"v": v, "type": "hello", "protocol": value}),
                    rf"protocol version mismatch: client speaks {value}, backend speaks {v}", "version_mismatch")
    mtype = draw(st.sampled_from(["hello", "ping", "status", "submit", "cancel"]))
    header, arrays = base_parts() if mtype == "submit" else ({"type": mtype, "job_id": "x"}, {})
    if draw(st.integers(0, 9)) == 0:
        header.pop("v", None)
    else:
        header["v"] = draw(st.one_of(st.integers().filter(lambda x: x != v), st.just(float(v)), st.just(True),
                                     st.just(str(v)), json_values.filter(lambda x: x != v)))
    return Case(kind, pack(header, arrays), rf"protocol version mismatch: peer speaks .*, this side speaks {v}",
                "version_mismatch")


@st.composite
def zero_images(draw) -> Case:
    """No image at all, or images of zero pixels."""
    header, arrays = base_parts()
    h, w, c = draw(st.integers(0, 64)), draw(st.integers(0, 64)), draw(st.sampled_from([3, 4]))
    if draw(st.integers(0, 3)) == 0:
        h, w = draw(st.sampled_from([(0, w), (h, 0), (0, 0)]))
        arrays["images"] = np.zeros((3, h, w, c), np.uint8)
        return Case("zero_images", pack(header, arrays), rf"submit\.images: images of {w}x{h} pixels are empty")
    arrays["images"] = np.zeros((0, h, w, c), np.uint8)
    arrays["intrinsics"] = arrays["intrinsics"][:0]
    arrays["poses"] = arrays["poses"][:0]
    return Case("zero_images", pack(header, arrays), r"submit\.images: at least one image is needed")


@st.composite
def many_images(draw) -> Case:
    """100,000 images: declared in the header only, or real (tiny) frames that hit the image cap."""
    n = 100_000
    header, arrays = base_parts()
    if draw(st.booleans()):
        h, w = draw(st.integers(1, 2048)), draw(st.integers(1, 2048))
        table = [{"name": "images", "dtype": "uint8", "shape": [n, h, w, 4]},
                 {"name": "intrinsics", "dtype": "float64", "shape": [n, 4]},
                 {"name": "poses", "dtype": "float64", "shape": [n, 4, 4]},
                 {"name": "aabb", "dtype": "float64", "shape": [2, 3]}]
        frames = [np.ascontiguousarray(a).tobytes() for a in arrays.values()]
        return Case("many_images", pack(header, table=table, frames=frames), BYTES_TOO_MANY)
    arrays["images"] = np.zeros((n, 1, 1, draw(st.sampled_from([3, 4]))), np.uint8)   # 300-400 kB
    return Case("many_images", pack(header, arrays),
                rf"submit\.images: N = {n} is more than the allowed {protocol.MAX_IMAGES}")


@st.composite
def strings(draw) -> Case:
    kind = "strings"
    how = draw(st.sampled_from(["empty_job_id", "empty_type", "empty_choice", "empty_version",
                                "long_name", "long_job_id", "long_client", "long_type", "huge_header"]))
    if how == "empty_job_id":
        return Case(kind, pack({"v": V, "type": "cancel", "job_id": ""}), r"no job '' on this backend", "unknown_job",
                    undecodable=False)
    if how == "empty_type":
        return Case(kind, pack({"v": V, "type": ""}), r"unknown message type ''", "unknown_type")
    if how == "empty_choice":
        header, arrays = base_parts()
        field = draw(st.sampled_from(["method", "preset"]))
        header[field] = ""
        return Case(kind, pack(header, arrays), rf"submit\.{field}: '' is not one of")
    if how == "empty_version":
        return Case(kind, pack({"v": "", "type": "ping"}), r"protocol version mismatch: peer speaks ''",
                    "version_mismatch")
    char = draw(st.characters(exclude_categories=["Cs"]))
    if how == "huge_header":   # over the 256 KiB header cap, far under the message cap
        length = draw(st.integers(wire.DEFAULT_LIMITS.max_header_bytes + 1, 3 * wire.DEFAULT_LIMITS.max_header_bytes))
        return Case(kind, pack({"v": V, "type": "ping", "pad": "a" * length}),
                    rf"header is \d+ bytes; at most {wire.DEFAULT_LIMITS.max_header_bytes} are accepted")
    length = draw(st.integers(protocol.MAX_NAME + 1, 60_000))
    text = char * length
    if how == "long_type":
        frames, expect = pack({"v": V, "type": text}), r"unknown message type"
    else:
        mtype, field = {"long_name": ("submit", "name"), "long_job_id": ("cancel", "job_id"),
                        "long_client": ("hello", "client")}[how]
        header, arrays = base_parts() if mtype == "submit" else ({"v": V, "type": mtype}, {})
        header[field] = text
        frames = pack(header, arrays)
        expect = rf"{mtype}\.{field}: string of {length} characters is longer than {protocol.MAX_NAME}"
    if len(frames[0]) > wire.DEFAULT_LIMITS.max_header_bytes:   # wide characters: the header cap comes first
        expect = r"header is \d+ bytes; at most"
    return Case(kind, frames, expect)


KINDS = {
    "wrong_types": wrong_types(), "truncated_frames": truncated_frames(), "oversized_declared": oversized_declared(),
    "bad_camera_values": bad_camera_values(), "dtype_shape_mismatch": dtype_shape_mismatch(),
    "unknown_types": unknown_types(), "wrong_versions": wrong_versions(), "zero_images": zero_images(),
    "many_images": many_images(), "strings": strings(),
}
batch_strategy = st.tuples(*[s for s in KINDS.values() for _ in range(PER_KIND)])


# --------------------------------------------------------------------------------------------
def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def fuzz_backend():
    backend = BackendProcess(fake=True, args=["--max-message-mb", str(MAX_MESSAGE_MB)])
    yield backend
    backend.close()


def assert_serving(peer: RawPeer, seq: int) -> None:
    pong = peer.request(protocol.Ping(seq=seq))
    assert isinstance(pong, protocol.Pong) and pong.seq == seq
    status = peer.request(protocol.Status())
    assert isinstance(status, protocol.StatusReply) and status.state == "idle" and status.queued_jobs == ""


@pytest.mark.slow   # ~40-60 s on 2 CPU cores
def test_fuzzed_messages_get_clear_errors(fuzz_backend):
    counts: Counter = Counter()
    with RawPeer(fuzz_backend.address) as peer:
        assert_serving(peer, 1)
        rss_before = vm_rss_kib(fuzz_backend.proc.pid)
        start = time.monotonic()

        @settings(max_examples=BATCHES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.large_base_example, HealthCheck.filter_too_much])
        @given(batch_strategy)
        def run_batch(batch):
            for case in batch:
                peer.send(case.frames)
            for i, case in enumerate(batch):
                try:
                    reply = peer.recv(timeout=10)
                except TimeoutError:
                    pytest.fail(f"no reply to case {i} ({case.kind}); backend log:\n{fuzz_backend.log()[-3000:]}")
                assert isinstance(reply, protocol.Error), (case.kind, reply, case.frames[0][:300])
                assert re.search(case.expect, reply.message, re.I | re.S), (case.kind, case.expect, reply.message[:500])
                if case.code:
                    assert reply.code == case.code, (case.kind, reply.code, reply.message[:300])
                counts[case.kind] += 1
                counts["_undecodable"] += case.undecodable

        run_batch()
        elapsed = time.monotonic() - start
        assert_serving(peer, 2)
        rss_after = vm_rss_kib(fuzz_backend.proc.pid)
    undecodable = counts.pop("_undecodable")
    total = sum(counts.values())
    print(f"\nfuzz: {total} messages in {elapsed:.1f} s; per kind {dict(counts)}; "
          f"backend VmRSS {rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MiB")
    assert total >= 10_000 and set(counts) == set(KINDS) and min(counts.values()) >= 1000
    assert rss_after - rss_before < RSS_BOUND_MIB * 1024, (rss_before, rss_after)
    assert fuzz_backend.proc.poll() is None
    log = fuzz_backend.log()
    assert log.count("rejected a message from") >= undecodable   # every undecodable one is logged ...
    assert "Traceback" not in log and "Logging error" not in log and "internal_error" not in log   # ... no crash


def test_a_message_over_the_cap_is_dropped_and_the_backend_keeps_serving(fuzz_backend):
    """Over --max-message-mb, libzmq closes that connection before the server sees the message:
    no reply is possible, nothing is allocated for it, and the backend keeps serving."""
    huge = "x" * ((MAX_MESSAGE_MB << 20) + 1000)   # an enormous string over the message cap
    with RawPeer(fuzz_backend.address) as peer:
        assert_serving(peer, 1)
        peer.send(pack({"v": V, "type": "submit", "name": "fuzz"}, table=[], frames=[]))
        assert isinstance(peer.recv(), protocol.Error)   # (within the cap: answered)
        peer.send([json.dumps({"v": V, "type": "hello", "client": huge}).encode()])
        with pytest.raises(TimeoutError):
            peer.recv(timeout=1.0)
    with RawPeer(fuzz_backend.address) as fresh:
        assert_serving(fresh, 3)
    assert fuzz_backend.proc.poll() is None
