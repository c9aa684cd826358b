"""The masked update on the wire, for both Flower APIs: the masked vector beside a
small JSON header (a uint8 array), and the digest of the model's layout the server
checks it against. Flower-free."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from .aggregation import InvalidUpdate, Layout
from .secagg_protocol import HEADER_KEY, MASKED_KEY, MAX_HEADER_BYTES

#: The ConfigRecord that carries a key stage's payload in a Message-API message (the
#: secure mod answers it; a DP clip mod lets it pass).
STAGE_RECORD_KEY = "secagg"



def header_array(header: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(header).encode(), dtype=np.uint8).copy()



def header_of(array: object) -> dict:
    """The JSON header beside a masked vector; :class:`InvalidUpdate` if malformed."""
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1 \
            or array.size > MAX_HEADER_BYTES:
        raise InvalidUpdate(f"the masked update's header must be a 1-d uint8 array of at most "
                            f"{MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(array.tobytes().decode())
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deep
        raise InvalidUpdate("the masked update's header is not UTF-8 JSON") from None
    if not isinstance(header, dict):
        raise InvalidUpdate("the masked update's header is not a JSON object")
    return header



def masked_arrays(record: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """The masked vector and header of a reply's arrays."""
    if set(record) != {MASKED_KEY, HEADER_KEY}:
        raise InvalidUpdate(f"expected arrays {MASKED_KEY!r} and {HEADER_KEY!r}, got "
                            f"{sorted(record)}: is secagg_mod on the ClientApp?")
    return record[MASKED_KEY], header_of(record[HEADER_KEY])



def layout_digest(layout: Layout) -> str:
    """Names, shapes and dtypes in order: the server checks the masked vector's."""
    return hashlib.sha256(json.dumps(layout.to_json()).encode()).hexdigest()

