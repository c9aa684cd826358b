"""Threshold Paillier tests of both Flower APIs, on the session's 2-of-3 key
(``threshold_key_dir``): nodes 101, 202 and 303 hold shares 1-3, node 404 none; every
node has its identity key, the roster and the group key. Their models and weights are
the masking tests' (:mod:`tests.helpers.masking`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from strategies.keyfiles import (GROUP_KEY_NAME, THRESHOLD_PUBLIC_NAME, load_group_key,
                                 load_key_share, threshold_share_name)
from strategies.threshold_node import NodeKeys
from strategies.threshold_paillier import KeyShare
from strategies.threshold_protocol import (DecryptRequest, GroupKey, _partial_context,
                                           _partial_from_bytes, _partial_to_bytes,
                                           check_request)
from tests.helpers import IDENTITY
from tests.helpers.masking import expected, local_model, weight

__all__ = ["NODES", "HOLDERS", "expected", "local_model", "weight", "node_config",
           "forged_partial", "held_secrets"]

NODES = [101, 202, 303, 404]
HOLDERS = {101: 1, 202: 2, 303: 3}


def node_config(keydir: Path, node: int) -> dict:
    """The node config of one of :data:`NODES`: its identity, the key files, its share."""
    config = {**IDENTITY.node_config(node),
              "paillier-threshold-public-key": str(keydir / THRESHOLD_PUBLIC_NAME),
              "paillier-group-key": str(keydir / GROUP_KEY_NAME)}
    if node in HOLDERS:
        config["paillier-key-share"] = str(keydir / threshold_share_name(HOLDERS[node]))
    return config


def forged_partial(keys: NodeKeys, request: DecryptRequest, sealed: bytes) -> bytes:
    """What a decryptor holding the group key could send instead of its sealed partial
    ``sealed`` of ``request``: the same, one value changed, sealed again."""
    model = check_request(keys.public, keys.identity.roster, request, minimum=2)
    context, width = _partial_context(model), keys.public.ciphertext_bytes
    partial = _partial_from_bytes(keys.group.open("partial", context, sealed), width)
    forged = dataclasses.replace(partial, values=(
        partial.values[0] * 4 % keys.public.nsquare, *partial.values[1:]))
    return keys.group.seal("partial", context, _partial_to_bytes(forged, width))


def held_secrets(roots: list, keydir: Path, skip: tuple[type, ...] = ()) -> list[str]:
    """Types of what is reachable from ``roots`` (attributes, containers; not below
    instances of ``skip``) and holds a key share, the group key or their secret bytes."""
    group = load_group_key(keydir / GROUP_KEY_NAME)
    shares = [load_key_share(keydir / threshold_share_name(i)) for i in (1, 2, 3)]
    secrets = [group.secret, *(int(s.secret).to_bytes(600, "big").lstrip(b"\0")
                               for s in shares)]
    found, seen, stack = [], set(), list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if skip and isinstance(obj, skip):
            continue
        if isinstance(obj, (KeyShare, GroupKey)):
            found.append(type(obj).__name__)
        elif isinstance(obj, (bytes, bytearray, np.ndarray)):
            raw = obj.tobytes() if isinstance(obj, np.ndarray) else bytes(obj)
            found += [type(obj).__name__ for s in secrets if s in raw]
        elif isinstance(obj, dict):
            stack += list(obj.keys()) + list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack += list(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack += list(vars(obj).values())
    return found
