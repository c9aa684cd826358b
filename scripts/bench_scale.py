"""Load: the spam task with many simulated clients, in each aggregation mode.

    python scripts/bench_scale.py [--data-dir ../shared/data] [--clients 100 300 1000]
        [--per-round 100] [--rounds 2] [--modes fedavg paillier secagg]

For every mode and every population size N in ``--clients``, one real Flower
simulation of our app (the repository root) on the spam task: N simulated
SuperNodes, each holding 1/N of the Enron e-mails, ``--per-round`` of them
sampled to train and to evaluate each round (``fraction = per-round / N``), the
default model (65,536 hashed-token buckets) and settings, no centralized
evaluation. Paillier uses a fresh 2048-bit key pair; masking an identity key per node and their roster.

Reported per run: status, seconds per round (mean of the rounds after the first,
which also pays for starting the node processes), every round's seconds, the
last round's clients and federated accuracy, and the peak memory of the whole
simulation: the sum of PSS (proportional set size, so pages shared between the
Ray workers count once) over every process the simulation started, sampled every
``--sample-seconds``. The last line of stdout is a JSON summary; progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedapp import launch  # noqa: E402
from strategies.keyfiles import KEY_DIR_ENV, write_keypair, write_simulation_identities  # noqa: E402

MODES = ("fedavg", "paillier", "secagg")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def descendants(root: int) -> list[int]:
    """PIDs of every living descendant of ``root`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pss_bytes(pid: int) -> int:
    """Proportional set size of ``pid`` in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class PeakMemory:
    """Samples the summed PSS of this process's descendants in a thread."""

    def __init__(self, every: float) -> None:
        self.every, self.peak = every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(pss_bytes(p) for p in descendants(os.getpid())))
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_one(mode: str, clients: int, args: argparse.Namespace, keys: dict[str, Path],
            work: Path) -> dict[str, Any]:
    per_round = min(args.per_round, clients)
    fraction = per_round / clients
    overrides: dict[str, Any] = {
        "task": "spam", "aggregation": mode, "num-server-rounds": args.rounds,
        "fraction-train": fraction, "fraction-evaluate": fraction,
        "min-train-nodes": per_round, "min-evaluate-nodes": per_round,
        "min-available-nodes": clients, "central-eval": False,
        "data-dir": str(Path(args.data_dir).resolve()),
    }
    env = {KEY_DIR_ENV: str(work / "keys")}  # the simulated nodes' key directory
    if mode == "paillier":
        overrides["paillier-public-key"] = str(keys["public"])
    start = time.monotonic()
    with PeakMemory(args.sample_seconds) as memory:
        status, run_dir, logs = launch.simulate(ROOT, work / f"{mode}-{clients}", clients,
                                                overrides, timeout=args.timeout,
                                                progress=False, env=env)
    result: dict[str, Any] = {"mode": mode, "clients": clients, "per-round": per_round,
                              "status": status, "wall-seconds": round(time.monotonic() - start, 1),
                              "peak-memory-mb": round(memory.peak / 2**20, 1)}
    rows = json.loads((run_dir / "metrics.json").read_text()) if run_dir and \
        (run_dir / "metrics.json").is_file() else []
    rows = [r for r in rows if r["round"] > 0]
    if status != launch.FINISHED_OK or not rows:
        result["log-tail"] = logs[-2000:]
        return result
    seconds = [r["seconds"] for r in rows]
    result.update({
        "round-seconds": seconds,
        "seconds-per-round": round(statistics.mean(seconds[1:] or seconds), 2),
        "train-clients": rows[-1].get("train-clients"),
        "fed-accuracy": rows[-1].get("fed-accuracy"),
        "bytes-up": rows[-1].get("bytes-up"),
    })
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--clients", type=int, nargs="+", default=[100, 300, 1000])
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--sample-seconds", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--workdir", help="logs and runs (default: a temporary directory)")
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-")).resolve()
    keys: dict[str, Path] = {}
    if "paillier" in args.modes:
        keys["public"], keys["private"], _ = write_keypair(work / "keys")
    if "secagg" in args.modes:
        keys["roster"] = write_simulation_identities(work / "keys", max(args.clients))
    results = []
    for mode in args.modes:
        for clients in args.clients:
            log(f"{mode}: {clients} clients, {min(args.per_round, clients)} per round ...")
            result = run_one(mode, clients, args, keys, work)
            log(f"  {result['status']}: {result.get('seconds-per-round')} s/round, "
                f"peak {result['peak-memory-mb']} MB, accuracy {result.get('fed-accuracy')}")
            results.append(result)
    growth = {}
    for mode in args.modes:
        mine = [r for r in results if r["mode"] == mode and "seconds-per-round" in r]
        if len(mine) > 1:
            growth[mode] = {
                "clients": [r["clients"] for r in mine],
                "seconds-per-round-vs-smallest": [
                    round(r["seconds-per-round"] / mine[0]["seconds-per-round"], 2) for r in mine],
                "peak-memory-vs-smallest": [
                    round(r["peak-memory-mb"] / mine[0]["peak-memory-mb"], 2) for r in mine],
            }
    ok = all(r["status"] == launch.FINISHED_OK for r in results)
    print(json.dumps({"benchmark": "scale", "task": "spam", "per-round": args.per_round,
                      "rounds": args.rounds, "workdir": str(work), "all-finished": ok,
                      "runs": results, "growth": growth}))
    return 0 if ok else 1


if __name__ == "__main__":
    launch.stop_on_sigterm()  # a stopped benchmark stops what it started
    sys.exit(main())
