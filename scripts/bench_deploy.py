"""Seconds per round on real nodes against the same run in simulation.

For each task and aggregation mode, one simulation (``fedapp sim``'s engine,
``launch.simulate``) and one loopback deployment (``scripts/deploy_loopback.py``: a
SuperLink and N SuperNode processes with TLS and node authentication, each node with
its long-lived ClientApp worker) run the same settings, one after the other. The
first round of each pays for imports and data loading (in simulation too), so the
comparison is of the mean of the later rounds; both are reported.

After each deployment every process whose environment points into its work
directory (SuperLink, SuperNodes, ClientApp workers, their children) must be gone.

    python scripts/bench_deploy.py [--tasks housing mnist] [--modes fedavg paillier secagg]
        [--clients 3] [--rounds 5] [--data-dir ../shared/data] [--workdir DIR]

The last line of output is a JSON summary; ``ratio`` is deployed over simulated
seconds per round.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from fedapp import launch  # noqa: E402
from fedapp.modes import MODES  # noqa: E402
from strategies.keyfiles import (KEY_DIR_ENV, THRESHOLD_PUBLIC_NAME, write_keypair,  # noqa: E402
                                 write_simulation_identities, write_threshold_key)


def log(message: str) -> None:
    print(time.strftime("%H:%M:%S"), message, file=sys.stderr, flush=True)


def round_seconds(run_dir: Path | None) -> list[float]:
    """Seconds of each recorded round of a run (round 0, the initial evaluation, left out)."""
    if run_dir is None or not (run_dir / "metrics.json").is_file():
        return []
    rows = json.loads((run_dir / "metrics.json").read_text())
    return [r["seconds"] for r in rows if r["round"] > 0 and r.get("seconds") is not None]


def summary(status: str, seconds: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {"status": status, "round-seconds": seconds}
    if seconds:
        out["first-round"] = seconds[0]
        out["seconds-per-round"] = round(statistics.mean(seconds[1:] or seconds), 3)
    return out


def simulated(task: str, mode: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "task": task, "aggregation": mode, "num-server-rounds": args.rounds,
        "min-available-nodes": args.clients, "min-train-nodes": args.clients,
        "min-evaluate-nodes": args.clients, "data-dir": str(Path(args.data_dir).resolve())}
    keys = work / ("keys-threshold" if mode == "paillier-threshold" else "keys")
    if mode == "paillier":
        overrides["paillier-public-key"] = str(keys / "paillier.pub.json")
    if mode == "paillier-threshold":  # 2 of N, as deploy_loopback.py deals it by default
        overrides["paillier-public-key"] = str(keys / THRESHOLD_PUBLIC_NAME)
    status, run_dir, logs = launch.simulate(
        ROOT, work / f"sim-{task}-{mode}", args.clients, overrides, timeout=args.timeout,
        progress=False, env={KEY_DIR_ENV: str(keys)})
    result = summary(status, round_seconds(run_dir))
    if status != launch.FINISHED_OK:
        result["log-tail"] = logs[-2000:]
    return result


def deployed(task: str, mode: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    where = work / f"deploy-{task}-{mode}"
    cmd = [sys.executable, str(ROOT / "scripts" / "deploy_loopback.py"), "--task", task,
           "--clients", str(args.clients), "--rounds", str(args.rounds),
           "--aggregation", mode, "--data-dir", str(Path(args.data_dir).resolve()),
           "--workdir", str(where), "--timeout", str(args.timeout)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            stdout, stderr = proc.communicate()
        finally:  # stopped (SIGTERM): the script stops its own processes on SIGTERM
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    try:
        report = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"status": f"deploy_loopback.py failed ({out.returncode})",
                "log-tail": (out.stdout + out.stderr)[-2000:]}
    run_dir = Path(report["run-dir"]) if report.get("run-dir") else None
    result = summary(report["status"], round_seconds(run_dir))
    time.sleep(1.0)  # let the stopped processes' exits be reaped
    result["processes-left"] = report["processes-left-running"] + launch.leftovers(where)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=("housing", "mnist", "spam"),
                   default=["housing", "mnist"])
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--workdir", help="logs and runs (default: a temporary directory)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-deploy-")).resolve()
    if "paillier" in args.modes:
        write_keypair(work / "keys")
    if "secagg" in args.modes:
        write_simulation_identities(work / "keys", args.clients)
    if "paillier-threshold" in args.modes:
        write_threshold_key(work / "keys-threshold", 2, args.clients)
        write_simulation_identities(work / "keys-threshold", args.clients)
    runs = []
    for task in args.tasks:
        for mode in args.modes:
            log(f"{task} {mode}: simulation ...")
            sim = simulated(task, mode, args, work)
            log(f"  {sim['status']}: {sim.get('seconds-per-round')} s/round")
            log(f"{task} {mode}: {args.clients} real nodes on loopback ...")
            real = deployed(task, mode, args, work)
            log(f"  {real['status']}: {real.get('seconds-per-round')} s/round, "
                f"left running: {real.get('processes-left')}")
            ratio = (round(real["seconds-per-round"] / sim["seconds-per-round"], 2)
                     if "seconds-per-round" in real and "seconds-per-round" in sim else None)
            runs.append({"task": task, "mode": mode, "simulation": sim, "deployment": real,
                         "ratio": ratio})
    ok = all(r["simulation"]["status"] == r["deployment"]["status"] == launch.FINISHED_OK
             and not r["deployment"]["processes-left"] for r in runs)
    print(json.dumps({"benchmark": "deploy", "clients": args.clients, "rounds": args.rounds,
                      "cores": os.cpu_count(), "workdir": str(work), "all-finished": ok,
                      "runs": runs}))
    return 0 if ok else 1


if __name__ == "__main__":
    launch.stop_on_sigterm()  # a stopped benchmark stops what it started
    sys.exit(main())
