"""A simulation on an existing Ray cluster (docs/scaling.md): a head node with no CPUs
and a worker node, each its own ``ray start`` process on loopback; ``fedapp sim
--ray-address`` places the simulated nodes on the cluster.

Under Paillier the private key lives only in the worker node's environment (its
``ray start`` was given ``FEDAPP_KEY_DIR``): the server side (head, SuperLink,
simulation driver) has no key, so the run finishing proves the ClientApps ran on the
worker and that no private material went through the server. A watcher also reads
every ClientApp actor's environment while the run goes on. Every process is stopped by
its process group."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fedapp import launch
from strategies.keyfiles import KEY_DIR_ENV
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # real Ray cluster and Flower run

RAY = str(Path(sys.executable).with_name("ray"))


def ray_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--node-ip-address", "127.0.0.1", "--block",
                             *args], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _descends_from(pid: int, roots: list[int]) -> bool:
    while pid > 1:
        if pid in roots:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
    return False


def actor_nodes(stop: threading.Event, seen: dict[int, str], nodes: list) -> None:
    """Which node each ClientApp actor process of this cluster (a descendant of one of
    ``nodes``: another test's simulation may run beside it) belongs to, by its
    environment."""
    while not stop.is_set():
        roots = [p.pid for p in nodes]
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in seen:
                continue
            try:
                if not (entry / "cmdline").read_bytes().startswith(b"ray::ClientAppActor"):
                    continue
                if not _descends_from(int(entry.name), roots):
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            marks = [e for e in environ if e.startswith(b"FEDAPP_TEST_RAY_NODE=")]
            seen[int(entry.name)] = marks[0].split(b"=", 1)[1].decode() if marks else "?"
        stop.wait(0.2)


def test_a_secure_simulation_runs_on_the_worker_of_a_ray_cluster(tmp_path, data_dir):
    keys, home = tmp_path / "keys", tmp_path / "home"
    made = subprocess.run([sys.executable, "-m", "fedapp.cli", "keygen", "--out", str(keys)],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    server_env = launch.flower_env(None, HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
                                   FEDAPP_TEST_RAY_NODE="head")
    server_env.pop(KEY_DIR_ENV, None)
    worker_env = {**server_env, KEY_DIR_ENV: str(keys), "FEDAPP_TEST_RAY_NODE": "worker"}
    port = launch.free_port()
    marker = Path("/tmp/ray/ray_current_cluster")  # what Ray's init() would join
    marker_before = marker.read_bytes() if marker.exists() else None
    # Ray's socket paths must stay short: its own temporary directory under /tmp
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    nodes, seen, stop = [], {}, threading.Event()
    watcher = threading.Thread(target=actor_nodes, args=(stop, seen, nodes), daemon=True)
    try:
        nodes.append(ray_node(["--head", "--port", str(port), "--num-cpus", "0",
                               "--include-dashboard", "false", "--temp-dir", str(ray_tmp)],
                              server_env, tmp_path / "ray-head.log"))
        launch.wait_for_port("127.0.0.1", port, timeout=60, proc=nodes[0])
        nodes.append(ray_node(["--address", f"127.0.0.1:{port}", "--num-cpus", "2"],
                              worker_env, tmp_path / "ray-worker.log"))
        time.sleep(5)  # the worker registers with the head
        watcher.start()
        out = subprocess.run(
            [sys.executable, "-m", "fedapp.cli", "sim", "--app", str(ROOT), "--num-supernodes",
             "2", "--workdir", str(tmp_path / "sim"), "--ray-address", f"127.0.0.1:{port}",
             "--timeout", "600", "--run-config", "task='housing'", "--run-config",
             f"data-dir='{data_dir}'", "--run-config", "num-server-rounds=2",
             "--run-config", "aggregation='paillier'", "--run-config",
             f"paillier-public-key='{keys / 'paillier.pub.json'}'"],
            env=server_env, capture_output=True, text=True, timeout=900)
    finally:
        stop.set()
        for proc in reversed(nodes):
            launch.stop(proc, grace=20)
        if watcher.is_alive():
            watcher.join(5)
        left = launch.leftovers(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    logs = out.stdout[-4000:] + out.stderr[-3000:]
    assert out.returncode == 0, logs
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["status"] == launch.FINISHED_OK
    assert "aggregate_train: 2 valid encrypted replies of 2" in out.stdout, logs
    assert seen and set(seen.values()) == {"worker"}, seen  # every actor on the worker node
    assert left == [] and launch.leftovers(keys) == []  # every Ray process stopped
    # and nothing points later simulations at the cluster that is gone
    assert (marker.read_bytes() if marker.exists() else None) == marker_before
