"""Private keys never travel to the server, secure modes fail closed, and runs
without a usable update end as failed (issue: the README handed the Paillier
private key to the server).

The unit tests build the bundle exactly as ``flwr run`` does
(``flwr.cli.build.build_fab_from_disk``) and drive the CLI; the end-to-end tests
follow the README's Paillier and masking steps in a fresh copy of the project with
a fresh home directory (keys where ``fedapp keygen`` puts them by default, no
environment variable pointing at them), and search everything under the
SuperLink's ``FLWR_HOME`` for the private key.
"""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from fedapp import bundle, cli, launch
from fedapp.nodekeys import write_node_keypair
from strategies.keyfiles import KEY_DIR_ENV, write_auth_key, write_keypair

ROOT = Path(__file__).resolve().parent.parent


def fresh_checkout(dest: Path) -> Path:
    """The project's files as a clone has them (tracked and new, not ignored ones)."""
    names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    app = dest / "fedprivacy"
    for name in names:
        if (ROOT / name).is_file():
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            (app / name).write_bytes((ROOT / name).read_bytes())
    return app


def bundle_files(app: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))) as fab:
        return {name: fab.read(name) for name in fab.namelist()}


# --- the bundle ------------------------------------------------------------------------------

def test_keys_made_inside_the_app_stay_out_of_its_bundle_and_block_submission(tmp_path):
    """The old README's way (keys in the project): the .gitignore keeps every kind of key
    out of the bundle Flower builds, and submitting refuses the app, naming the files."""
    app = fresh_checkout(tmp_path)
    keys = app / "keys"
    write_keypair(keys)
    write_auth_key(keys)
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
    assert set(found) == {keys / "paillier.key.json", keys / "secagg-auth.key",
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


def test_keygen_writes_outside_the_app_by_default_and_refuses_inside(tmp_path, monkeypatch,
                                                                     capsys):
    app = fresh_checkout(tmp_path)
    monkeypatch.chdir(app)
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "key-dir"))
    for kind in ([], ["--secagg"], ["--supernode"]):
        assert cli.main(["keygen", *kind, "--out", str(app / "keys")]) == 2
        assert "inside the Flower app" in capsys.readouterr().err
    assert not (app / "keys").exists()
    assert cli.main(["keygen"]) == 0 and cli.main(["keygen", "--secagg"]) == 0
    assert sorted(p.name for p in (tmp_path / "key-dir").iterdir()) == [
        "paillier.key.json", "paillier.pub.json", "secagg-auth.key"]
    assert bundle.private_material(app) == []
    # told explicitly, it writes there (a user who ignores the files themselves)
    assert cli.main(["keygen", "--secagg", "--out", str(app / "keys"),
                     "--allow-inside-app"]) == 0


@pytest.mark.parametrize("content, secret", [
    (b'{"type": "paillier-private-key", "p": "f"}', True),
    (b'{"type": "paillier-public-key", "n": "f"}', False),
    (b"-----BEGIN OPENSSH " b"PRIVATE KEY-----\nabc\n", True),  # split: this file is none
    (b"-----BEGIN EC " b"PRIVATE KEY-----\nabc\n", True),
    (b"-----BEGIN CERTIFICATE-----\nabc\n", False),
    (b"ab" * 32 + b"\n", True),
    (b'x = "paillier-private-key"  # source code that names the type\n', False),
])
def test_private_key_material_is_recognised(content, secret):
    assert bundle.holds_private_key(content) is secret


def test_sim_and_run_take_the_current_directory_and_say_so(tmp_path, monkeypatch, capsys):
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["sim"].format_help()
    assert "default: the current directory" in " ".join(help_text.split())
    monkeypatch.chdir(tmp_path)  # no app here
    assert cli.main(["sim", "--workdir", str(tmp_path / "w")]) == 2
    out = capsys.readouterr()
    assert f"submitting the Flower app in {tmp_path}" in out.out
    assert "holds no Flower app" in out.err


# --- the README's secure steps, end to end ---------------------------------------------------

def readme_env(home: Path) -> dict[str, str]:
    """A user's shell: a fresh home, no variable pointing at keys."""
    env = launch.flower_env(home / ".flwr", HOME=str(home))
    env.pop(KEY_DIR_ENV, None)
    return env


def fedapp(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedapp.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def secrets_under(directory: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in directory.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {n[:16]!r}" for n in needles if n in data]
    return found


SIM = ["--run-config", "task=housing", "--run-config", "num-server-rounds=1"]


def test_readme_paillier_steps_keep_the_key_on_the_clients(tmp_path, data_dir):
    app, home = fresh_checkout(tmp_path), tmp_path / "home"
    env = readme_env(home)
    made = fedapp(["keygen"], app, env)
    assert made.returncode == 0, made.stderr
    keys = home / ".fedapp" / "keys"
    private = (keys / "paillier.key.json").read_bytes()
    hex_p, hex_q = (json.loads(private)[f].encode() for f in ("p", "q"))
    work = tmp_path / "work"
    run = fedapp(["sim", "--workdir", str(work), *SIM, "--run-config", f"data-dir='{data_dir}'",
                  "--run-config", "aggregation=paillier", "--run-config",
                  f"paillier-public-key='{keys / 'paillier.pub.json'}'"], app, env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "aggregate_train: 2 valid encrypted replies of 2" in run.stdout
    assert secrets_under(work, [private, hex_p, hex_q]) == []  # the SuperLink's FLWR_HOME too
    assert not list(work.rglob("paillier.key.json"))
    assert secrets_under(home / ".flwr", [private, hex_p, hex_q]) == []
    # (a node without the key: tests/test_examples.py, a run that fails at round 1)


def test_readme_masking_steps_authenticate_and_fail_closed_without_the_key(tmp_path, data_dir):
    """One SuperLink, started before the key exists (as ``flwr run .`` leaves one running):
    a run without the key fails closed, naming the cause; after ``fedapp keygen --secagg``
    the next run on the same SuperLink finds the key and authenticates."""
    app, home = fresh_checkout(tmp_path), tmp_path / "home"
    env = readme_env(home)
    flwr_home = tmp_path / "superlink-home"
    env["FLWR_HOME"] = str(flwr_home)
    port = launch.free_port()
    launch.write_connection(flwr_home, "sim", f"127.0.0.1:{port}", insecure=True)
    link = launch.start(launch.superlink_command("127.0.0.1", port, ["--insecure"],
                                                 simulation=True), env, tmp_path / "link.log")
    settings = {"task": "housing", "num-server-rounds": 1, "data-dir": str(data_dir),
                "aggregation": "secagg", "run-dir": str(tmp_path / "runs")}
    federation = {"num-supernodes": 2, "client-resources-num-cpus": 1}

    def run() -> tuple[str, str]:
        run_id = launch.submit(app, "sim", env, settings, federation)
        status = launch.wait_for_run(run_id, "sim", env, 600, progress=False)
        return status, launch.logs(run_id, "sim", env)

    try:
        launch.wait_for_port("127.0.0.1", port, proc=link)
        status, logs = run()  # no key anywhere yet
        assert status == "finished:failed", logs[-3000:]
        assert "failed the advertise stage: secure aggregation needs the federation's " \
            "authentication key" in logs
        assert "1 round(s) in a row without a usable update" in logs
        made = fedapp(["keygen", "--secagg"], app, env)  # the README's way, after the start
        assert made.returncode == 0, made.stderr
        status, logs = run()
    finally:
        launch.stop(link)
    assert status == launch.FINISHED_OK, logs[-3000:]
    assert "2 of 2 nodes' key advertisements carry an authentication tag" in logs
    key = (home / ".fedapp" / "keys" / "secagg-auth.key").read_bytes().strip()
    assert secrets_under(flwr_home, [key, bytes.fromhex(key.decode())]) == []
