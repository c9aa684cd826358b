"""What a client node does in threshold Paillier mode, for the Flower adapters
(:mod:`strategies.threshold_message`, :mod:`strategies.threshold_legacy`): find its
keys, encrypt and sign its update, and answer the view, decrypt and combine stages
(:mod:`strategies.threshold_protocol`; the requests as :mod:`strategies.threshold_rounds`
has them). It opens the sealed model with
:func:`strategies.paillier_node.open_sealed_model`.

A node holds (node config first, else its key directory,
:func:`strategies.keyfiles.node_key_file`):

* the threshold public key: ``paillier-threshold-public-key`` or
  ``paillier-threshold.pub.json``;
* the clients' group key: ``paillier-group-key`` or ``paillier-group.key``;
* its identity key and the roster, as in masking (:mod:`strategies.secagg_node`), here
  required;
* if it is a decryptor, its key share: ``paillier-key-share``, else (in a simulation,
  whose nodes share one directory) ``paillier-threshold-share-<partition-id + 1>.json``
  if that file exists. A node without a share trains and signs but never decrypts.

Its round state (what it contributed, the view it signed, the view it decrypted, per
round) lives in ``context.state``, so it survives between messages and worker
restarts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Context

from .dp_rounds import MIN_NOISE_SETTING, paillier_client_noise
from .keyfiles import (GROUP_KEY_NAME, KeyNotFound, THRESHOLD_PUBLIC_NAME, load_group_key,
                       load_key_share, load_threshold_public_key, node_key_file,
                       threshold_share_name)
from .node_errors import NodeError
from .node_settings import node_setting
from .paillier_node import parse_round_config, round_masked
from .paillier_protocol import Layout, client_weight, encrypt_update
from .plaintext_proofs import ProvingEncryptor
from .secagg_identity import NodeIdentity
from . import secagg_node
from .secagg_node import node_identity
from .secure_sums import metric_sums
from .threshold_paillier import KeyShare, ThresholdEncryptor, ThresholdPublicKey
from .threshold_protocol import (Contribution, DecryptRequest, GroupKey, View,
                                 combine_sealed, decrypt_share, sign_view)
from .threshold_rounds import CombineRequest, Combined

PUBLIC_NODE_CONFIG = "paillier-threshold-public-key"
GROUP_NODE_CONFIG = "paillier-group-key"
SHARE_NODE_CONFIG = "paillier-key-share"
STATE_KEY = "threshold-paillier"
MIN_CONTRIBUTORS = "paillier-min-contributors"
ACCEPT_NOISE = "paillier-accept-server-noise"


@dataclass(frozen=True)
class NodeKeys:
    """One node's key material for threshold mode."""

    public: ThresholdPublicKey
    group: GroupKey
    identity: NodeIdentity
    share: KeyShare | None

    @property
    def share_index(self) -> int:
        """The node's share number, 0 if it holds none."""
        return self.share.index if self.share else 0


_KEYS: dict[tuple, tuple] = {}  # files -> (public key, group key, share)
_ENCRYPTORS: dict[str, ThresholdEncryptor] = {}


def _share_file(config: dict) -> Path | None:
    if config.get(SHARE_NODE_CONFIG):
        return node_key_file(config, SHARE_NODE_CONFIG, "", "fedapp keygen --threshold")
    if "partition-id" in config:
        try:
            return node_key_file(config, SHARE_NODE_CONFIG,
                                 threshold_share_name(int(config["partition-id"]) + 1), "")
        except (KeyNotFound, ValueError):
            return None
    return None


def node_keys(context: Context) -> NodeKeys:
    """This node's threshold public key, group key, identity and share (cached).

    Raises
    ------
    NodeError
        If the public key, group key, identity or roster is missing or does not fit
        the others (fail closed), naming the file and the fix.
    """
    config = dict(context.node_config)
    try:
        public_file = node_key_file(config, PUBLIC_NODE_CONFIG, THRESHOLD_PUBLIC_NAME,
                                    "fedapp keygen --threshold T --shares N")
        group_file = node_key_file(config, GROUP_NODE_CONFIG, GROUP_KEY_NAME,
                                   "fedapp keygen --threshold T --shares N")
        share_file = _share_file(config)
    except KeyNotFound as err:
        raise NodeError(f"threshold Paillier: {err}") from None
    identity = node_identity(context)  # read at every message, as masking does
    if identity is None:
        raise NodeError("threshold Paillier needs this node's identity key and the roster "
                        "(fedapp keygen --secagg; fedapp roster): it signs its contributions "
                        "and views with them")
    cache = (str(public_file), str(group_file), str(share_file))
    if cache not in _KEYS:
        try:
            public = load_threshold_public_key(public_file)
            group = load_group_key(group_file, public)
            share = load_key_share(share_file, public) if share_file else None
        except ValueError as err:  # the messages name files, never key material
            raise NodeError(f"threshold Paillier: {err}") from None
        _KEYS[cache] = (public, group, share)
    return NodeKeys(*_KEYS[cache][:2], identity, _KEYS[cache][2])


def load_state(context: Context) -> dict:
    return secagg_node.load_state(context, STATE_KEY)


def save_state(context: Context, state: dict) -> None:
    secagg_node.save_state(context, state, STATE_KEY)


def minimum_contributors(context: Context) -> int:
    minimum = node_setting(context.node_config, MIN_CONTRIBUTORS)
    if minimum < 1:
        raise NodeError(f"node setting {MIN_CONTRIBUTORS} must be >= 1, got {minimum}")
    return minimum


def minimum_noise(context: Context) -> float:
    """The node's ``dp-min-noise-multiplier``: the least distributed-DP noise it adds,
    and that an aggregate it decrypts must carry (0: none required)."""
    return node_setting(context.node_config, MIN_NOISE_SETTING)


def accepts_server_noise(context: Context) -> bool:
    """The node's ``paillier-accept-server-noise``: whether it decrypts an aggregate the
    server added central-DP noise to (proven to be noise the server knows, so it cannot
    isolate an update; it can shift the model and learn whether decoding succeeds)."""
    return node_setting(context.node_config, ACCEPT_NOISE)


def contribute(config: dict, names: list[str], arrays: list[np.ndarray], num_examples: int,
               keys: NodeKeys, context: Context, *, run: int,
               metrics: dict | None = None) -> Contribution:
    """This node's update under the threshold key, tagged under the group key, with its
    proof that the node knows what it encrypted, signed
    (:class:`strategies.threshold_protocol.Contribution`); remembers the contribution
    for the view stage. When the round asks for
    distributed DP, the node's share of the noise goes into its levels before
    encryption, as under the single-holder key
    (:func:`strategies.dp_rounds.paillier_client_noise`).

    Raises
    ------
    NodeError
        If the round's noise (none included) is below the node's
        ``dp-min-noise-multiplier``, or names another key.
    """
    params, fingerprint, unit, server_round = parse_round_config(config)
    try:
        noise = paillier_client_noise(config, context.node_config)
    except PermissionError as err:
        raise NodeError(str(err)) from None
    if fingerprint != keys.public.fingerprint:
        raise NodeError(f"the server uses key {fingerprint[:16]}..., this node holds the "
                        f"threshold key {keys.public.fingerprint[:16]}...: give every node the "
                        "run's keys")
    params.check_modulus_bits(keys.public.n_bits)
    if fingerprint not in _ENCRYPTORS:
        _ENCRYPTORS.clear()
        _ENCRYPTORS[fingerprint] = ThresholdEncryptor(keys.public)
    weight = client_weight(num_examples, unit)
    prover = ProvingEncryptor(_ENCRYPTORS[fingerprint])
    update = encrypt_update(arrays, Layout.of(names, arrays), weight, params, prover,
                            keys.group.tag_key(keys.public.n),
                            run=run, server_round=server_round, node=context.node_id,
                            sums=metric_sums(metrics or {}, weight), noise=noise,
                            masked=round_masked(config))
    state = load_state(context)
    state["own"] = {"run": run, "round": server_round, "digest": update.digest()}
    save_state(context, state)
    return Contribution.make(update, prover, keys.identity)


def answer_view(view: View, keys: NodeKeys, context: Context) -> bytes:
    """Sign the round's view (see :func:`strategies.threshold_protocol.sign_view`)."""
    state = load_state(context)
    signed = state.setdefault("signed", {})
    signature = sign_view(view, keys.identity, state.get("own", {}), signed,
                          minimum=minimum_contributors(context),
                          threshold=keys.public.threshold)
    save_state(context, state)
    return signature


def answer_decrypt(request: DecryptRequest, keys: NodeKeys, context: Context) -> bytes:
    """This decryptor's sealed partial decryption (NodeError without a share)."""
    if keys.share is None:
        raise NodeError("this node holds no key share: the server asked a node that is not "
                        "a decryptor")
    state = load_state(context)
    sealed = decrypt_share(keys.share, keys.group, keys.identity.roster, request,
                           state.setdefault("decrypted", {}),
                           minimum=minimum_contributors(context),
                           min_noise=minimum_noise(context),
                           accept_noise=accepts_server_noise(context))
    save_state(context, state)
    return sealed


def answer_combine(request: CombineRequest, keys: NodeKeys, context: Context) -> Combined:
    """As the combiner: the model sealed from ``T`` verified partials, and the nodes
    whose partials were left out (:func:`strategies.threshold_protocol.combine_sealed`,
    which also checks the aggregate's noise against the node's floor and consent)."""
    model, left_out = combine_sealed(keys.public, keys.group, request.aggregate,
                                     request.partials, min_noise=minimum_noise(context),
                                     accept_noise=accepts_server_noise(context))
    return Combined(model, left_out)
