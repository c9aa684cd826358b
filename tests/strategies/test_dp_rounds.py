"""The clipping a node does for central DP (strategies.dp_rounds), with the clip the
server sends.

Fuzz tests (``tests.helpers.fuzzing``): random and near-valid malformed input is
either accepted with a well-formed result or refused with the exception the callers
catch and a message that says what was wrong."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given

from strategies.dp_rounds import clip_local_update
from tests.helpers.fuzzing import attempt, fuzz, json_values, refused


# ------------------------------------------------------------------ fuzzing
@fuzz(60)
@given(clip=json_values, bit=json_values)
def test_dp_clip_sent_by_the_server(clip, bit):
    incoming = {"w": np.zeros(3, np.float32)}
    trained = {"w": np.array([3.0, 4.0, 0.0], np.float32)}
    result = attempt(lambda: clip_local_update({"dp-clip": clip, "dp-unclipped": bit},
                                               incoming, trained), ValueError)
    if not refused(result):
        assert math.isfinite(clip) and clip > 0
        assert np.linalg.norm(result["w"]) <= clip * (1 + 1e-6)
