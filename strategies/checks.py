"""Type checks for values that arrive over the network or from settings (Flower-free).

``bool`` is an ``int`` to Python, so ``isinstance(True, int)`` holds; a count, a
weight or a key size of ``True`` is always a malformed message, never a 1.
"""

from __future__ import annotations

import numpy as np


def is_int(value: object) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float (Python or numpy), not a bool; may be NaN or infinite."""
    return isinstance(value, (int, float, np.integer, np.floating)) \
        and not isinstance(value, bool)
