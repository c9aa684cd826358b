"""Opacus, imported without its side effect on logging.

``opacus.utils.module_utils`` calls ``logging.basicConfig`` at import time, which
adds a handler to the root logger: every Flower log line then prints twice (once
by Flower's handler, once by the root's). Import Opacus through this module to
undo that.
"""

from __future__ import annotations

import logging

_root = logging.getLogger()
_before = list(_root.handlers)

import opacus  # noqa: E402,F401

for _handler in _root.handlers[:]:
    if _handler not in _before:
        _root.removeHandler(_handler)
