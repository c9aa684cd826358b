"""``fedapp sim`` stopped mid-run (SIGTERM, as a scheduler or ``timeout`` sends it)
leaves nothing behind: the SuperLink, Flower's SuperExec, the simulation and Ray's
processes all go."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedapp import launch
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # a real Flower simulation


def descendants(pid: int) -> set[int]:
    table = launch.process_table()
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigterm_mid_run_stops_everything_the_simulation_started(tmp_path):
    out = tmp_path / "out.txt"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home")}
    started: set[int] = set()
    with open(out, "w") as log:
        sim = subprocess.Popen([sys.executable, "-m", "fedapp.cli", "sim", "--workdir",
                                str(tmp_path / "w"), "--run-config", "num-server-rounds=20"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "[ROUND 1/20]" not in out.read_text() and time.monotonic() < deadline:
            assert sim.poll() is None, out.read_text()[-3000:]
            time.sleep(1)
        assert "[ROUND 1/20]" in out.read_text(), out.read_text()[-3000:]
        started = descendants(sim.pid)
        names = " ".join(Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                         for p in started if alive(p))
        assert "flower-superlink" in names and "flwr-simulation" in names and "raylet" in names
        sim.send_signal(signal.SIGTERM)
        assert sim.wait(60) == 128 + signal.SIGTERM
        time.sleep(1)
        left = sorted(p for p in started if alive(p))
        assert not left, [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left]
    finally:  # whatever happened, nothing of this test outlives it
        groups = {pgid for pid, (_, pgid) in launch.process_table().items()
                  if pid in started}
        if sim.poll() is None:
            launch.stop(sim)
        for group in groups - {os.getpgrp()}:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
