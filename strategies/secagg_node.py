"""What a client node does in masked secure aggregation, for both Flower APIs: find
its authentication key (fail closed without one), answer the key stages from its
state in ``context.state``, and mask its weighted update.

The Message-API mod (:mod:`strategies.secagg_message`) and the legacy one
(:mod:`strategies.secagg_legacy`) only move these values in and out of their
envelopes."""

from __future__ import annotations

import json
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Context
from flwr.common.logger import log

from .aggregation import Layout
from .keyfiles import AUTH_KEY_NAME, KeyNotFound, load_auth_key, node_key_file
from .secagg_masks import SecAggError
from .node_errors import NodeError
from .secagg_protocol import HEADER_KEY, MASKED_KEY, PAYLOAD_KEY, client_mask, client_step
from .secagg_wire import header_array, layout_digest

STATE_KEY = "secagg"  # the ConfigRecord in context.state holding this node's round state
AUTH_KEY_NODE_CONFIG = "secagg-auth-key"


ALLOW_UNAUTHENTICATED = "secagg-allow-unauthenticated"


_WARNED: set[str] = set()



def allows_unauthenticated(context: Context) -> bool:
    """Whether the node or run config says ``secagg-allow-unauthenticated = true``."""
    return any(config.get(ALLOW_UNAUTHENTICATED) in (True, "true")
               for config in (context.node_config, context.run_config))



def node_auth_key(context: Context) -> bytes | None:
    """This node's authentication key (node config ``secagg-auth-key``, else
    ``secagg-auth.key`` in its key directory).

    Returns None, with a one-time warning, only if there is none and the node or run
    config allows unauthenticated key exchange (``secagg-allow-unauthenticated``).

    Raises
    ------
    NodeError
        If there is no key and nothing allows running without one (fail closed), or
        the file the node config names does not exist.
    """
    try:
        path = node_key_file(dict(context.node_config), AUTH_KEY_NODE_CONFIG, AUTH_KEY_NAME,
                             "fedapp keygen --secagg")
    except KeyNotFound as err:
        if AUTH_KEY_NODE_CONFIG in context.node_config or not allows_unauthenticated(context):
            raise NodeError(
                f"secure aggregation needs the federation's authentication key: {err}. To run "
                "without one, trusting the server to relay keys honestly, set "
                f"{ALLOW_UNAUTHENTICATED}=true in the run config") from None
        if "auth" not in _WARNED:
            _WARNED.add("auth")
            log(WARNING, "Secure aggregation without an authentication key (%s = true): the "
                "server is trusted to relay keys honestly", ALLOW_UNAUTHENTICATED)
        return None
    return load_auth_key(path)



def load_state(context: Context) -> dict:
    record = context.state.config_records.get(STATE_KEY)
    return json.loads(record["state"]) if record and "state" in record else {}



def save_state(context: Context, state: dict) -> None:
    context.state.config_records[STATE_KEY] = ConfigRecord({"state": json.dumps(state)})



def answer_stage(payload: object, context: Context, node: int) -> str:
    """Answer a key stage (advertise, share, unmask) on this node."""
    if not isinstance(payload, str):
        raise SecAggError("the secure-aggregation request holds no payload")
    reply, state = client_step(payload, load_state(context), node, node_auth_key(context))
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



def mask_model(payload: str, context: Context, node: int, names: list[str],
               arrays: list[np.ndarray], weight: int) -> tuple[dict[str, np.ndarray], float]:
    """This node's trained model, masked; returns the arrays to send and the fraction
    of values outside the clip range."""
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
    masked, header, state = client_mask(payload, state, node, flat, weight)
    save_state(context, state)
    header["layout"] = layout_digest(layout)
    return {MASKED_KEY: masked, HEADER_KEY: header_array(header)}, clipped

