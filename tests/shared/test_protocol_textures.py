"""Wire checks of the textured-mesh messages: MeshResult's uvs/normals, TextureResult, and
Submit.texture_size.  Every bad value is refused with a text naming the field."""
from __future__ import annotations

import numpy as np
import pytest

from fit_implicit.shared import protocol
from fit_implicit.shared.protocol import WireError, decode_message
from helpers import zmq_round_trip


def textured_mesh(**kw) -> protocol.MeshResult:
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], np.float32)
    args = dict(job_id="j", vertices=v, faces=np.array([[0, 1, 2], [1, 3, 2]], np.int32),
                colors=np.full((4, 3), 0.5, np.float32), uvs=v[:, :2].copy(),
                normals=np.tile(np.float32([0, 0, 1]), (4, 1)))
    args.update(kw)
    return protocol.MeshResult(**args)


def round_trip(message: protocol.Message) -> protocol.Message:
    return decode_message([bytes(f) for f in message.to_frames()])


def refused(message: protocol.Message, *needles: str) -> None:
    with pytest.raises(WireError) as info:
        round_trip(message)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"


def test_textured_mesh_round_trips_through_zmq():
    message = textured_mesh().validate()
    got = zmq_round_trip(message, "textures")
    assert isinstance(got, protocol.MeshResult)
    np.testing.assert_array_equal(got.uvs, message.uvs)
    np.testing.assert_array_equal(got.normals, message.normals)


def test_untextured_mesh_still_round_trips_with_empty_uvs():
    got = round_trip(textured_mesh(uvs=np.zeros((0, 2), np.float32), normals=np.zeros((0, 3), np.float32)))
    assert got.uvs.shape == (0, 2) and got.normals.shape == (0, 3) and len(got.vertices) == 4


@pytest.mark.parametrize("field, value, needle", [
    ("uvs", np.zeros((3, 2), np.float32), "mesh.uvs: 3 rows for 4 vertices"),
    ("uvs", np.full((4, 2), 1.5, np.float32), "mesh.uvs: values must be in [0, 1]"),
    ("uvs", np.full((4, 2), np.nan, np.float32), "mesh.uvs: contains NaN"),
    ("uvs", np.zeros((4, 3), np.float32), "mesh.uvs: axis 1 must be 2"),
    ("uvs", np.zeros((4, 2), np.float64), "mesh.uvs: dtype float64 is not allowed"),
    ("normals", np.zeros((4, 3), np.float32), "mesh.normals: every normal must have unit length"),
    ("normals", np.ones((5, 3), np.float32) / np.sqrt(3), "mesh.normals: 5 rows for 4 vertices"),
    ("normals", np.full((4, 3), np.inf, np.float32), "mesh.normals: contains NaN or infinite"),
])
def test_bad_uvs_and_normals_are_refused(field, value, needle):
    refused(textured_mesh(**{field: value}), needle)


def test_texture_kinds_round_trip():
    rng = np.random.default_rng(0)
    for kind, c in (("albedo", 3), ("albedo", 4), ("normal", 3), ("roughness", 1)):
        image = rng.integers(0, 256, (16, 8, c), dtype=np.uint8)
        got = round_trip(protocol.TextureResult(job_id="j", kind=kind, image=image, lighting_baked=False))
        assert got.kind == kind and got.lighting_baked is False
        np.testing.assert_array_equal(got.image, image)


@pytest.mark.parametrize("kind, image, needle", [
    ("albedo", np.zeros((4, 4, 1), np.uint8), "a albedo texture needs 3 or 4 channels"),
    ("normal", np.zeros((4, 4, 4), np.uint8), "a normal texture needs 3 channels"),
    ("roughness", np.zeros((4, 4, 3), np.uint8), "a roughness texture needs 1 channels"),
    ("albedo", np.zeros((4, 4, 2), np.uint8), "texture.image: axis 2 must be one of"),
    ("albedo", np.zeros((4, 4, 3), np.float32), "texture.image: dtype float32 is not allowed"),
    ("albedo", np.zeros((4, 4), np.uint8), "texture.image: expected 3 dimensions"),
    ("albedo", np.zeros((0, 4, 3), np.uint8), "texture.image: the image is empty"),
    ("specular", np.zeros((4, 4, 3), np.uint8), "texture.kind: 'specular' is not one of"),
    ("metallic", np.zeros((4, 4, 3), np.uint8), "texture.image: a metallic texture needs 1 channels, got 3"),
])
def test_bad_textures_are_refused(kind, image, needle):
    refused(protocol.TextureResult(job_id="j", kind=kind, image=image), needle)


def test_texture_side_is_capped_before_anything_is_allocated():
    """A texture side over the cap is refused on its shape, with the cap in the text."""
    big = np.zeros((protocol.MAX_TEXTURE_SIDE + 1, 1, 1), np.uint8)
    refused(protocol.TextureResult(job_id="j", kind="roughness", image=big), "H = 8193 is more than the allowed 8192")


def small_submit(**kw) -> protocol.Submit:
    pose = np.eye(4)
    pose[2, 3] = 3.0
    return protocol.Submit(images=np.zeros((1, 4, 4, 4), np.uint8), intrinsics=np.array([[4.0, 4.0, 2.0, 2.0]]),
                           poses=pose[None], aabb=np.array([[-1.0, -1, -1], [1, 1, 1]]), **kw)


def test_submit_textures_field():
    assert round_trip(small_submit()).texture_size == 0            # old clients: vertex colours only
    assert round_trip(small_submit(texture_size=1024)).texture_size == 1024
    assert round_trip(small_submit(texture_size=protocol.TEXTURE_AUTO)).texture_size == protocol.TEXTURE_AUTO
    refused(small_submit(texture_size=8), "submit.texture_size: 8 is not 0 (no textures), 1 (chosen from the cameras) "
                                          "or in [16, 8192]")
    refused(small_submit(texture_size=10000), "submit.texture_size: 10000 is outside [0, 8192]")
    refused(small_submit(texture_size=True), "submit.texture_size: expected an integer")
    assert round_trip(small_submit(max_faces=5000)).max_faces == 5000
    refused(small_submit(max_faces=10), "submit.max_faces: 10 is not 0 (the backend's default) or at least 100")
