"""Provisioning kits (fedapp.kits, ``fedapp provision`` and ``--kit``): each folder holds
exactly what its machine needs, no folder holds another machine's private key (the
server's none but its TLS key), the keys fit together, and a kit given to the wrong
command, incomplete or with a readable private key is refused. A real federation runs
from kits in tests/runs/test_real_nodes.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedapp import cli
from fedapp.kits import KitError, load_kit, provision
from fedapp.nodekeys import check_node_private_key, check_node_public_key
from strategies.keyfiles import load_private_key, load_public_key, load_roster, load_identity
from tests.helpers import fresh_checkout

SITE_FILES = {"kit.json", "certs/ca.crt", "supernode.key", "supernode.pub",
              "paillier.key.json", "secagg-identity.key", "secagg-identity.pub",
              "secagg-roster.json"}
PRIVATE = ("supernode.key", "paillier.key.json", "secagg-identity.key")


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kits") / "federation"
    provision(out, 3, "server.example.org:9092")
    return out


def test_each_folder_holds_what_its_machine_needs(kits):
    assert sorted(p.name for p in kits.iterdir()) == ["server", "site-0", "site-1", "site-2"]
    assert files(kits / "server") == {
        "kit.json", "certs/ca.crt", "certs/server.pem", "certs/server.key",
        "paillier.pub.json", "supernodes/site-0.pub", "supernodes/site-1.pub",
        "supernodes/site-2.pub"}
    for i in range(3):
        site = kits / f"site-{i}"
        assert files(site) == SITE_FILES
        for name in PRIVATE:
            assert (site / name).stat().st_mode & 0o077 == 0, name
        kit = load_kit(site, "site")
        assert (kit.superlink, kit.partition_id, kit.num_partitions) == (
            "server.example.org:9092", i, 3)
        check_node_private_key(site / "supernode.key")
        assert (site / "supernode.pub").read_bytes() == \
            (kits / "server" / "supernodes" / f"site-{i}.pub").read_bytes()
        assert (site / "certs/ca.crt").read_bytes() == \
            (kits / "server" / "certs/ca.crt").read_bytes()
    server = load_kit(kits / "server", "server")
    assert server.port == 9092 and len(server.supernode_keys()) == 3
    for key in server.supernode_keys():
        check_node_public_key(key)


def test_the_keys_fit_together(kits):
    public = load_public_key(kits / "server" / "paillier.pub.json")
    roster = load_roster(kits / "site-0" / "secagg-roster.json")
    for i in range(3):
        site = kits / f"site-{i}"
        assert load_private_key(site / "paillier.key.json").public_key == public
        assert load_roster(site / "secagg-roster.json") == roster
        assert load_identity(site / "secagg-identity.key").public in roster.keys
    assert len(set(roster.keys)) == 3


def test_no_folder_holds_another_machines_private_key(kits):
    for i in range(3):
        secrets = [(kits / f"site-{i}" / n).read_bytes() for n in ("supernode.key",
                                                                 "secagg-identity.key")]
        paillier_p = json.loads((kits / f"site-{i}" / "paillier.key.json").read_text())["p"]
        for other in ["server", *(f"site-{j}" for j in range(3) if j != i)]:
            for path in (kits / other).rglob("*"):
                if path.is_file():
                    data = path.read_bytes()
                    assert not [s for s in secrets if s in data], path
                    if other == "server":
                        assert paillier_p.encode() not in data, path


def test_modes_leave_out_the_keys_they_do_not_need(tmp_path):
    provision(tmp_path / "f", 2, "10.0.0.5:9092", ("fedavg", "secagg"))
    assert files(tmp_path / "f" / "site-1") == SITE_FILES - {"paillier.key.json"}
    assert "paillier.pub.json" not in files(tmp_path / "f" / "server")


def test_bad_requests_and_bad_kits_are_refused(kits, tmp_path):
    with pytest.raises(KitError, match="not empty"):
        provision(kits, 2, "h:1")
    with pytest.raises(KitError, match="at least 2 sites"):
        provision(tmp_path / "a", 1, "h:1")
    with pytest.raises(KitError, match="HOST:PORT"):
        provision(tmp_path / "b", 2, "no-port")
    with pytest.raises(KitError, match="is a site kit: it goes with 'fedapp client --kit'"):
        load_kit(kits / "site-0", "server")
    with pytest.raises(KitError, match="is a server kit"):
        load_kit(kits / "server", "site")
    with pytest.raises(KitError, match="no kit.json"):
        load_kit(tmp_path, "site")
    provision(tmp_path / "c", 2, "h:1", ("secagg",))
    site = tmp_path / "c" / "site-0"
    (site / "secagg-roster.json").unlink()
    with pytest.raises(KitError, match="lacks secagg-roster.json"):
        load_kit(site, "site")
    (tmp_path / "c" / "site-1" / "supernode.key").chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_kit(tmp_path / "c" / "site-1", "site")


def test_provision_refuses_to_write_inside_an_app(tmp_path, capsys):
    app = fresh_checkout(tmp_path)
    assert cli.main(["provision", "--sites", "2", "--server-address", "h:1", "--out",
                     str(app / "federation")]) == 2
    assert "inside the Flower app" in capsys.readouterr().err
    assert not (app / "federation").exists()


def test_client_and_run_take_everything_from_the_kit(kits, tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(cli.launch, "run_node", lambda cmd, env: started.append(cmd) or 0)
    assert cli.main(["client", "--kit", str(kits / "site-2"), "--flwr-home",
                     str(tmp_path / "h")]) == 0
    cmd, = started
    site = (kits / "site-2").resolve()
    assert cmd[cmd.index("--superlink") + 1] == "server.example.org:9092"
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(site / "supernode.key")
    assert cmd[cmd.index("--root-certificates") + 1] == str(site / "certs" / "ca.crt")
    node_config = cmd[cmd.index("--node-config") + 1]
    assert "partition-id=2 num-partitions=3" in node_config
    for name in ("paillier.key.json", "secagg-identity.key", "secagg-roster.json"):
        assert str(site / name) in node_config
    assert cli.main(["client", "--kit", str(kits / "site-2"), "--superlink", "h:1"]) == 2
    assert "--kit decides --superlink" in capsys.readouterr().err
    assert cli.main(["client", "--partition-id", "0"]) == 2
    assert "give --kit FOLDER" in capsys.readouterr().err

    submitted = []
    monkeypatch.setattr(cli.launch, "submit", lambda app, conn, env, overrides: (
        submitted.append((conn, overrides)) or "7"))
    monkeypatch.setattr(cli, "check_run_config", lambda app, overrides: None)
    assert cli.main(["run", "--kit", str(kits / "server"), "--flwr-home", str(tmp_path / "r"),
                     "--no-wait", "--run-config", "aggregation=paillier"]) == 0
    (connection, overrides), = submitted
    assert connection == "fedapp-server-example-org-9092"
    assert overrides["paillier-public-key"] == str(
        (kits / "server" / "paillier.pub.json").resolve())


def test_a_threshold_kit_gives_each_site_its_own_share_and_the_server_none(
        threshold_key_dir, tmp_path, monkeypatch):
    """(The dealing itself is the session's 2-of-3 key, copied: safe primes take seconds;
    ``fedapp keygen --threshold`` is tested in test_cli.)"""
    import shutil

    import fedapp.kits as kits_module
    from strategies.keyfiles import load_group_key, load_key_share, load_threshold_public_key

    def dealt(directory, threshold, shares, n_bits=2048):
        assert (threshold, shares) == (2, 3)
        shutil.copytree(threshold_key_dir, directory)

    monkeypatch.setattr(kits_module, "write_threshold_key", dealt)
    with pytest.raises(KitError, match="2 <= T < sites"):
        provision(tmp_path / "small", 2, "h:1", ("paillier-threshold",))
    out = tmp_path / "f"
    provision(out, 3, "h:1", ("fedavg", "paillier-threshold"))
    assert files(out / "server") >= {"paillier-threshold.pub.json"}
    assert not any("share" in f or "group" in f for f in files(out / "server"))
    assert not (out / ".dealer").exists()
    public = load_threshold_public_key(out / "server" / "paillier-threshold.pub.json")
    for i in range(3):
        site = out / f"site-{i}"
        shares = [f for f in files(site) if "share" in f]
        assert shares == [f"paillier-threshold-share-{i + 1}.json"]
        assert load_key_share(site / shares[0], public).index == i + 1
        load_group_key(site / "paillier-group.key", public)
        kit = load_kit(site, "site")
        assert "paillier-threshold" in kit.modes
    started = []
    monkeypatch.setattr(cli.launch, "run_node", lambda cmd, env: started.append(cmd) or 0)
    assert cli.main(["client", "--kit", str(out / "site-1"), "--flwr-home",
                     str(tmp_path / "h")]) == 0
    node_config = started[0][started[0].index("--node-config") + 1]
    site = (out / "site-1").resolve()
    for key, name in (("paillier-key-share", "paillier-threshold-share-2.json"),
                      ("paillier-group-key", "paillier-group.key"),
                      ("paillier-threshold-public-key", "paillier-threshold.pub.json"),
                      ("secagg-identity-key", "secagg-identity.key")):
        assert f"{key}='{site / name}'" in node_config
