"""``fedapp``: run simulations, and start the server and client nodes of a deployment.

    fedapp sim       run a simulation on a private SuperLink and report how it ended
    fedapp server    start a SuperLink (the server node): TLS, and SuperNode authentication
    fedapp client    start a SuperNode (a client node) for one data partition
    fedapp register  register client nodes' public keys with a running SuperLink
    fedapp run       submit this app to a SuperLink and wait until the run ends
    fedapp keygen    make a Paillier key pair (public key for the server, private for clients),
                     with --secagg one client node's masking identity key pair (with
                     --simulation N: N of them and their roster, for a simulation),
                     with --supernode one client node's SuperNode authentication key pair
    fedapp roster    collect the client nodes' public identity keys into the masking roster
    fedapp decrypt   turn an encrypted final model into a plaintext checkpoint (key holders)
    fedapp provision make a federation's keys and certificates, one folder per machine
                     (then fedapp server/client/run --kit FOLDER)
    fedapp predict   predictions from a trained model; --secure: on secret shares, with
                     the model owner, data owner, two computing parties and a dealer
    fedapp infer     one party of a secure prediction session, for separate machines
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from . import launch
from .modes import MODES



def parse_overrides(items: list[str]) -> dict:
    """``key=value`` pairs, values read as TOML scalars (numbers, true/false, 'strings')."""
    import tomllib

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--run-config expects key=value, got '{item}'")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value  # a bare word: take it as a string
    return out


def _flwr_home(args: argparse.Namespace) -> Path:
    return Path(args.flwr_home or os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def app_dir(args: argparse.Namespace) -> Path:
    """The app to submit (``--app``, default the current directory), said out loud."""
    path = Path(args.app).expanduser().resolve()
    print(f"submitting the Flower app in {path}", flush=True)
    return path


def check_run_config(app: Path, overrides: dict) -> None:
    """For this project's app, check the run settings before submitting: Flower would
    say only "Invalid run configuration" for an unknown key, and a bad value would stop
    the run seconds later with a traceback. Other apps are left to Flower.

    Raises
    ------
    ValueError
        Naming the setting (and the closest known one) or the bad value.
    """
    import tomllib

    try:
        project = tomllib.loads((app / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return  # Flower will say what is wrong with the app
    flwr = project.get("tool", {}).get("flwr", {}).get("app", {})
    if flwr.get("components", {}).get("serverapp") == "fedapp.server_app:app":
        from .config import RunSettings

        # the app's own config (it may differ from our defaults), then the overrides
        RunSettings.from_run_config({**flwr.get("config", {}), **overrides})


def simulation_identities(nodes: int) -> None:
    """With masking or threshold Paillier, ``fedapp sim`` makes the simulated nodes'
    identity keys and their roster in the key directory if it holds no roster (every node of a simulation runs
    on this machine, in the SuperLink's processes).

    Raises
    ------
    ValueError
        If the roster there lists fewer nodes than the simulation has.
    """
    from strategies.keyfiles import (ROSTER_NAME, default_key_dir, load_roster,
                                     write_simulation_identities)

    directory = default_key_dir()
    if not (directory / ROSTER_NAME).exists():
        write_simulation_identities(directory, nodes)
        print(f"made {nodes} masking identity keys and their roster in {directory}",
              file=sys.stderr)
    elif len(load_roster(directory / ROSTER_NAME)) < nodes:
        raise ValueError(f"the masking roster in {directory} lists fewer than {nodes} nodes: "
                         f"make keys for this simulation elsewhere ('fedapp keygen --secagg "
                         f"--simulation {nodes} --out DIR', then FEDAPP_KEY_DIR=DIR)")


def cmd_sim(args: argparse.Namespace) -> int:
    from strategies.node_settings import NODE_CONFIG_ENV, node_config_text

    env = {NODE_CONFIG_ENV: node_config_text(args.node_config)} if args.node_config else {}
    if args.ray_address:  # Flower's Ray backend joins the cluster that ray.init() finds there
        env["RAY_ADDRESS"] = args.ray_address
    overrides = parse_overrides(args.run_config)
    app = app_dir(args)
    check_run_config(app, overrides)
    if overrides.get("aggregation") in ("secagg", "paillier-threshold"):
        simulation_identities(args.num_supernodes)
    status, run_dir, _ = launch.simulate(
        app, Path(args.workdir), args.num_supernodes, overrides,
        timeout=args.timeout, env=env, runs_in_workdir=False)  # streams the log as it goes
    if run_dir:
        print(f"run directory: {run_dir} (report: {run_dir / 'report.html'})")
    print(json.dumps({"status": status, "run-dir": str(run_dir) if run_dir else None}))
    return 0 if status == launch.FINISHED_OK else 1


def _from_kit(args: argparse.Namespace, **values: object) -> None:
    """Fill ``args`` from a kit, refusing options the kit already decides."""
    given = [f"--{k.replace('_', '-')}" for k in values if getattr(args, k, None)]
    if given:
        raise ValueError(f"--kit decides {', '.join(given)}: drop them")
    for key, value in values.items():
        setattr(args, key, value)


def cmd_server(args: argparse.Namespace) -> int:
    kit = None
    if args.kit:
        from .kits import load_kit

        kit = load_kit(Path(args.kit), "server")
        _from_kit(args, certificates=str(kit.certificates), insecure=False,
                  no_supernode_auth=False)
        args.port = kit.port
    tls = launch.tls_args(Path(args.certificates) if args.certificates else None,
                          args.insecure, server=True)
    cmd = launch.superlink_command(args.host, args.port, tls,
                                   database=Path(args.database) if args.database else None,
                                   supernode_auth=not (args.insecure or args.no_supernode_auth))
    env = launch.flower_env(_flwr_home(args))
    if kit is None:
        os.execve(cmd[0], cmd, env)
        return 1  # not reached
    link = subprocess.Popen(cmd, env=env)
    try:  # register the kit's sites once the SuperLink listens, then serve
        local = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        launch.wait_for_port(local, args.port, timeout=60, proc=link)
        args.superlink = f"{local}:{args.port}"
        connection, env = connect(args)
        for key in kit.supernode_keys():
            print(f"fedapp server: {key.stem} {launch.ensure_registered(key, connection, env)}",
                  flush=True)
        return link.wait()
    finally:
        if link.poll() is None:
            link.terminate()
            link.wait()


def client_secrets(args: argparse.Namespace) -> str | None:
    """Check the key files a client node was given before it starts; returns the
    SuperNode private key path (None without node authentication).

    Raises
    ------
    ValueError
        If node authentication is on (TLS without ``--no-supernode-auth``) and no
        ``--supernode-key`` was given, or a key is given with ``--insecure`` or
        ``--no-supernode-auth``, or the key is not a usable SuperNode key.
    PermissionError
        If a private key file is readable by group or others.
    """
    from strategies.keyfiles import check_private

    from .nodekeys import check_node_private_key

    if args.insecure and args.supernode_key:
        raise ValueError("--supernode-key needs TLS (Flower refuses node authentication "
                         "over an insecure connection): drop --insecure or the key")
    if args.no_supernode_auth and args.supernode_key:
        raise ValueError("give either --supernode-key or --no-supernode-auth, not both")
    if not (args.insecure or args.no_supernode_auth or args.supernode_key):
        raise ValueError("give --supernode-key FILE (this node's private key from 'fedapp "
                         "keygen --supernode', its public key registered with 'fedapp "
                         "register'), or --no-supernode-auth for a SuperLink started with it")
    if args.paillier_workers < 0:
        raise ValueError(f"--paillier-workers must be >= 0 (0: all cores), got "
                         f"{args.paillier_workers}")
    for path in (args.paillier_private_key, args.secagg_identity_key, args.paillier_group_key,
                 args.paillier_key_share):
        if path:
            check_private(Path(path).expanduser())
    return str(check_node_private_key(Path(args.supernode_key))) if args.supernode_key else None


def cmd_client(args: argparse.Namespace) -> int:
    if args.kit:
        from strategies.keyfiles import (GROUP_KEY_NAME, IDENTITY_NAME, PRIVATE_NAME,
                                         ROSTER_NAME, THRESHOLD_PUBLIC_NAME,
                                         threshold_share_name)

        from .kits import SUPERNODE_PRIVATE, load_kit

        kit = load_kit(Path(args.kit), "site")
        files = {"supernode_key": SUPERNODE_PRIVATE, "paillier_private_key": PRIVATE_NAME,
                 "secagg_identity_key": IDENTITY_NAME, "secagg_roster": ROSTER_NAME,
                 "paillier_threshold_public_key": THRESHOLD_PUBLIC_NAME,
                 "paillier_group_key": GROUP_KEY_NAME,
                 "paillier_key_share": threshold_share_name(kit.partition_id + 1)}
        _from_kit(args, superlink=kit.superlink, partition_id=kit.partition_id,
                  num_partitions=kit.num_partitions, certificates=str(kit.certificates),
                  insecure=False, no_supernode_auth=False,
                  **{k: str(f) if (f := kit.file(n)) else None for k, n in files.items()})
    missing = [o for o, v in (("--superlink", args.superlink), ("--partition-id",
               args.partition_id), ("--num-partitions", args.num_partitions)) if v is None]
    if missing:
        raise ValueError(f"give --kit FOLDER (fedapp provision), or {', '.join(missing)}")
    if args.num_partitions < 1 or not 0 <= args.partition_id < args.num_partitions:
        raise ValueError(f"--partition-id {args.partition_id} is not a partition of "
                         f"--num-partitions {args.num_partitions}: give each client node one "
                         f"of 0 to {max(args.num_partitions - 1, 0)}")
    from strategies.node_settings import node_config_text

    from .polling import node_settings

    node_settings()  # a bad FEDAPP_NODE_* value: one line now, not a traceback later
    settings = node_config_text(args.node_config)
    tls = launch.tls_args(Path(args.certificates) if args.certificates else None,
                          args.insecure, server=False)
    node_key = client_secrets(args)
    key_files = {"paillier-private-key": args.paillier_private_key,
                 "secagg-identity-key": args.secagg_identity_key,
                 "secagg-roster": args.secagg_roster,
                 "paillier-threshold-public-key": args.paillier_threshold_public_key,
                 "paillier-group-key": args.paillier_group_key,
                 "paillier-key-share": args.paillier_key_share}
    cmd = launch.supernode_command(args.superlink, args.partition_id, args.num_partitions,
                                   args.port, tls, args.data_dir, key_files, node_key,
                                   args.paillier_workers, settings)
    return launch.run_node(cmd, launch.flower_env(_flwr_home(args)))


def connect(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    """Add or update this SuperLink's own connection (``fedapp-HOST-PORT``) in
    ``$FLWR_HOME/config.toml``, TLS with ``--certificates DIR``/ca.crt unless
    ``--insecure``; the user's other connections and default stay as they were.
    Returns the connection's name and the environment for ``flwr`` commands."""
    home = _flwr_home(args)
    ca = Path(args.certificates) / "ca.crt" if args.certificates else None
    if not args.insecure and (ca is None or not ca.is_file()):
        raise SystemExit("give --certificates DIR holding ca.crt, or --insecure")
    name = launch.connection_name(args.superlink)
    launch.write_connection(home, name, args.superlink, insecure=args.insecure,
                            root_certificates=None if args.insecure else ca)
    return name, launch.flower_env(home)


def cmd_run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.run_config)
    if args.kit:
        from strategies.keyfiles import PUBLIC_NAME, THRESHOLD_PUBLIC_NAME

        from .kits import load_kit

        kit = load_kit(Path(args.kit), "server")
        _from_kit(args, superlink=kit.superlink,
                  certificates=str(kit.certificates), insecure=False)
        public = {"paillier": PUBLIC_NAME, "paillier-threshold": THRESHOLD_PUBLIC_NAME}.get(
            str(overrides.get("aggregation")))
        if public and kit.file(public):
            overrides.setdefault("paillier-public-key", str(kit.file(public)))
    if not args.superlink:
        raise ValueError("give --kit FOLDER (the server's, from fedapp provision), or "
                         "--superlink HOST:PORT")
    app = app_dir(args)
    check_run_config(app, overrides)
    connection, env = connect(args)
    run_id = launch.submit(app, connection, env, overrides)
    print(f"submitted run {run_id} (connection '{connection}': flwr log {run_id} "
          f"{connection} --stream)")
    if args.no_wait:
        return 0
    status = launch.wait_for_run(run_id, connection, env, args.timeout)  # streams the log
    run_dir = launch.run_dir_in(launch.logs(run_id, connection, env))
    if run_dir:
        print(f"run directory on the server's machine: {run_dir} (report: "
              f"{run_dir / 'report.html'})")
    print(json.dumps({"run-id": run_id, "status": status,
                      "run-dir": str(run_dir) if run_dir else None}))
    return 0 if status == launch.FINISHED_OK else 1


def cmd_register(args: argparse.Namespace) -> int:
    from .nodekeys import check_node_public_key

    if args.insecure:
        raise SystemExit("SuperNode authentication needs TLS: a SuperLink started with "
                         "--insecure lets any SuperNode in, there is nothing to register")
    keys = [check_node_public_key(Path(k)) for k in args.public_keys]
    connection, env = connect(args)
    ids = {str(k): launch.register_supernode(k, connection, env) for k in keys}
    print(json.dumps({"registered": ids}))
    return 0


def cmd_roster(args: argparse.Namespace) -> int:
    from strategies.keyfiles import read_public_identity, write_roster

    keys = [read_public_identity(Path(p)) for p in args.public_keys]
    path = write_roster(Path(args.out), keys)
    print(f"roster of {len(keys)} nodes (every client node gets a copy): {path}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from strategies.keyfiles import (default_key_dir, write_identity, write_keypair,
                                     write_simulation_identities)

    from .bundle import refuse_inside_app

    out = Path(args.out).expanduser() if args.out else default_key_dir()
    if not args.allow_inside_app:
        refuse_inside_app(out, "private keys")
    args.out = str(out)
    if args.simulation is not None and not args.secagg:
        raise ValueError("--simulation N goes with --secagg")
    if (args.threshold is None) != (args.shares is None):
        raise ValueError("--threshold T and --shares N go together (T of N holders decrypt)")
    if args.threshold is not None and (args.secagg or args.supernode):
        raise ValueError("--threshold makes a Paillier key: drop --secagg / --supernode")
    if args.threshold is not None:
        from strategies.keyfiles import GROUP_KEY_NAME, write_threshold_key

        public, shares, fingerprint = write_threshold_key(Path(args.out), args.threshold,
                                                          args.shares, args.bits)
        print(f"public key (server and every node):           {public}")
        for i, path in enumerate(shares, 1):
            print(f"key share {i} (holder {i} only, 0600):{' ' * (13 - len(str(i)))}{path}")
        print(f"group key (every client node, never the server): "
              f"{Path(args.out) / GROUP_KEY_NAME}")
        print(f"fingerprint: {fingerprint}")
        print(f"any {args.threshold} of the {args.shares} holders decrypt together. This "
              "process was the dealer: the key existed whole only in its memory, now gone. "
              "Move each share to its holder and delete it from this machine.")
        return 0
    if args.secagg and args.simulation is not None:
        roster = write_simulation_identities(Path(args.out), args.simulation)
        print(f"{args.simulation} identity keys (secagg-identity-<partition-id>.key, 0600) "
              f"and their roster: {roster}")
        return 0
    if args.secagg:
        public, private = write_identity(Path(args.out))
        print(f"identity public key  (for the roster: fedapp roster):  {public}")
        print(f"identity private key (this client node only, 0600):    {private}")
        return 0
    if args.supernode:
        from .nodekeys import write_node_keypair

        public, private = write_node_keypair(Path(args.out))
        print(f"SuperNode public key  (register it: fedapp register):  {public}")
        print(f"SuperNode private key (this client node only, 0600):   {private}")
        return 0
    public, private, fingerprint = write_keypair(Path(args.out), args.bits)
    print(f"public key  (give to the server):       {public}")
    print(f"private key (client nodes only, 0600):  {private}")
    print(f"fingerprint: {fingerprint}")
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    import numpy as np

    from strategies.keyfiles import load_group_key, load_private_key
    from strategies.paillier_protocol import EncryptedModel, decrypt_model
    from strategies.threshold_protocol import is_sealed, open_model

    with np.load(args.model, allow_pickle=False) as data:
        stored = {k: data[k] for k in data.files}
    if is_sealed(stored):  # a threshold run's model: the clients' group key opens it
        layout, arrays, means, server_round = open_model(load_group_key(Path(args.key)),
                                                         stored, run=None)
    else:
        key = load_private_key(Path(args.key))
        encrypted = EncryptedModel.from_arrays(stored, key.public_key)
        arrays, sums = decrypt_model(key, encrypted, min_contributors=args.min_contributors,
                                     accept_noise=args.accept_server_noise, workers=None)
        layout, server_round = encrypted.layout, encrypted.server_round
        means = {k: v / encrypted.total_weight for k, v in sums.items()}
    names = list(layout.names)
    if args.task:  # name the arrays after the task model's parameters, for load_npz
        from clients.tasks import DataSpec, build_model

        names = list(build_model(DataSpec(task=args.task, mnist_model=args.mnist_model,
                                          spam_buckets=args.spam_buckets)).state_dict())
        if len(names) != len(arrays):
            raise ValueError(f"the model has {len(arrays)} arrays, task {args.task} {len(names)}")
    np.savez(args.out, **dict(zip(names, arrays, strict=True)))
    print(f"wrote {args.out} ({sum(a.size for a in arrays):,} values)")
    if means:  # the round's train metrics, example-weighted means over its contributors
        print(json.dumps({"round": server_round, "train-metrics": means}))
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from .bundle import refuse_inside_app
    from .kits import provision

    out = Path(args.out).expanduser()
    refuse_inside_app(out, "private keys")
    folders = provision(out, args.sites, args.server_address, tuple(args.modes), args.days,
                        args.threshold)
    print(f"server kit (to the server machine):  {folders[0]}")
    for folder in folders[1:]:
        print(f"site kit (to its client node only):  {folder}")
    print(f"once each folder is on its machine, delete {out}: it holds every site's keys")
    return 0


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written; every option's default after its help
    (except flags, which default to off, and options without a default)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or action.default == [] \
                or not action.option_strings or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("fedprivacy")
    except PackageNotFoundError:  # run from a source tree that was not installed
        ours = "unknown"
    return f"fedapp {ours} (flwr {version('flwr')})"


RUN_CONFIG_HELP = ("a run setting, repeatable (see docs/configuration.md; unknown keys are "
                   "named with the closest valid one before anything starts)")
TIMEOUT_HELP = "seconds to wait for the run to end before stopping it and failing"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedapp", description=__doc__, formatter_class=_Help)
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, description: str, example: str
                ) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=textwrap.fill(description, 88),
                              epilog="example:\n" + example, formatter_class=_Help)

    def tls(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--certificates", help="directory with ca.crt (and server.pem, "
                        "server.key for the server); see scripts/make_certificates.py")
        sp.add_argument("--insecure", action="store_true", help="no TLS (test setups only)")
        sp.add_argument("--flwr-home", help="Flower's state directory (default $FLWR_HOME or "
                        "~/.flwr)")

    s = command("sim", "run a simulation and report whether it succeeded",
                "Run this app in Flower's simulation engine on a private SuperLink, stream "
                "its log, and print where its run directory is and how it ended (exit code "
                "0 only if it completed). Makes the masking identity keys of the simulated "
                "nodes the first time aggregation=secagg needs them.",
                "  fedapp sim --num-supernodes 10 --run-config aggregation=secagg \\\n"
                "             --run-config num-server-rounds=5")
    s.add_argument("--num-supernodes", type=int, default=2, help="simulated client nodes")
    s.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                   help=RUN_CONFIG_HELP)
    s.add_argument("--node-config", action="append", default=[], metavar="KEY=VALUE",
                   help="a node's own setting, for every simulated node (e.g. "
                        "paillier-accept-server-noise=true; docs/threat-model.md)")
    s.add_argument("--workdir", default="fedapp-sim",
                   help="the private SuperLink's state and logs (default: %(default)s); run "
                        "directories go where the run-dir setting says, as with every command")
    s.add_argument("--app", default=".", help="the Flower app directory (default: the "
                   "current directory)")
    s.add_argument("--ray-address", help="HOST:PORT of the head of a running Ray cluster "
                   "(ray start --head) to place the simulated nodes on, instead of a Ray "
                   "started on this machine; see docs/scaling.md")
    s.add_argument("--timeout", type=float, default=6 * 3600, help=TIMEOUT_HELP)
    s.set_defaults(func=cmd_sim)

    s = command("server", "start the SuperLink (server node)",
                "Start a SuperLink: the server node clients connect to and runs are "
                "submitted to (fedapp run). With --certificates it serves TLS and admits "
                "only SuperNodes registered with fedapp register.",
                "  fedapp server --certificates certs --database server.db")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    s.add_argument("--port", type=int, default=9092, help="the SuperLink's Fleet API port "
                   "(clients connect here; the next two ports serve runs and the ServerApp)")
    s.add_argument("--database", help="SQLite file for the SuperLink state, registered "
                   "SuperNodes included (default: in memory)")
    s.add_argument("--no-supernode-auth", action="store_true", help="let any SuperNode "
                   "connect (default with TLS: only SuperNodes registered with fedapp register)")
    s.add_argument("--kit", help="the server folder from fedapp provision: its certificates "
                   "and port, and its sites' SuperNode keys, registered once the server "
                   "listens")
    tls(s)
    s.set_defaults(func=cmd_server)

    s = command("client", "start a SuperNode (client node) for one partition",
                "Start a SuperNode that trains on one partition of the run's data set. Its "
                "keys (Paillier private key, masking identity key and roster, SuperNode "
                "key) stay on this machine; the options below name them when they are not "
                "in $FEDAPP_KEY_DIR or ~/.fedapp/keys.",
                "  fedapp client --superlink 10.0.0.5:9092 --certificates certs \\\n"
                "      --partition-id 0 --num-partitions 3 --supernode-key keys/supernode.key")
    s.add_argument("--kit", help="this site's folder from fedapp provision: it gives the "
                   "server address, partition, certificates and keys (no need for the "
                   "options that name them)")
    s.add_argument("--superlink", help="HOST:PORT of the server (without --kit)")
    s.add_argument("--partition-id", type=int,
                   help="this node's partition, 0 to --num-partitions - 1 (without --kit)")
    s.add_argument("--num-partitions", type=int, help="how many partitions the data set is "
                   "split into, one per client (without --kit)")
    s.add_argument("--data-dir", help="this node's data directory (overrides the run's)")
    s.add_argument("--paillier-private-key", help="private key file for aggregation=paillier")
    s.add_argument("--paillier-workers", type=int, default=0,
                   help="processes for Paillier encryption and decryption on this node "
                        "(0: all cores)")
    s.add_argument("--secagg-identity-key", help="this node's identity key file for "
                   "aggregation=secagg or paillier-threshold (fedapp keygen --secagg)")
    s.add_argument("--secagg-roster", help="the federation's roster for aggregation=secagg "
                   "or paillier-threshold (fedapp roster; the same on every client node)")
    s.add_argument("--paillier-threshold-public-key", help="the threshold public key "
                   "(paillier-threshold.pub.json) for aggregation=paillier-threshold")
    s.add_argument("--paillier-group-key", help="the clients' group key (paillier-group.key) "
                   "for aggregation=paillier-threshold")
    s.add_argument("--paillier-key-share", help="this node's key share "
                   "(paillier-threshold-share-<i>.json) if it is one of the decryptors")
    s.add_argument("--supernode-key", help="this node's SuperNode authentication private key "
                   "(fedapp keygen --supernode); needed with TLS")
    s.add_argument("--no-supernode-auth", action="store_true",
                   help="connect without node authentication (the SuperLink must allow it)")
    s.add_argument("--port", type=int, default=9094,
                   help="local port for the ClientApp runtime; one per node on a machine")
    s.add_argument("--node-config", action="append", default=[], metavar="KEY=VALUE",
                   help="one of this node's own settings, checked before the node starts "
                        "(e.g. paillier-accept-server-noise=true; docs/configuration.md)")
    tls(s)
    s.set_defaults(func=cmd_client)

    s = command("keygen", "make a Paillier key pair, a masking identity key pair (--secagg) "
                "or a SuperNode key pair (--supernode)",
                "Make keys. By default a Paillier key pair: the public key goes to the "
                "server, the private key to every client node and never to the server. "
                "--secagg makes one client node's masking identity key (its public half goes "
                "into the roster); --supernode one client node's SuperNode authentication key.",
                "  fedapp keygen --out keys                    # Paillier\n"
                "  fedapp keygen --secagg --out node0          # one node's identity key\n"
                "  fedapp keygen --secagg --simulation 10      # a simulation's 10 and roster\n"
                "  fedapp keygen --threshold 3 --shares 5      # 3 of 5 holders decrypt")
    s.add_argument("--out", help="directory for paillier.pub.json and paillier.key.json "
                   "(with --secagg: secagg-identity.key and secagg-identity.pub, with "
                   "--simulation N secagg-identity-0.key ... and secagg-roster.json; with "
                   "--supernode: supernode.key and "
                   "supernode.pub); default $FEDAPP_KEY_DIR or ~/.fedapp/keys, where client "
                   "nodes look for their keys. Refused inside a Flower app: its files travel "
                   "to the server in the app bundle")
    s.add_argument("--allow-inside-app", action="store_true", help="write inside a Flower "
                   "app's directory all the same (the key files must be ignored there)")
    kind = s.add_mutually_exclusive_group()
    kind.add_argument("--secagg", action="store_true", help="make this client node's masking "
                      "identity key pair (Ed25519) for aggregation=secagg instead")
    kind.add_argument("--supernode", action="store_true", help="make this client node's "
                      "SuperNode authentication key pair (EC P-384, OpenSSH) instead")
    s.add_argument("--threshold", type=int, metavar="T", help="with --shares N: a threshold "
                   "Paillier key instead, any T of N holders decrypt together "
                   "(paillier-threshold.pub.json and paillier-threshold-share-1.json ... N, "
                   "0600; docs/paillier.md)")
    s.add_argument("--shares", type=int, metavar="N", help="with --threshold: the number of "
                   "key shares (holders), at most 64")
    s.add_argument("--simulation", type=int, metavar="N", help="with --secagg: N identity "
                   "keys (one per simulated partition) and their roster, for simulations, "
                   "whose nodes share one key directory")
    s.add_argument("--bits", type=int, default=2048, help="Paillier modulus size (at least "
                   "2048)")
    s.set_defaults(func=cmd_keygen)

    s = command("roster", "write the masking roster from the client nodes' public identity "
                "keys",
                "Collect the public identity keys of every client node (fedapp keygen "
                "--secagg on each) into the roster every client node checks its neighbours' "
                "signatures against.",
                "  fedapp roster node*/secagg-identity.pub --out secagg-roster.json")
    s.add_argument("public_keys", nargs="+", help="secagg-identity.pub of each client node")
    s.add_argument("--out", required=True, help="roster file to write (secagg-roster.json): "
                   "give every client node a copy, in its key directory or with "
                   "--secagg-roster")
    s.set_defaults(func=cmd_roster)

    s = command("decrypt", "decrypt a run's model.encrypted.npz or open its model.sealed.npz",
                "On a machine that holds the Paillier private key: check and decrypt the "
                "final model of a Paillier run into a plaintext checkpoint, and print the "
                "train metrics the key holders release with it. For a paillier-threshold "
                "run, on a client machine: open model.sealed.npz with the group key.",
                "  fedapp decrypt --key ~/.fedapp/keys/paillier.key.json \\\n"
                "      --model runs/RUN/model.encrypted.npz --out model.npz --task mnist\n"
                "  fedapp decrypt --key ~/.fedapp/keys/paillier-group.key \\\n"
                "      --model runs/RUN/model.sealed.npz --out model.npz --task housing")
    s.add_argument("--key", required=True, help="the private key file (paillier.key.json), "
                   "or for a sealed model the group key (paillier-group.key)")
    s.add_argument("--model", required=True, help="model.encrypted.npz or model.sealed.npz "
                   "from a run directory")
    s.add_argument("--out", required=True, help="plaintext .npz to write")
    s.add_argument("--task", help="name arrays after this task's model (mnist, spam, housing)")
    s.add_argument("--mnist-model", default="cnn", help="with --task mnist: the model's "
                   "architecture (cnn or small-cnn, as the run's mnist-model)")
    s.add_argument("--spam-buckets", type=int, default=65536, help="with --task spam: the "
                   "run's spam-buckets")
    s.add_argument("--min-contributors", type=int, default=2,
                   help="refuse a model aggregated from fewer updates")
    s.add_argument("--accept-server-noise", action="store_true",
                   help="decrypt a model the server added central-DP noise to (its "
                        "authenticity cannot be checked: docs/threat-model.md)")
    s.set_defaults(func=cmd_decrypt)

    s = command("run", "submit the app to a SuperLink and wait for the result",
                "Submit this app to a running SuperLink (fedapp server), stream its log "
                "and wait until the run ends; exit code 0 only if it completed.",
                "  fedapp run --superlink 10.0.0.5:9092 --certificates certs \\\n"
                "      --run-config aggregation=paillier --run-config num-server-rounds=10")
    s.add_argument("--superlink", help="HOST:PORT of the server (without --kit)")
    s.add_argument("--kit", help="the server folder from fedapp provision: address, "
                   "certificates, and the Paillier public key for aggregation=paillier")
    s.add_argument("--run-config", action="append", default=[], metavar="KEY=VALUE",
                   help=RUN_CONFIG_HELP)
    s.add_argument("--app", default=".", help="the Flower app directory (default: the "
                   "current directory)")
    s.add_argument("--timeout", type=float, default=6 * 3600, help=TIMEOUT_HELP)
    s.add_argument("--no-wait", action="store_true", help="return once submitted")
    tls(s)
    s.set_defaults(func=cmd_run)

    s = command("register", "register client nodes' public keys with a running SuperLink "
                "(SuperNode authentication)",
                "Tell a running SuperLink which SuperNodes may connect: their public keys "
                "from fedapp keygen --supernode.",
                "  fedapp register nodes/*/supernode.pub --superlink 127.0.0.1:9092 "
                "--certificates certs")
    s.add_argument("public_keys", nargs="+", metavar="PUBLIC_KEY",
                   help="supernode.pub files from 'fedapp keygen --supernode'")
    s.add_argument("--superlink", required=True, help="HOST:PORT of the server")
    tls(s)
    s.set_defaults(func=cmd_register)

    s = command("provision", "make a federation's kits: one folder per site and one for "
                "the server",
                "Make every key and certificate a deployment needs and sort them into one "
                "folder per machine: server/ (its TLS files, the sites' public keys, the "
                "Paillier public key) and site-0/ ... (the CA certificate, the site's own "
                "keys, the Paillier private key, the masking roster). Copy each folder to its "
                "machine, then delete OUT: this machine made every site's private keys. The "
                "CA's private key is not kept.",
                "  fedapp provision --sites 3 --server-address server.example.org:9092 \\\n"
                "      --out federation\n"
                "  fedapp server --kit federation/server --host 0.0.0.0    # on the server\n"
                "  fedapp client --kit federation/site-0 --data-dir /data  # on each site\n"
                "  fedapp run --kit federation/server --run-config aggregation=secagg")
    s.add_argument("--sites", type=int, required=True, help="client nodes (one data "
                   "partition each)")
    s.add_argument("--server-address", required=True, help="HOST:PORT the sites reach the "
                   "server at (HOST goes into the server certificate)")
    s.add_argument("--out", required=True, help="new directory for the kits (refused inside "
                   "a Flower app)")
    s.add_argument("--modes", nargs="+", choices=list(MODES),
                   default=["fedavg", "paillier", "secagg"],
                   help="aggregation modes to make keys for (default: fedavg paillier "
                   "secagg; add paillier-threshold for a threshold key, a share per site)")
    s.add_argument("--threshold", type=int, default=2, help="with --modes ... "
                   "paillier-threshold: the shares that decrypt together (2 <= T < sites)")
    s.add_argument("--days", type=int, default=365, help="validity of the server certificate")
    s.set_defaults(func=cmd_provision)

    from .inference.commands import add_commands

    add_commands(command)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    launch.stop_on_sigterm()
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"fedapp {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
