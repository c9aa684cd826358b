"""Settings a client node decides for itself: how much it trusts the server.

The server sends each round's settings, so it must not be the one to choose how
much a node lets it get away with. These settings come only from the node:

- on real nodes, the SuperNode's ``--node-config`` (e.g.
  ``--node-config "paillier-min-contributors=3"``);
- in a simulation, where Flower gives nodes no config of their own, from
  ``$FEDAPP_NODE_CONFIG`` in the same ``key=value`` form, read by the processes the
  simulation runs in (``fedapp sim --node-config`` sets it). The node config wins
  where both name a key.

Never from the run config: the SuperLink hands that out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from flwr.common.config import parse_config_args

from .node_errors import NodeError

NODE_CONFIG_ENV = "FEDAPP_NODE_CONFIG"

#: Each node setting: its default and what it means.
SETTINGS = {
    "paillier-min-contributors": (2, "decrypt only aggregates of at least this many "
                                     "updates (1: also a single update)"),
    "paillier-accept-server-noise": (False, "decrypt aggregates the server added central-DP "
                                            "noise to, whose authenticity cannot be checked"),
}


def node_setting(node_config: Mapping[str, object], key: str) -> object:
    """The node's value of ``key`` (see the module), else its default.

    Raises
    ------
    NodeError
        If the value has another type than the default's, or ``$FEDAPP_NODE_CONFIG``
        does not parse.
    """
    default = SETTINGS[key][0]
    value = node_config.get(key)
    if value is None:
        try:
            value = parse_config_args([os.environ.get(NODE_CONFIG_ENV, "")]).get(key)
        except ValueError as err:
            raise NodeError(f"${NODE_CONFIG_ENV} does not parse ({err}): write it as "
                            "key=value pairs, e.g. \"paillier-min-contributors=3\"") from None
    if value is None:
        return default
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value,
                                                                               type(default)):
        raise NodeError(f"node setting {key} must be {type(default).__name__} like its "
                        f"default {default!r}, got {value!r}")
    return value
