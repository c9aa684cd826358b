"""Real Flower runs: simulation on both APIs, a failing run, and a TLS deployment
of separate server and client processes on 127.0.0.1. Few and small on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clients.models import McMahanCNN, get_weights
from fedapp import launch
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # real Flower runs


def test_default_run_on_the_message_api(tmp_path):
    """The default job (embedded MNIST, no data directory) runs to the end."""
    status, run_dir, logs = launch.simulate(ROOT, tmp_path, 2, {"num-server-rounds": 1},
                                            timeout=600, progress=False)
    assert status == launch.FINISHED_OK, logs[-3000:]
    for name in ("config.json", "metrics.json", "metrics.csv", "metrics.png", "model.npz",
                 "status.json", "report.html"):
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    # named at the end too, where a user looks
    assert logs.rindex(f"Run directory: {run_dir}") > logs.index("Saved the final model")
    rows = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in rows] == [0, 1]  # one round (CI time): the job is the same
    model_bytes = sum(a.nbytes for a in get_weights(McMahanCNN()))
    # 2 clients train and 2 evaluate: 4 models down, 2 updates up per round
    assert abs(rows[1]["bytes-down"] / (4 * model_bytes) - 1) < 0.01
    assert abs(rows[1]["bytes-up"] / (2 * model_bytes) - 1) < 0.01
    assert rows[1]["train-clients"] == 2 and rows[1]["train-failures"] == 0
    assert rows[1]["central-accuracy"] > 0.6 and rows[1]["fed-accuracy"] > 0.6
    with np.load(run_dir / "model.npz", allow_pickle=False) as model:
        assert sum(model[k].size for k in model.files) == 1_663_370
    assert json.loads((run_dir / "config.json").read_text())["task"] == "mnist"


def test_same_numpy_clients_on_the_legacy_api(tmp_path, data_dir):
    """A legacy-API project (client_fn / server_fn, flwr.server.strategy) with our clients."""
    app = tmp_path / "legacy-project"
    app.mkdir()
    (app / "pyproject.toml").write_text(f"""
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"
[project]
name = "legacy-project"
version = "1.0.0"
requires-python = ">=3.11"
dependencies = []
[tool.flwr.app]
publisher = "tests"
[tool.flwr.app.components]
serverapp = "fedapp.legacy:serverapp"
clientapp = "fedapp.legacy:clientapp"
[tool.flwr.app.config]
task = "housing"
num-server-rounds = 3
data-dir = "{data_dir}"
run-dir = "runs"
""")
    status, run_dir, logs = launch.simulate(app, tmp_path / "work", 2, timeout=600,
                                            progress=False)
    assert status == launch.FINISHED_OK, logs[-3000:]
    assert "Federated standardization from 2 clients" in logs
    rows = json.loads((run_dir / "metrics.json").read_text())
    mse = [r["central-mse"] for r in rows if "central-mse" in r]
    assert len(mse) == 3 and mse[-1] < mse[0]
    assert (run_dir / "model.npz").is_file() and (run_dir / "metrics.png").is_file()
    # the federated model answers private predictions: five processes, TLS (docs/inference.md)
    from clients.loaders import load_housing_files

    houses = load_housing_files(data_dir)[1].x[:30]
    queries = tmp_path / "houses.csv"
    queries.write_text("".join(",".join(map(str, row)) + "\n" for row in houses))
    cli = [sys.executable, "-m", "fedapp.cli", "predict", "--model", str(run_dir / "model.npz"),
           "--inputs", str(queries)]
    plain, secure = tmp_path / "plain.txt", tmp_path / "secure.txt"
    subprocess.run([*cli, "--out", str(plain)], check=True, cwd=ROOT, timeout=120)
    done = subprocess.run([*cli, "--out", str(secure), "--secure", "--batch-size", "10"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["ok"]
    assert all(f"[{role}]" in done.stdout for role in ("p0", "p1", "dealer", "model-owner",
                                                         "data-owner"))
    a, b = np.loadtxt(plain), np.loadtxt(secure)  # prices in $1000s
    assert a.shape == b.shape == (30,) and np.abs(a - b).max() < 0.01


def test_a_failing_run_is_reported_as_failed(tmp_path):
    """flwr run exits 0 even when the run fails; we read the status instead."""
    status, run_dir, logs = launch.simulate(ROOT, tmp_path, 2, {"task": "spam"}, timeout=300,
                                            progress=False)
    assert status != launch.FINISHED_OK
    assert "No spam data found" in logs and "ham.txt" in logs
    # ... and so does its directory, with the error
    said = json.loads((run_dir / "status.json").read_text())
    assert said["status"] == "failed" and "No spam data found" in said["detail"], said
    assert "No spam data found" in (run_dir / "report.html").read_text()


#: Faults injected per mode: (clients, rounds, fault flags, train clients per round). The
#: secure modes cover every property plaintext FedAvg would (CI time).
FAULT_PLANS = {
    "paillier": (3, 3, ["--crash-client", "2", "--restart-server", "2"], [3, 2, 2]),
    "secagg": (3, 3, ["--crash-client", "2", "--restart-server", "2"], [3, 2, 2]),
}
# A frozen client (--hang-client) on real nodes costs a round timeout per stage: it is
# tested in simulation for each secure mode (tests/runs/test_faults.py) and measured in the README.


@pytest.mark.parametrize("aggregation", sorted(FAULT_PLANS))
def test_loopback_deployment_with_tls_and_faults(aggregation, tmp_path, data_dir):
    """fedapp server + fedapp client processes, TLS, every process stopped at the end;
    SuperNode authentication: the registered nodes connect under their registered
    ids and a node with an unregistered key is turned away; with Paillier the private
    key, with masking each node's identity key, lives only in the client nodes' config.
    Faults for real: client 0 is killed as round 2 starts and the round finishes with
    the survivors (with masking, its masks recovered from the shares); the server is
    killed after round 2, restarted, and the run resumed: every round recorded once."""
    clients, rounds, faults, trained = FAULT_PLANS[aggregation]
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "deploy_loopback.py"), "--task", "housing",
         "--rounds", str(rounds), "--clients", str(clients), "--data-dir", str(data_dir),
         "--workdir", str(tmp_path), "--aggregation", aggregation, *faults,
         "--run-config", "round-timeout=60"],
        capture_output=True, text=True, timeout=1500)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert summary["status"] == launch.FINISHED_OK and summary["tls"] is True
    assert summary["rounds"] == list(range(1, rounds + 1)), summary  # none redone or lost
    assert summary["train-clients"] == trained, summary
    assert len(summary["runs-submitted"]) == 2 and len(summary["faults"]) == len(faults) // 2 + 1
    assert summary["processes-left-running"] == []
    assert launch.leftovers(tmp_path) == []  # workers included
    for i in (1, 2):  # one long-lived ClientApp worker ran every message of the node
        log = (tmp_path / f"client{i}.log").read_text(errors="replace")
        assert log.count("ClientApp worker running in the SuperNode's process") == 1, log[-3000:]
        assert "Start `flwr-clientapp` process" not in log
    # server, unregistered node, the clients, the restarted server
    assert len(summary["processes-started"]) == clients + 3
    assert summary["supernode-auth"] is True and summary["unregistered-node-refused"] is True
    assert summary["nodes-connected-as-registered"] is True
    # (that the killed node is named by its own id is tested on PollingGrid directly,
    # tests/fedapp/test_polling.py: here the server is killed right after that round, and
    # the ServerApp's last log lines may not reach the SuperLink before it)
    assert len(set(summary["registered-nodes"].values())) == clients
    server_log = (tmp_path / "server.log").read_text()
    assert "SuperNode authentication is disabled" not in server_log  # Flower's warning
    assert "supernode.key" not in server_log
    assert summary["aggregation"] == aggregation
    model = "model.encrypted.npz" if aggregation == "paillier" else "model.npz"
    assert (Path(summary["run-dir"]) / model).is_file()
    if aggregation == "paillier":  # what the server was given names the public key only
        seen = (Path(summary["run-dir"]) / "config.json").read_text()
        assert "paillier.pub.json" in seen and "paillier.key.json" not in seen
        assert "paillier.key.json" not in (tmp_path / "server.log").read_text()
    if aggregation == "secagg":
        for seen in (Path(summary["run-dir"]) / "config.json", tmp_path / "server.log"):
            assert "secagg-identity.key" not in seen.read_text()
        assert "without identity keys" not in (tmp_path / "client0.log").read_text()
