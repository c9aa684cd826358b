"""The Flower commands fedapp.launch builds for SuperLinks and SuperNodes."""

from __future__ import annotations

import os

from fedapp import launch
from tests.helpers import TLS_FILES


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


def test_superlink_command_names_only_its_own_tls_files(certs):
    tls = launch.tls_args(certs, False, server=True)
    cmd = launch.superlink_command("127.0.0.1", 9092, tls, supernode_auth=True)
    files = [a for a in cmd[1:] if os.sep in a]
    assert sorted(files) == sorted(str(certs / n) for n in TLS_FILES)
