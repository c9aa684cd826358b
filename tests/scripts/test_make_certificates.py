"""The certificate script (scripts/make_certificates.py) never overwrites."""

from __future__ import annotations

import pytest

from tests.helpers import load_script


def test_make_certificates_never_overwrites(certs):
    with pytest.raises(FileExistsError, match="server.key"):
        load_script("make_certificates").make_certificates(certs, ["127.0.0.1"])
