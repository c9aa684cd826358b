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
from collections.abc import Mapping, Sequence

from flwr.common.config import parse_config_args

from .node_errors import NodeError

NODE_CONFIG_ENV = "FEDAPP_NODE_CONFIG"

#: Each node setting: its default and what it means.
SETTINGS = {
    "paillier-min-contributors": (2, "decrypt only aggregates of at least this many "
                                     "updates (1: also a single update)"),
    "paillier-accept-server-noise": (False, "decrypt aggregates the server added central-DP "
                                            "noise to (the server can shift the model and "
                                            "learn whether decoding succeeds)"),
    "secagg-allow-unauthenticated": (False, "masking: take part without an identity key and "
                                            "roster, trusting the server to relay keys "
                                            "honestly"),
    "secagg-min-group": (2, "masking: the smallest share group (the node and its neighbors) "
                            "the node takes part in"),
    "secagg-min-threshold-fraction": (0.5, "masking: the threshold must be more than this "
                                           "fraction of the node's share group (at least 0.5)"),
    "dp-min-noise-multiplier": (0.0, "distributed DP: refuse rounds that ask this node's "
                                     "share of less noise than this multiplier, and under "
                                     "Paillier to decrypt sums noised below it (0: what the "
                                     "run asks)"),
    "plaintext-metrics": (False, "secure modes: answer federated evaluation with this "
                                 "node's own loss, examples and metrics in plaintext, and "
                                 "under Paillier send its train metrics in plaintext too "
                                 "(off: train metrics travel only as sums)"),
}
PLAINTEXT_METRICS = "plaintext-metrics"


def node_config_text(pairs: Sequence[str]) -> str:
    """``KEY=VALUE`` node settings (``--node-config`` of ``fedapp client`` and ``fedapp
    sim``) as one node-config text, each checked: a known setting, of its default's type.

    Raises
    ------
    ValueError
        Naming the setting that is unknown, malformed or of the wrong type.
    """
    text = " ".join(pairs)
    try:
        if any("=" not in pair for pair in pairs):  # Flower's parser drops those silently
            raise ValueError
        parsed = parse_config_args([text]) if text else {}
    except Exception:  # noqa: BLE001 - Flower raises click's exception here
        raise ValueError(f"--node-config {text!r} does not parse: write KEY=VALUE, values in "
                         "TOML (e.g. paillier-accept-server-noise=true)") from None
    unknown = sorted(set(parsed) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown node setting(s) {', '.join(unknown)}: the node settings "
                         f"are {', '.join(SETTINGS)} (docs/configuration.md)")
    for key in parsed:
        node_setting(parsed, key)  # NodeError, a ValueError, names a wrong type
    return text


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
        except Exception:  # noqa: BLE001 - Flower raises click's exception here
            raise NodeError(f"${NODE_CONFIG_ENV} does not parse: write it as key=value pairs, "
                            "values in TOML (e.g. \"paillier-min-contributors=3 "
                            "paillier-accept-server-noise=true\")") from None
    if value is None:
        return default
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value,
                                                                               type(default)):
        raise NodeError(f"node setting {key} must be {type(default).__name__} like its "
                        f"default {default!r}, got {value!r}")
    return value


def refuse_evaluation(node_config: Mapping[str, object], mode: str) -> None:
    """Refuse a federated evaluation request under a secure mode ``mode`` unless the
    node's ``plaintext-metrics`` allows it: the reply is this node's own loss,
    example count and metrics, in plaintext, of a model the server chose (one that
    always predicts class ``c`` reads the node's share of ``c``).

    Raises
    ------
    NodeError
        Unless the node allows it.
    """
    if not node_setting(node_config, PLAINTEXT_METRICS):
        raise NodeError(f"this node answers no federated evaluation under {mode}: its own "
                        "loss, example count and metrics would reach the server in plaintext. "
                        "Turn federated evaluation off on the server (fraction-evaluate = 0), "
                        f"or allow it on the node with {PLAINTEXT_METRICS}=true in its "
                        "settings (--node-config, or $FEDAPP_NODE_CONFIG in a simulation)")
