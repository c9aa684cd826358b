"""Privacy plug-ins for Flower: weighted FedAvg with Paillier-encrypted or masked secure
aggregation, central DP-FedAvg, and the client mods that go with them, on both of
Flower's APIs.

Message API (``flwr.serverapp`` / ``flwr.clientapp``)::

    from strategies import PaillierFedAvg, paillier_mod, load_public_key
    strategy = PaillierFedAvg(load_public_key(path), clip=1.0)     # server
    app = ClientApp(mods=[paillier_mod])                             # clients

Legacy API (``server_fn`` / ``client_fn``): the ``Legacy*`` strategies and
``legacy_*_mod`` mods, the same way.

Layout, by the direction of imports:

- protocol cores, which never import Flower: :mod:`~strategies.aggregation` (update
  checks, weighted average, layouts), :mod:`~strategies.checks` (type checks),
  :mod:`~strategies.fixed_point` (the quantizer both secure aggregations use),
  :mod:`~strategies.encoding` (Paillier's packing), :mod:`~strategies.paillier`, :mod:`~strategies.paillier_protocol`,
  :mod:`~strategies.secagg_masks`, :mod:`~strategies.secagg_protocol`,
  :mod:`~strategies.secagg_wire`, :mod:`~strategies.dp`, :mod:`~strategies.keyfiles`,
  :mod:`~strategies.legacy_wire`, :mod:`~strategies.threshold_paillier`,
  :mod:`~strategies.threshold_protocol`;
- the layer both APIs share (server round logic, what a client node does, how failures
  are reported): :mod:`~strategies.paillier_node`, :mod:`~strategies.secagg_rounds`,
  :mod:`~strategies.secagg_node`, :mod:`~strategies.dp_rounds`,
  :mod:`~strategies.threshold_node`, :mod:`~strategies.threshold_rounds`,
  :mod:`~strategies.screening`, :mod:`~strategies.node_errors`,
  :mod:`~strategies.records`, :mod:`~strategies.encrypted_result` (the encrypted final
  model an app gets, and how to save it);
- one thin adapter per API, which never import each other: ``*_message`` and
  :mod:`~strategies.fedavg` (Message API), ``*_legacy`` (legacy API).

Names load on first use, so importing one piece does not import them all.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    # Message API
    "WeightedFedAvg": "fedavg",
    "PaillierFedAvg": "paillier_message", "paillier_mod": "paillier_message",
    "SecAggFedAvg": "secagg_message", "secagg_mod": "secagg_message",
    "CentralDP": "dp_message", "dp_clip_mod": "dp_message",
    "ThresholdPaillierFedAvg": "threshold_message",
    "threshold_paillier_mod": "threshold_message",
    # legacy API
    "LegacyPaillierFedAvg": "paillier_legacy", "legacy_paillier_mod": "paillier_legacy",
    "LegacySecAggFedAvg": "secagg_legacy", "legacy_secagg_mod": "secagg_legacy",
    "LegacyCentralDP": "dp_legacy", "legacy_dp_clip_mod": "dp_legacy",
    "LegacyThresholdPaillierFedAvg": "threshold_legacy",
    "legacy_threshold_paillier_mod": "threshold_legacy",
    # keys
    "load_public_key": "keyfiles", "load_private_key": "keyfiles",
    "write_keypair": "keyfiles", "write_identity": "keyfiles", "write_roster": "keyfiles",
    "default_key_dir": "keyfiles", "load_threshold_public_key": "keyfiles",
    # the encrypted final model
    "EncryptedArrayRecord": "encrypted_result", "EncryptedModelError": "encrypted_result",
    "save_encrypted_model": "encrypted_result",
    # outcomes
    "NoUsableUpdate": "screening", "NodeError": "node_errors",
    "InvalidUpdate": "aggregation",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'strategies' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
