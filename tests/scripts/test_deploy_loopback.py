"""The loopback deployment script (scripts/deploy_loopback.py) uses TLS and node
authentication unless told otherwise, and gives client secrets to client nodes only."""

from __future__ import annotations

import json

import pytest

from tests.helpers import load_script


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


@pytest.mark.parametrize("aggregation", ["fedavg", "paillier", "secagg"])
def test_deployment_gives_client_secrets_to_client_nodes_only(aggregation, tmp_path):
    deploy = load_script("deploy_loopback")
    args = deploy.parse_args(["--clients", "3", "--aggregation", aggregation])
    keys = tmp_path / "keys"
    secrets = {keys / "paillier.key.json",
               *(keys / f"client{i}" / name for i in range(3)
                 for name in ("supernode.key", "secagg-identity.key"))}
    server_side = json.dumps([deploy.server_command(args, tmp_path, 1234),
                              deploy.run_overrides(args, tmp_path)])
    assert not [s for s in secrets if str(s) in server_side]
    assert str(keys) not in server_side.replace(str(keys / "paillier.pub.json"), "")
    clients = [json.dumps(deploy.client_command(args, tmp_path, 1234, i)) for i in range(3)]
    for i, cmd in enumerate(clients):
        assert str(keys / f"client{i}" / "supernode.key") in cmd
        assert (str(keys / "paillier.key.json") in cmd) == (aggregation == "paillier")
        # each node its own identity key, none another's; every one the roster
        assert (str(keys / f"client{i}" / "secagg-identity.key") in cmd) == \
            (aggregation == "secagg")
        assert (str(keys / "secagg-roster.json") in cmd) == (aggregation == "secagg")
        assert not [j for j in range(3) if j != i
                    and str(keys / f"client{j}" / "secagg-identity.key") in cmd]
    if aggregation == "paillier":
        assert deploy.run_overrides(args, tmp_path)["paillier-public-key"] == str(
            keys / "paillier.pub.json")
