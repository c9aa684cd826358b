"""A federation from ``fedapp provision`` kits, for real: ``fedapp server --kit`` (TLS,
node authentication, the sites' keys registered by the server itself), three
``fedapp client --kit`` processes and ``fedapp run --kit``, in the masking mode. The run
completes; each node ran every message in its one long-lived ClientApp worker, in the
SuperNode's process; no private key of a site reached the server's folder or state; once
the server and the clients are stopped nothing they started is left. (The kits themselves:
tests/fedapp/test_kits.py; the speed against simulation: scripts/bench_deploy.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from fedapp import launch
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # real Flower processes

FEDAPP = [sys.executable, "-m", "fedapp.cli"]


def test_a_provisioned_federation_runs_from_its_kits(tmp_path, data_dir):
    kits, port = tmp_path / "federation", launch.free_port()
    made = subprocess.run([*FEDAPP, "provision", "--sites", "3", "--server-address",
                           f"127.0.0.1:{port}", "--modes", "secagg", "--out", str(kits)],
                          capture_output=True, text=True, check=False)
    assert made.returncode == 0, made.stderr
    env = launch.flower_env()
    procs = [launch.start([*FEDAPP, "server", "--kit", str(kits / "server"), "--flwr-home",
                           str(tmp_path / "server-home")], env, tmp_path / "server.log")]
    try:
        launch.wait_for_port("127.0.0.1", port, proc=procs[0])
        deadline = time.monotonic() + 120  # a node whose key is not registered yet exits
        while (tmp_path / "server.log").read_text().count("registered as node") < 3:
            assert time.monotonic() < deadline and procs[0].poll() is None, \
                (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        for i in range(3):
            procs.append(launch.start(
                [*FEDAPP, "client", "--kit", str(kits / f"site-{i}"), "--data-dir",
                 str(data_dir), "--port", str(launch.free_port()), "--flwr-home",
                 str(tmp_path / f"site-{i}-home")], env, tmp_path / f"site-{i}.log"))
        run = subprocess.run(
            [*FEDAPP, "run", "--kit", str(kits / "server"), "--flwr-home",
             str(tmp_path / "admin-home"), "--timeout", "600", "--app", str(ROOT),
             "--run-config", "task=housing", "--run-config", "num-server-rounds=2",
             "--run-config", "aggregation=secagg", "--run-config", "min-available-nodes=3",
             "--run-config", f"data-dir='{data_dir}'",
             "--run-config", f"run-dir='{tmp_path / 'runs'}'"],
            capture_output=True, text=True, timeout=900, check=False)
    finally:
        for proc in reversed(procs):
            launch.stop(proc)
    server_log = (tmp_path / "server.log").read_text(errors="replace")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:] + server_log[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["status"] == launch.FINISHED_OK
    assert server_log.count("registered as node") == 3
    for i in range(3):
        log = (tmp_path / f"site-{i}.log").read_text(errors="replace")
        assert log.count("ClientApp worker running in the SuperNode's process") == 1, log[-3000:]
        assert "Start `flwr-clientapp` process" not in log
        assert log.count("Sending: train message") >= 2 * 4  # four masking stages a round
        secret = (kits / f"site-{i}" / "secagg-identity.key").read_bytes()
        for seen in [*(tmp_path / "server-home").rglob("*"), *(kits / "server").rglob("*")]:
            assert not seen.is_file() or secret not in seen.read_bytes(), seen
    assert launch.leftovers(tmp_path) == []
