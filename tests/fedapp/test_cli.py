"""The ``fedapp`` command line (fedapp.cli), without starting Flower: run config
values, key generation outside the app, TLS on unless ``--insecure`` is explicit,
SuperNode authentication (``--enable-supernode-auth`` on the SuperLink, each
SuperNode signing with ``--auth-supernode-private-key``), the connections written
for ``flwr``, and secret files checked before a node starts. The real processes
run in tests/runs/test_flower_runs.py::test_loopback_deployment_with_tls_and_faults."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedapp import bundle, cli, launch
from fedapp.nodekeys import write_node_keypair
from strategies.keyfiles import KEY_DIR_ENV, write_identity, write_keypair
from tests.helpers import ROOT, TLS_FILES, fresh_checkout


def test_run_config_values_are_read_as_toml():
    assert cli.parse_overrides(["a=3", "b=0.5", "c=true", "d='x y'", "e=word"]) == {
        "a": 3, "b": 0.5, "c": True, "d": "x y", "e": "word"}
    with pytest.raises(SystemExit, match="key=value"):
        cli.parse_overrides(["novalue"])


def test_tls_is_required_unless_insecure_is_explicit(tmp_path, capsys):
    assert cli.main(["server"]) == 2
    assert "--insecure" in capsys.readouterr().err
    assert cli.main(["client", "--superlink", "127.0.0.1:1", "--partition-id", "0",
                     "--num-partitions", "2", "--certificates", str(tmp_path)]) == 2
    assert "ca.crt" in capsys.readouterr().err
    assert launch.tls_args(None, True, server=True) == ["--insecure"]
    for name in ("ca.crt", "server.pem", "server.key"):
        (tmp_path / name).write_text("x")
    assert launch.tls_args(tmp_path, False, server=False) == ["--root-certificates",
                                                              str(tmp_path / "ca.crt")]


def test_keygen_writes_outside_the_app_by_default_and_refuses_inside(tmp_path, monkeypatch,
                                                                     capsys):
    app = fresh_checkout(tmp_path)
    monkeypatch.chdir(app)
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "key-dir"))
    for kind in ([], ["--secagg"], ["--supernode"]):
        assert cli.main(["keygen", *kind, "--out", str(app / "keys")]) == 2
        assert "inside the Flower app" in capsys.readouterr().err
    assert not (app / "keys").exists()
    assert cli.main(["keygen"]) == 0 and cli.main(["keygen", "--secagg"]) == 0
    assert sorted(p.name for p in (tmp_path / "key-dir").iterdir()) == [
        "paillier.key.json", "paillier.pub.json", "secagg-identity.key", "secagg-identity.pub"]
    assert bundle.private_material(app) == []
    # told explicitly, it writes there (a user who ignores the files themselves)
    assert cli.main(["keygen", "--secagg", "--out", str(app / "keys"),
                     "--allow-inside-app"]) == 0


def test_sim_and_run_take_the_current_directory_and_say_so(tmp_path, monkeypatch, capsys):
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["sim"].format_help()
    assert "default: the current directory" in " ".join(help_text.split())
    monkeypatch.chdir(tmp_path)  # no app here
    assert cli.main(["sim", "--workdir", str(tmp_path / "w")]) == 2
    out = capsys.readouterr()
    assert f"submitting the Flower app in {tmp_path}" in out.out
    assert "holds no Flower app" in out.err


# -------------------------------------------------- TLS, SuperNode authentication and secret files
@pytest.fixture(scope="module")
def paillier_keys(tmp_path_factory) -> tuple[Path, Path]:
    public, private, _ = write_keypair(tmp_path_factory.mktemp("paillier"))
    return public, private


@pytest.fixture
def execs(monkeypatch) -> list[tuple[list[str], dict[str, str]]]:
    """What ``fedapp server`` / ``fedapp client`` would exec, instead of exec'ing it."""
    seen: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(cli.os, "execve", lambda path, cmd, env: seen.append((cmd, env)))
    monkeypatch.setattr(cli.launch, "run_node",
                        lambda cmd, env: seen.append((cmd, env)) or 1)
    return seen


def client_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["client", "--superlink", "127.0.0.1:9092", "--partition-id", "0",
            "--num-partitions", "2", "--flwr-home", str(tmp_path / "home"), *extra]


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
    assert cmd[1:3] == ["-m", "fedapp.polling"] and "--isolation" in cmd
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert cmd[cmd.index("--root-certificates") + 1] == str(certs / "ca.crt")
    assert "supernode.key" not in cmd[cmd.index("--node-config") + 1]
    refusals = {  # arguments: what the error says
        (): "give --supernode-key FILE",
        ("--insecure", "--supernode-key", str(key)): "needs TLS",
        ("--no-supernode-auth", "--supernode-key", str(key)): "either --supernode-key or",
        ("--supernode-key", str(junk)): "not an unencrypted OpenSSH",
        ("--supernode-key", str(key.with_suffix(".pub"))): "holds an OpenSSH (SuperNode) "
                                                           "public key",
        ("--supernode-key", str(tmp_path / "nope")): "not found",
    }
    for extra, message in refusals.items():
        more_tls = [] if "--insecure" in extra else tls
        assert cli.main(client_args(tmp_path, *more_tls, *extra)) == 2
        assert message in capsys.readouterr().err
    assert len(execs) == 1
    assert cli.main(client_args(tmp_path, *tls, "--no-supernode-auth")) == 1  # opt-out
    assert "--auth-supernode-private-key" not in execs[-1][0]


def test_register_refuses_insecure_and_private_keys(tmp_path, capsys):
    public, private = write_node_keypair(tmp_path / "node")
    with pytest.raises(SystemExit, match="needs TLS"):
        cli.main(["register", str(public), "--superlink", "h:1", "--insecure"])
    assert cli.main(["register", str(private), "--superlink", "h:1",
                     "--flwr-home", str(tmp_path / "home")]) == 2
    assert "holds a private key" in capsys.readouterr().err


def test_client_checks_its_secret_files_before_starting(tmp_path, paillier_keys, execs,
                                                       capsys):
    _, identity = write_identity(tmp_path / "identity")
    for flag, path in (("--paillier-private-key", paillier_keys[1]),
                       ("--secagg-identity-key", identity)):
        path.chmod(0o644)
        try:
            assert cli.main(client_args(tmp_path, "--insecure", flag, str(path))) == 2
            assert "chmod 600" in capsys.readouterr().err
        finally:
            path.chmod(0o600)
    assert execs == []


def test_keygen_and_roster_make_a_masking_federation(tmp_path, capsys):
    """Real nodes: each makes its identity key pair, the public keys become the roster;
    a simulation: N keys and their roster at once. Every key is in its roster."""
    from strategies.keyfiles import identity_name, load_identity, load_roster

    for i in range(3):
        assert cli.main(["keygen", "--secagg", "--out", str(tmp_path / f"node{i}")]) == 0
    roster = tmp_path / "secagg-roster.json"
    assert cli.main(["roster", "--out", str(roster),
                     *(str(tmp_path / f"node{i}" / "secagg-identity.pub") for i in range(3))]) == 0
    keys = load_roster(roster)
    assert {load_identity(tmp_path / f"node{i}" / "secagg-identity.key").public
            for i in range(3)} == keys.keys
    assert cli.main(["roster", "--out", str(tmp_path / "bad.json"),
                     str(tmp_path / "node0" / "secagg-identity.key")]) == 2
    assert "does not hold a public identity key" in capsys.readouterr().err
    assert cli.main(["roster", "--out", str(tmp_path / "twice.json"),
                     *[str(tmp_path / "node0" / "secagg-identity.pub")] * 2]) == 2
    assert "twice" in capsys.readouterr().err

    sim = tmp_path / "sim"
    assert cli.main(["keygen", "--secagg", "--simulation", "4", "--out", str(sim)]) == 0
    assert {load_identity(sim / identity_name(i)).public for i in range(4)} == \
        load_roster(sim / "secagg-roster.json").keys
    assert cli.main(["keygen", "--simulation", "4", "--out", str(tmp_path / "x")]) == 2


def test_sim_makes_the_identities_of_a_masking_simulation(tmp_path, monkeypatch, capsys):
    from strategies.keyfiles import load_roster

    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "keys"))
    cli.simulation_identities(3)
    assert len(load_roster(tmp_path / "keys" / "secagg-roster.json")) == 3
    assert "made 3 masking identity keys" in capsys.readouterr().err
    cli.simulation_identities(3)  # there: kept
    with pytest.raises(ValueError, match="fewer than 4 nodes"):
        cli.simulation_identities(4)


def test_sim_and_run_check_this_apps_run_config_before_submitting(tmp_path, monkeypatch,
                                                                  capsys):
    """An unknown setting is named with the closest known one, a bad value in one line,
    before anything starts; another app's settings are left to Flower."""
    app = fresh_checkout(tmp_path)
    submitted = []
    monkeypatch.setattr(launch, "simulate", lambda *a, **k: submitted.append(a) or
                        ("finished:completed", None, ""))
    assert cli.main(["sim", "--app", str(app), "--run-config", "num-rounds=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown run setting 'num-rounds' (did you mean 'num-server-rounds'?)" in err
    assert len(err.strip().splitlines()) == 1
    assert cli.main(["sim", "--app", str(app), "--run-config", "fraction-train=2.0"]) == 2
    assert "fraction-train" in capsys.readouterr().err
    assert cli.main(["run", "--app", str(app), "--superlink", "127.0.0.1:1", "--insecure",
                     "--run-config", "aggregation='secagg2'"]) == 2
    assert "aggregation" in capsys.readouterr().err
    assert submitted == []
    other = tmp_path / "other"
    other.mkdir()
    (other / "pyproject.toml").write_text('[tool.flwr.app.components]\nserverapp = "x:app"\n')
    cli.check_run_config(other, {"anything": 1})  # not ours: Flower checks it
    assert cli.main(["sim", "--app", str(app), "--run-config", "num-server-rounds=1"]) == 0
    assert len(submitted) == 1


def test_every_command_explains_itself(capsys):
    """Every subcommand has a description and an example, every option a help text,
    and ``fedapp --version`` names ours and Flower's."""
    import argparse

    from fedapp.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"sim", "server", "client", "keygen", "roster", "decrypt",
                                     "run", "register", "provision", "predict", "infer"}
    for name, sub in commands.choices.items():
        assert sub.description and sub.epilog.startswith("example:\n  fedapp " + name), name
        for action in sub._actions:
            assert action.help, f"fedapp {name} {action.option_strings or action.dest}"
        text = sub.format_help()
        for action in sub._actions:  # a default worth stating is stated
            if action.option_strings and action.default not in (None, False, [],
                                                                 argparse.SUPPRESS):
                assert f"(default: {action.default})" in " ".join(text.split()) \
                    or "default" in action.help, (name, action.dest)
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    out = capsys.readouterr().out
    assert out.startswith("fedapp ") and "(flwr 1." in out


def test_the_live_log_leaves_out_flowers_and_rays_boilerplate():
    shown = [line for line in [
        "[92mINFO [0m:      [ROUND 1/2]\n",
        "/x/ray/_private/worker.py:2051: FutureWarning: Tip: In future versions of Ray, ...\n",
        "  warnings.warn(\n",
        "[93mWARNING [0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
        "[92mINFO [0m:      To change federation size, use the following command:\n",
        "[92mINFO [0m:      \tflwr federation simulation-config @none/default <superlink>\n",
        "[92mINFO [0m:      Round 1 done: {'fed-loss': 0.44}\n",
        "[93mWARNING [0m:   node 3 failed the train stage: out of memory\n",
    ] if launch.worth_showing(line)]
    assert [line.split(":", 1)[1].strip() for line in shown] == [
        "[ROUND 1/2]", "Round 1 done: {'fed-loss': 0.44}",
        "node 3 failed the train stage: out of memory"]


@pytest.mark.parametrize(("partition", "partitions"), [(3, 3), (-1, 3), (0, 0)])
def test_client_refuses_a_partition_outside_the_split(partition, partitions, capsys):
    code = cli.main(["client", "--superlink", "127.0.0.1:9092", "--insecure",
                     "--partition-id", str(partition), "--num-partitions", str(partitions)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--partition-id {partition} is not a partition of --num-partitions {partitions}" \
        in err


@pytest.mark.parametrize("name", ["FEDAPP_NODE_POLL_SECONDS", "FEDAPP_NODE_FAST_POLL_SECONDS",
                                  "FEDAPP_NODE_HEARTBEAT_SECONDS"])
def test_client_refuses_a_bad_node_setting_before_starting(name, monkeypatch, capsys):
    monkeypatch.setenv(name, "soon")
    code = cli.main(["client", "--superlink", "127.0.0.1:9092", "--insecure",
                     "--partition-id", "0", "--num-partitions", "2"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{name}='soon': give seconds between" in err and "Traceback" not in err


def test_client_passes_its_own_settings_to_its_node_config_after_checking_them(
        tmp_path, execs, capsys):
    base = ["client", "--superlink", "127.0.0.1:9092", "--insecure", "--partition-id", "0",
            "--num-partitions", "2", "--flwr-home", str(tmp_path / "home")]
    assert cli.main([*base, "--node-config", "paillier-accept-server-noise=true",
                     "--node-config", "paillier-min-contributors=3"]) == 1
    (cmd, _), = execs
    text = cmd[cmd.index("--node-config") + 1]
    assert text.endswith("paillier-accept-server-noise=true paillier-min-contributors=3")
    refusals = {"paillier-accept-server-noise=1": "must be bool like its default False",
                "paillier-min-contributor=3": "unknown node setting(s) "
                                             "paillier-min-contributor: the node settings are",
                "paillier-min-contributors": "does not parse"}
    for value, message in refusals.items():
        assert cli.main([*base, "--node-config", value]) == 2
        assert message in capsys.readouterr().err
    assert len(execs) == 1


def test_flower_env_turns_progress_bars_off_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert launch.flower_env()["TQDM_DISABLE"] == "1"
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert launch.flower_env()["TQDM_DISABLE"] == "0"


def test_keygen_threshold_deals_a_public_key_and_one_share_per_holder(threshold_key_dir,
                                                                      tmp_path, capsys):
    """(The session's key, dealt by fedapp keygen --threshold 2 --shares 3: the public key,
    the shares and the clients' group key, the secrets 0600.)"""
    assert sorted(p.name for p in threshold_key_dir.iterdir()) == [
        "paillier-group.key", "paillier-threshold-share-1.json", "paillier-threshold-share-2.json",
        "paillier-threshold-share-3.json", "paillier-threshold.pub.json"]
    assert (threshold_key_dir / "paillier-group.key").stat().st_mode & 0o077 == 0
    for bad in (["--threshold", "2"], ["--threshold", "2", "--shares", "3", "--secagg"],
                ["--threshold", "1", "--shares", "3"], ["--threshold", "4", "--shares", "3"]):
        assert cli.main(["keygen", *bad, "--out", str(tmp_path / "x")]) == 2
    said = capsys.readouterr().err
    assert "--threshold T and --shares N go together" in said
    assert "threshold 1 would let one holder decrypt alone" in said
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
