"""Start and stop Flower processes, submit runs and check how they ended.

Used by the ``fedapp`` command line, the scripts and the tests. Every process
is started here with a known PID and stopped by that PID. ``flwr run`` exits 0
even when a run fails, so :func:`wait_for_run` reads the status from ``flwr ls``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from strategies.keyfiles import check_private

from .bundle import check_app, stage_app
from .hints import HintReader

FINISHED_OK = "finished:completed"


def flower_env(flwr_home: Path | None = None, **extra: str) -> dict[str, str]:
    """This process's environment with Flower's telemetry, update check and runtime
    dependency installation off (the app's dependencies are installed already), and
    tqdm's progress bars off unless the user set ``TQDM_DISABLE`` (flwr-datasets draws
    one each time a node partitions its data: noise in the run's log)."""
    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", **extra)
    if flwr_home is not None:
        flwr_home.mkdir(parents=True, exist_ok=True)
        env["FLWR_HOME"] = str(flwr_home)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_command(name: str) -> str:
    """Path of a Flower console script (``flwr``, ``flower-superlink``, ...)."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"'{name}' not found: install the project (pip install -e .)")
    return found


def tls_args(certificates: Path | None, insecure: bool, server: bool) -> list[str]:
    """Flower's TLS flags from a directory holding ``ca.crt`` (and, for the server,
    ``server.pem`` / ``server.key``), or ``--insecure`` when asked for explicitly.

    Raises
    ------
    ValueError
        Without a certificates directory and without ``insecure``.
    FileNotFoundError
        If a certificate file is missing.
    PermissionError
        If the server's TLS key is readable by group or others.
    """
    if insecure:
        return ["--insecure"]
    if certificates is None:
        raise ValueError("give a certificates directory (see scripts/make_certificates.py) "
                         "or pass --insecure explicitly to run without TLS")
    ca = certificates / "ca.crt"
    needed = [ca] + ([certificates / "server.pem", certificates / "server.key"] if server else [])
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"missing TLS files: {', '.join(missing)}")
    if server:
        check_private(needed[2])
        return ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(needed[1]),
                "--ssl-keyfile", str(needed[2])]
    return ["--root-certificates", str(ca)]


def superlink_command(host: str, port: int, tls: list[str], simulation: bool = False,
                      database: Path | None = None, supernode_auth: bool = False) -> list[str]:
    """``flower-superlink`` on ``host:port``; with ``supernode_auth`` only SuperNodes
    whose public key was registered (:func:`register_supernode`) may connect.

    Raises
    ------
    ValueError
        If ``supernode_auth`` is asked for without TLS (Flower refuses it).
    """
    if supernode_auth and "--insecure" in tls:
        raise ValueError("SuperNode authentication needs TLS: give certificates, or "
                         "turn node authentication off (--no-supernode-auth)")
    cmd = [flower_command("flower-superlink"), *tls, "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if simulation:
        cmd += ["--simulation", "--control-api-address", f"{host}:{free_port()}"]
    if database is not None:
        cmd += ["--database", str(database)]
    return cmd


def supernode_command(superlink: str, partition_id: int, num_partitions: int, port: int,
                      tls: list[str], data_dir: str | None = None,
                      key_files: Mapping[str, str | None] | None = None,
                      node_key: str | None = None, paillier_workers: int = 0,
                      settings: str = "") -> list[str]:
    """``flower-supernode`` for one partition, in process isolation (the ClientApp
    runs in :mod:`fedapp.node_worker`, see :func:`run_node`), started through
    :mod:`fedapp.polling` for shorter waits.

    ``key_files`` maps node-config keys to the federation's client-side key files
    (``paillier-private-key``, ``secagg-identity-key``, ``secagg-roster``,
    ``paillier-threshold-public-key``, ``paillier-group-key``, ``paillier-key-share``):
    they go in the node config, where the ClientApp reads them, with
    ``paillier-workers`` (processes for Paillier encryption and decryption; 0: all
    cores) when the node decrypts. ``node_key``, this node's SuperNode authentication
    private key (``fedapp keygen --supernode``), goes to Flower's
    ``--auth-supernode-private-key``. None of them ever reaches the server.
    ``settings``: the node's own settings as node-config text
    (:func:`strategies.node_settings.node_config_text`), appended.

    Raises
    ------
    ValueError
        If ``node_key`` is given without TLS (Flower refuses it).
    """
    if node_key and "--insecure" in tls:
        raise ValueError("SuperNode authentication needs TLS: give certificates, or "
                         "drop the SuperNode private key")
    node_config = f"partition-id={partition_id} num-partitions={num_partitions}"
    for key, path in {"data-dir": data_dir, **(key_files or {})}.items():
        if path:
            node_config += f" {key}='{Path(path).expanduser().resolve()}'"
    if (key_files or {}).get("paillier-private-key"):
        node_config += f" paillier-workers={int(paillier_workers)}"
    if settings:
        node_config += f" {settings}"
    cmd = [sys.executable, "-m", "fedapp.polling", *tls, "--superlink", superlink,
           "--node-config", node_config, "--port", str(port), "--isolation", "process"]
    if node_key:
        cmd += ["--auth-supernode-private-key", str(Path(node_key).expanduser().resolve())]
    return cmd


def _relay_with_hints(stream: IO[str]) -> None:
    reader = HintReader()
    for line in stream:
        sys.stdout.write(line)
        if (hint := reader.hint(line)) is not None:
            sys.stdout.write(f"fedapp client: likely cause: {hint}\n")
        sys.stdout.flush()


def run_node(supernode: list[str], env: dict[str, str]) -> int:
    """Run a client node in the foreground: the SuperNode (``supernode``, from
    :func:`supernode_command`, in process isolation, with the long-lived ClientApp
    worker of :mod:`fedapp.node_worker` in its process), in this process's group.
    Returns its exit code; SIGTERM (as SystemExit) or Ctrl-C stops it. Its output is
    passed on with a hint (:mod:`fedapp.hints`) where it shows why the node cannot
    connect."""
    node = subprocess.Popen(supernode, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    relay = threading.Thread(target=_relay_with_hints, args=(node.stdout,), daemon=True)
    relay.start()
    try:
        code = node.wait()
        relay.join(5)
        print(f"fedapp client: the SuperNode (pid {node.pid}) exited with {code}",
              file=sys.stderr)
        return code
    finally:
        if node.poll() is None:
            node.terminate()
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()


def register_supernode(public_key: Path, connection: str, env: dict[str, str]) -> int:
    """Register a SuperNode's public key with a SuperLink through its Control API
    (``flwr supernode register``); returns the node id Flower gives it.

    The SuperLink must be running; it keeps registrations in its state (in memory
    unless it was started with ``--database``).

    Raises
    ------
    RuntimeError
        With Flower's message, if the registration failed (e.g. the key is
        registered already, or the SuperLink cannot be reached).
    """
    out = subprocess.run(
        [flower_command("flwr"), "supernode", "register", str(public_key), connection,
         "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
    try:
        reply = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        reply = {}
    if out.returncode != 0 or not reply.get("success"):
        raise RuntimeError(f"flwr supernode register {public_key} failed: "
                           f"{out.stdout.strip()} {out.stderr.strip()}")
    return int(reply["node-id"])


def ensure_registered(public_key: Path, connection: str, env: dict[str, str]) -> str:
    """Register ``public_key`` unless the SuperLink has it already (a server restarted on
    its ``--database``); says which.

    Raises
    ------
    RuntimeError
        If the registration failed for another reason.
    """
    try:
        return f"registered as node {register_supernode(public_key, connection, env)}"
    except RuntimeError as err:
        if "Public key already in use" in str(err):
            return "registered before"
        raise


def start(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` in its own process group with output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 - the child process owns it
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def process_table() -> dict[int, tuple[int, int]]:
    """Every process's ``(parent, process group)`` by PID (Linux ``/proc``)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
            table[int(entry.name)] = (int(fields[1]), int(fields[2]))
    return table


def leftovers(directory: Path) -> list[int]:
    """PIDs of live processes (not zombies, not this one) whose environment or command
    line names ``directory``: what a deployment or run there left running."""
    mark = str(directory).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile
            continue
        if mark in text and state != "Z":
            found.append(int(entry.name))
    return found


def process_groups(pid: int) -> set[int]:
    """The process groups of ``pid`` and of all its descendants. Flower's SuperExec
    starts a session of its own, and the simulation and Ray's processes live in it, so
    stopping the SuperLink's group alone leaves them running."""
    table = process_table()
    groups, todo = {table.get(pid, (0, pid))[1]}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, pgid) in table.items():
            if ppid == parent:
                groups.add(pgid)
                todo.append(child)
    return groups


def stop_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` in this process, so that the ``finally`` blocks
    of :func:`simulate` and the deployment helpers stop what they started (``fedapp``
    and every script that runs Flower call it first)."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _signal_groups(groups: set[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a process we started, by its PID, with every process it started: SIGTERM to
    its process group and its descendants' (found before any of them dies, since
    orphans lose their parent), then SIGKILL to what is left after ``grace`` s."""
    groups = (process_groups(proc.pid) | {proc.pid}) - {os.getpgrp()}  # never our own
    _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    while time.monotonic() < deadline and any(
            pgid in groups for _, pgid in process_table().values()):
        time.sleep(0.2)
    _signal_groups(groups, signal.SIGKILL)
    if proc.poll() is None:
        proc.wait()


def wait_for_port(host: str, port: int, timeout: float = 30.0,
                  proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before "
                               f"listening on {host}:{port}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def connection_name(address: str) -> str:
    """The name ``fedapp run``/``register`` give the connection to ``address`` in
    Flower's config: one per SuperLink, beside the user's own connections."""
    return "fedapp-" + "".join(c if c.isalnum() else "-" for c in address).strip("-")


def write_connection(flwr_home: Path, name: str, address: str, *, insecure: bool,
                     root_certificates: Path | None = None) -> None:
    """Add or update the connection ``name`` in ``$FLWR_HOME/config.toml``.

    Every other connection, and the default, stay as they were (a new file starts
    from Flower's own, whose default is the ``local`` simulation). With
    ``insecure=False`` the ``flwr`` commands use TLS, verifying the SuperLink against
    ``root_certificates`` (or the system's trust store when it is None).
    """
    import tomli_w
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    if insecure and root_certificates is not None:
        raise ValueError("a connection is either insecure or verified with root certificates")
    path = flwr_home / "config.toml"
    text = path.read_text() if path.is_file() else DEFAULT_FLOWER_CONFIG_TOML
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path} is not valid TOML ({err}): fix or remove it") from None
    links = config.setdefault("superlink", {})
    links.setdefault("default", name)
    links[name] = {"address": address, "insecure": insecure}
    if root_certificates is not None:
        links[name]["root-certificates"] = str(root_certificates.resolve())
    flwr_home.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config))


def config_arg(flag: str, overrides: dict[str, Any]) -> list[str]:
    """``--run-config`` / ``--federation-config`` arguments in TOML syntax."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v) if isinstance(v, str) else repr(v)
    return [flag, " ".join(f"{k}={fmt(v)}" for k, v in overrides.items())] if overrides else []


def submit(app_dir: Path, connection: str, env: dict[str, str],
           overrides: dict[str, Any] | None = None,
           federation: dict[str, Any] | None = None) -> str:
    """``flwr run APP CONNECTION`` with run-config (and, for simulations, federation-config)
    overrides; returns the run id.

    Raises
    ------
    ValueError
        If ``app_dir`` is not a Flower app or holds private key material (which the
        bundle would carry to the server).
    """
    check_app(app_dir)
    with tempfile.TemporaryDirectory(prefix="fedapp-bundle-") as staged:
        out = subprocess.run(
            [flower_command("flwr"), "run", str(stage_app(app_dir.resolve(), Path(staged))),
             connection, "--format", "json", *config_arg("--run-config", overrides or {}),
             *config_arg("--federation-config", federation or {})],
            env=env, capture_output=True, text=True, check=False)
    try:
        reply = json.loads(out.stdout[out.stdout.index("{"):])
    except ValueError:
        reply = {}
    if out.returncode != 0 or not reply.get("success"):
        raise RuntimeError(f"flwr run failed: {out.stdout.strip()} {out.stderr.strip()}")
    return str(reply["run-id"])


def run_status(run_id: str, connection: str, env: dict[str, str]) -> str:
    out = subprocess.run([flower_command("flwr"), "ls", connection, "--run-id", run_id,
                          "--format", "json"], env=env, capture_output=True, text=True)
    try:
        return json.loads(out.stdout[out.stdout.index("{"):])["runs"][0]["status"]
    except (ValueError, KeyError, IndexError):
        return "unknown"


# Lines Flower and Ray print on every run that tell a user nothing about theirs (the run's
# full log, ``flwr log RUN``, keeps them): Ray's advice about GPU variables (and the source
# line after it), Flower's note on its old default federation size and how to change it.
_NOISE = ("FutureWarning: Tip: In future versions of Ray",
          "default simulated SuperNodes changed",
          "To change federation size, use the following command",
          "flwr federation simulation-config")


def worth_showing(line: str) -> bool:
    """Whether a line of a run's log is shown live (see :data:`_NOISE`)."""
    return not any(noise in line for noise in _NOISE) and line.strip() != "warnings.warn("


def wait_for_run(run_id: str, connection: str, env: dict[str, str], timeout: float,
                 progress: bool = True) -> str:
    """Follow the run's log until the run finishes; return its final status.

    One ``flwr log RUN --stream`` process serves the whole run (Flower ends the stream
    when the run finishes), instead of a ``flwr ls`` process every few seconds: each
    of those costs a second of CPU to start, which a 2-core machine running the
    simulation feels. With ``progress`` each log line is printed as it arrives, after
    the time. If the stream breaks off early (a server restart), it is opened again;
    the status comes from ``flwr ls`` at the end.
    """
    deadline = time.monotonic() + timeout
    status = run_status(run_id, connection, env)
    while not status.startswith("finished") and time.monotonic() < deadline:
        stream = subprocess.Popen(
            [flower_command("flwr"), "log", run_id, connection, "--stream"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)

        def relay(out=stream.stdout) -> None:
            for line in out:
                if progress and worth_showing(line):
                    print(f"{time.strftime('%H:%M:%S')} {line}", end="", flush=True)

        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        stop(stream, grace=2.0)
        for _ in range(15):  # the status can lag the end of the stream a little
            status = run_status(run_id, connection, env)
            if status.startswith("finished") or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    if not status.startswith("finished"):
        return f"timeout after {timeout:.0f} s (last status {status})"
    if progress:
        print(f"run {run_id}: {status}", flush=True)
    return status


def logs(run_id: str, connection: str, env: dict[str, str]) -> str:
    """The run's logs, as ``flwr log --show`` prints them."""
    out = subprocess.run([flower_command("flwr"), "log", run_id, connection, "--show"],
                         env=env, capture_output=True, text=True, timeout=60)
    return out.stdout + out.stderr


def find_run_dir(base: Path, run_id: str) -> Path | None:
    """The run directory the ServerApp made under ``base`` for ``run_id``."""
    found = sorted(base.glob(f"*-{run_id}"))
    return found[-1] if found else None


def run_dir_in(log_text: str) -> Path | None:
    """The run directory the ServerApp named in its log (its last ``Run directory:``
    line), wherever the ``run-dir`` setting put it; None for other apps."""
    found = re.findall(r"Run directory: (\S+)", re.sub(r"\x1b\[[0-9;]*m", "", log_text))
    return Path(found[-1]) if found else None


def settle_run_dir(run_dir: Path | None, status: str) -> None:
    """A run Flower ended other than ``finished:completed`` whose directory still says
    ``running`` (stopped, timed out, or a ServerApp that could not say so itself) is
    marked failed there, with Flower's status."""
    from .outputs import STATUS_NAME, RunRecorder

    if status == FINISHED_OK or run_dir is None or not (run_dir / STATUS_NAME).is_file():
        return
    recorder = RunRecorder.reopen(run_dir)
    if recorder.status().get("status") == "running":
        recorder.set_status("failed", f"Flower says: {status}")


def simulation_env(flwr_home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """:func:`flower_env` for a simulation's SuperLink, with ``RAY_ADDRESS=local`` unless
    this process's environment or ``extra`` names a cluster. Ray's ``init()`` otherwise
    joins the cluster named in ``/tmp/ray/ray_current_cluster``, which a ``ray start``
    killed without ``ray stop`` leaves behind: the simulation would wait forever."""
    local = {} if os.environ.get("RAY_ADDRESS") else {"RAY_ADDRESS": "local"}
    return flower_env(flwr_home, **{**local, **(extra or {})})


def simulate(app_dir: Path, workdir: Path, num_supernodes: int,
             overrides: dict[str, Any] | None = None, timeout: float = 3600.0,
             progress: bool = True, env: dict[str, str] | None = None,
             runs_in_workdir: bool = True) -> tuple[str, Path | None, str]:
    """One simulation on a private SuperLink that is stopped afterwards. ``env``
    adds environment variables for the simulated nodes (e.g. a private key path).
    The simulation starts its own Ray unless ``RAY_ADDRESS`` (in this process's
    environment or in ``env``) names a cluster to join.
    Run directories go to ``workdir/runs`` (tests and benchmarks keep theirs apart),
    or with ``runs_in_workdir=False`` where the ``run-dir`` setting says, as for every
    other command (``fedapp sim``).

    Returns ``(status, run directory, logs)``; ``status`` is ``finished:completed``
    only if the run really succeeded.
    """
    check_app(app_dir)  # before starting anything
    workdir = workdir.resolve()
    home = workdir / "flwr-home"
    env = simulation_env(home, env)
    port = free_port()
    write_connection(home, "sim", f"127.0.0.1:{port}", insecure=True)
    if runs_in_workdir:
        overrides = {"run-dir": str(workdir / "runs"), **(overrides or {})}
    link = start(superlink_command("127.0.0.1", port, ["--insecure"], simulation=True),
                 env, workdir / "superlink.log")
    try:
        wait_for_port("127.0.0.1", port, proc=link)
        run_id = submit(app_dir, "sim", env, overrides,
                        {"num-supernodes": num_supernodes, "client-resources-num-cpus": 1})
        status = wait_for_run(run_id, "sim", env, timeout, progress=progress)
        text = logs(run_id, "sim", env)
    finally:
        stop(link)
    run_dir = run_dir_in(text)
    if run_dir is None and runs_in_workdir:  # another app that names its directories by run
        run_dir = find_run_dir(workdir / "runs", run_id)
    settle_run_dir(run_dir, status)
    return status, run_dir, text
