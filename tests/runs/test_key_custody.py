"""The README's secure steps end to end: private keys never travel to the server,
secure modes fail closed, and runs without a usable update end as failed (issue:
the README handed the Paillier private key to the server).

The tests follow the README's Paillier and masking steps in a fresh copy of the
project with a fresh home directory (keys where ``fedapp keygen`` puts them by
default, no environment variable pointing at them), and search everything under
the SuperLink's ``FLWR_HOME`` for the private key. (The bundle and CLI checks:
tests/fedapp/test_bundle.py, tests/fedapp/test_cli.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedapp import launch
from strategies.keyfiles import KEY_DIR_ENV, load_identity
from tests.helpers import fresh_checkout

pytestmark = pytest.mark.slow  # real Flower runs


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
    # the run directory is where flwr run would put it (run-dir, under the home), and said
    run_dir = Path(json.loads(run.stdout.strip().splitlines()[-1])["run-dir"])
    assert run_dir.parent == home / "fedapp-runs" and (run_dir / "report.html").is_file()
    assert f"run directory: {run_dir}" in run.stdout
    assert secrets_under(run_dir, [private, hex_p, hex_q]) == []
    # (a node without the key: tests/runs/test_examples.py, a run that fails at round 1)


def test_readme_masking_steps_authenticate_and_fail_closed_without_the_key(tmp_path, data_dir):
    """One SuperLink, started before the key exists (as ``flwr run .`` leaves one running):
    a run without the keys fails closed, naming the cause; after ``fedapp keygen --secagg
    --simulation 2`` the next run on the same SuperLink finds each node's identity key
    and the roster, and signs."""
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
        assert "failed the advertise stage: secure aggregation needs this node's identity " \
            "key and the federation's roster" in logs
        assert "1 round(s) in a row without a usable update" in logs
        made = fedapp(["keygen", "--secagg", "--simulation", "2"], app, env)  # the README's way
        assert made.returncode == 0, made.stderr
        status, logs = run()
    finally:
        launch.stop(link)
    assert status == launch.FINISHED_OK, logs[-3000:]
    assert "2 of 2 nodes' key advertisements are signed" in logs
    for i in range(2):
        key = load_identity(home / ".fedapp" / "keys" / f"secagg-identity-{i}.key").private
        assert secrets_under(flwr_home, [key, key.hex().encode()]) == []
