"""Private keys never travel to the server (fedapp.bundle): the bundle is built
exactly as ``flwr run`` does (``flwr.cli.build.build_fab_from_disk``), and
submitting refuses an app directory that holds private key material. (The
README's steps end to end: tests/runs/test_key_custody.py.)"""

from __future__ import annotations

import importlib.util
import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedapp import bundle, launch
from fedapp.nodekeys import write_node_keypair
from strategies.keyfiles import write_identity, write_keypair
from tests.helpers import ROOT, fresh_checkout


def bundle_files(app: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        return {name: fab.read(name) for name in fab.namelist()}


def test_keys_made_inside_the_app_stay_out_of_its_bundle_and_block_submission(tmp_path):
    """The old README's way (keys in the project): the .gitignore keeps every kind of key
    out of the bundle Flower builds, and submitting refuses the app, naming the files."""
    app = fresh_checkout(tmp_path)
    keys = app / "keys"
    write_keypair(keys)
    write_identity(keys)
    write_node_keypair(keys / "node0")
    spec = importlib.util.spec_from_file_location(
        "make_certificates", ROOT / "scripts" / "make_certificates.py")
    certificates = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(certificates)
    certificates.make_certificates(app / "certs", ["127.0.0.1"])
    files = bundle_files(app)
    assert "fedapp/server_app.py" in files  # it is the app's bundle
    assert not [n for n in files if n.startswith(("keys/", "certs/"))], sorted(files)
    assert not [n for n, data in files.items()
                if bundle.holds_private_key(data)], "private key material in the FAB"

    found = bundle.private_material(app)
    assert set(found) == {keys / "paillier.key.json", keys / "secagg-identity.key",
                          keys / "node0" / "supernode.key", app / "certs" / "server.key"}
    with pytest.raises(ValueError, match="holds private key material") as refused:
        launch.submit(app, "local", {}, {})
    assert str(keys / "paillier.key.json") in str(refused.value)


def test_without_the_gitignore_flower_would_ship_the_private_key(tmp_path):
    """The attack the .gitignore and the submission check stop: Flower packs every .json."""
    app = fresh_checkout(tmp_path)
    (app / ".gitignore").unlink()
    write_keypair(app / "keys")
    assert "keys/paillier.key.json" in bundle_files(app)


@pytest.mark.parametrize("content, secret", [
    (b'{"type": "paillier-private-key", "p": "f"}', True),
    (b'{"type": "paillier-public-key", "n": "f"}', False),
    (b'{"type": "fedapp-threshold-paillier-key-share", "share": "f"}', True),
    (b'{"type": "fedapp-threshold-paillier-public-key", "n": "f"}', False),
    (b'{"type": "fedapp-paillier-group-key", "key": "00"}', True),
    (b"-----BEGIN OPENSSH " b"PRIVATE KEY-----\nabc\n", True),  # split: this file is none
    (b"-----BEGIN EC " b"PRIVATE KEY-----\nabc\n", True),
    (b"-----BEGIN CERTIFICATE-----\nabc\n", False),
    (b"ab" * 32 + b"\n", False),  # a public identity key (fedapp keygen --secagg)
    (b'x = "paillier-private-key"  # source code that names the type\n', False),
])
def test_private_key_material_is_recognised(content, secret):
    assert bundle.holds_private_key(content) is secret


def test_the_staged_copy_builds_the_same_bundle_without_entering_ignored_directories(
        tmp_path):
    """``fedapp sim``/``run`` submit a staged copy (Flower would list a virtual
    environment inside the app file by file first): the bundle is byte for byte the
    one Flower builds from the app itself, and nothing under an ignored directory or
    of a type no bundle holds is copied."""
    app = fresh_checkout(tmp_path)
    (app / ".venv-ci" / "lib").mkdir(parents=True)
    (app / ".venv-ci" / "lib" / "site.py").write_text("x = 1\n")
    (app / "fedapp" / "notes.md").write_text("kept\n")
    (app / "fedapp" / "weights.npz").write_bytes(b"\0" * 64)
    (app / "fedapp" / "__pycache__").mkdir(exist_ok=True)
    (app / "fedapp" / "__pycache__" / "x.json").write_text("{}")
    write_keypair(app / "keys")  # ignored: keys/
    staged = bundle.stage_app(app, tmp_path / "staged")
    copied = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert "fedapp/notes.md" in copied and "pyproject.toml" in copied and ".gitignore" in copied
    assert not any(name.startswith((".venv-ci/", "keys/")) or name.endswith(".npz")
                   or "__pycache__" in name for name in copied), sorted(copied)
    assert build_fab_from_disk(staged) == build_fab_from_disk(app)
