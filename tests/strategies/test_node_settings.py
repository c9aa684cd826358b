"""Node settings come from the node (node config, else $FEDAPP_NODE_CONFIG), never the
run config, with the default's type (strategies.node_settings)."""

from __future__ import annotations

import pytest

from strategies.node_errors import NodeError
from strategies.node_settings import NODE_CONFIG_ENV, SETTINGS, node_setting


def test_defaults_when_the_node_says_nothing(monkeypatch):
    monkeypatch.delenv(NODE_CONFIG_ENV, raising=False)
    for key, (default, _) in SETTINGS.items():
        assert node_setting({}, key) == default


def test_the_environment_serves_simulations_and_the_node_config_wins(monkeypatch):
    monkeypatch.setenv(NODE_CONFIG_ENV, "paillier-min-contributors=3 "
                                        "paillier-accept-server-noise=true")
    assert node_setting({}, "paillier-min-contributors") == 3
    assert node_setting({}, "paillier-accept-server-noise") is True
    assert node_setting({"paillier-min-contributors": 5}, "paillier-min-contributors") == 5


@pytest.mark.parametrize("value", ["true", 1, 2.0, None])
def test_a_value_of_another_type_is_refused_by_name(value, monkeypatch):
    monkeypatch.delenv(NODE_CONFIG_ENV, raising=False)
    if value is None:
        monkeypatch.setenv(NODE_CONFIG_ENV, "paillier-accept-server-noise=yes")
        with pytest.raises(NodeError, match=NODE_CONFIG_ENV):
            node_setting({}, "paillier-accept-server-noise")
        return
    with pytest.raises(NodeError, match="paillier-accept-server-noise must be bool"):
        node_setting({"paillier-accept-server-noise": value}, "paillier-accept-server-noise")


def test_a_boolean_is_no_count():
    with pytest.raises(NodeError, match="must be int"):
        node_setting({"paillier-min-contributors": True}, "paillier-min-contributors")
