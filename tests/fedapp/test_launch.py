"""The Flower commands fedapp.launch builds for SuperLinks and SuperNodes."""

from __future__ import annotations

import os
from pathlib import Path

from fedapp import launch
from tests.helpers import TLS_FILES


def test_supernode_command_carries_the_partition_and_data_dir(tmp_path):
    cmd = launch.supernode_command("h:1", 1, 3, 9999, ["--insecure"], str(tmp_path))
    config = cmd[cmd.index("--node-config") + 1]
    assert config == f"partition-id=1 num-partitions=3 data-dir='{tmp_path.resolve()}'"


def test_supernode_command_gives_paillier_nodes_all_cores(tmp_path):
    key = tmp_path / "paillier.key.json"
    cmd = launch.supernode_command("h:1", 0, 2, 9999, ["--insecure"],
                                   key_files={"paillier-private-key": str(key)})
    config = cmd[cmd.index("--node-config") + 1]
    assert f"paillier-private-key='{key.resolve()}'" in config
    assert config.endswith(" paillier-workers=0")  # 0: all cores (strategies.paillier_message)
    cmd = launch.supernode_command("h:1", 0, 2, 9999, ["--insecure"],
                                   key_files={"paillier-private-key": str(key)},
                                   paillier_workers=3)
    assert cmd[cmd.index("--node-config") + 1].endswith(" paillier-workers=3")


def test_superlink_command_names_only_its_own_tls_files(certs):
    tls = launch.tls_args(certs, False, server=True)
    cmd = launch.superlink_command("127.0.0.1", 9092, tls, supernode_auth=True)
    files = [a for a in cmd[1:] if os.sep in a]
    assert sorted(files) == sorted(str(certs / n) for n in TLS_FILES)


def test_the_run_directory_is_read_from_the_serverapp_log():
    log = ("\x1b[92mINFO \x1b[0m:      Run directory: /home/u/fedapp-runs/20261203-1-mnist-7\n"
           "INFO :      Round 1 done\n"
           "INFO :      Run directory: /home/u/fedapp-runs/20261203-1-mnist-7\x1b[0m\n")
    assert launch.run_dir_in(log) == Path("/home/u/fedapp-runs/20261203-1-mnist-7")
    assert launch.run_dir_in("INFO : another app's log\n") is None


def test_a_run_flower_ended_badly_is_marked_failed_in_its_directory(tmp_path):
    from fedapp.outputs import RunRecorder

    running, done = RunRecorder(tmp_path / "a"), RunRecorder(tmp_path / "b")
    running.write_config({"task": "housing", "aggregation": "fedavg"})
    done.set_status("completed")
    launch.settle_run_dir(running.directory, "finished:stopped")
    launch.settle_run_dir(done.directory, "timeout after 10 s (last status running)")
    assert running.status()["status"] == "failed"
    assert running.status()["detail"] == "Flower says: finished:stopped"
    assert "Flower says: finished:stopped" in (running.directory / "report.html").read_text()
    assert done.status()["status"] == "completed"  # the ServerApp said so itself
    launch.settle_run_dir(None, "finished:failed")  # no directory: nothing to do


def test_a_simulation_starts_its_own_ray_unless_told_to_join_a_cluster(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert launch.simulation_env(tmp_path)["RAY_ADDRESS"] == "local"  # not a stale cluster
    joined = launch.simulation_env(tmp_path, {"RAY_ADDRESS": "127.0.0.1:6379"})
    assert joined["RAY_ADDRESS"] == "127.0.0.1:6379"  # fedapp sim --ray-address
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # the user's shell names one
    assert launch.simulation_env(tmp_path)["RAY_ADDRESS"] == "10.0.0.1:6379"
