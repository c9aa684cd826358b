"""Benchmark: privacy against utility of DP-FedAvg, central and distributed, in real
Flower simulations.

    python scripts/bench_dp.py [--runs fedavg:0,fedavg:1,secagg:0,secagg:1,secagg-ddp:1]
        [--rounds 30] [--clients 1000] [--per-round 100] [--clip 1.0] [--local-epochs 1]

MNIST split IID over ``--clients`` simulated clients (60 images each for 1,000),
``--per-round`` of them sampled each round (sample rate q = per-round / clients),
the small CNN (20,338 parameters), ``--local-epochs`` of SGD. ``--runs`` lists the
runs, each ``aggregation:z``: ``fedavg`` (plaintext), ``secagg`` (masking) or
``secagg-ddp`` (masking with distributed DP: the clients add the noise), at noise
multiplier ``z`` (0: no DP, FedAvg weighted by examples; > 0: DP-FedAvg, uniform
weights, clipping norm ``--clip``, fixed denominator, epsilon at ``--delta``).

Reports, per run: test accuracy on the 10,000 MNIST test images (centralized
evaluation, each round), the cumulative epsilon after each round, seconds per
round; and side by side: distributed DP's seconds per round over masking without DP,
and its accuracy minus central DP's over masking at the same z. The last line of
stdout is a JSON summary. Progress goes to stderr.

Before the runs, the exact discrete Gaussian samplers side by side, in this process:
ours (:mod:`strategies.discrete_gaussian`) on the MNIST CNN's 1,663,370 values, and
OpenDP's (``make_gaussian`` on integers, the same exactness and CSPRNG) on
``--opendp-values`` of them, in values per second (``--sampler-only`` stops there).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedapp import launch  # noqa: E402


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_report(status: str, run_dir: Path | None) -> dict[str, Any]:
    rows = json.loads((run_dir / "metrics.json").read_text()) \
        if run_dir and (run_dir / "metrics.json").is_file() else []
    rounds = [r for r in rows if r["round"] >= 1]
    accuracy = [r.get("central-accuracy") for r in rounds]
    return {
        "status": status,
        "rounds": len(rounds),
        "final_accuracy": accuracy[-1] if accuracy else None,
        "best_accuracy": max((a for a in accuracy if a is not None), default=None),
        "accuracy": [round(a, 4) if a is not None else None for a in accuracy],
        "epsilon": [round(r["train-dp-epsilon"], 4) for r in rounds if "train-dp-epsilon" in r],
        "final_epsilon": rounds[-1].get("train-dp-epsilon") if rounds else None,
        "clip": [round(r["train-dp-clip"], 4) for r in rounds if "train-dp-clip" in r],
        "unclipped_fraction": [round(r["train-dp-unclipped-fraction"], 3) for r in rounds
                               if "train-dp-unclipped-fraction" in r],
        "seconds_per_round": round(statistics.mean(r["seconds"] for r in rounds[1:]), 2)
        if len(rounds) > 1 else None,
        "run_dir": str(run_dir) if run_dir else None,
    }


def sampler_benchmark(values: int = 1_663_370, opendp_values: int = 100_000,
                      sigma: float = 33_333.3) -> dict[str, Any]:
    """Values per second of the exact discrete Gaussian samplers (see the module); the
    scale is z C / step for z = C = 1 on the 16-bit grid of range 1."""
    from strategies.discrete_gaussian import discrete_gaussian

    start = time.perf_counter()
    ours = discrete_gaussian(sigma, values)
    ours_seconds = time.perf_counter() - start
    import opendp.prelude as dp

    dp.enable_features("contrib")
    measurement = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=int)),
                                     dp.l2_distance(T=int), scale=sigma)
    start = time.perf_counter()
    theirs = measurement([0] * opendp_values)
    opendp_seconds = time.perf_counter() - start
    return {"sigma": sigma, "ours_values": values, "ours_seconds": round(ours_seconds, 3),
            "ours_values_per_second": round(values / ours_seconds),
            "ours_std_over_sigma": round(float(ours.std()) / sigma, 4),
            "opendp_values": opendp_values, "opendp_seconds": round(opendp_seconds, 3),
            "opendp_values_per_second": round(opendp_values / opendp_seconds),
            "opendp_std_over_sigma": round(statistics.pstdev(theirs) / sigma, 4),
            "speedup": round((values / ours_seconds) / (opendp_values / opendp_seconds), 1)}


def run_spec(text: str) -> tuple[str, float]:
    aggregation, _, z = text.partition(":")
    if aggregation not in ("fedavg", "secagg", "secagg-ddp") or not z:
        raise argparse.ArgumentTypeError(f"{text!r}: write aggregation:z, aggregation one of "
                                         "fedavg, secagg, secagg-ddp")
    return aggregation, float(z)


def side_by_side(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Distributed DP against masking without DP (seconds per round) and against
    central DP over masking at the same z (accuracy), where the runs are there."""
    by = {r["run"]: r for r in runs}
    out: dict[str, Any] = {}
    for r in runs:
        if r["aggregation"] != "secagg-ddp":
            continue
        z = r["noise_multiplier"]
        plain, central = by.get("secagg:0"), by.get(f"secagg:{z:g}")
        if plain and plain["seconds_per_round"] and r["seconds_per_round"]:
            out[f"ddp_z{z:g}_seconds_over_masking"] = round(
                r["seconds_per_round"] / plain["seconds_per_round"], 3)
        if central and central["final_accuracy"] is not None \
                and r["final_accuracy"] is not None:
            out[f"ddp_z{z:g}_accuracy_minus_central"] = round(
                r["final_accuracy"] - central["final_accuracy"], 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--runs", default="fedavg:0,fedavg:1,secagg:0,secagg:1,secagg-ddp:1",
                        type=lambda t: [run_spec(r) for r in t.split(",") if r],
                        help="aggregation:z pairs (aggregation fedavg, secagg or secagg-ddp)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=100)
    parser.add_argument("--clip", type=float, default=1.0, help="L2 clipping norm C")
    parser.add_argument("--adaptive", action="store_true", help="adaptive clipping (central)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--timeout", type=float, default=6 * 3600)
    parser.add_argument("--opendp-values", type=int, default=100_000)
    parser.add_argument("--sampler-only", action="store_true",
                        help="only compare the discrete Gaussian samplers")
    args = parser.parse_args()

    log("exact discrete Gaussian samplers, ours and OpenDP's")
    sampler = sampler_benchmark(opendp_values=args.opendp_values)
    log(json.dumps(sampler))
    if args.sampler_only:
        print(json.dumps({"benchmark": "dp", "sampler": sampler}))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-dp-"))
    common = {"task": "mnist", "mnist-model": "small-cnn",
              "data-dir": str(Path(args.data_dir).resolve()),
              "num-server-rounds": args.rounds, "min-available-nodes": args.clients,
              "fraction-train": args.per_round / args.clients, "min-train-nodes": args.per_round,
              "fraction-evaluate": 0.0, "min-evaluate-nodes": 0,
              "batch-size": 10, "learning-rate": args.learning_rate, "optimizer": "sgd",
              "local-epochs": args.local_epochs, "central-eval": True,
              "dp-clip": args.clip, "dp-delta": args.delta}
    summary: dict[str, Any] = {"benchmark": "dp", "sampler": sampler, "settings": common,
                               "sample_rate": args.per_round / args.clients,
                               "cpu_count": os.cpu_count(), "workdir": str(work), "runs": []}
    keys = work / "keys"
    if any(aggregation != "fedavg" for aggregation, _ in args.runs):
        from strategies.keyfiles import write_simulation_identities

        keys.mkdir()
        write_simulation_identities(keys, args.clients)
    for aggregation, z in args.runs:
        name = f"{aggregation}:{z:g}"
        log(f"simulation {name}: {args.clients} clients, {args.per_round} per round, "
            f"{args.rounds} rounds")
        settings = {**common, "aggregation": aggregation.removesuffix("-ddp"),
                    "dp-noise-multiplier": z,
                    "dp-mode": "distributed" if aggregation.endswith("-ddp") else "central",
                    "dp-adaptive-clip": args.adaptive and not aggregation.endswith("-ddp")}
        start = time.monotonic()
        with contextlib.redirect_stdout(sys.stderr):
            status, run_dir, logs = launch.simulate(
                ROOT, work / name.replace(":", "-z"), args.clients, settings,
                timeout=args.timeout, env={"FEDAPP_KEY_DIR": str(keys)})
        report = {"run": name, "aggregation": aggregation, "noise_multiplier": z,
                  **run_report(status, run_dir),
                  "wall_seconds": round(time.monotonic() - start, 1)}
        if status != launch.FINISHED_OK:
            log(logs[-4000:])
        log(json.dumps(report))
        summary["runs"].append(report)
    summary["table"] = [{"run": r["run"], "epsilon": r["final_epsilon"],
                         "final_accuracy": r["final_accuracy"],
                         "best_accuracy": r["best_accuracy"],
                         "seconds_per_round": r["seconds_per_round"]} for r in summary["runs"]]
    summary["side_by_side"] = side_by_side(summary["runs"])
    print(json.dumps(summary))


if __name__ == "__main__":
    launch.stop_on_sigterm()  # a stopped benchmark stops what it started
    main()
