"""A real deployment on this machine: one server node and N client nodes on
127.0.0.1, each its own process (SuperLink, SuperNodes), started with the
``fedapp server`` / ``fedapp client`` commands; the app is submitted with
``flwr run`` (via ``fedapp run``). Checks with ``flwr ls`` that the run finished
successfully, then stops every process it started, by PID.

    python scripts/deploy_loopback.py [--clients 3] [--rounds 2] [--insecure]
        [--aggregation fedavg|paillier|secagg] [--data-dir ../shared/data]
        [--run-config key=value ...]

TLS and SuperNode authentication are on unless --insecure: a throw-away CA and
server certificate are made first (scripts/make_certificates.py), each client
node gets its own key pair (fedapp keygen --supernode), the public keys are
registered with the running SuperLink (fedapp register) before the clients start,
and each client passes its private key. A SuperNode with an unregistered key is
started too and must be turned away; each client must connect under the node id
its registration got.

With --aggregation paillier a key pair is made (fedapp keygen); the server gets the
public key in the run config, each client node the private key in its node config.
With --aggregation secagg an authentication key is made (fedapp keygen --secagg) for
the client nodes' node config only. The last line of output is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedapp import launch  # noqa: E402
from fedapp.cli import parse_overrides  # noqa: E402

FEDAPP = [sys.executable, "-m", "fedapp.cli"]
INTRUDER_TIMEOUT = 90.0  # seconds an unregistered SuperNode may take to be turned away


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--task", default="mnist")
    p.add_argument("--data-dir", default="", help="given to every client node (default: "
                   "the embedded data)")
    p.add_argument("--insecure", action="store_true", help="no TLS (and so no SuperNode "
                   "authentication)")
    p.add_argument("--aggregation", choices=("fedavg", "paillier", "secagg"), default="fedavg")
    p.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", help="logs and state (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=900)
    return p.parse_args(argv)


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
    elif args.aggregation == "secagg":
        subprocess.run([*FEDAPP, "keygen", "--secagg", "--out", str(work / "keys")], check=True)


def server_command(args: argparse.Namespace, work: Path, port: int) -> list[str]:
    """``fedapp server``: TLS files (its own certificate and key) and nothing else."""
    return [*FEDAPP, "server", "--port", str(port), *security_args(args, work),
            "--flwr-home", str(work / "server-home")]


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
    if args.aggregation == "paillier":
        cmd += ["--paillier-private-key", str(keys / "paillier.key.json")]
    elif args.aggregation == "secagg":
        cmd += ["--secagg-auth-key", str(keys / "secagg-auth.key")]
    return cmd


def run_overrides(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The run config the server's ServerApp gets: the Paillier public key at most."""
    overrides = {"task": args.task, "num-server-rounds": args.rounds,
                 "min-available-nodes": args.clients, "min-train-nodes": args.clients,
                 "min-evaluate-nodes": args.clients, "run-dir": str(work / "runs"),
                 "aggregation": args.aggregation, **parse_overrides(args.run_config)}
    if args.data_dir:
        overrides["data-dir"] = str(Path(args.data_dir).resolve())
    if args.aggregation == "paillier":
        overrides["paillier-public-key"] = str(work / "keys" / "paillier.pub.json")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="deploy-")).resolve()
    node_auth = not args.insecure
    make_keys(args, work)
    port = launch.free_port()
    procs: list[subprocess.Popen] = []
    started = time.monotonic()
    status, run_id, registered, refused, intruder = "not submitted", None, {}, None, None
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
        for i in range(args.clients):
            procs.append(launch.start(client_command(args, work, port, i),
                                      launch.flower_env(), work / f"client{i}.log"))
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
        run_id = launch.submit(ROOT, "deployment", env, run_overrides(args, work))
        print(f"submitted run {run_id}", flush=True)
        status = launch.wait_for_run(run_id, "deployment", env, args.timeout)
        if status != launch.FINISHED_OK:
            print(launch.logs(run_id, "deployment", env)[-8000:])
    finally:
        for proc in reversed(procs):
            launch.stop(proc)
    alive = [proc.pid for proc in procs if proc.poll() is None]
    run_dir = launch.find_run_dir(work / "runs", run_id) if run_id else None
    rows = json.loads((run_dir / "metrics.json").read_text()) if run_dir else []
    connected = {f"client{i}": connected_node_id(work / f"client{i}.log")
                 for i in range(args.clients)}
    ids_match = connected == registered if node_auth else None
    print(json.dumps({
        "deployment": "loopback", "tls": not args.insecure, "supernode-auth": node_auth,
        "clients": args.clients, "aggregation": args.aggregation,
        "status": status, "run-id": run_id, "rounds-recorded": sum(1 for r in rows if r["round"] > 0),
        "last-round": rows[-1] if rows else None, "run-dir": str(run_dir) if run_dir else None,
        "registered-nodes": registered, "connected-nodes": connected,
        "nodes-connected-as-registered": ids_match, "unregistered-node-refused": refused,
        "processes-started": [proc.pid for proc in procs], "processes-left-running": alive,
        "wall-seconds": round(time.monotonic() - started, 1), "workdir": str(work),
    }))
    auth_ok = not node_auth or (refused is True and ids_match is True)
    return 0 if status == launch.FINISHED_OK and not alive and auth_ok else 1


if __name__ == "__main__":
    sys.exit(main())
