"""Benchmark: our masked secure aggregation against plaintext FedAvg and Flower's own
SecAgg+, side by side in one run, in real Flower simulations with the same settings.

    python scripts/bench_secagg.py [--clients 10] [--rounds 3] [--tasks mnist] [--skip-ours]

For every task in ``--tasks`` (default MNIST: full data, McMahan CNN, ``--clients``
clients, all training and evaluating each round, E=1, B=32, no centralized
evaluation), back to back:
  * ``plaintext``: our Message-API app (the repository root) with ``aggregation=fedavg``;
  * ``ours``: the same app with ``aggregation=secagg`` (skipped with ``--skip-ours``);
  * ``flower-secaggplus``: the legacy-API strategy and clients under Flower's
    ``SecAggPlusWorkflow`` / ``secaggplus_mod`` (``fedapp.legacy:secaggplus_serverapp``
    and ``fedapp.legacy:secaggplus_clientapp``) from a temporary project directory,
    with the same ``secagg-*`` settings (shares, threshold, clip, value bits).

Each run reports its status, seconds per round (mean of the rounds after the first),
every round's seconds and train loss, and the bytes of the last round (no run
evaluates: ours sends no evaluation requests by default, see ``plaintext-metrics``);
then the ratios ours / plaintext and ours / Flower SecAgg+. The in-process
micro-benchmark of the masking core (:func:`compute_benchmark`) goes under
``"compute"``.

Bytes are not measured identically: the Message-API app counts array payloads,
the SecAgg+ app every record (SecAgg+ sends its masked vectors as bytes in config
records). Legacy-API rows start where the previous row ended, so from round 2 on a
row holds one round's fit, the same work per round as a Message-API row.

Shared machines make absolute times noisy: compare the ratios measured in the same run.
Progress goes to stderr; the last line of stdout is a JSON summary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from fedapp import launch  # noqa: E402
from strategies.secagg_identity import Identity, NodeIdentity, Roster  # noqa: E402
from strategies.keyfiles import KEY_DIR_ENV, ROSTER_NAME, write_simulation_identities  # noqa: E402
from strategies.secagg_masks import SecAggParams  # noqa: E402
from strategies.secagg_protocol import ServerRound, client_mask, client_step  # noqa: E402

RUNS = ("plaintext", "ours", "flower-secaggplus")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def app_config_table(pyproject: Path) -> str:
    """The ``[tool.flwr.app.config]`` table of ``pyproject``, header included, as text."""
    lines = pyproject.read_text().splitlines()
    start = lines.index("[tool.flwr.app.config]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    return "\n".join(lines[start:end]).strip() + "\n"


def write_secaggplus_project(directory: Path) -> Path:
    """A project whose components are the legacy app under Flower's SecAgg+, with the
    repository's run settings (so every run-config key exists)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pyproject.toml").write_text(f"""\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "bench-flower-secaggplus"
version = "1.0.0"
requires-python = ">=3.11"
dependencies = []

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "fedapp.legacy:secaggplus_serverapp"
clientapp = "fedapp.legacy:secaggplus_clientapp"

{app_config_table(ROOT / "pyproject.toml")}""")
    return directory


def compute_round(n: int, length: int, degree: int, drop_fraction: float,
                  rng: np.random.Generator) -> dict[str, Any]:
    """One full in-process round of the masking core: ``n`` clients with random
    models of ``length`` values and random weights (examples) whose total fits the
    default 32-bit encoding, ``drop_fraction`` of them dropping after the share
    stage; seconds per client (mean) and on the server per stage, and the max error
    against the exact weighted average of the survivors."""
    params = SecAggParams.derive(1.0)
    nodes = [int(u) for u in rng.choice(2**62, size=n, replace=False) + 1]
    server: dict[str, float] = {}
    client: dict[str, float] = {"advertise": 0.0, "coin": 0.0, "share": 0.0, "mask": 0.0,
                                "check": 0.0, "unmask": 0.0}
    states: dict[int, dict] = {u: {} for u in nodes}
    keys = {u: Identity.generate() for u in nodes}  # each node its identity key
    roster = Roster.of(k.public for k in keys.values())
    identity = {u: NodeIdentity(keys[u], roster) for u in nodes}

    def clients(stage: str, requests: dict[int, str]) -> dict[int, str]:
        replies = {}
        for u, request in requests.items():
            start = time.perf_counter()
            replies[u], states[u] = client_step(request, states[u], u, identity[u])
            client[stage] += time.perf_counter() - start
        return replies

    def timed(stage: str, fn, *a):
        start = time.perf_counter()
        out = fn(*a)
        server[stage] = server.get(stage, 0.0) + time.perf_counter() - start
        return out

    rnd = timed("setup", ServerRound, params, nodes, length, degree)
    timed("advertise", rnd.receive_adverts, clients("advertise", timed(
        "advertise", rnd.advertise_requests)))
    coins = timed("coin", rnd.coin_requests)  # sparse graphs only
    if coins:
        timed("coin", rnd.receive_coins, clients("coin", coins))
    timed("share", rnd.receive_shares, clients("share", timed("share", rnd.share_requests)))
    payloads = timed("mask", rnd.mask_payloads)
    dropped = set(nodes[:int(drop_fraction * n)])
    exact = np.zeros(length)
    total_weight = 0
    for u, payload in payloads.items():
        x = rng.uniform(-1, 1, length)
        weight = int(rng.integers(1, min(700, params.max_total_weight // n) + 1))
        start = time.perf_counter()
        # the app's train metrics ride along as sums (train loss, clipped fraction)
        masked, header, states[u] = client_mask(
            payload, states[u], u, x, weight,
            sums={"train-loss": weight * 0.5, "secagg-clipped": 0.0})
        client["mask"] += time.perf_counter() - start
        if u not in dropped:
            exact += weight * x
            total_weight += weight
            timed("mask", rnd.receive_masked, u, masked, header)
    timed("check", rnd.receive_checks, clients("check", timed("check", rnd.check_requests)))
    average, _ = timed("unmask", rnd.receive_unmask, clients("unmask", timed(
        "unmask", rnd.unmask_requests)))
    return {
        "clients": n, "values": length, "neighbors": len(rnd.graph[nodes[0]]),
        "threshold": rnd.threshold, "dropped": len(dropped),
        "client_seconds": {k: round(v / n, 4) for k, v in client.items()},
        "client_seconds_total": round(sum(client.values()) / n, 4),
        "server_seconds": {k: round(v, 4) for k, v in server.items()},
        "server_seconds_total": round(sum(server.values()), 3),
        "max_abs_error": float(np.abs(average - exact / total_weight).max()),
        "error_bound": params.error_bound,
    }


def compute_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """In-process compute of the masking core for a model of ``--compute-values``
    (default: the MNIST CNN's 1,663,370): per client and on the server, for each
    of ``--compute-clients`` with SecAgg+'s logarithmic neighborhoods, and with a
    complete graph (every pair masks, as in the original protocol) at the largest
    count up to 100, so the growth is visible. 10% of the clients drop after the
    share stage and are recovered."""
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"values": args.compute_values, "drop_fraction": 0.1,
                           "sparse": [], "complete": None}
    for n in args.compute_clients:
        log(f"compute: {n} clients, logarithmic neighborhoods")
        out["sparse"].append(compute_round(n, args.compute_values, 0, 0.1, rng))
        log(json.dumps(out["sparse"][-1]))
    small = [n for n in args.compute_clients if n <= 100]
    if small:
        log(f"compute: {max(small)} clients, complete graph")
        out["complete"] = compute_round(max(small), args.compute_values, max(small) - 1, 0.1,
                                        rng)
        log(json.dumps(out["complete"]))
    return out


def run_report(status: str, run_dir: Path | None) -> dict[str, Any]:
    """What one simulation left in ``metrics.json``: seconds, train loss and bytes."""
    rows = json.loads((run_dir / "metrics.json").read_text()) \
        if run_dir and (run_dir / "metrics.json").is_file() else []
    rows = [r for r in rows if r["round"] >= 1]  # the legacy app also records round 0
    later = [r for r in rows if r["round"] > 1]
    last = rows[-1] if rows else {}
    return {
        "status": status,
        "rounds_recorded": len(rows),
        "seconds_per_round": round(statistics.mean(r["seconds"] for r in later), 2) if later else None,
        "round_seconds": [r["seconds"] for r in rows],
        "train_loss": [r.get("train-loss") for r in rows],  # ours: from the masked sums
        "bytes_up_per_round": last.get("bytes-up"),
        "bytes_down_per_round": last.get("bytes-down"),
        "run_dir": str(run_dir) if run_dir else None,
    }


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return round(a / b, digits) if a and b else None


def simulate_task(task: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The three simulations of one task with the same settings, back to back."""
    n = args.clients
    common = {"task": task, "data-dir": str(Path(args.data_dir).resolve()),
              "num-server-rounds": args.rounds, "min-available-nodes": n,
              "min-train-nodes": n, "local-epochs": 1, "batch-size": 32,
              # no evaluation in any run: ours sends none by default (a node's evaluation
              # is plaintext), so the rounds and bytes compare like for like
              "central-eval": False, "fraction-evaluate": 0.0, "min-evaluate-nodes": 0,
              "secagg-neighbors": args.secagg_neighbors,
              "secagg-threshold": args.secagg_threshold}
    apps = {"plaintext": (ROOT, {"aggregation": "fedavg"}),
            "ours": (ROOT, {"aggregation": "secagg"}),
            "flower-secaggplus": (write_secaggplus_project(work / task / "secaggplus-project"),
                                  {"aggregation": "fedavg"})}
    out: dict[str, Any] = {"settings": common}
    keys = work / "keys"  # the nodes' identity keys and roster, made for this benchmark
    if not (keys / ROSTER_NAME).exists():
        write_simulation_identities(keys, n)
    for name in RUNS:
        if name == "ours" and args.skip_ours:
            out[name] = {"status": "skipped"}
            continue
        app_dir, extra = apps[name]
        log(f"simulation: {name} {task}, {n} clients, {args.rounds} rounds")
        start = time.monotonic()
        with contextlib.redirect_stdout(sys.stderr):
            status, run_dir, logs = launch.simulate(app_dir, work / task / name, n,
                                                    {**common, **extra}, timeout=args.timeout,
                                                    env={KEY_DIR_ENV: str(keys)})
        out[name] = {**run_report(status, run_dir),
                     "wall_seconds": round(time.monotonic() - start, 1)}
        if name == "ours":  # the consistency check's stage, as the server logged it
            checks = [float(m) for m in re.findall(
                r"check stage, \d+ of \d+ nodes answered in ([0-9.]+) s", logs)]
            out[name]["check_stage_seconds"] = checks
            out[name]["check_stage_seconds_mean"] = round(statistics.mean(checks), 2) \
                if checks else None
        if status != launch.FINISHED_OK:
            log(logs[-4000:])
        log(f"{name}: {json.dumps(out[name])}")
    p, o, f = out["plaintext"], out["ours"], out["flower-secaggplus"]
    out["ratios"] = {
        "ours_over_plaintext_seconds_per_round":
            ratio(o.get("seconds_per_round"), p.get("seconds_per_round")),
        "ours_over_flower_secaggplus_seconds_per_round":
            ratio(o.get("seconds_per_round"), f.get("seconds_per_round")),
        "flower_secaggplus_over_plaintext_seconds_per_round":
            ratio(f.get("seconds_per_round"), p.get("seconds_per_round")),
        "ours_over_plaintext_bytes_up":
            ratio(o.get("bytes_up_per_round"), p.get("bytes_up_per_round"), 3),
        "ours_over_flower_secaggplus_bytes_up":
            ratio(o.get("bytes_up_per_round"), f.get("bytes_up_per_round"), 3),
        "flower_secaggplus_over_plaintext_bytes_up":
            ratio(f.get("bytes_up_per_round"), p.get("bytes_up_per_round"), 3),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", default="mnist",
                        help="comma-separated tasks to simulate (mnist, housing, spam)")
    parser.add_argument("--secagg-neighbors", type=int, default=0,
                        help="secagg-neighbors of ours and of Flower's SecAgg+ (0: SecAgg+'s "
                             "2 ceil(log2 n) + 2, all for 10 clients or fewer)")
    parser.add_argument("--secagg-threshold", type=float, default=0.5,
                        help="secagg-threshold of ours and of Flower's SecAgg+")
    parser.add_argument("--skip-ours", action="store_true",
                        help="leave out aggregation=secagg (plaintext and SecAgg+ only)")
    parser.add_argument("--timeout", type=float, default=4 * 3600,
                        help="seconds each simulation may take")
    parser.add_argument("--compute-clients", default="10,30,100,300",
                        type=lambda text: [int(n) for n in text.split(",") if n],
                        help="client counts of the in-process compute benchmark")
    parser.add_argument("--compute-values", type=int, default=1_663_370,
                        help="model size of the compute benchmark (default: the MNIST CNN)")
    parser.add_argument("--skip-simulation", action="store_true",
                        help="only the in-process compute benchmark")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-secagg-"))
    summary: dict[str, Any] = {"benchmark": "secagg", "clients": args.clients,
                               "rounds": args.rounds, "skip_ours": args.skip_ours,
                               "cpu_count": os.cpu_count(),
                               "load_average_1min": os.getloadavg()[0], "workdir": str(work)}
    summary["compute"] = compute_benchmark(args)
    summary["simulation"] = {} if args.skip_simulation else {
        task: simulate_task(task, args, work)
        for task in (t.strip() for t in args.tasks.split(",")) if task}
    print(json.dumps(summary))


if __name__ == "__main__":
    launch.stop_on_sigterm()  # a stopped benchmark stops what it started
    main()
