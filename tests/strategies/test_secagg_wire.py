"""Masked updates on the wire (strategies.secagg_wire, and the legacy API's tensors).

Fuzz tests (``tests.helpers.fuzzing``): random and near-valid malformed input is
either accepted with a well-formed result or refused with the exception the callers
catch and a message that says what was wrong."""

from __future__ import annotations

import json

import numpy as np
from flwr.common import Parameters, ndarray_to_bytes
from hypothesis import given
from hypothesis import strategies as st

from strategies.aggregation import InvalidUpdate
from strategies.secagg_legacy import parameters_masked
from strategies.secagg_legacy import TENSOR_TYPE as SECAGG_TENSOR_TYPE
from strategies.secagg_masks import SecAggError
from strategies.secagg_protocol import b64
from strategies.secagg_wire import masked_arrays
from tests.helpers.fuzzing import BAD, MASK_LENGTH, attempt, fuzz, garbage, mutated_bytes, refused


# ------------------------------------------------------------------ fuzzing
def masked_header(length: int = MASK_LENGTH) -> np.ndarray:
    header = {"version": 1, "context": b64(bytes(32)), "node": BAD, "mod-bits": 32,
              "length": length, "layout": "0" * 64}
    return np.frombuffer(json.dumps(header).encode(), np.uint8).copy()


@fuzz(80)
@given(data=st.data())
def test_masked_update_arrays(data):
    vector = np.arange(MASK_LENGTH, dtype=np.uint32)
    header = masked_header()
    raw = data.draw(mutated_bytes(header.tobytes()) | garbage)
    record = data.draw(st.sampled_from([
        {"secagg-masked": vector, "secagg-header": np.frombuffer(raw, np.uint8)},
        {"secagg-masked": vector, "secagg-header": np.frombuffer(raw, np.uint8).reshape(1, -1)},
        {"secagg-masked": vector, "secagg-header": raw},
        {"secagg-masked": vector},
        {"secagg-masked": vector, "secagg-header": header, "x": vector}]))
    result = attempt(lambda: masked_arrays(record), InvalidUpdate)
    assert refused(result) or isinstance(result[1], dict)
    tensors = data.draw(st.lists(st.sampled_from([ndarray_to_bytes(vector),
                                                  ndarray_to_bytes(header)])
                                 .flatmap(lambda t: st.just(t) | mutated_bytes(t)) | garbage,
                                 max_size=3))
    parameters = Parameters(tensors=tensors, tensor_type=data.draw(
        st.sampled_from([SECAGG_TENSOR_TYPE, "numpy.ndarray", ""])))
    result = attempt(lambda: parameters_masked(parameters), (InvalidUpdate, SecAggError))
    if not refused(result):
        assert result[0].dtype in (np.uint32, np.uint64) and isinstance(result[1], dict)
