"""A real deployment on this machine: one server node and N client nodes on
127.0.0.1, each its own process (SuperLink, SuperNodes), started with the
``fedapp server`` / ``fedapp client`` commands; the app is submitted with
``flwr run`` (via ``fedapp run``). Checks with ``flwr ls`` that the run finished
successfully, then stops every process it started, by PID.

    python scripts/deploy_loopback.py [--clients 3] [--rounds 2] [--insecure]
        [--aggregation fedavg|paillier|secagg] [--data-dir ../shared/data]
        [--run-config key=value ...]

With --aggregation paillier a key pair is made (fedapp keygen); the server gets the
public key in the run config, each client node the private key in its node config.
With --aggregation secagg an authentication key is made (fedapp keygen --secagg) for
the client nodes' node config only.

TLS is on unless --insecure: a throw-away CA and server certificate are made
first (scripts/make_certificates.py). The last line of output is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedapp import launch  # noqa: E402
from fedapp.cli import parse_overrides  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--task", default="mnist")
    p.add_argument("--data-dir", default="", help="given to every client node (default: "
                   "the embedded data)")
    p.add_argument("--insecure", action="store_true", help="no TLS")
    p.add_argument("--aggregation", choices=("fedavg", "paillier", "secagg"), default="fedavg")
    p.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", help="logs and state (default: a temporary directory)")
    p.add_argument("--timeout", type=float, default=900)
    args = p.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="deploy-")).resolve()
    certs = work / "certs"
    security = ["--insecure"] if args.insecure else ["--certificates", str(certs)]
    if not args.insecure:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_certificates.py"),
                        str(certs)], check=True)
    fedapp = [sys.executable, "-m", "fedapp.cli"]
    keys = work / "keys"
    if args.aggregation == "paillier":
        subprocess.run([*fedapp, "keygen", "--out", str(keys)], check=True)
    elif args.aggregation == "secagg":
        subprocess.run([*fedapp, "keygen", "--secagg", "--out", str(keys)], check=True)
    port = launch.free_port()
    procs: list[subprocess.Popen] = []
    started = time.monotonic()
    status, run_id = "not submitted", None
    try:
        server = launch.start([*fedapp, "server", "--port", str(port), *security,
                               "--flwr-home", str(work / "server-home")],
                              launch.flower_env(), work / "server.log")
        procs.append(server)
        launch.wait_for_port("127.0.0.1", port, proc=server)
        print(f"server (SuperLink) pid {server.pid} on 127.0.0.1:{port}", flush=True)
        for i in range(args.clients):
            cmd = [*fedapp, "client", "--superlink", f"127.0.0.1:{port}",
                   "--partition-id", str(i), "--num-partitions", str(args.clients),
                   "--port", str(launch.free_port()), *security,
                   "--flwr-home", str(work / f"client{i}-home")]
            if args.data_dir:
                cmd += ["--data-dir", str(Path(args.data_dir).resolve())]
            if args.aggregation == "paillier":
                cmd += ["--paillier-private-key", str(keys / "paillier.key.json")]
            elif args.aggregation == "secagg":
                cmd += ["--secagg-auth-key", str(keys / "secagg-auth.key")]
            procs.append(launch.start(cmd, launch.flower_env(), work / f"client{i}.log"))
            print(f"client {i} (SuperNode) pid {procs[-1].pid}", flush=True)
        overrides = {"task": args.task, "num-server-rounds": args.rounds,
                     "min-available-nodes": args.clients, "min-train-nodes": args.clients,
                     "min-evaluate-nodes": args.clients, "run-dir": str(work / "runs"),
                     "aggregation": args.aggregation, **parse_overrides(args.run_config)}
        if args.data_dir:
            overrides["data-dir"] = str(Path(args.data_dir).resolve())
        if args.aggregation == "paillier":
            overrides["paillier-public-key"] = str(keys / "paillier.pub.json")
        home = work / "submit-home"
        ca = None if args.insecure else certs / "ca.crt"
        launch.write_connection(home, "deployment", f"127.0.0.1:{port}",
                                insecure=args.insecure, root_certificates=ca)
        env = launch.flower_env(home)
        run_id = launch.submit(ROOT, "deployment", env, overrides)
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
    print(json.dumps({
        "deployment": "loopback", "tls": not args.insecure, "clients": args.clients,
        "aggregation": args.aggregation,
        "status": status, "run-id": run_id, "rounds-recorded": sum(1 for r in rows if r["round"] > 0),
        "last-round": rows[-1] if rows else None, "run-dir": str(run_dir) if run_dir else None,
        "processes-started": [proc.pid for proc in procs], "processes-left-running": alive,
        "wall-seconds": round(time.monotonic() - started, 1), "workdir": str(work),
    }))
    return 0 if status == launch.FINISHED_OK and not alive else 1


if __name__ == "__main__":
    sys.exit(main())
