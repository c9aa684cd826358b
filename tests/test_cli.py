import pytest

from fedapp import cli, launch


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


def test_node_config_is_checked():
    from fedapp.nodes import node_partition

    assert node_partition({"partition-id": 2, "num-partitions": 3}) == (2, 3)
    with pytest.raises(ValueError, match="outside"):
        node_partition({"partition-id": 3, "num-partitions": 3})
    with pytest.raises(ValueError, match="--node-config"):
        node_partition({"num-partitions": 3})


def test_supernode_command_carries_the_partition_and_data_dir(tmp_path):
    cmd = launch.supernode_command("h:1", 1, 3, 9999, ["--insecure"], str(tmp_path))
    config = cmd[cmd.index("--node-config") + 1]
    assert config == f"partition-id=1 num-partitions=3 data-dir='{tmp_path.resolve()}'"


def test_supernode_command_gives_paillier_nodes_all_cores(tmp_path):
    key = tmp_path / "paillier.key.json"
    cmd = launch.supernode_command("h:1", 0, 2, 9999, ["--insecure"], private_key=str(key))
    config = cmd[cmd.index("--node-config") + 1]
    assert f"paillier-private-key='{key.resolve()}'" in config
    assert config.endswith(" paillier-workers=0")  # 0: all cores (strategies.paillier_message)
    cmd = launch.supernode_command("h:1", 0, 2, 9999, ["--insecure"], private_key=str(key),
                                   paillier_workers=3)
    assert cmd[cmd.index("--node-config") + 1].endswith(" paillier-workers=3")
