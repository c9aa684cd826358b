"""What a client node does in masked secure aggregation, for both Flower APIs: find
its identity key and the roster (fail closed without them), answer the key stages from its
state in ``context.state``, and mask its weighted update.

The Message-API mod (:mod:`strategies.secagg_message`) and the legacy one
(:mod:`strategies.secagg_legacy`) only move these values in and out of their
envelopes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common.logger import log

from .aggregation import Layout
from .dp_rounds import distributed_noise, masking_noise_fraction
from .keyfiles import (ROSTER_NAME, KeyNotFound, identity_name, load_identity, load_roster,
                       node_key_file)
from .secagg_identity import NodeIdentity
from .secagg_masks import SecAggError
from .node_errors import NodeError
from .node_settings import node_setting
from .secagg_protocol import (HEADER_KEY, MASKED_KEY, PAYLOAD_KEY, NodePolicy, client_mask,
                              client_step)
from .secagg_wire import header_array, layout_digest
from .secure_sums import metric_sums

STATE_KEY = "secagg"  # the ConfigRecord in context.state holding this node's round state
CLIPPED_KEY = "secagg-clipped"  # the train metric: fraction of values outside the clip range
IDENTITY_NODE_CONFIG = "secagg-identity-key"
ROSTER_NODE_CONFIG = "secagg-roster"
ALLOW_UNAUTHENTICATED = "secagg-allow-unauthenticated"
_WARNED: set[str] = set()


def allows_unauthenticated(context: Context) -> bool:
    """Whether the node's own setting ``secagg-allow-unauthenticated`` is true (never
    the run config: the server side hands that out)."""
    return node_setting(context.node_config, ALLOW_UNAUTHENTICATED)


def _identity_file(config: dict) -> Path:
    """The node's identity key file: node config ``secagg-identity-key``; else in its
    key directory, ``secagg-identity-<partition-id>.key`` if the node has a partition id
    and that file exists (a simulation's nodes share one directory), else
    ``secagg-identity.key``."""
    if "partition-id" in config and not config.get(IDENTITY_NODE_CONFIG):
        try:
            return node_key_file(config, IDENTITY_NODE_CONFIG,
                                 identity_name(int(config["partition-id"])),
                                 "fedapp keygen --secagg --simulation N")
        except (KeyNotFound, ValueError):
            pass
    return node_key_file(config, IDENTITY_NODE_CONFIG, identity_name(), "fedapp keygen --secagg")


def node_identity(context: Context) -> NodeIdentity | None:
    """This node's identity key and the federation's roster (node config
    ``secagg-identity-key`` / ``secagg-roster``, else in the node's key directory).

    Returns None, with a one-time warning, only if either is missing and the node's
    own setting ``secagg-allow-unauthenticated`` allows running without them.

    Raises
    ------
    NodeError
        If either is missing and nothing allows running without them (fail closed),
        the node config names a file that does not exist, or the roster does not
        list this node's key.
    """
    config = dict(context.node_config)
    try:
        key_file = _identity_file(config)
        roster_file = node_key_file(config, ROSTER_NODE_CONFIG, ROSTER_NAME,
                                    "fedapp roster (or fedapp keygen --secagg --simulation N)")
    except KeyNotFound as err:
        named = IDENTITY_NODE_CONFIG in config or ROSTER_NODE_CONFIG in config
        if named or not allows_unauthenticated(context):
            raise NodeError(
                f"secure aggregation needs this node's identity key and the federation's "
                f"roster: {err}. To run without them, trusting the server to relay keys "
                f"honestly, set {ALLOW_UNAUTHENTICATED}=true in the node's settings "
                "(--node-config, or $FEDAPP_NODE_CONFIG in a simulation)") from None
        if "auth" not in _WARNED:
            _WARNED.add("auth")
            log(WARNING, "Secure aggregation without identity keys (%s = true): the server "
                "is trusted to relay keys honestly", ALLOW_UNAUTHENTICATED)
        return None
    try:
        return NodeIdentity(load_identity(key_file), load_roster(roster_file))
    except ValueError as err:  # the messages name files and formats, never key bytes
        raise NodeError(f"secure aggregation: {err}") from None


def load_state(context: Context, key: str = STATE_KEY) -> dict:
    """The node's round state kept in ``context.state`` under ``key`` (JSON)."""
    record = context.state.config_records.get(key)
    return json.loads(record["state"]) if record and "state" in record else {}


def save_state(context: Context, state: dict, key: str = STATE_KEY) -> None:
    context.state.config_records[key] = ConfigRecord({"state": json.dumps(state)})



def node_policy(context: Context) -> NodePolicy:
    """What this node requires of a round (its node settings ``secagg-min-group`` and
    ``secagg-min-threshold-fraction``)."""
    config = context.node_config
    try:
        return NodePolicy(node_setting(config, "secagg-min-group"),
                          node_setting(config, "secagg-min-threshold-fraction"))
    except SecAggError as err:
        raise NodeError(f"node settings: {err}") from None


def answer_stage(payload: object, context: Context, node: int) -> str:
    """Answer a key stage (advertise, share, check, unmask) on this node."""
    if not isinstance(payload, str):
        raise SecAggError("the secure-aggregation request holds no payload")
    reply, state = client_step(payload, load_state(context), node, node_identity(context),
                               node_policy(context))
    save_state(context, state)
    return reply



def require_payload(config: dict) -> str:
    """The round's mask payload from a train config; refuses to train without one
    (the server is then not a secure-aggregation strategy: never send plaintext)."""
    payload = config.get(PAYLOAD_KEY)
    if not isinstance(payload, str):
        raise NodeError("this node masks its updates (secure-aggregation client mod) but the "
                         "server sent no secure-aggregation payload: the server must run "
                         "SecAggFedAvg (Message API) or LegacySecAggFedAvg (legacy API)")
    return payload



def below_or_at(value: float, dtype: np.dtype) -> np.floating:
    """The largest ``dtype`` number at most ``value``: for ``x`` of that dtype,
    ``x > below_or_at(value)`` exactly when ``x > value``."""
    with np.errstate(over="ignore"):  # beyond the dtype's range: its largest number
        out = np.asarray(value, dtype=dtype)[()]
    return np.nextafter(out, dtype.type(-np.inf)) if float(out) > value else out



def model_digest(arrays: Mapping[str, np.ndarray], config: Mapping[str, object]) -> str:
    """SHA-256 of the global model and round settings a train message brought (the
    masking payload left out: it is addressed to each node)."""
    h = hashlib.sha256()
    for name, array in arrays.items():
        a = np.ascontiguousarray(array)
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.data)
    h.update(json.dumps({k: v for k, v in config.items() if k != PAYLOAD_KEY},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def mask_model(payload: str, context: Context, node: int, names: list[str],
               arrays: list[np.ndarray], weight: int, received: str,
               metrics: Mapping[str, object], config: Mapping[str, object]
               ) -> dict[str, np.ndarray]:
    """This node's trained model and the weighted sums of its train ``metrics``
    (without the weight: it is always summed), masked; the arrays to send.
    ``received`` is the :func:`model_digest` of the train message (signed in the
    consistency check), ``config`` the train message's config (with distributed DP,
    the noise the node adds its share of: :func:`strategies.dp_rounds.distributed_noise`).
    The fraction of values outside the clip range is summed as ``secagg-clipped``."""
    noise = distributed_noise(config, context.node_config)
    fraction = masking_noise_fraction(config)
    layout = Layout.of(names, arrays)
    # in the model's own float dtype (float32 for torch): quantize computes in float64
    flat = layout.flatten(arrays, np.result_type(*arrays))
    state = load_state(context)
    clip = float(state.get("params", {}).get("clip", np.inf))
    clipped = float(np.count_nonzero(np.abs(flat) > below_or_at(clip, flat.dtype))
                    / max(flat.size, 1))
    if clipped > 0:
        log(WARNING, "%.4f%% of model values exceed the clip range %g: raise it",
            100 * clipped, clip)
    sums = metric_sums({**metrics, CLIPPED_KEY: clipped}, weight)
    masked, header, state = client_mask(payload, state, node, flat, weight,
                                        model_digest=received, sums=sums, noise_levels=noise,
                                        noise_fraction=fraction)
    save_state(context, state)
    header["layout"] = layout_digest(layout)
    return {MASKED_KEY: masked, HEADER_KEY: header_array(header)}

