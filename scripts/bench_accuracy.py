"""Benchmark: plaintext weighted FedAvg quality on the three tasks, in real Flower
simulations (a private SuperLink, Ray, ``flwr run``), against published figures.

    python scripts/bench_accuracy.py --data-dir ../shared/data [--tasks mnist,spam,housing]

Settings per task (overridable with --rounds-*):
  mnist    full MNIST, McMahan CNN, 100 clients IID (588 training images each), 10 per
           round, E=5, B=10, SGD lr 0.1 momentum 0.5, 20 rounds;
           target test accuracy >= 0.99 (McMahan et al. 2017, Table 2: 20 rounds)
  spam     Enron-Spam split by mailbox (6 clients), target test accuracy >= 0.985
  housing  Keras split, 2 clients, target test MSE <= 12

The last line of output is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedapp import launch  # noqa: E402
from fedapp.cli import parse_overrides  # noqa: E402

TASKS = {
    "mnist": {
        "supernodes": 100, "metric": "accuracy", "target": 0.99, "higher": True,
        "config": {"task": "mnist", "num-server-rounds": 20, "fraction-train": 0.1,
                   "min-train-nodes": 10, "fraction-evaluate": 0.1, "min-evaluate-nodes": 10,
                   "min-available-nodes": 100, "local-epochs": 5, "batch-size": 10,
                   "learning-rate": 0.1, "momentum": 0.5, "partitioning": "iid",
                   "local-test-fraction": 0.02},
    },
    "spam": {
        "supernodes": 6, "metric": "accuracy", "target": 0.985, "higher": True,
        "config": {"task": "spam", "num-server-rounds": 10, "partitioning": "natural",
                   "min-available-nodes": 6, "min-train-nodes": 6, "min-evaluate-nodes": 6},
    },
    "housing": {
        "supernodes": 2, "metric": "mse", "target": 12.0, "higher": False,
        "config": {"task": "housing", "num-server-rounds": 20, "partitioning": "iid"},
    },
}


def summarize(name: str, spec: dict, rows: list[dict], status: str, wall: float) -> dict:
    key = f"central-{spec['metric']}"
    curve = [(r["round"], r[key]) for r in rows if r["round"] > 0 and key in r]
    ok = (lambda v: v >= spec["target"]) if spec["higher"] else (lambda v: v <= spec["target"])
    reached = next((rnd for rnd, v in curve if ok(v)), None)
    seconds = [r["seconds"] for r in rows if r["round"] > 0]
    return {
        "status": status,
        "supernodes": spec["supernodes"],
        "settings": spec["config"],
        f"final-{spec['metric']}": curve[-1][1] if curve else None,
        f"best-{spec['metric']}": (max if spec["higher"] else min)(v for _, v in curve) if curve else None,
        "target": spec["target"],
        "first-round-at-target": reached,
        "met-target-at-end": bool(curve) and ok(curve[-1][1]),
        "rounds": len(curve),
        "seconds-per-round": round(sum(seconds) / len(seconds), 2) if seconds else None,
        "wall-seconds": round(wall, 1),
        "curve": [round(v, 4) for _, v in curve],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--tasks", default="mnist,spam,housing")
    p.add_argument("--rounds", type=int, help="override every task's number of rounds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run setting of every selected task (TOML value)")
    p.add_argument("--workdir", help="where run directories go (default: a temporary one)")
    args = p.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-accuracy-")).resolve()
    results = {}
    for name in args.tasks.split(","):
        spec = TASKS[name]
        config = {**spec["config"], "data-dir": str(Path(args.data_dir).resolve())}
        if args.rounds:
            config["num-server-rounds"] = args.rounds
        config.update(parse_overrides(args.set))
        print(f"== {name}: {spec['supernodes']} supernodes, {config}", flush=True)
        start = time.monotonic()
        status, run_dir, text = launch.simulate(ROOT, workdir / name, spec["supernodes"], config)
        rows = json.loads((run_dir / "metrics.json").read_text()) if run_dir else []
        results[name] = summarize(name, {**spec, "config": config}, rows, status,
                                  time.monotonic() - start)
        results[name]["run-dir"] = str(run_dir)
        print(json.dumps({name: results[name]}), flush=True)
        if status != launch.FINISHED_OK:
            print(text[-5000:], flush=True)
    print(json.dumps({"benchmark": "accuracy", "results": results}))
    return 0 if all(r["status"] == launch.FINISHED_OK for r in results.values()) else 1


if __name__ == "__main__":
    launch.stop_on_sigterm()  # a stopped benchmark stops what it started
    sys.exit(main())
