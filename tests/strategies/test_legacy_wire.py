"""The legacy API's .npy tensors (strategies.legacy_wire): hand-made and mutated files
are refused, never unpickled.

Fuzz tests (``tests.helpers.fuzzing``): random and near-valid malformed input is
either accepted with a well-formed result or refused with the exception the callers
catch and a message that says what was wrong."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord
from flwr.common import ndarray_to_bytes
from hypothesis import given
from hypothesis import strategies as st

from strategies.aggregation import InvalidUpdate
from strategies.legacy_wire import load_npy
from strategies.records import record_arrays
from tests.helpers.fuzzing import (attempt, fuzz, garbage, garbage_array, must_refuse,
                                   mutated_bytes, refused)


# ------------------------------------------------------------------ fuzzing
DESCRS = ["'<f4'", "'>u8'", "'|u1'", "'|O'", "[('a', '|O')]", "[('a', '<i4')]", "'|V0'",
          "'<U0'", "'|S0'", "'<U2'", "'|b1'", "'<c16'", "'x'", "None", "5", "[('a',"]


def npy_file(descr: str, shape: list[int], data: bytes = b"", fortran: str = "False") -> bytes:
    """A hand-made .npy file (format 1.0) with any header values."""
    header = "{'descr': %s, 'fortran_order': %s, 'shape': (%s), }" % (
        descr, fortran, "".join(f"{d}, " for d in shape))
    header += " " * (-(len(header) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + data


@st.composite
def npy_bytes(draw) -> bytes:
    """A hand-made .npy file: any dtype descriptor, shape and amount of data."""
    shape = draw(st.lists(st.integers(-3, 5) | st.sampled_from([2**31, 2**32, 2**63, 2**70]),
                          max_size=3))
    return npy_file(draw(st.sampled_from(DESCRS)), shape, draw(st.binary(max_size=64)),
                    draw(st.sampled_from(["False", "True", "0"])))


@fuzz(120)
@given(data=st.data(), dtypes=st.sampled_from([None, (np.uint8,), (np.uint32, np.uint64),
                                                (np.float32,)]))
def test_npy_tensors(data, dtypes):
    valid = ndarray_to_bytes(data.draw(st.sampled_from(
        [np.arange(6, dtype=np.float32).reshape(2, 3), np.zeros(3, np.uint8),
         np.array([1.5]), np.arange(4, dtype=np.uint64)])))
    raw = data.draw(st.one_of(mutated_bytes(valid), garbage, npy_bytes(),
                              st.sampled_from([valid, None, "text", bytearray(valid)])))
    result = attempt(lambda: load_npy(raw, "fuzzed", dtypes), InvalidUpdate)
    if not refused(result):
        assert isinstance(result, np.ndarray) and not result.dtype.hasobject
        assert dtypes is None or result.dtype in [np.dtype(d) for d in dtypes]


@pytest.mark.parametrize("descr, shape", [
    ("'<f8'", [0, 10, 2 * 10**17]), ("'|u1'", [0, 2**63]), ("'|u1'", [0, 10**20, 0]),
    ("'|u1'", [2**70]),
    ("'<f4'", [-1, -1]), ("'|u1'", [2**32, 2**32])])
def test_npy_tensors_with_impossible_shapes(descr, shape):
    for data in (b"", b"\x00", bytes(4)):
        must_refuse(lambda: load_npy(npy_file(descr, shape, data), "odd", None), InvalidUpdate)


class _Canary:
    ran = False

    def __reduce__(self):
        return (_Canary._trip, ())

    @staticmethod
    def _trip():
        _Canary.ran = True
        return 0


def test_npy_tensors_are_never_unpickled():
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([_Canary()], dtype=object), allow_pickle=True)
    for dtypes in (None, (np.uint8,)):
        must_refuse(lambda: load_npy(buffer.getvalue(), "pickled", dtypes), InvalidUpdate)
    record = ArrayRecord({"x": garbage_array(buffer.getvalue())})
    must_refuse(lambda: record_arrays(record), InvalidUpdate)
    assert not _Canary.ran
