"""The Paillier protocol's shared layer, for both Flower APIs: the server state both
strategies hold (:class:`PaillierRounds`), the round config the server sends and the
client reads, and what a client node does (find its private key, decrypt the global
model once per aggregate, encrypt its weighted update).

The Message-API adapter (:mod:`strategies.paillier_message`) and the legacy one
(:mod:`strategies.paillier_legacy`) only move these values in and out of their
envelopes; neither imports the other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from logging import WARNING
from pathlib import Path

import numpy as np
from flwr.app import Context
from flwr.common.logger import log

from .checks import is_int
from .dp_rounds import MIN_NOISE_SETTING, paillier_client_noise
from .encoding import EncodingParams
from .screening import RoundWatch
from .keyfiles import PRIVATE_NAME, load_private_key, node_key_file
from .node_errors import NodeError
from .paillier import Encryptor, PrivateKey, PublicKey
from .node_settings import node_setting
from .paillier_protocol import (ClientNoise, EncryptedModel, Layout, RoundSum, client_weight,
                                decrypt_model, encrypt_update)
from .paillier_tags import TagKey
from .threshold_paillier import ThresholdPublicKey
from .threshold_protocol import SEALED_KEY, GroupKey, open_model, seal_model
from .secure_sums import metric_sums

PRIVATE_KEY_NODE_CONFIG = "paillier-private-key"
WORKERS_NODE_CONFIG = "paillier-workers"
PREFIX = "paillier-"
RESUMED_KEY = f"{PREFIX}resumed-run"
MASKED_KEY = f"{PREFIX}masked"
CLIPPED_KEY = "paillier-clipped"  # the train metric: fraction of values outside the clip range
RELEASED = "released-"  # a key holder's release of the last aggregate's metric means



def encoding_for(public_key: PublicKey | ThresholdPublicKey, *, clip: float,
                 max_total_weight: int, weight_unit: int, value_bits: int) -> EncodingParams:
    """Check a Paillier strategy's arguments; the encoding its clients must use."""
    if not isinstance(public_key, (PublicKey, ThresholdPublicKey)):
        raise ValueError("public_key must be a strategies.paillier.PublicKey (or a "
                         "ThresholdPublicKey for threshold decryption); the server needs the "
                         "public key only")
    if weight_unit < 1:
        raise ValueError(f"weight_unit must be >= 1, got {weight_unit}")
    return EncodingParams.for_key(public_key.n_bits, max_total_weight, clip=clip,
                                  value_bits=value_bits)



class PaillierRounds:
    """What both Paillier strategies (Message API and legacy) hold: the public key, the
    encoding, the weight unit, the global model's layout and the round watch."""

    server_sees = "encrypted"  # for CentralDP: noise goes into the encrypted aggregate

    def _init_paillier(self, public_key: PublicKey, clip: float, max_total_weight: int,
                       weight_unit: int, value_bits: int, max_empty_rounds: int) -> None:
        self.watch = RoundWatch(max_empty_rounds)
        self.params = encoding_for(public_key, clip=clip, max_total_weight=max_total_weight,
                                   weight_unit=weight_unit, value_bits=value_bits)
        self.public_key = public_key
        self.weight_unit = weight_unit
        self._layout: Layout | None = None
        # distributed DP (set by the DP wrapper): the noise every update must carry
        self.client_noise: ClientNoise | None = None
        # threshold mode, set by the ServerApp when it resumes: the run whose sealed model
        # the first round sends
        self.resumed_run: int | None = None

    def _round_sum(self, server_round: int) -> RoundSum:
        return RoundSum(self.public_key, self.params, self._layout, server_round,
                        client_noise=self.client_noise)

    def _remember_layout(self, plain: dict[str, np.ndarray] | None,
                         arrays: list[np.ndarray] | None = None,
                         names: list[str] | None = None) -> None:
        """The layout of the global model sent this round: from the encrypted model's
        header (``plain`` holds its arrays), or of the initial plaintext model
        (``arrays`` named ``names``: public, random weights)."""
        if plain is not None:
            self._layout = EncryptedModel.from_arrays(plain, self.public_key).layout
        else:
            self._layout = Layout.of(names, arrays)

    def _describe(self) -> str:
        p = self.params
        return (f"key {self.public_key.fingerprint[:16]}..., {p.value_bits}-bit values in "
                f"[-{p.clip:g}, {p.clip:g}], {p.slots_per_plaintext} slots of {p.slot_bits} "
                f"bits per ciphertext, weight unit {self.weight_unit}")


def round_config(params: EncodingParams, fingerprint: str, weight_unit: int,
                 server_round: int, resumed: int | None = None, masked: bool = False) -> dict:
    """What a client needs to encrypt its update (sent in every train config), and in a
    resumed threshold run the run it resumes (whose sealed model it may open); with
    ``masked``, that the update's payload is masked (:mod:`strategies.ring_masks`)."""
    return {f"{PREFIX}fingerprint": fingerprint, f"{PREFIX}weight-unit": weight_unit,
            f"{PREFIX}round": server_round,
            **({RESUMED_KEY: str(resumed)} if resumed is not None else {}),
            **({MASKED_KEY: True} if masked else {}),
            **{f"{PREFIX}encoding-{k}": v for k, v in params.to_dict().items()}}


def round_masked(config: Mapping[str, object]) -> bool:
    """Whether the train config asks for a masked payload (:func:`round_config`)."""
    value = config.get(MASKED_KEY, False)
    if not isinstance(value, bool):
        raise ValueError(f"{MASKED_KEY} must be a bool, got {value!r}")
    return value


def resumed_run(config: Mapping[str, object]) -> int | None:
    """The run a resumed run's train config names (:func:`round_config`), or None."""
    value = config.get(RESUMED_KEY)
    if value is None:
        return None
    if not isinstance(value, str) or not value.isdigit() or int(value) >= 2 ** 64:
        raise ValueError(f"{RESUMED_KEY} must be a run id (decimal digits), got {value!r}")
    return int(value)



def parse_round_config(config: dict) -> tuple[EncodingParams, str, int, int]:
    """Inverse of :func:`round_config`; ``ValueError`` if absent or malformed
    (:class:`NodeError` if absent: the server runs no Paillier strategy)."""
    if f"{PREFIX}fingerprint" not in config:
        raise NodeError("this node encrypts its updates (Paillier client mod) but the server "
                         "sent no Paillier parameters: the server must run PaillierFedAvg or "
                         "ThresholdPaillierFedAvg (Message API), LegacyPaillierFedAvg or "
                         "LegacyThresholdPaillierFedAvg (legacy API), as the nodes' mod")
    enc = {k[len(f"{PREFIX}encoding-"):]: v for k, v in config.items()
           if k.startswith(f"{PREFIX}encoding-")}
    unit = config.get(f"{PREFIX}weight-unit")
    if not is_int(unit) or unit < 1:
        raise ValueError(f"{PREFIX}weight-unit must be a positive int, got {unit!r}")
    server_round = config.get(f"{PREFIX}round")
    if not is_int(server_round) or not 0 <= server_round < 2**64:
        raise ValueError(f"{PREFIX}round must be an unsigned 64-bit int, got {server_round!r}")
    return (EncodingParams.from_dict(enc), str(config[f"{PREFIX}fingerprint"]), unit,
            server_round)



# ------------------------------------------------------------------ client node
_KEYS: dict[str, PrivateKey] = {}
_ENCRYPTORS: dict[str, tuple[Encryptor, TagKey]] = {}
_DECRYPTED: dict[str, list[np.ndarray]] = {}



def node_private_key(context: Context) -> PrivateKey:
    """This node's private key (cached): the file its node config names, else
    ``paillier.key.json`` in its key directory.

    Raises
    ------
    strategies.keyfiles.KeyNotFound
        If there is no such file, saying where the node looked and what to do.
    """
    path = str(node_key_file(dict(context.node_config), PRIVATE_KEY_NODE_CONFIG, PRIVATE_NAME,
                             "fedapp keygen").resolve())
    if path not in _KEYS:
        _KEYS[path] = load_private_key(Path(path))
    return _KEYS[path]



def node_workers(context: Context) -> int | None:
    """Processes for encryption and decryption on this node (node config
    ``paillier-workers``; 0 means all cores)."""
    value = int(context.node_config.get(WORKERS_NODE_CONFIG, 1))
    return None if value == 0 else value



def decrypt_global_model(key: PrivateKey, arrays: dict[str, np.ndarray],
                         node_config: Mapping[str, object], workers: int | None
                         ) -> tuple[Layout, list[np.ndarray], dict[str, float]]:
    """The plaintext model inside an encrypted aggregate that arrived from the server,
    if it is an authentic aggregate of at least the node's ``paillier-min-contributors``
    updates (:func:`strategies.paillier_protocol.decrypt_model`), and what the node
    releases of its sums: the train metrics' weighted means over the aggregate's
    contributors (``released-<metric>``, with ``released-round``), for its next reply.

    The last result is cached: evaluate(r) and train(r+1) carry the same aggregate.

    Raises
    ------
    DecryptionRefused
        Whatever the cause once decryption started (one message: no plaintext bit).
    NodeError
        If the server added noise this node's settings do not accept.
    """
    model = EncryptedModel.from_arrays(arrays, key.public_key)
    minimum = node_setting(node_config, "paillier-min-contributors")
    if minimum < 1:
        raise NodeError(f"node setting paillier-min-contributors must be >= 1, got {minimum}")
    accept_noise = node_setting(node_config, "paillier-accept-server-noise")
    if model.server_noise and not accept_noise:
        raise NodeError("the server added central-DP noise to the encrypted model, which no "
                        "node can check: this node decrypts it only with its node setting "
                        "paillier-accept-server-noise=true (docs/threat-model.md)")
    floor = node_setting(node_config, MIN_NOISE_SETTING)
    carried = model.client_noise.multiplier(model.params.step) if model.client_noise else 0.0
    if carried < floor:
        raise NodeError(f"the encrypted model carries distributed-DP noise of multiplier "
                        f"{carried:.4g}, below this node's {MIN_NOISE_SETTING} {floor:g}: it "
                        "does not decrypt it")
    digest = model.digest()
    if digest not in _DECRYPTED:
        _DECRYPTED.clear()
        _DECRYPTED[digest] = decrypt_model(key, model, min_contributors=minimum,
                                           accept_noise=accept_noise, workers=workers)
    plain, sums = _DECRYPTED[digest]
    released = {f"{RELEASED}{k}": v / model.total_weight for k, v in sums.items()}
    if released:
        released[f"{RELEASED}round"] = model.server_round
    return model.layout, plain, released


def seal_global_model(key: PrivateKey, arrays: dict[str, np.ndarray],
                      node_config: Mapping[str, object], workers: int | None
                      ) -> dict[str, np.ndarray]:
    """Decrypt-once: the designated key holder decrypts the aggregate (with every check
    of :func:`decrypt_global_model`) and seals the model and the metric means it
    releases under the key holders' group key (:meth:`GroupKey.of_private_key`), for
    the other nodes to open with one AES pass."""
    _, plain, released = decrypt_global_model(key, arrays, node_config, workers)
    means = {k[len(RELEASED):]: v for k, v in released.items() if k != f"{RELEASED}round"}
    return seal_model(GroupKey.of_private_key(key),
                      EncryptedModel.from_arrays(arrays, key.public_key), plain, means)


_OPENED: dict[bytes, tuple] = {}  # (group key, sealed model) digest and run: what it opened to


def open_sealed_model(group_key: GroupKey, arrays: dict[str, np.ndarray], run: int,
                      resumed: int | None = None
                      ) -> tuple[Layout, list[np.ndarray], dict[str, float]]:
    """A sealed global model opened (cached: evaluate and the next train carry the same
    one), and the metric means it releases (``released-*``, with ``released-round``).
    ``resumed``: the run this one resumes (:func:`resumed_run`), whose sealed model is
    accepted too.

    Raises
    ------
    strategies.threshold_protocol.SealError
        If it is not this group key's, this run's, or was altered.
    """
    # keyed by the group key too: a hit must mean this key opened these bytes
    key = hashlib.sha256(group_key.secret + bytes(np.ascontiguousarray(
        arrays.get(SEALED_KEY, np.zeros(0))).data)).digest() + run.to_bytes(8, "big") \
        + (resumed or 0).to_bytes(8, "big")
    if key not in _OPENED:
        _OPENED.clear()
        layout, plain, means, server_round = open_model(group_key, arrays, run=run,
                                                        resumed=resumed)
        released = {f"{RELEASED}{k}": v for k, v in means.items()}
        if released:
            released[f"{RELEASED}round"] = server_round
        _OPENED[key] = (layout, plain, released)
    return _OPENED[key]


def encrypt_local_model(config: dict, names: list[str], arrays: list[np.ndarray],
                        num_examples: int, key: PrivateKey, *, run: int, node: int,
                        workers: int | None, metrics: Mapping[str, object] | None = None,
                        node_config: Mapping[str, object] | None = None
                        ) -> tuple[EncryptedModel, float]:
    """This node's trained model, encrypted as the round's config asks, weighted by
    its examples and tagged for ``(run, round, node)``, with its train ``metrics``
    (weight excluded) and the fraction of values outside the clip range
    (``paillier-clipped``) as weighted sums; returns the update and that fraction.
    When the round asks for distributed DP, the node's share of the noise goes in
    before encryption (:func:`strategies.dp_rounds.paillier_client_noise`, which
    checks it against the node's own ``dp-min-noise-multiplier``).

    Raises ``ValueError`` if the config holds no Paillier parameters (the server is
    not a Paillier strategy: never send plaintext then) or names another key.
    """
    params, fingerprint, unit, server_round = parse_round_config(config)
    noise = paillier_client_noise(config, node_config or {})
    if fingerprint != key.fingerprint:
        raise NodeError(f"the server uses key {fingerprint[:16]}..., this node holds "
                         f"{key.fingerprint[:16]}...: give every node the same key pair")
    params.check_modulus_bits(key.public_key.n_bits)
    layout = Layout.of(names, arrays)
    flat = layout.flatten(arrays)
    clipped = float(np.mean(np.abs(flat) > params.clip))
    if clipped > 0:
        log(WARNING, "%.4f%% of model values exceed the clip range %g: raise it",
            100 * clipped, params.clip)
    if key.fingerprint not in _ENCRYPTORS:
        _ENCRYPTORS[key.fingerprint] = (Encryptor(key.public_key, key),
                                        TagKey.from_private_key(key))
    encryptor, tag_key = _ENCRYPTORS[key.fingerprint]
    weight = client_weight(num_examples, unit)
    sums = metric_sums({**(metrics or {}), CLIPPED_KEY: clipped}, weight)
    update = encrypt_update(arrays, layout, weight, params, encryptor, tag_key, run=run,
                            server_round=server_round, node=node, workers=workers, sums=sums,
                            noise=noise)
    return update, clipped
