"""Key files (strategies.keyfiles): masking identity keys and rosters, and Paillier key
files with any content; secret files are refused when others may read them."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies import keyfiles
from strategies.keyfiles import (IDENTITY_NAME, IDENTITY_PUBLIC_NAME, ROSTER_NAME, identity_name,
                                 load_identity, load_roster, read_public_identity, write_identity,
                                 write_roster, write_simulation_identities)
from strategies.secagg_identity import Identity, NodeIdentity, verify
from tests.helpers.fuzzing import (attempt, deep_json, fuzz, garbage, must_refuse, mutated_bytes,
                                   mutated_json, refused)


def test_identity_key_pair_round_trip(tmp_path):
    public, private = write_identity(tmp_path / "keys")
    assert (public.name, private.name) == (IDENTITY_PUBLIC_NAME, IDENTITY_NAME)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN " "PRIVATE KEY-----")  # PKCS#8 PEM
    # (split: this file holds no key)
    identity = load_identity(private)
    assert read_public_identity(public) == identity.public
    assert verify(identity.public, b"m", identity.sign(b"m"))
    assert not verify(identity.public, b"n", identity.sign(b"m"))
    other = load_identity(write_identity(tmp_path / "other")[1])
    assert other.public != identity.public
    assert identity.private.hex() not in repr(identity)
    with pytest.raises(FileExistsError, match="exists"):
        write_identity(tmp_path / "keys")
    with pytest.raises(ValueError, match="does not hold a public identity key"):
        read_public_identity(private)  # the private key file is no public key


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o601])
def test_identity_key_refuses_readable_by_others(tmp_path, mode):
    _, path = write_identity(tmp_path)
    path.chmod(mode)
    with pytest.raises(PermissionError, match="readable by other users.*chmod 600"):
        load_identity(path)
    path.chmod(0o400)
    assert load_identity(path)


@pytest.mark.parametrize(("content", "match"), [
    ("", "is not an unencrypted Ed25519 private key"),
    ("ab" * 32, "holds a masking identity public key"),  # a .pub's content
    ("-----BEGIN " "PRIVATE KEY-----\nxx\n", "is not an unencrypted Ed25519 private key")])
def test_identity_key_refuses_malformed(tmp_path, content, match):
    path = tmp_path / IDENTITY_NAME
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(ValueError, match=match):
        load_identity(path)


def test_roster_round_trip_and_refusals(tmp_path):
    keys = [Identity.generate().public for _ in range(3)]
    roster = load_roster(write_roster(tmp_path / ROSTER_NAME, keys))
    assert roster.keys == frozenset(keys) and len(roster) == 3
    for bad, match in (([keys[0], keys[0]], "twice"), ([], "one or more"),
                       ([keys[0][:31]], "one or more")):
        with pytest.raises(ValueError, match=match):
            write_roster(tmp_path / "bad.json", bad)
    for text in ('{"version": 2, "keys": []}', '{"keys": "ab"}', "[]", '{"version": 1, "keys": ["zz"]}'):
        (tmp_path / "odd.json").write_text(text)
        with pytest.raises(ValueError, match="roster|key object"):
            load_roster(tmp_path / "odd.json")


def test_simulation_identities_have_a_key_per_partition_and_one_roster(tmp_path):
    roster = load_roster(write_simulation_identities(tmp_path, 4))
    identities = [load_identity(tmp_path / identity_name(i)) for i in range(4)]
    assert roster.keys == {i.public for i in identities}
    assert all(NodeIdentity(i, roster) for i in identities)  # each is in the roster
    with pytest.raises(ValueError, match="at least 2"):
        write_simulation_identities(tmp_path / "one", 1)


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
    roster = json.dumps({"version": 1, "keys": [Identity(bytes(32)).public.hex()]}).encode()
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
    path = write_file(key_dir / "roster.json", data.draw(mutated_bytes(roster) | garbage))
    result = attempt(lambda: keyfiles.load_roster(path), ValueError)
    assert refused(result) or len(result) >= 1


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
        keyfiles.load_identity(path)


def test_a_public_key_where_a_private_one_is_needed_is_named_before_any_chmod(tmp_path):
    """The three public key files a user may pick by mistake (``.pub`` sits next to
    ``.key``): each is refused as what it is, with the private file to give instead,
    even when its mode would also be refused."""
    from fedapp.nodekeys import write_node_keypair
    from strategies.keyfiles import check_private, write_identity, write_keypair

    paillier_pub, _, _ = write_keypair(tmp_path / "p", 2048)
    identity_pub = write_identity(tmp_path / "i")[0]
    node_pub = write_node_keypair(tmp_path / "n")[0]
    for path, kind, private in [(paillier_pub, "a Paillier public key", "paillier.key.json"),
                                (identity_pub, "a masking identity public key",
                                 "secagg-identity.key"),
                                (node_pub, "an OpenSSH (SuperNode) public key",
                                 "supernode.key")]:
        path.chmod(0o644)
        with pytest.raises(ValueError, match=re.escape(
                f"holds {kind}, where a private key is needed: give its private half "
                f"({private}")):
            check_private(path)
    secret = tmp_path / "secret.json"
    secret.write_text('{"type": "paillier-private-key"}')
    secret.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        check_private(secret)


def test_threshold_key_files_hold_one_share_each_0600_and_refuse_mixups(threshold_key_dir,
                                                                          tmp_path):
    from strategies.keyfiles import (THRESHOLD_PUBLIC_NAME, load_key_share,
                                     load_threshold_public_key, threshold_share_name,
                                     write_threshold_key)
    from strategies.threshold_paillier import deal_threshold_key

    public_path = threshold_key_dir / THRESHOLD_PUBLIC_NAME
    public = load_threshold_public_key(public_path)
    assert (public.threshold, public.shares) == (2, 3)
    shares = [load_key_share(threshold_key_dir / threshold_share_name(i), public)
              for i in (1, 2, 3)]
    assert [s.index for s in shares] == [1, 2, 3]
    for i in (1, 2, 3):
        mode = (threshold_key_dir / threshold_share_name(i)).stat().st_mode & 0o777
        assert mode == 0o600
    # the server is never handed a share; a node never takes the public key for its share
    with pytest.raises(ValueError, match="holds a key share: give the server the public key"):
        load_threshold_public_key(threshold_key_dir / threshold_share_name(1))
    with pytest.raises(ValueError, match="holds a threshold Paillier public key, where a "
                                         "private key is needed"):
        load_key_share(public_path)
    # a share readable by others is refused with the fix
    loose = tmp_path / "loose.json"
    loose.write_text((threshold_key_dir / threshold_share_name(2)).read_text())
    loose.chmod(0o644)
    with pytest.raises(PermissionError, match=f"chmod 600 {loose}"):
        load_key_share(loose)
    # a share of another key is refused, naming both fingerprints, never the share
    other, _ = deal_threshold_key(2, 3, 512, allow_insecure=True)
    with pytest.raises(ValueError, match="is a share of another key") as refused:
        load_key_share(threshold_key_dir / threshold_share_name(3), other)
    assert format(int(shares[2].secret), "x") not in str(refused.value)
    with pytest.raises(FileExistsError, match="exists"):  # never overwrites a share
        write_threshold_key(threshold_key_dir, 2, 3)
