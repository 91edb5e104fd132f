"""The wire protocol: every message round-trips; malformed input is rejected with a clear text."""
from __future__ import annotations

import json
import pickle
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import REPO, ring_cameras
from fit_implicit.shared import protocol, wire
from fit_implicit.shared.protocol import PROTOCOL_VERSION, ProtocolError, WireError, decode_message


def small_submit(n: int = 3, size: int = 8, m: int = 1, **kw) -> protocol.Submit:
    k, poses = ring_cameras(n + m, size)
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 4), dtype=np.uint8)
    return protocol.Submit(images=images, intrinsics=k[:n], poses=poses[:n],
                           aabb=np.array([[-1.0, -1, -1], [1, 1, 1]]), eval_intrinsics=k[n:],
                           eval_poses=poses[n:], eval_sizes=np.full((m, 2), size, np.int32), **kw)


def examples() -> dict[str, protocol.Message]:
    img = np.arange(6 * 5 * 4, dtype=np.uint8).reshape(6, 5, 4)
    return {m.TYPE: m for m in [
        protocol.Hello(client="test", token="0123456789abcdef0123456789abcdef"),
        protocol.MeshJob(fit_job_id="0123456789ab", mesh_resolution=128, texture_size=protocol.TEXTURE_AUTO,
                         max_faces=5000),
        protocol.FetchModel(fit_job_id="0123456789ab"),
        protocol.PointsJob(points=np.arange(60, dtype=np.float32).reshape(20, 3),
                           normals=np.tile(np.float32([0, 0, 1]), (20, 1)), colors=np.full((20, 3), 7, np.uint8),
                           name="scan", preset="draft", detail=0.25, orientation="oriented", max_faces=1000),
        protocol.ModelFile(run_json=np.frombuffer(b'{"format": 2}', np.uint8), weights=np.arange(9, dtype=np.uint8),
                           fit_job_id="0123456789ab"),
        protocol.StoreModel(run_json=np.frombuffer(b'{"format": 2}', np.uint8), weights=np.arange(9, dtype=np.uint8),
                            name="kept"),
        protocol.Welcome(server="s", device="cpu"),
        protocol.Ping(seq=7),
        protocol.Pong(seq=7, state="busy", running_job="abc", queued=2),
        small_submit(name="x", preset="draft", steps=10, seconds=2.5, mesh_resolution=32, preview_size=0),
        protocol.Accepted(job_id="abc", position=1),
        protocol.Progress(job_id="abc", step=3, total_steps=10, loss=0.5, psnr=20.0, fraction=0.3),
        protocol.Preview(job_id="abc", image=img, step=3),
        protocol.MeshResult(job_id="abc", vertices=np.random.rand(4, 3).astype(np.float32),
                            faces=np.array([[0, 1, 2], [1, 2, 3]], np.int32),
                            colors=np.random.rand(4, 3).astype(np.float32)),
        protocol.RenderResult(job_id="abc", index=2, image=img),
        protocol.RenderJob(fit_job_id="0123456789ab", intrinsics=np.array([[20.0, 20, 8, 6]]),
                           poses=np.eye(4)[None], sizes=np.array([[16, 12]], np.int32)),
        protocol.TextureResult(job_id="abc", kind="albedo", image=img[..., :3].copy(), lighting_baked=False),
        protocol.EnvironmentResult(job_id="abc", image=np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)),
        protocol.MaterialResult(job_id="abc", light=np.linspace(0, 40, 4 * 8 * 3, dtype=np.float32).reshape(4, 8, 3),
                                albedo_view=np.full((3, 5, 4), 200, np.uint8), view_photo=2),
        protocol.CamerasResult(job_id="abc", poses=ring_cameras(2, 8)[1], moved_deg=np.array([0.5, 1.5]),
                               moved=np.array([0.0, 0.02])),
        protocol.Done(job_id="abc", summary={"steps": 10, "psnr": 21.5, "device": "cpu", "ok": True, "x": None}),
        protocol.Failed(job_id="abc", message="boom"),
        protocol.Cancelled(job_id="abc"),
        protocol.Cancel(job_id="abc"),
        protocol.Ack(request="cancel", job_id="abc"),
        protocol.Attach(job_id="0123456789ab"),
        protocol.Attached(job_id="0123456789ab", state="running", position=0),
        protocol.Status(),
        protocol.FreeMemory(),
        protocol.StatusReply(state="busy", running_job="abc", queued_jobs="d,e", device="cpu"),
        protocol.Error(code="bad_message", message="nope", in_reply_to="submit"),
    ]}


def assert_same(a: protocol.Message, b: protocol.Message) -> None:
    assert type(a) is type(b)
    for name, value in vars(a).items():
        other = getattr(b, name)
        if isinstance(value, np.ndarray):
            assert other.dtype == value.dtype and other.shape == value.shape and np.array_equal(other, value), name
        else:
            assert other == value, name


def header_of(frames) -> dict:
    return json.loads(bytes(frames[0]))


def with_header(frames, **changes) -> list:
    header = header_of(frames)
    header.update(changes)
    return [json.dumps(header).encode(), *frames[1:]]


def rejects(frames, *needles: str, code: str | None = None) -> WireError:
    with pytest.raises(WireError) as info:
        decode_message(frames)
    text = str(info.value)
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    if code is not None:
        assert info.value.code == code
    return info.value


# ---- round trips ----------------------------------------------------------------------------
def test_examples_cover_every_message_type():
    assert set(examples()) == set(protocol.message_types())


@pytest.mark.parametrize("mtype", sorted(examples()))
def test_round_trip(mtype):
    message = examples()[mtype].validate()
    frames = [bytes(f) for f in message.to_frames()]
    assert_same(message, decode_message(frames))


def test_round_trip_zero_copy_through_zmq():
    """Frames received with copy=False (zmq.Frame) decode to views of the received buffers."""
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://round-trip")
        b.connect("inproc://round-trip")
        message = small_submit(n=2, size=64).validate()
        a.send_multipart(message.to_frames(), copy=False)
        got = decode_message(b.recv_multipart(copy=False))
        assert_same(message, got)
        assert not got.images.flags.writeable and not got.images.flags.owndata
    finally:
        a.close(linger=0)
        b.close(linger=0)


def test_unknown_header_keys_are_ignored():
    frames = with_header(protocol.Ping(seq=1).to_frames(), added_in_v2="hello")
    assert decode_message(frames) == protocol.Ping(seq=1)


def test_error_for_fits_the_protocol():
    err = protocol.error_for(ProtocolError("x" * 10_000, code="version_mismatch"), protocol.Hello().to_frames())
    assert err.validate().code == "version_mismatch" and len(err.message) == protocol.MAX_STRING
    assert err.in_reply_to == "hello"


# ---- malformed headers and fields -----------------------------------------------------------
def test_wrong_field_types():
    base = small_submit().to_frames()
    rejects(with_header(base, steps="10"), "submit.steps", "integer")
    rejects(with_header(base, steps=True), "submit.steps", "integer")
    rejects(with_header(base, seconds="fast"), "submit.seconds", "number")
    rejects(with_header(base, preset=3), "submit.preset", "string")
    rejects(with_header(base, preset="ultra"), "submit.preset", "draft")
    rejects(with_header(protocol.Done(job_id="a").to_frames(), summary={"a": [1]}), "done.summary")


def test_missing_fields():
    rejects(with_header(protocol.Accepted(job_id="a").to_frames(), job_id=None), "accepted.job_id")
    header = header_of(protocol.Accepted(job_id="a").to_frames())
    del header["job_id"]
    rejects([json.dumps(header).encode()], "accepted.job_id", "required field is missing")
    frames = small_submit().to_frames()
    header = header_of(frames)
    header["arrays"] = header["arrays"][1:]   # drop images from the table and its frame
    rejects([json.dumps(header).encode(), *frames[2:]], "submit.images", "missing")


def test_missing_and_truncated_frames():
    frames = [bytes(f) for f in small_submit().to_frames()]
    rejects([], "empty message")
    rejects(frames[:-1], "declares", "data frames")
    rejects(frames[:1], "declares", "data frames")
    rejects([frames[0], frames[1][:-1], *frames[2:]], "'images'", "frame has")
    rejects([b"", *frames[1:]], "not valid UTF-8 JSON")


def test_declared_shape_larger_than_frame():
    frames = [bytes(f) for f in small_submit().to_frames()]
    header = header_of(frames)
    header["arrays"][1]["shape"] = [3, 40]     # intrinsics: 3x4 sent, 3x40 declared
    rejects([json.dumps(header).encode(), *frames[1:]], "'intrinsics'", "needs 960 bytes, frame has 96")


@pytest.mark.parametrize("field", ["poses", "intrinsics", "eval_poses", "aabb"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_rejected(field, bad):
    msg = small_submit()
    arr = getattr(msg, field).copy()
    arr.reshape(-1)[1] = bad
    setattr(msg, field, arr)
    rejects(msg.to_frames(), f"submit.{field}", "NaN or infinite")


def test_cameras_must_be_rigid():
    msg = small_submit()
    msg.poses = msg.poses.copy()
    msg.poses[1, :3, :3] *= 2.0
    rejects(msg.to_frames(), "submit.poses", "orthonormal")
    msg = small_submit()
    msg.poses = msg.poses.copy()
    msg.poses[0, :3, 0] *= -1.0                  # mirrored
    rejects(msg.to_frames(), "submit.poses", "right-handed")
    msg = small_submit()
    msg.poses = msg.poses.copy()
    msg.poses[0, 3, 0] = 0.5
    rejects(msg.to_frames(), "submit.poses", "last row")
    msg = small_submit()
    msg.intrinsics = msg.intrinsics.copy()
    msg.intrinsics[2, 0] = 0.0
    rejects(msg.to_frames(), "submit.intrinsics", "focal lengths must be positive")


def test_dtype_mismatch():
    msg = small_submit()
    msg.images = msg.images.astype(np.float32)
    rejects(msg.to_frames(), "submit.images", "dtype float32 is not allowed", "uint8")
    msg = small_submit()
    msg.eval_sizes = msg.eval_sizes.astype(np.float64)
    rejects(msg.to_frames(), "submit.eval_sizes", "dtype float64")
    frames = [bytes(f) for f in small_submit().to_frames()]
    header = header_of(frames)
    header["arrays"][2]["dtype"] = "float32"       # poses are float64 on the wire
    rejects([json.dumps(header).encode(), *frames[1:]], "'poses'", "frame has")


@pytest.mark.parametrize("dtype", ["object", "O", "|O", "<U8", "V8", "bool", ">f8", "complex128"])
def test_unlisted_dtypes_are_rejected(dtype):
    frames = [bytes(f) for f in small_submit().to_frames()]
    header = header_of(frames)
    header["arrays"][0]["dtype"] = dtype
    rejects([json.dumps(header).encode(), *frames[1:]], "is not allowed")


def test_shape_mismatch_across_fields():
    msg = small_submit()
    msg.intrinsics = msg.intrinsics[:2]
    rejects(msg.to_frames(), "submit.intrinsics", "N = 2 does not match N = 3")
    msg = small_submit(m=2)
    msg.eval_sizes = msg.eval_sizes[:1]
    rejects(msg.to_frames(), "submit.eval_sizes", "M = 1 does not match M = 2")
    msg = small_submit()
    msg.images = msg.images[..., :2]
    rejects(msg.to_frames(), "submit.images", "axis 3 must be one of (3, 4)")


def test_unknown_type():
    rejects(with_header(protocol.Ping().to_frames(), type="launch_missiles"), "unknown message type", code="unknown_type")
    rejects(with_header(protocol.Ping().to_frames(), type=["ping"]), "unknown message type")


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1, 99, str(PROTOCOL_VERSION), True,
                                     float(PROTOCOL_VERSION), None])
def test_wrong_protocol_version_names_both(version):
    err = rejects(with_header(protocol.Ping().to_frames(), v=version), "version mismatch", code="version_mismatch")
    assert repr(version) in str(err) and str(PROTOCOL_VERSION) in str(err)


def test_hello_with_another_protocol_names_both():
    rejects(protocol.Hello(protocol=PROTOCOL_VERSION + 1).to_frames(), f"client speaks {PROTOCOL_VERSION + 1}",
            f"backend speaks {PROTOCOL_VERSION}",
            code="version_mismatch")


def test_points_job_takes_points_or_a_mesh_and_matching_rows():
    pts = np.zeros((4, 3), np.float32)
    tri = np.array([[0, 1, 2]], np.int32)
    rejects(protocol.PointsJob().to_frames(), "either points or a mesh", "got neither")
    rejects(protocol.PointsJob(points=pts, vertices=pts, faces=tri).to_frames(), "not both")
    rejects(protocol.PointsJob(points=pts, colors=np.zeros((3, 3), np.uint8)).to_frames(), "3 rows for 4 points")
    rejects(protocol.PointsJob(vertices=pts, faces=tri + 2).to_frames(), "points_job.faces", "indices")
    rejects(protocol.PointsJob(vertices=pts).to_frames(), "the mesh has no faces")
    rejects(protocol.PointsJob(points=pts, orientation="sideways").to_frames(), "points_job.orientation")
    rejects(protocol.PointsJob(points=pts, detail=1.5).to_frames(), "points_job.detail")
    nan = protocol.PointsJob(points=np.full((4, 3), np.nan, np.float32)).validate()    # NaN rows: the backend drops them
    assert np.isnan(nan.points).all()


def test_zero_images():
    msg = small_submit()
    msg.images, msg.intrinsics, msg.poses = msg.images[:0], msg.intrinsics[:0], msg.poses[:0]
    rejects(msg.to_frames(), "submit.images", "at least one image")


def test_too_many_images_are_counted():
    n = protocol.MAX_IMAGES + 1
    k, poses = ring_cameras(1, 1)
    msg = protocol.Submit(images=np.zeros((n, 1, 1, 4), np.uint8), intrinsics=np.repeat(k, n, 0),
                          poses=np.repeat(poses, n, 0), aabb=np.array([[-1.0, -1, -1], [1, 1, 1]]))
    rejects(msg.to_frames(), "submit.images", f"N = {n} is more than the allowed {protocol.MAX_IMAGES}")


@pytest.mark.parametrize("shape", [[100_000, 8192, 8192, 4], [protocol.MAX_IMAGES + 1, 64, 64, 4], [2**39, 2**39, 4]])
def test_huge_declared_arrays_are_rejected_before_allocating(shape):
    """Only the header claims the size: nothing that large may be allocated to find out."""
    frames = [bytes(f) for f in small_submit().to_frames()]
    header = header_of(frames)
    header["arrays"][0]["shape"] = shape
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="'images'"):
            decode_message([json.dumps(header).encode(), *frames[1:]])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_oversized_strings_and_headers():
    rejects(small_submit(name="n" * (protocol.MAX_NAME + 1)).to_frames(), "submit.name", "longer than 256")
    rejects(protocol.Failed(job_id="a", message="m" * (protocol.MAX_STRING + 1)).to_frames(), "failed.message")
    rejects(with_header(protocol.Ping().to_frames(), pad="x" * (300 * 1024)), "header is", "at most")
    rejects(with_header(protocol.Ping().to_frames(), type="t" * 100_000), "unknown message type")


def test_other_structural_problems():
    rejects([b"[1, 2]"], "must be a JSON object")
    rejects([b"[" * 100_000], "nested too deeply")
    rejects([b'{"v": 2, "type": "ping", "seq": NaN}'], "not valid UTF-8 JSON")
    rejects([b"\xff\xfe{}"], "not valid UTF-8 JSON")
    rejects([b"{}"] * (wire.DEFAULT_LIMITS.max_frames + 1), "frames")
    frames = [bytes(f) for f in protocol.Preview(job_id="a", image=np.zeros((2, 2, 4), np.uint8)).to_frames()]
    header = header_of(frames)
    header["arrays"].append(dict(header["arrays"][0]))
    rejects([json.dumps(header).encode(), frames[1], frames[1]], "appears twice")
    header["arrays"][1]["name"] = "payload"
    rejects([json.dumps(header).encode(), frames[1], frames[1]], "unexpected array frames")
    header = header_of(frames)
    header["arrays"][0]["shape"] = [2, -2, 4]
    rejects([json.dumps(header).encode(), frames[1]], "non-negative integers")


def test_result_values_are_checked():
    mesh = examples()["mesh"]
    mesh.faces = mesh.faces + 2
    rejects(mesh.to_frames(), "mesh.faces", "indices")
    mesh = examples()["mesh"]
    mesh.colors = mesh.colors + 1.5
    rejects(mesh.to_frames(), "mesh.colors")
    msg = small_submit()
    msg.eval_sizes = np.zeros_like(msg.eval_sizes)
    rejects(msg.to_frames(), "submit.eval_sizes")
    msg = small_submit()
    msg.aabb = msg.aabb[::-1].copy()
    rejects(msg.to_frames(), "submit.aabb")


# ---- pickle ---------------------------------------------------------------------------------
class _Boom:
    def __reduce__(self):
        return (pytest.fail, ("a pickle payload was unpickled",))


def test_pickle_payloads_are_never_unpickled(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("pickle was used while decoding")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    payload = pickle.dumps(_Boom(), protocol=5)
    rejects([payload], "not valid UTF-8 JSON")
    frames = [bytes(f) for f in protocol.Preview(job_id="a", image=np.zeros((2, 2, 4), np.uint8)).to_frames()]
    header = header_of(frames)
    header["arrays"][0].update(dtype="object", shape=[len(payload)])
    rejects([json.dumps(header).encode(), payload], "'object' is not allowed")
    # a pickle in an allowed array is just bytes
    header["arrays"][0].update(dtype="uint8", shape=[len(payload)])
    rejects([json.dumps(header).encode(), payload], "preview.image", "dimensions")


def test_no_pickle_in_the_code_that_talks():
    for rel in ["shared/wire.py", "shared/protocol.py", "backend/service/server.py", "backend/service/jobs.py",
                "backend/service/outbox.py", "backend/service/fit_job.py", "blender_addon/client.py"]:
        text = (REPO / rel).read_text()
        assert not re.search(r"import (c?pickle|dill|marshal)|from pickle|pickle\.|allow_pickle\s*=\s*True|\beval\(",
                             text), rel


def test_shared_imports_no_heavy_modules():
    for path in Path(REPO / "shared").glob("*.py"):
        text = path.read_text()
        for module in ("bpy", "torch", "zmq"):
            assert f"import {module}" not in text and f"from {module}" not in text, (path.name, module)


# ---- fuzzing --------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_random_frames_only_raise_wire_errors(frames):
    try:
        decode_message(frames)
    except WireError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(examples())), st.dictionaries(st.sampled_from(
    ["job_id", "seq", "steps", "state", "summary", "image", "index", "protocol", "name", "preset",
     "arrays", "queued", "message", "code", "fraction", "v"]), json_values, max_size=4))
def test_random_headers_only_raise_wire_errors(mtype, changes):
    frames = [bytes(f) for f in examples()[mtype].to_frames()]
    try:
        decode_message(with_header(frames, **changes))
    except WireError:
        pass


@pytest.mark.parametrize("height, width", [(0, 8), (8, 0), (0, 0)])
def test_images_of_zero_pixels_are_rejected(height, width):
    submit = small_submit()
    submit.images = np.zeros((3, height, width, 4), np.uint8)
    with pytest.raises(ProtocolError, match=rf"submit\.images: images of {width}x{height} pixels are empty"):
        submit.validate()


def test_photos_of_different_sizes_travel_padded_with_their_sizes():
    wide, tall = np.full((4, 8, 4), 7, np.uint8), np.full((8, 3, 4), 9, np.uint8)
    images, sizes = protocol.pad_images([wide, tall])
    assert images.shape == (2, 8, 8, 4) and sizes.tolist() == [[8, 4], [3, 8]]
    assert (images[0, 4:] == 0).all() and (images[1, :, 3:] == 0).all() and (images[1, :, :3] == 9).all()
    submit = small_submit(n=2, size=8, image_sizes=sizes)
    back = decode_message(submit.to_frames())
    assert back.image_sizes.tolist() == [[8, 4], [3, 8]]
    from fit_implicit.backend.fitting.data import from_submit
    assert from_submit(back).image(1).shape == (8, 3, 4)
    for bad in ([[8, 4]], [[9, 4], [3, 8]], [[8, 0], [3, 8]]):       # a row per image, within W x H, >= 1
        with pytest.raises(ProtocolError, match="submit.image_sizes"):
            small_submit(n=2, size=8, image_sizes=np.array(bad)).validate()


def test_refined_cameras_must_be_rigid_and_say_how_far_they_moved():
    poses = ring_cameras(2, 8)[1]

    def cams(**kw):
        values = dict(job_id="abc", poses=poses, moved_deg=np.array([0.5, 1.5]), moved=np.array([0.0, 0.02]))
        return protocol.CamerasResult(**{**values, **kw}).validate()

    cams()
    scaled = poses.copy()
    scaled[0, :3, :3] *= 2.0
    with pytest.raises(protocol.ProtocolError, match="cameras.poses: rotations must be orthonormal"):
        cams(poses=scaled)
    with pytest.raises(protocol.ProtocolError, match="cameras.moved_deg"):
        cams(moved_deg=np.array([0.5]))
    with pytest.raises(protocol.ProtocolError, match="expected angles in"):
        cams(moved=np.array([0.0, -1.0]))
    with pytest.raises(protocol.ProtocolError, match="at least one camera"):
        cams(poses=poses[:0], moved_deg=np.zeros(0), moved=np.zeros(0))
