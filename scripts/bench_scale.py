"""Load: many simulated clients, and many real nodes on one machine, in each mode.

    python scripts/bench_scale.py [--data-dir ../shared/data] [--clients 100 300 1000]
        [--per-round 100] [--rounds 2] [--modes fedavg paillier secagg]
    python scripts/bench_scale.py --deploy [--clients 10 20 30] [--rounds 3]
        [--modes fedavg paillier paillier-threshold secagg] [--restart-at 10]

Simulations: for every mode and every population size N in ``--clients``, one
real Flower simulation of our app (the repository root) on the spam task: N
simulated SuperNodes, each holding 1/N of the Enron e-mails, ``--per-round`` of
them sampled to train and to evaluate each round (``fraction = per-round / N``),
the default model (65,536 hashed-token buckets) and settings, no centralized
evaluation. Paillier uses a fresh 2048-bit key pair; masking an identity key per
node and their roster. Reported per run: status, seconds per round (mean of the
rounds after the first, which also pays for starting the node processes), every
round's seconds, the last round's clients and federated accuracy, and the peak
memory of the whole simulation: the sum of PSS (proportional set size, so pages
shared between the Ray workers count once) over every process the simulation
started, sampled every ``--sample-seconds``, also per program (SuperLink,
ServerApp, Ray's parts and workers).

``--deploy``: the deployment load test. For every mode and population N,
``scripts/deploy_loopback.py`` on the housing task: a SuperLink and N SuperNode
processes on 127.0.0.1 with TLS and node authentication, each node with its
long-lived ClientApp worker. Reported: status, rounds, seconds per round, the peak
memory of the server's process tree (SuperLink and ServerApp) and of each node's
(SuperNode and ClientApp worker), of everything, and the peak load average. A
population is tried only if the smaller ones completed in that mode, so the output
says where this machine stops. ``--restart-at N``: at N also a run whose server is
killed (SIGKILL) after round 2, restarted on its database and the run resumed; the
extra wall seconds over the same run without it are what a restart costs.

The last line of stdout is a JSON summary; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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
DEPLOY_MODES = ("fedavg", "paillier", "paillier-threshold", "secagg")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def children_map() -> dict[int, list[int]]:
    """``{parent pid: [child pids]}`` of every living process."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in launch.process_table().items():
        children.setdefault(parent, []).append(pid)
    return children


def subtree(root: int, children: dict[int, list[int]]) -> list[int]:
    """``root`` and every living descendant of it."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
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


def command_line(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def program(command: list[str]) -> str:
    """A short name for a process: its program, or for Python the script or module it
    runs (Ray's workers name themselves, e.g. ``ray::ClientAppActor``)."""
    if not command or not command[0]:
        return "?"
    name = Path(command[0].split()[0]).name
    if name.startswith("python"):
        rest = [arg for arg in command[1:] if arg and arg != "-m" and not arg.startswith("-")]
        return Path(rest[0]).name if rest else name
    return name


class PeakMemory:
    """Samples in a thread the summed PSS of the process tree under each child of
    ``root`` (default: this process), grouped by ``role(child's command line)`` (a
    role of None is left out). ``peaks[role]`` is the largest tree of that role seen
    in one sample, ``total`` the largest sum over every child's tree, ``programs``
    the largest sum per :func:`program` name, ``load`` the largest 1-minute load
    average."""

    def __init__(self, every: float, root: int | None = None,
                 role: Any = lambda command: "all") -> None:
        self.every, self.root, self.role = every, root or os.getpid(), role
        self.peaks: dict[str, int] = {}
        self.programs: dict[str, int] = {}
        self.total = 0
        self.load = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        children, total, programs = children_map(), 0, {}
        for child in children.get(self.root, []):
            role = self.role(command_line(child))
            if role is None:
                continue
            size = 0
            for pid in subtree(child, children):
                pss = pss_bytes(pid)
                name = program(command_line(pid))
                programs[name] = programs.get(name, 0) + pss
                size += pss
            self.peaks[role] = max(self.peaks.get(role, 0), size)
            total += size
        self.total = max(self.total, total)
        for name, size in programs.items():
            self.programs[name] = max(self.programs.get(name, 0), size)
        self.load = max(self.load, os.getloadavg()[0])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def mb(size: int) -> float:
    return round(size / 2**20, 1)


def top_programs(memory: PeakMemory, count: int = 6) -> dict[str, float]:
    """The ``count`` programs with the largest peak memory, in MB."""
    ranked = sorted(memory.programs.items(), key=lambda kv: -kv[1])[:count]
    return {name: mb(size) for name, size in ranked}


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
    (work / f"{mode}-{clients}" / "run.log").write_text(logs)
    result: dict[str, Any] = {"mode": mode, "clients": clients, "per-round": per_round,
                              "status": status, "wall-seconds": round(time.monotonic() - start, 1),
                              "peak-memory-mb": mb(memory.total),
                              "peak-memory-mb-by-program": top_programs(memory)}
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


def deploy_role(command: list[str]) -> str | None:
    """``server`` (the SuperLink, with the SuperExec and ServerApp it starts),
    ``client<i>``, or None (the unregistered node, one-off commands)."""
    if program(command) == "flower-superlink":  # what fedapp server runs (exec)
        return "server"
    if "fedapp.cli" not in command:
        return None
    rest = command[command.index("fedapp.cli") + 1:]
    if rest[:1] == ["client"] and "--flwr-home" in rest:
        node = Path(rest[rest.index("--flwr-home") + 1]).name.removesuffix("-home")
        return node if node.startswith("client") else None
    return None


def run_deploy(mode: str, clients: int, args: argparse.Namespace, work: Path,
               restart: bool = False) -> dict[str, Any]:
    """One ``scripts/deploy_loopback.py`` run (TLS, node authentication, housing) with
    the memory of each node's and of the server's process tree sampled; with
    ``restart`` the server is killed after round 2, restarted and the run resumed."""
    name = f"deploy-{mode}-{clients}" + ("-restart" if restart else "")
    cmd = [sys.executable, str(ROOT / "scripts" / "deploy_loopback.py"), "--task", "housing",
           "--clients", str(clients), "--rounds", str(args.rounds), "--aggregation", mode,
           "--data-dir", str(Path(args.data_dir).resolve()), "--workdir", str(work / name),
           "--timeout", str(args.timeout), *(["--restart-server", "2"] if restart else [])]
    output = work / f"{name}.log"
    start = time.monotonic()
    with open(output, "w") as out, \
            subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT) as proc, \
            PeakMemory(args.sample_seconds, root=proc.pid, role=deploy_role) as memory:
        try:
            proc.wait(args.timeout + 600)
        except BaseException:  # a timeout, or this benchmark stopped
            proc.terminate()  # it stops every process it started
            proc.wait(120)
            if proc.returncode is None or sys.exc_info()[0] is not subprocess.TimeoutExpired:
                raise
    text = output.read_text(errors="replace")
    try:
        summary = json.loads(text.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        summary = {}
    nodes = [size for role, size in memory.peaks.items() if role.startswith("client")]
    result: dict[str, Any] = {
        "mode": mode, "clients": clients, "server-restart": restart,
        "status": summary.get("status", f"no summary (exit {proc.returncode})"),
        "wall-seconds": round(time.monotonic() - start, 1),
        "rounds": summary.get("rounds"), "train-clients": summary.get("train-clients"),
        "server-peak-memory-mb": mb(memory.peaks.get("server", 0)),
        "node-peak-memory-mb": mb(max(nodes, default=0)),
        "node-mean-peak-memory-mb": mb(statistics.mean(nodes)) if nodes else 0,
        "total-peak-memory-mb": mb(memory.total),
        "peak-memory-mb-by-program": top_programs(memory),
        "peak-load-average": round(memory.load, 1),
        "processes-left-running": summary.get("processes-left-running"),
    }
    run_dir = Path(summary["run-dir"]) if summary.get("run-dir") else None
    if run_dir and (run_dir / "metrics.json").is_file():
        seconds = [r["seconds"] for r in json.loads((run_dir / "metrics.json").read_text())
                   if r["round"] > 0]
        result["round-seconds"] = seconds
        if seconds:
            result["seconds-per-round"] = round(statistics.mean(seconds[1:] or seconds), 2)
    if result["status"] != launch.FINISHED_OK:
        result["log-tail"] = text[-3000:]
    return result


def deploy_main(args: argparse.Namespace, work: Path) -> int:
    """The deployment load test: every mode at every population, larger ones only while
    the smaller ones completed; with ``--restart-at`` a run with a server restart too."""
    results = []
    for mode in args.modes:
        for clients in sorted(args.clients):
            for restart in [False] + ([True] if clients in args.restart_at else []):
                log(f"deploy {mode}: {clients} nodes, {args.rounds} rounds"
                    + (", server restarted after round 2" if restart else "") + " ...")
                result = run_deploy(mode, clients, args, work, restart)
                log(f"  {result['status']}: {result.get('seconds-per-round')} s/round, "
                    f"server {result['server-peak-memory-mb']} MB, node "
                    f"{result['node-peak-memory-mb']} MB, all {result['total-peak-memory-mb']}"
                    f" MB, load {result['peak-load-average']}, {result['wall-seconds']} s")
                results.append(result)
            if any(r["status"] != launch.FINISHED_OK for r in results[-2:]
                   if r["mode"] == mode and r["clients"] == clients):
                log(f"  {mode} stops at {clients} nodes here: larger populations skipped")
                break
    restarts = {}
    for r in results:
        plain = [q for q in results if q["mode"] == r["mode"] and q["clients"] == r["clients"]
                 and not q["server-restart"]]
        if r["server-restart"] and plain and r["status"] == plain[0]["status"] == \
                launch.FINISHED_OK:
            restarts[f"{r['mode']}-{r['clients']}"] = round(
                r["wall-seconds"] - plain[0]["wall-seconds"], 1)
    largest = {mode: max((r["clients"] for r in results if r["mode"] == mode
                          and r["status"] == launch.FINISHED_OK), default=0)
               for mode in args.modes}
    print(json.dumps({"benchmark": "scale-deploy", "task": "housing", "rounds": args.rounds,
                      "workdir": str(work), "largest-completed": largest,
                      "restart-extra-seconds": restarts, "runs": results}))
    return 0 if all(r["status"] == launch.FINISHED_OK for r in results) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--deploy", action="store_true", help="the deployment load test: real "
                   "SuperNode processes on loopback (housing) instead of simulations")
    p.add_argument("--clients", type=int, nargs="+",
                   help="populations (default 100 300 1000; with --deploy 10 20 30)")
    p.add_argument("--per-round", type=int, default=100, help="simulations: clients "
                   "sampled per round")
    p.add_argument("--rounds", type=int, help="default 2; with --deploy 3")
    p.add_argument("--modes", nargs="+", choices=DEPLOY_MODES,
                   help=f"default {' '.join(MODES)}; with --deploy {' '.join(DEPLOY_MODES)}")
    p.add_argument("--restart-at", type=int, nargs="*", default=[], metavar="CLIENTS",
                   help="with --deploy: at these populations also a run whose server is "
                   "killed after round 2, restarted and resumed")
    p.add_argument("--sample-seconds", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=7200)
    p.add_argument("--workdir", help="logs and runs (default: a temporary directory)")
    args = p.parse_args()
    args.clients = args.clients or ([10, 20, 30] if args.deploy else [100, 300, 1000])
    args.rounds = args.rounds or (3 if args.deploy else 2)
    args.modes = args.modes or list(DEPLOY_MODES if args.deploy else MODES)
    if not args.deploy and set(args.modes) - set(MODES):
        p.error(f"simulations run the modes {', '.join(MODES)}")
    if args.deploy and args.restart_at and args.rounds < 3:
        p.error("--restart-at restarts the server after round 2: needs --rounds 3 or more")

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-scale-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.deploy:
        return deploy_main(args, work)
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
