"""Key files (strategies.keyfiles): the masking authentication key, and Paillier key
files with any content; secret files are refused when others may read them."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies import keyfiles
from strategies.keyfiles import AUTH_KEY_BYTES, AUTH_KEY_NAME, load_auth_key, write_auth_key
from tests.helpers import AUTH
from tests.helpers.fuzzing import (attempt, deep_json, fuzz, garbage, must_refuse, mutated_bytes,
                                   mutated_json, refused)


def test_auth_key_file_round_trip(tmp_path):
    path = write_auth_key(tmp_path / "keys")
    assert path == tmp_path / "keys" / AUTH_KEY_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_auth_key(path)
    assert isinstance(key, bytes) and len(key) == AUTH_KEY_BYTES
    assert path.read_text() == key.hex() + "\n"
    other = write_auth_key(tmp_path / "other")
    assert load_auth_key(other) != key


def test_auth_key_refuses_overwrite(tmp_path):
    path = write_auth_key(tmp_path)
    before = path.read_text()
    with pytest.raises(FileExistsError, match="exists"):
        write_auth_key(tmp_path)
    assert path.read_text() == before


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_auth_key_refuses_readable_by_others(tmp_path, mode):
    path = write_auth_key(tmp_path)
    path.chmod(mode)
    with pytest.raises(PermissionError, match="readable by other users.*chmod 600"):
        load_auth_key(path)
    path.chmod(0o400)
    assert len(load_auth_key(path)) == AUTH_KEY_BYTES


@pytest.mark.parametrize(("content", "match"), [
    ("zz" * 32, "cannot read an authentication key"),
    ("", "holds 0 bytes"),
    ("ab" * 16, "holds 16 bytes"),
    ("ab" * 33, "holds 33 bytes"),
    ("abc", "cannot read an authentication key"),
])
def test_auth_key_refuses_malformed(tmp_path, content, match):
    path = tmp_path / AUTH_KEY_NAME
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ValueError, match=match):
        load_auth_key(path)


def test_auth_key_missing_file(tmp_path):
    with pytest.raises(OSError):
        load_auth_key(tmp_path / "nope")


# ------------------------------------------------------------------ fuzzing
@pytest.fixture(scope="module")
def key_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-keys")


def write_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    os.chmod(path, 0o600)
    return path


@fuzz(40)
@given(data=st.data())
def test_key_files(keys, key_dir, data):
    public = json.dumps(keys[0].to_dict()).encode()
    private = json.dumps(keys[1].to_dict()).encode()
    auth = (AUTH.hex() + "\n").encode()
    change = st.one_of(
        st.sampled_from([public, private]).flatmap(mutated_bytes),
        st.sampled_from([keys[0].to_dict(), keys[1].to_dict()]).flatmap(mutated_json).map(
            lambda d: json.dumps(d).encode()),
        garbage)
    content = data.draw(change)
    path = write_file(key_dir / "key.json", content)
    result = attempt(lambda: keyfiles.load_public_key(path), ValueError)
    assert refused(result) or result == keys[0]
    result = attempt(lambda: keyfiles.load_private_key(path), ValueError)
    assert refused(result) or result.fingerprint == keys[1].fingerprint
    path = write_file(key_dir / "auth.key", data.draw(mutated_bytes(auth) | garbage))
    result = attempt(lambda: keyfiles.load_auth_key(path), ValueError)
    assert refused(result) or len(result) == keyfiles.AUTH_KEY_BYTES


@pytest.mark.parametrize("content", [deep_json(), '"paillier-public-key"', "[1, 2]", "null",
                                     '{"p": 1}', "\udcff".encode("utf-8", "surrogatepass")])
def test_key_files_that_are_no_key_objects(key_dir, content):
    path = write_file(key_dir / "odd.json",
                      content if isinstance(content, bytes) else content.encode())
    for load in (keyfiles.load_public_key, keyfiles.load_private_key):
        must_refuse(lambda: load(path), ValueError)
    if content == '"paillier-public-key"':  # a string: not mistaken for private key material
        assert "private key material" not in str(must_refuse(
            lambda: keyfiles.load_public_key(path), ValueError))


def test_readable_secret_files_are_refused(keys, key_dir):
    path = write_file(key_dir / "open.json", json.dumps(keys[1].to_dict()).encode())
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        keyfiles.load_private_key(path)
    with pytest.raises(PermissionError, match="chmod 600"):
        keyfiles.load_auth_key(path)
