"""SuperNode key pairs (fedapp.nodekeys) are what Flower reads and verifies, and private
key files are written 0600 and refused when others may read them."""

from __future__ import annotations

import os
import re
import stat
from argparse import Namespace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fedapp import launch
from fedapp.nodekeys import check_node_private_key, check_node_public_key, write_node_keypair
from strategies.keyfiles import load_private_key, write_keypair
from tests.helpers import load_script


def test_supernode_keys_are_what_flower_reads_and_verifies(tmp_path, monkeypatch):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    old = os.umask(0)  # the most permissive umask must still give 0600
    try:
        public, private = write_node_keypair(tmp_path / "node")
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert check_node_private_key(private) == private.resolve()
    assert check_node_public_key(public) == public.resolve()
    # the SuperNode loads the private key, the SuperLink stores the registered public key
    node_private, _ = _try_setup_client_authentication(Namespace(
        auth_supernode_private_key=str(private), auth_supernode_public_key=None))
    registered = bytes_to_public_key(try_load_public_key(public))
    signature = node_private.sign(b"2026-11-23T12:00:00", ec.ECDSA(hashes.SHA256()))
    assert verify_signature(registered, b"2026-11-23T12:00:00", signature)
    other, _ = _try_setup_client_authentication(Namespace(
        auth_supernode_private_key=str(write_node_keypair(tmp_path / "other")[1]),
        auth_supernode_public_key=None))
    forged = other.sign(b"2026-11-23T12:00:00", ec.ECDSA(hashes.SHA256()))
    assert not verify_signature(registered, b"2026-11-23T12:00:00", forged)
    with pytest.raises(FileExistsError, match="exists"):
        write_node_keypair(tmp_path / "node")


def test_node_key_checks_refuse_the_wrong_keys(tmp_path):
    public, private = write_node_keypair(tmp_path / "node")
    with pytest.raises(ValueError, match="holds a private key"):
        check_node_public_key(private)  # the server side is never given a private key
    ssh = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    (tmp_path / "rsa.pub").write_bytes(
        rsa.generate_private_key(65537, 2048).public_key().public_bytes(*ssh))
    with pytest.raises(ValueError, match="NIST curve"):
        check_node_public_key(tmp_path / "rsa.pub")
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(ValueError, match="not an OpenSSH public key"):
        check_node_public_key(tmp_path / "junk.pub")
    pem = tmp_path / "pem.key"  # PKCS8 PEM: flower-supernode cannot read it
    pem.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    pem.chmod(0o600)
    with pytest.raises(ValueError, match="not an unencrypted OpenSSH private key"):
        check_node_private_key(pem)
    edwards = tmp_path / "ed.key"
    edwards.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    edwards.chmod(0o600)
    with pytest.raises(ValueError, match="NIST curve"):
        check_node_private_key(edwards)


@pytest.mark.parametrize("kind", ["paillier", "supernode", "tls-server"])
def test_private_key_files_are_0600_and_refused_when_readable(kind, tmp_path):
    old = os.umask(0)
    try:
        if kind == "paillier":
            path = write_keypair(tmp_path, n_bits=2048)[1]
            load = load_private_key
        elif kind == "supernode":
            path = write_node_keypair(tmp_path)[1]
            load = check_node_private_key
        else:
            load_script("make_certificates").make_certificates(tmp_path, ["127.0.0.1"])
            path = tmp_path / "server.key"

            def load(_path: Path) -> list[str]:
                return launch.tls_args(tmp_path, False, server=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    load(path)
    for mode in (0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(PermissionError,
                           match=f"readable by other users.*chmod 600 {re.escape(str(path))}"):
            load(path)
    path.chmod(0o400)
    load(path)
