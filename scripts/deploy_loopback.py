"""A real deployment on this machine: one server node and N client nodes on
127.0.0.1, each its own process (SuperLink, SuperNodes), started with the
``fedapp server`` / ``fedapp client`` commands; the app is submitted with
``flwr run`` (via ``fedapp run``). Checks with ``flwr ls`` that the run finished
successfully, then stops every process it started, by PID.

    python scripts/deploy_loopback.py [--clients 3] [--rounds 2] [--insecure]
        [--aggregation fedavg|paillier|paillier-threshold|secagg] [--threshold 2]
        [--data-dir ../shared/data]
        [--run-config key=value ...] [--node-config key=value ...]

TLS and SuperNode authentication are on unless --insecure: a throw-away CA and
server certificate are made first (scripts/make_certificates.py), each client
node gets its own key pair (fedapp keygen --supernode), the public keys are
registered with the running SuperLink (fedapp register) before the clients start,
and each client passes its private key. A SuperNode with an unregistered key is
started too and must be turned away; each client must connect under the node id
its registration got.

With --aggregation paillier a key pair is made (fedapp keygen); the server gets the
public key in the run config, each client node the private key in its node config.
With --aggregation secagg each client node gets its own identity key (fedapp keygen
--secagg) and all of them the roster of the public keys (fedapp roster), through their
node config only. With --aggregation paillier-threshold a --threshold-of---clients key is
dealt (fedapp keygen --threshold): client i gets share i + 1, every client the group key,
its identity key and the roster, the server the threshold public key only.

Faults, for real (by PID, while the run goes on): --crash-client R kills client 0
(SIGKILL) as round R starts; --hang-client R freezes client 1 (SIGSTOP) as round R
starts, until the end; both rounds must finish with the survivors (the minimum
numbers of nodes drop by one per faulty client). --restart-server R kills the
server (SIGKILL) once round R is finished, starts it again on the same port and
state database, and submits the run again with ``resume-from`` its run directory:
the clients reconnect and the run goes on from round R + 1. The last line of
output is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedapp import launch  # noqa: E402
from fedapp.checkpoint import Checkpoint, CheckpointError  # noqa: E402
from fedapp.cli import parse_overrides  # noqa: E402

FEDAPP = [sys.executable, "-m", "fedapp.cli"]
INTRUDER_TIMEOUT = 90.0  # seconds an unregistered SuperNode may take to be turned away
STATUS_SECONDS = 5.0  # how often the run's status is read while faults are pending


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--task", default="mnist")
    p.add_argument("--data-dir", default="", help="given to every client node (default: "
                   "the embedded data)")
    p.add_argument("--insecure", action="store_true", help="no TLS (and so no SuperNode "
                   "authentication)")
    p.add_argument("--aggregation", choices=("fedavg", "paillier", "paillier-threshold",
                                             "secagg"), default="fedavg")
    p.add_argument("--threshold", type=int, default=2, help="with --aggregation "
                   "paillier-threshold: the shares that decrypt together (every client node "
                   "holds one of --clients shares)")
    p.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--node-config", action="append", default=[], metavar="KEY=VALUE",
                   help="a node setting for every client node (fedapp client --node-config), "
                        "e.g. paillier-accept-server-noise=true for central DP")
    p.add_argument("--workdir", help="logs and state (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--crash-client", type=int, default=0, metavar="ROUND",
                   help="kill client 0 as this round starts")
    p.add_argument("--hang-client", type=int, default=0, metavar="ROUND",
                   help="freeze client 1 as this round starts (set round-timeout short)")
    p.add_argument("--restart-server", type=int, default=0, metavar="ROUND",
                   help="kill and restart the server after this round, then resume")
    args = p.parse_args(argv)
    if args.hang_client and args.clients < 2:
        p.error("--hang-client freezes client 1: needs --clients 2 or more")
    return args


def security_args(args: argparse.Namespace, work: Path) -> list[str]:
    return ["--insecure"] if args.insecure else ["--certificates", str(work / "certs")]


def make_keys(args: argparse.Namespace, work: Path) -> None:
    """Certificates, the aggregation's keys and (with TLS) every client node's
    SuperNode key pair plus an unregistered one for the intruder check."""
    if not args.insecure:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_certificates.py"),
                        str(work / "certs")], check=True)
        for name in [f"client{i}" for i in range(args.clients)] + ["intruder"]:
            subprocess.run([*FEDAPP, "keygen", "--supernode", "--out",
                            str(work / "keys" / name)], check=True)
    if args.aggregation == "paillier":
        subprocess.run([*FEDAPP, "keygen", "--out", str(work / "keys")], check=True)
    if args.aggregation == "paillier-threshold":  # the dealer, here: a share per node
        subprocess.run([*FEDAPP, "keygen", "--threshold", str(args.threshold), "--shares",
                        str(args.clients), "--out", str(work / "keys" / "threshold")],
                       check=True)
    if args.aggregation in ("secagg", "paillier-threshold"):  # identity keys, the roster
        for i in range(args.clients):
            subprocess.run([*FEDAPP, "keygen", "--secagg", "--out",
                            str(work / "keys" / f"client{i}")], check=True)
        subprocess.run([*FEDAPP, "roster", "--out", str(work / "keys" / "secagg-roster.json"),
                        *(str(work / "keys" / f"client{i}" / "secagg-identity.pub")
                          for i in range(args.clients))], check=True)


def server_command(args: argparse.Namespace, work: Path, port: int) -> list[str]:
    """``fedapp server``: TLS files (its own certificate and key) and nothing else; a
    state database when it is to be restarted (registered nodes survive)."""
    database = ["--database", str(work / "superlink.db")] if args.restart_server else []
    return [*FEDAPP, "server", "--port", str(port), *security_args(args, work),
            "--flwr-home", str(work / "server-home"), *database]


def client_command(args: argparse.Namespace, work: Path, port: int, i: int,
                   node: str | None = None) -> list[str]:
    """``fedapp client`` for partition ``i``, with the client-side keys; ``node``
    names the SuperNode key pair (default ``client{i}``)."""
    node = node or f"client{i}"
    keys = work / "keys"
    cmd = [*FEDAPP, "client", "--superlink", f"127.0.0.1:{port}",
           "--partition-id", str(i), "--num-partitions", str(args.clients),
           "--port", str(launch.free_port()), *security_args(args, work),
           "--flwr-home", str(work / f"{node}-home")]
    if not args.insecure:
        cmd += ["--supernode-key", str(keys / node / "supernode.key")]
    if args.data_dir:
        cmd += ["--data-dir", str(Path(args.data_dir).resolve())]
    for setting in args.node_config:
        cmd += ["--node-config", setting]
    if args.aggregation == "paillier":
        cmd += ["--paillier-private-key", str(keys / "paillier.key.json")]
    if args.aggregation in ("secagg", "paillier-threshold"):
        cmd += ["--secagg-identity-key", str(keys / f"client{i}" / "secagg-identity.key"),
                "--secagg-roster", str(keys / "secagg-roster.json")]
    if args.aggregation == "paillier-threshold":
        cmd += ["--paillier-threshold-public-key",
                str(keys / "threshold" / "paillier-threshold.pub.json"),
                "--paillier-group-key", str(keys / "threshold" / "paillier-group.key"),
                "--paillier-key-share",
                str(keys / "threshold" / f"paillier-threshold-share-{i + 1}.json")]
    return cmd


def run_overrides(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The run config the server's ServerApp gets: the Paillier public key at most."""
    least = args.clients - bool(args.crash_client) - bool(args.hang_client)
    overrides = {"task": args.task, "num-server-rounds": args.rounds,
                 "min-available-nodes": least, "min-train-nodes": least,
                 "min-evaluate-nodes": least, "run-dir": str(work / "runs"),
                 "aggregation": args.aggregation, **parse_overrides(args.run_config)}
    if args.data_dir:
        overrides["data-dir"] = str(Path(args.data_dir).resolve())
    if args.aggregation == "paillier":
        overrides["paillier-public-key"] = str(work / "keys" / "paillier.pub.json")
    if args.aggregation == "paillier-threshold":
        overrides["paillier-public-key"] = str(work / "keys" / "threshold" /
                                               "paillier-threshold.pub.json")
    return overrides


def register_nodes(args: argparse.Namespace, work: Path, port: int) -> dict[str, int]:
    """Register every client node's public key (``fedapp register``); returns
    ``{node name: node id}``."""
    names = [f"client{i}" for i in range(args.clients)]
    out = subprocess.run(
        [*FEDAPP, "register", *[str(work / "keys" / n / "supernode.pub") for n in names],
         "--superlink", f"127.0.0.1:{port}", *security_args(args, work),
         "--flwr-home", str(work / "admin-home")],
        capture_output=True, text=True, check=False, env=launch.flower_env())
    if out.returncode != 0:
        raise RuntimeError(f"fedapp register failed: {out.stdout} {out.stderr}")
    ids = json.loads(out.stdout.strip().splitlines()[-1])["registered"]
    return {n: ids[str(work / "keys" / n / "supernode.pub")] for n in names}


def connected_node_id(log_path: Path) -> int | None:
    """The node id a SuperNode reports in its log once the SuperLink let it in."""
    found = re.findall(r"SuperNode ID: (\d+)", log_path.read_text(errors="replace"))
    return int(found[-1]) if found else None


_LAST_CHECKPOINT: dict[Path, tuple[float, int]] = {}


def finished_round(run_dir: Path | None) -> int:
    """The last round the run's checkpoint holds (-1: no run directory yet); the file is
    read again only when it changed."""
    if run_dir is None:
        return -1
    try:
        mtime = (run_dir / "checkpoint.npz").stat().st_mtime
    except OSError:
        return 0
    if _LAST_CHECKPOINT.get(run_dir, (None,))[0] != mtime:
        try:
            _LAST_CHECKPOINT[run_dir] = (mtime, Checkpoint.load(run_dir).round)
        except CheckpointError:
            return 0
    return _LAST_CHECKPOINT[run_dir][1]


def node_env(args: argparse.Namespace) -> dict[str, str]:
    """A client node's environment: the nodes share this machine's cores, so each
    gets its share of torch threads (as Flower's simulation gives each ClientApp one
    CPU), unless ``OMP_NUM_THREADS`` is set."""
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1)
                                                           // args.clients))
    return launch.flower_env(OMP_NUM_THREADS=threads)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group we started ``proc`` in."""
    os.killpg(proc.pid, sig)


class StatusWatch:
    """A run's status (``flwr ls``), read every few seconds in a thread of its own."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.run_id = ""
        self.last = "unknown"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def follow(self, run_id: str) -> None:
        self.run_id, self.last = run_id, "unknown"

    def _loop(self) -> None:
        while not self._stop.wait(STATUS_SECONDS):
            run_id = self.run_id
            status = launch.run_status(run_id, "deployment", self.env)
            if run_id == self.run_id:
                self.last = status

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class FaultRun:
    """Waits for a run while injecting the requested faults; restarting the server
    resubmits the run with ``resume-from``."""

    def __init__(self, args: argparse.Namespace, work: Path, port: int,
                 procs: list[subprocess.Popen], server: subprocess.Popen,
                 clients: list[subprocess.Popen], env: dict[str, str]) -> None:
        self.args, self.work, self.port, self.env = args, work, port, env
        self.procs, self.server, self.clients = procs, server, clients
        self.events: list[str] = []
        self.run_ids: list[str] = []
        self.run_dir: Path | None = None

    def event(self, text: str) -> None:
        print(text, flush=True)
        self.events.append(text)

    def submit(self, overrides: dict[str, Any]) -> str:
        run_id = launch.submit(ROOT, "deployment", self.env, overrides)
        self.run_ids.append(run_id)
        print(f"submitted run {run_id}", flush=True)
        return run_id

    def restart_server(self) -> None:
        signal_group(self.server, signal.SIGKILL)
        self.server.wait()
        self.event(f"server pid {self.server.pid} killed after round {self.args.restart_server}")
        self.server = launch.start(server_command(self.args, self.work, self.port),
                                   launch.flower_env(), self.work / "server-restarted.log")
        self.procs.append(self.server)
        launch.wait_for_port("127.0.0.1", self.port, proc=self.server)
        self.event(f"server restarted, pid {self.server.pid}")

    def wait(self, run_id: str) -> str:
        """Follow the run; inject each fault once the run has finished the round before
        it (crash, hang) or the round itself (restart). Returns the final status.

        While faults are pending the run's checkpoint is watched every 0.02 s (a file:
        cheap; a housing round takes about a second on real nodes, so a fault meant for
        round R must land before round R's messages reach the nodes) and the run's
        status is read in the background (``flwr ls`` takes a second or two); then
        :func:`fedapp.launch.wait_for_run` follows the run to its end (one ``flwr log
        --stream`` process, not a ``flwr ls`` process every fraction of a second, which
        would take a core from the nodes)."""
        a = self.args
        rounds = {"crash": a.crash_client, "hang": a.hang_client, "restart": a.restart_server}
        pending = {f: r - (f != "restart") for f, r in rounds.items() if r}  # 0: not asked
        deadline = time.monotonic() + a.timeout
        status = StatusWatch(self.env)
        status.follow(run_id)
        try:
            while pending and time.monotonic() < deadline:
                if status.last.startswith("finished"):
                    return status.last
                self.run_dir = self.run_dir or launch.find_run_dir(self.work / "runs", run_id)
                done = finished_round(self.run_dir)
                for fault in [f for f, after in pending.items() if self.run_dir and done >= after]:
                    del pending[fault]
                    if fault == "crash":
                        signal_group(self.clients[0], signal.SIGKILL)
                        self.event(f"client 0 (pid {self.clients[0].pid}) killed as round "
                                   f"{a.crash_client} starts")
                    elif fault == "hang":
                        signal_group(self.clients[1], signal.SIGSTOP)
                        self.event(f"client 1 (pid {self.clients[1].pid}) frozen as round "
                                   f"{a.hang_client} starts")
                    else:
                        self.restart_server()
                        run_id = self.submit({**run_overrides(a, self.work),
                                              "resume-from": str(self.run_dir)})
                        status.follow(run_id)
                time.sleep(0.02)
        finally:
            status.stop()
        return launch.wait_for_run(run_id, "deployment", self.env,
                                   max(0.0, deadline - time.monotonic()), progress=False)

    def thaw(self) -> None:
        """Let a frozen client go on, so it can be stopped."""
        if self.args.hang_client and self.clients[1].poll() is None:
            signal_group(self.clients[1], signal.SIGCONT)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM as SystemExit, so that ``main`` stops every process it started."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deploy-")).resolve()
    node_auth = not args.insecure
    make_keys(args, work)
    port = launch.free_port()
    procs: list[subprocess.Popen] = []
    started = time.monotonic()
    status, run_id, registered, refused, intruder = "not submitted", None, {}, None, None
    faults: FaultRun | None = None
    try:
        server = launch.start(server_command(args, work, port), launch.flower_env(),
                              work / "server.log")
        procs.append(server)
        launch.wait_for_port("127.0.0.1", port, proc=server)
        print(f"server (SuperLink) pid {server.pid} on 127.0.0.1:{port}", flush=True)
        if node_auth:
            registered = register_nodes(args, work, port)
            print(f"registered SuperNodes: {registered}", flush=True)
            intruder = launch.start(client_command(args, work, port, 0, node="intruder"),
                                    launch.flower_env(), work / "intruder.log")
            procs.append(intruder)
            print(f"unregistered SuperNode pid {intruder.pid}", flush=True)
        clients = []
        for i in range(args.clients):
            clients.append(launch.start(client_command(args, work, port, i),
                                        node_env(args), work / f"client{i}.log"))
            procs.append(clients[-1])
            print(f"client {i} (SuperNode) pid {procs[-1].pid}", flush=True)
        if intruder is not None:  # turned away before the run starts, or the check fails
            try:
                refused = intruder.wait(INTRUDER_TIMEOUT) != 0 \
                    and connected_node_id(work / "intruder.log") is None
            except subprocess.TimeoutExpired:
                refused = False
            print(f"unregistered SuperNode refused: {refused}", flush=True)
        home = work / "submit-home"
        ca = None if args.insecure else work / "certs" / "ca.crt"
        launch.write_connection(home, "deployment", f"127.0.0.1:{port}",
                                insecure=args.insecure, root_certificates=ca)
        env = launch.flower_env(home)
        faults = FaultRun(args, work, port, procs, server, clients, env)
        run_id = faults.submit(run_overrides(args, work))
        status = faults.wait(run_id)
        run_id = faults.run_ids[-1]
        for submitted in faults.run_ids:  # the ServerApp's log of each run, kept
            text = launch.logs(submitted, "deployment", env)
            (work / f"run-{submitted}.log").write_text(text)
        if status != launch.FINISHED_OK:
            print(text[-8000:])
    finally:
        if faults is not None:
            faults.thaw()
        for proc in reversed(procs):
            launch.stop(proc)
    alive = [proc.pid for proc in procs if proc.poll() is None]
    run_dir = faults.run_dir if faults and faults.run_dir else (
        launch.find_run_dir(work / "runs", run_id) if run_id else None)
    launch.settle_run_dir(run_dir, status)
    rows = json.loads((run_dir / "metrics.json").read_text()) if run_dir else []
    connected = {f"client{i}": connected_node_id(work / f"client{i}.log")
                 for i in range(args.clients)}
    ids_match = connected == registered if node_auth else None
    print(json.dumps({
        "deployment": "loopback", "tls": not args.insecure, "supernode-auth": node_auth,
        "clients": args.clients, "aggregation": args.aggregation,
        "status": status, "run-id": run_id, "rounds-recorded": sum(1 for r in rows if r["round"] > 0),
        "rounds": [r["round"] for r in rows if r["round"] > 0],
        "train-clients": [r.get("train-clients") for r in rows if r["round"] > 0],
        "runs-submitted": faults.run_ids if faults else [], "faults": faults.events if faults else [],
        "last-round": rows[-1] if rows else None, "run-dir": str(run_dir) if run_dir else None,
        "registered-nodes": registered, "connected-nodes": connected,
        "nodes-connected-as-registered": ids_match, "unregistered-node-refused": refused,
        "processes-started": [proc.pid for proc in procs], "processes-left-running": alive,
        "wall-seconds": round(time.monotonic() - started, 1), "workdir": str(work),
    }))
    auth_ok = not node_auth or (refused is True and ids_match is True)
    return 0 if status == launch.FINISHED_OK and not alive and auth_ok else 1


if __name__ == "__main__":
    launch.stop_on_sigterm()  # a stopped benchmark stops what it started
    sys.exit(main())
