"""Wire checks of EnvironmentResult, the background a fit modelled as an equirectangular image:
it round-trips unchanged, and any other shape or type is refused with a text naming the field."""
from __future__ import annotations

import numpy as np
import pytest

from fit_implicit.shared import protocol
from fit_implicit.shared.protocol import WireError, decode_message
from helpers import zmq_round_trip


def test_an_environment_round_trips_through_zmq():
    image = np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)
    message = protocol.EnvironmentResult(job_id="j", image=image).validate()
    got = zmq_round_trip(message, "environment")
    assert isinstance(got, protocol.EnvironmentResult) and got.job_id == "j"
    np.testing.assert_array_equal(got.image, image)


LIMIT = protocol.MAX_ENVIRONMENT_HEIGHT


@pytest.mark.parametrize("image, needle", [
    (np.zeros((32, 32, 3), np.uint8), "environment.image: an equirectangular image is twice as wide as it is high, "
                                      "got 32x32"),
    (np.zeros((32, 65, 3), np.uint8), "twice as wide as it is high, got 65x32"),
    (np.zeros((32, 64, 4), np.uint8), "environment.image: axis 2 must be 3"),
    (np.zeros((32, 64), np.uint8), "environment.image: expected 3 dimensions"),
    (np.zeros((32, 64, 3), np.float32), "environment.image: dtype float32 is not allowed"),
    (np.zeros((0, 0, 3), np.uint8), "environment.image: the image is empty"),
    (np.zeros((LIMIT + 1, 2 * LIMIT + 2, 3), np.uint8), f"H = {LIMIT + 1} is more than the allowed {LIMIT}"),
])
def test_other_shapes_and_types_are_refused(image, needle):
    frames = [bytes(f) for f in protocol.EnvironmentResult(job_id="j", image=image).to_frames()]
    with pytest.raises(WireError) as info:
        decode_message(frames)
    assert needle in str(info.value)
