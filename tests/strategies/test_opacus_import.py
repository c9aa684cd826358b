"""Importing Opacus through strategies.opacus_import leaves the root logger alone."""

from __future__ import annotations

from tests.helpers import ROOT


def test_importing_opacus_through_us_leaves_logging_alone():
    """Opacus calls logging.basicConfig at import; our modules undo it, or every Flower
    log line would print twice."""
    import subprocess
    import sys

    code = ("import logging, strategies.dp, clients.dp_sgd; "
            "print(len(logging.getLogger().handlers))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=str(ROOT))
    assert out.stdout.strip() == "0"
    raw = subprocess.run([sys.executable, "-c", "import logging, opacus.accountants; "
                          "print(len(logging.getLogger().handlers))"],
                         capture_output=True, text=True, check=True)
    assert raw.stdout.strip() == "1"  # what we undo (if Opacus stops, drop the workaround)
