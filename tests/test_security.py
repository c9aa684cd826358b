"""Security requirements of a deployment, checked without starting Flower:

- TLS is on unless ``--insecure`` is explicit (``fedapp server``/``client``/``run``/
  ``register``, the ``flwr`` connection we write, the loopback deployment script);
- SuperNode authentication (Flower 1.41: ``--enable-supernode-auth`` on the
  SuperLink, public keys registered through the Control API, each SuperNode
  signing with ``--auth-supernode-private-key``) is on with TLS, and our key files
  are what Flower's own loaders read;
- private key files are written 0600 and refused when others may read them;
- the server is never handed a client-side private key (commands, run config,
  strategies);
- nothing in the project unpickles or evaluates data (a scan of the source).

The real processes (registered nodes let in, an unregistered one turned away) run
in ``tests/test_flower_runs.py::test_loopback_deployment_with_tls``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import stat
import tomllib
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from fedapp import cli, launch
from fedapp.config import DEFAULTS, RunSettings
from fedapp.nodekeys import check_node_private_key, check_node_public_key, write_node_keypair
from fedapp.strategy import build_strategy
from strategies.keyfiles import load_auth_key, load_private_key, write_auth_key, write_keypair

ROOT = Path(__file__).resolve().parent.parent
TLS_FILES = ("ca.crt", "server.pem", "server.key")


def load_script(name: str):
    """A module from scripts/ (not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tls") / 'my "certs"'  # a quote must not break TOML
    load_script("make_certificates").make_certificates(out, ["127.0.0.1", "localhost"])
    return out


@pytest.fixture(scope="module")
def paillier_keys(tmp_path_factory) -> tuple[Path, Path]:
    public, private, _ = write_keypair(tmp_path_factory.mktemp("paillier"))
    return public, private


@pytest.fixture
def execs(monkeypatch) -> list[tuple[list[str], dict[str, str]]]:
    """What ``fedapp server`` / ``fedapp client`` would exec, instead of exec'ing it."""
    seen: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(cli.os, "execve", lambda path, cmd, env: seen.append((cmd, env)))
    return seen


def client_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["client", "--superlink", "127.0.0.1:9092", "--partition-id", "0",
            "--num-partitions", "2", "--flwr-home", str(tmp_path / "home"), *extra]


# --- TLS on by default --------------------------------------------------------------------

def test_run_and_register_need_certificates_or_an_explicit_insecure(tmp_path):
    public, _ = write_node_keypair(tmp_path / "node")
    for argv in (["run", "--superlink", "127.0.0.1:9092"],
                 ["register", str(public), "--superlink", "127.0.0.1:9092"]):
        with pytest.raises(SystemExit, match="--certificates DIR holding ca.crt, or --insecure"):
            cli.main([*argv, "--flwr-home", str(tmp_path / "home")])
    assert not (tmp_path / "home" / "config.toml").exists()


def test_run_writes_a_tls_connection_that_flower_reads(certs, tmp_path, monkeypatch):
    from flwr.cli.config_utils import load_certificate_in_connection
    from flwr.cli.flower_config import parse_superlink_connection

    submitted = []
    monkeypatch.setattr(launch, "submit", lambda app, conn, env, overrides: (
        submitted.append((conn, env["FLWR_HOME"], app)) or "7"))
    monkeypatch.chdir(ROOT)
    home = tmp_path / "home"
    assert cli.main(["run", "--superlink", "server.example:9092", "--certificates", str(certs),
                     "--flwr-home", str(home), "--no-wait"]) == 0
    name = "fedapp-server-example-9092"
    assert submitted == [(name, str(home), ROOT)]  # the current directory's app
    config = tomllib.loads((home / "config.toml").read_text())
    connection = parse_superlink_connection(config["superlink"][name], name)
    assert connection.address == "server.example:9092" and connection.insecure is False
    assert load_certificate_in_connection(connection) == (certs / "ca.crt").read_bytes()
    with pytest.raises(ValueError, match="either insecure or verified"):
        launch.write_connection(home, "x", "h:1", insecure=True,
                                root_certificates=certs / "ca.crt")


def test_run_and_register_leave_the_users_connections_alone(certs, tmp_path, monkeypatch):
    """A Flower config with the user's ``local`` simulation as default and a connection of
    their own: fedapp adds its own connection per SuperLink, changes nothing else, and a
    second CA for the same SuperLink only changes that connection."""
    home = tmp_path / "home"
    home.mkdir()
    mine = ('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
            'options.num-supernodes = 10\n\n[superlink.prod]\naddress = "prod:9093"\n'
            'root-certificates = "/etc/prod-ca.crt"\n')
    (home / "config.toml").write_text(mine)
    monkeypatch.setattr(launch, "submit", lambda *a: "7")
    monkeypatch.setattr(launch, "register_supernode", lambda *a: 3)
    public, _ = write_node_keypair(tmp_path / "node")
    assert cli.main(["register", str(public), "--superlink", "127.0.0.1:9092",
                     "--certificates", str(certs), "--flwr-home", str(home)]) == 0
    other = tmp_path / "other-certs"
    other.mkdir()
    (other / "ca.crt").write_bytes((certs / "ca.crt").read_bytes())
    assert cli.main(["run", "--superlink", "127.0.0.1:9092", "--certificates", str(other),
                     "--flwr-home", str(home), "--no-wait", "--app", str(ROOT)]) == 0
    config = tomllib.loads((home / "config.toml").read_text())
    before = tomllib.loads(mine)["superlink"]
    assert config["superlink"]["default"] == "local"
    assert config["superlink"]["local"] == before["local"]
    assert config["superlink"]["prod"] == before["prod"]
    assert config["superlink"]["fedapp-127-0-0-1-9092"] == {
        "address": "127.0.0.1:9092", "insecure": False,
        "root-certificates": str((other / "ca.crt").resolve())}


def test_deploy_script_uses_tls_and_node_auth_unless_insecure(tmp_path):
    deploy = load_script("deploy_loopback")
    args = deploy.parse_args([])
    server = deploy.server_command(args, tmp_path, 1234)
    client = deploy.client_command(args, tmp_path, 1234, 0)
    for cmd in (server, client):
        assert cmd[cmd.index("--certificates") + 1] == str(tmp_path / "certs")
        assert "--insecure" not in cmd and "--no-supernode-auth" not in cmd
    assert client[client.index("--supernode-key") + 1] == str(
        tmp_path / "keys" / "client0" / "supernode.key")
    args = deploy.parse_args(["--insecure"])
    for cmd in (deploy.server_command(args, tmp_path, 1234),
                deploy.client_command(args, tmp_path, 1234, 0)):
        assert "--insecure" in cmd and "--certificates" not in cmd
        assert "--supernode-key" not in cmd


# --- SuperNode authentication ---------------------------------------------------------------

def test_server_turns_supernode_auth_on_with_tls(certs, tmp_path, execs):
    home = ["--flwr-home", str(tmp_path / "home")]
    assert cli.main(["server", "--certificates", str(certs), *home]) == 1  # 1: exec not real
    assert cli.main(["server", "--certificates", str(certs), "--no-supernode-auth", *home]) == 1
    assert cli.main(["server", "--insecure", *home]) == 1
    (auth, _), (no_auth, _), (insecure, _) = execs
    assert Path(auth[0]).name == "flower-superlink" and "--enable-supernode-auth" in auth
    assert [auth[auth.index(f) + 1] for f in ("--ssl-ca-certfile", "--ssl-certfile",
                                              "--ssl-keyfile")] == [str(certs / n) for n in TLS_FILES]
    assert "--enable-supernode-auth" not in no_auth and "--ssl-keyfile" in no_auth
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    with pytest.raises(ValueError, match="needs TLS"):
        launch.superlink_command("127.0.0.1", 1, ["--insecure"], supernode_auth=True)


def test_client_passes_its_supernode_key_to_flower_only(certs, tmp_path, execs, capsys):
    assert cli.main(["keygen", "--supernode", "--out", str(tmp_path / "node")]) == 0
    key = tmp_path / "node" / "supernode.key"
    junk = tmp_path / "junk.key"
    junk.write_text("not a key\n")
    junk.chmod(0o600)
    tls = ["--certificates", str(certs)]
    assert cli.main(client_args(tmp_path, *tls, "--supernode-key", str(key))) == 1
    (cmd, _), = execs
    assert Path(cmd[0]).name == "flower-supernode"
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert cmd[cmd.index("--root-certificates") + 1] == str(certs / "ca.crt")
    assert "supernode.key" not in cmd[cmd.index("--node-config") + 1]
    refusals = {  # arguments: what the error says
        (): "give --supernode-key FILE",
        ("--insecure", "--supernode-key", str(key)): "needs TLS",
        ("--no-supernode-auth", "--supernode-key", str(key)): "either --supernode-key or",
        ("--supernode-key", str(junk)): "not an unencrypted OpenSSH",
        ("--supernode-key", str(key.with_suffix(".pub"))): "readable by other users",
        ("--supernode-key", str(tmp_path / "nope")): "not found",
    }
    for extra, message in refusals.items():
        more_tls = [] if "--insecure" in extra else tls
        assert cli.main(client_args(tmp_path, *more_tls, *extra)) == 2
        assert message in capsys.readouterr().err
    assert len(execs) == 1
    assert cli.main(client_args(tmp_path, *tls, "--no-supernode-auth")) == 1  # opt-out
    assert "--auth-supernode-private-key" not in execs[-1][0]


def test_supernode_keys_are_what_flower_reads_and_verifies(tmp_path, monkeypatch):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature
    from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

    old = os.umask(0)  # the most permissive umask must still give 0600
    try:
        public, private = write_node_keypair(tmp_path / "node")
    finally:
        os.umask(old)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert check_node_private_key(private) == private.resolve()
    assert check_node_public_key(public) == public.resolve()
    # the SuperNode loads the private key, the SuperLink stores the registered public key
    node_private, _ = _try_setup_client_authentication(Namespace(
        auth_supernode_private_key=str(private), auth_supernode_public_key=None))
    registered = bytes_to_public_key(try_load_public_key(public))
    signature = node_private.sign(b"2026-11-23T12:00:00", ec.ECDSA(hashes.SHA256()))
    assert verify_signature(registered, b"2026-11-23T12:00:00", signature)
    other, _ = _try_setup_client_authentication(Namespace(
        auth_supernode_private_key=str(write_node_keypair(tmp_path / "other")[1]),
        auth_supernode_public_key=None))
    forged = other.sign(b"2026-11-23T12:00:00", ec.ECDSA(hashes.SHA256()))
    assert not verify_signature(registered, b"2026-11-23T12:00:00", forged)
    with pytest.raises(FileExistsError, match="exists"):
        write_node_keypair(tmp_path / "node")


def test_node_key_checks_refuse_the_wrong_keys(tmp_path):
    public, private = write_node_keypair(tmp_path / "node")
    with pytest.raises(ValueError, match="holds a private key"):
        check_node_public_key(private)  # the server side is never given a private key
    ssh = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    (tmp_path / "rsa.pub").write_bytes(
        rsa.generate_private_key(65537, 2048).public_key().public_bytes(*ssh))
    with pytest.raises(ValueError, match="NIST curve"):
        check_node_public_key(tmp_path / "rsa.pub")
    (tmp_path / "junk.pub").write_text("not a key\n")
    with pytest.raises(ValueError, match="not an OpenSSH public key"):
        check_node_public_key(tmp_path / "junk.pub")
    pem = tmp_path / "pem.key"  # PKCS8 PEM: flower-supernode cannot read it
    pem.write_bytes(ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    pem.chmod(0o600)
    with pytest.raises(ValueError, match="not an unencrypted OpenSSH private key"):
        check_node_private_key(pem)
    edwards = tmp_path / "ed.key"
    edwards.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    edwards.chmod(0o600)
    with pytest.raises(ValueError, match="NIST curve"):
        check_node_private_key(edwards)


def test_register_refuses_insecure_and_private_keys(tmp_path, capsys):
    public, private = write_node_keypair(tmp_path / "node")
    with pytest.raises(SystemExit, match="needs TLS"):
        cli.main(["register", str(public), "--superlink", "h:1", "--insecure"])
    assert cli.main(["register", str(private), "--superlink", "h:1",
                     "--flwr-home", str(tmp_path / "home")]) == 2
    assert "holds a private key" in capsys.readouterr().err


# --- private key files: 0600, refused when others may read them -----------------------------

@pytest.mark.parametrize("kind", ["paillier", "supernode", "tls-server"])
def test_private_key_files_are_0600_and_refused_when_readable(kind, tmp_path):
    old = os.umask(0)
    try:
        if kind == "paillier":
            path = write_keypair(tmp_path, n_bits=2048)[1]
            load = load_private_key
        elif kind == "supernode":
            path = write_node_keypair(tmp_path)[1]
            load = check_node_private_key
        else:
            load_script("make_certificates").make_certificates(tmp_path, ["127.0.0.1"])
            path = tmp_path / "server.key"

            def load(_path: Path) -> list[str]:
                return launch.tls_args(tmp_path, False, server=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    load(path)
    for mode in (0o640, 0o604, 0o660):
        path.chmod(mode)
        with pytest.raises(PermissionError,
                           match=f"readable by other users.*chmod 600 {re.escape(str(path))}"):
            load(path)
    path.chmod(0o400)
    load(path)


def test_make_certificates_never_overwrites(certs):
    with pytest.raises(FileExistsError, match="server.key"):
        load_script("make_certificates").make_certificates(certs, ["127.0.0.1"])


def test_client_checks_its_secret_files_before_starting(tmp_path, paillier_keys, execs,
                                                       capsys):
    auth = write_auth_key(tmp_path / "auth")
    for flag, path in (("--paillier-private-key", paillier_keys[1]),
                       ("--secagg-auth-key", auth)):
        path.chmod(0o644)
        try:
            assert cli.main(client_args(tmp_path, "--insecure", flag, str(path))) == 2
            assert "chmod 600" in capsys.readouterr().err
        finally:
            path.chmod(0o600)
    assert execs == []


# --- the server never receives a private key ------------------------------------------------

@pytest.mark.parametrize("aggregation", ["fedavg", "paillier", "secagg"])
def test_deployment_gives_client_secrets_to_client_nodes_only(aggregation, tmp_path):
    deploy = load_script("deploy_loopback")
    args = deploy.parse_args(["--clients", "3", "--aggregation", aggregation])
    keys = tmp_path / "keys"
    secrets = {keys / "paillier.key.json", keys / "secagg-auth.key",
               *(keys / f"client{i}" / "supernode.key" for i in range(3))}
    server_side = json.dumps([deploy.server_command(args, tmp_path, 1234),
                              deploy.run_overrides(args, tmp_path)])
    assert not [s for s in secrets if str(s) in server_side]
    assert str(keys) not in server_side.replace(str(keys / "paillier.pub.json"), "")
    clients = [json.dumps(deploy.client_command(args, tmp_path, 1234, i)) for i in range(3)]
    for i, cmd in enumerate(clients):
        assert str(keys / f"client{i}" / "supernode.key") in cmd
        assert (str(keys / "paillier.key.json") in cmd) == (aggregation == "paillier")
        assert (str(keys / "secagg-auth.key") in cmd) == (aggregation == "secagg")
    if aggregation == "paillier":
        assert deploy.run_overrides(args, tmp_path)["paillier-public-key"] == str(
            keys / "paillier.pub.json")


def test_superlink_command_names_only_its_own_tls_files(certs):
    tls = launch.tls_args(certs, False, server=True)
    cmd = launch.superlink_command("127.0.0.1", 9092, tls, supernode_auth=True)
    files = [a for a in cmd[1:] if os.sep in a]
    assert sorted(files) == sorted(str(certs / n) for n in TLS_FILES)


def test_run_config_cannot_carry_client_secrets():
    """The ServerApp gets the run config: it has no setting for a private key, and
    an unknown setting stops the run (node config keys stay with the nodes)."""
    assert not [k for k, v in DEFAULTS.items() if not isinstance(v, bool)  # a switch holds none
                and any(w in k for w in ("private", "secret", "auth"))]
    for key in ("paillier-private-key", "secagg-auth-key", "supernode-key"):
        with pytest.raises(ValueError, match="unknown run settings"):
            RunSettings.from_run_config({**DEFAULTS, key: "/keys/secret"})


def _holds(obj, needles: list, seen: set[int] | None = None, path: str = "strategy") -> list:
    """Paths below ``obj`` (attributes, slots, containers) holding a Paillier private
    key or one of ``needles``: numbers (compared as ints, so gmpy2 values count),
    bytes, or strings found inside a str or path."""
    from strategies.paillier import PrivateKey

    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, bool | float | None.__class__ | type | np.ndarray):
        return []
    seen.add(id(obj))
    if isinstance(obj, PrivateKey):
        return [path]
    if isinstance(obj, str | bytes | Path):
        text = str(obj) if isinstance(obj, Path) else obj
        return [path] if [n for n in needles if isinstance(n, type(text)) and n in text] else []
    try:
        if int(obj) in [n for n in needles if isinstance(n, int)]:
            return [path]
    except (TypeError, ValueError, OverflowError):
        pass
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            found += _holds(k, needles, seen, f"{path}[key]")
            found += _holds(v, needles, seen, f"{path}[{k!r}]")
    elif isinstance(obj, list | tuple | set | frozenset):
        for i, v in enumerate(obj):
            found += _holds(v, needles, seen, f"{path}[{i}]")
    children = dict(getattr(obj, "__dict__", {}))
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()):
            if hasattr(obj, slot):
                children[slot] = getattr(obj, slot)
    for name, value in children.items():
        found += _holds(value, needles, seen, f"{path}.{name}")
    return found


def test_server_strategies_hold_no_client_secret(paillier_keys, tmp_path, monkeypatch):
    """Even with the client-side keys in its environment (as in a simulation), the
    server's strategy for every mode holds no private material nor key path."""
    from strategies.keyfiles import KEY_DIR_ENV

    auth_path = write_auth_key(tmp_path)
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path))
    private, auth = load_private_key(paillier_keys[1]), load_auth_key(auth_path)
    needles = [int(private.p), int(private.q), int(private.alpha_p), int(private.alpha_q), auth,
               auth.hex(), str(paillier_keys[1]), str(auth_path)]
    class Leaky:  # the search would catch a strategy keeping any of them
        def __init__(self):
            self.cache = {"k": [private.q], "path": Path(str(auth_path))}
            self.key, self.mac = private, auth

    assert _holds(Leaky(), needles) == ["strategy.cache['k'][0]", "strategy.cache['path']",
                                        "strategy.key", "strategy.mac"]
    for aggregation in ("fedavg", "secagg", "paillier"):
        for dp in (0.0, 1.0):
            settings = RunSettings.from_run_config({
                "aggregation": aggregation, "paillier-public-key": str(paillier_keys[0]),
                "dp-noise-multiplier": dp})
            strategy = build_strategy(settings)
            assert _holds(strategy, needles) == [], (aggregation, dp)


# --- nothing received is unpickled or evaluated ---------------------------------------------

SCANNED = ("fedapp", "strategies", "clients", "scripts")
UNSAFE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib",
                  "jsonpickle", "marshal", "shelve"}
#: ``(path relative to the project, source line)``: reason. Empty: no legitimate
#: use exists. An entry that no longer matches anything fails the test.
ALLOWED: dict[tuple[str, str], str] = {}


def _root_name(node: ast.AST) -> str:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expression>"
    return "<missing>"


def unsafe_uses(source: str) -> list[tuple[int, str]]:
    """``(line, what)`` for every pickle, eval-like call or unsafe loader in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            found += [(node.lineno, f"imports {n}") for n in names
                      if n.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Name | ast.Attribute):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if "pickle" in name.lower() or name in UNSAFE_MODULES:
                found.append((node.lineno, f"uses {name}"))
        if not isinstance(node, ast.Call):
            continue
        func, root = node.func, _root_name(node.func)
        if isinstance(func, ast.Name) and func.id in {"eval", "exec", "compile", "__import__"}:
            found.append((node.lineno, f"calls {func.id}()"))
        if isinstance(func, ast.Attribute):
            if root == "builtins" and func.attr in {"eval", "exec", "compile"}:
                found.append((node.lineno, f"calls builtins.{func.attr}()"))
            if root in {"np", "numpy"} and func.attr in {"load", "loads"} \
                    and _keyword(node, "allow_pickle") is not False:
                found.append((node.lineno, f"{root}.{func.attr} without allow_pickle=False"))
            if root == "torch" and func.attr == "load" and _keyword(node, "weights_only") is not True:
                found.append((node.lineno, "torch.load without weights_only=True"))
            if root == "yaml" and func.attr in {"load", "load_all", "unsafe_load", "full_load"}:
                found.append((node.lineno, f"yaml.{func.attr} (use yaml.safe_load)"))
            if root == "os" and func.attr in {"system", "popen"}:
                found.append((node.lineno, f"os.{func.attr} runs a shell"))
        if _keyword(node, "allow_pickle") not in (False, "<missing>"):
            found.append((node.lineno, "allow_pickle is not False"))
        if _keyword(node, "shell") not in (False, "<missing>"):
            found.append((node.lineno, "shell=True runs a shell"))
    return sorted(set(found))


def test_the_scan_finds_every_unsafe_pattern():
    bad = """
import pickle
from marshal import loads
import numpy as np, torch, yaml, os, subprocess, builtins, shelve
pickle.loads(b"")
eval("1"); exec("x = 1"); builtins.eval("2")
np.load(f); np.load(f, allow_pickle=True); numpy.load(f, allow_pickle=flag)
torch.load(f); torch.load(f, weights_only=False)
yaml.load(s); yaml.full_load(s)
pd.read_pickle(f)
os.system("ls"); subprocess.run("ls", shell=True)
"""
    good = """
import json, numpy as np, torch, yaml, subprocess
np.load(f, allow_pickle=False); torch.load(f, weights_only=True); yaml.safe_load(s)
model.eval(); json.loads(s); subprocess.run(["ls"], check=True)
\"\"\"Nothing here is pickled, nor eval(uated).\"\"\"  # eval( in a comment is fine
"""
    whats = [what for _, what in unsafe_uses(bad)]
    for expected in ("imports pickle", "imports marshal", "imports shelve", "uses pickle",
                     "calls eval()", "calls exec()", "calls builtins.eval()",
                     "np.load without allow_pickle=False", "numpy.load without allow_pickle=False",
                     "allow_pickle is not False", "torch.load without weights_only=True",
                     "yaml.load (use yaml.safe_load)", "yaml.full_load (use yaml.safe_load)",
                     "uses read_pickle", "os.system runs a shell", "shell=True runs a shell"):
        assert expected in whats, expected
    assert unsafe_uses(good) == []


def test_no_pickle_or_eval_in_the_project_source():
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 40 and {p.parent.name for p in files} >= set(SCANNED)
    found, allowed_seen = [], set()
    for path in files:
        rel = str(path.relative_to(ROOT))
        lines = path.read_text().splitlines()
        for line, what in unsafe_uses(path.read_text()):
            key = (rel, lines[line - 1].strip())
            if key in ALLOWED:
                allowed_seen.add(key)
            else:
                found.append(f"{rel}:{line}: {what}: {key[1]}")
    assert found == [], "\n".join(found)
    assert allowed_seen == set(ALLOWED), f"stale allow-list entries: {set(ALLOWED) - allowed_seen}"
