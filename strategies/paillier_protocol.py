"""Paillier-encrypted weighted FedAvg, Flower-free: what a client sends, what the
server adds up, what a key holder decrypts.

A client quantizes its model (all arrays, flattened), multiplies it by its small
integer weight ``w_k = max(1, round(num_examples / weight_unit))``, packs and
encrypts it (:mod:`strategies.encoding`, :mod:`strategies.paillier`). The server
multiplies the ciphertexts of the valid replies, which adds the plaintexts, and
sums the weights. A key holder decrypts the sum and divides by the total weight:
``sum(w_k x_k) / sum(w_k)``, within ``EncodingParams.max_error()`` per value.
With ``weight_unit = 1`` that is exactly weighted FedAvg by number of examples; a
larger unit rounds the weights (fewer headroom bits, fewer bytes on the wire).

An :class:`EncryptedModel` travels as two uint8 arrays: the ciphertexts (one
fixed-width big-endian row each) and a JSON header (key fingerprint, encoding
parameters, the model's layout, the total weight). Nothing is pickled.

**Masked payload** (``masked=True``, the threshold mode's default): the levels are not
packed into Paillier plaintexts but masked with a fresh Ring-LWE secret
(:mod:`strategies.ring_masks`), and only the secret is encrypted (33 ciphertexts under
a 2048-bit key, whatever the model's size). Sums add the masked vectors modulo the
ring's ``2^k`` (:attr:`EncryptedModel.ring`: the fewest whole bytes that hold the slots'
sums) beside the ciphertexts; decrypting the sum of the secrets unmasks the sum of the
levels exactly. The masked vector travels as a third uint8 array, ``k / 8``
little-endian bytes a value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .checks import is_int
from .aggregation import InvalidUpdate, Layout  # noqa: F401  (Layout: part of this API)
from .discrete_gaussian import discrete_gaussian
from . import ring_masks
from .encoding import (EncodingOverflow, EncodingParams, decode, decode_sums, encode_noise, pack,
                       quantize)
from .paillier import (Encryptor, PrivateKey, PublicKey, aggregate_arrays,
                       check_ciphertext_array)
from .paillier_tags import TagKey, round_context
from .secure_sums import OFFSET, check_names, from_fixed, to_fixed

CIPHERTEXTS_KEY = "paillier-ciphertexts"
HEADER_KEY = "paillier-header"
MASKED_KEY = "paillier-masked"
MAX_HEADER_BYTES = 1 << 20  # the header beside the ciphertexts: encoding, layout, weight
FORMAT_VERSION = 2
CLIENT_TAIL_CLIP = 12.0  # distributed DP: each client's noise is clipped this many stds out


@dataclass(frozen=True)
class ClientNoise:
    """Distributed DP under Paillier: the noise each contributor adds to its levels
    before encrypting, a discrete Gaussian of std ``std`` levels clipped to
    ``[-bound, bound]`` (``bound = ceil(CLIENT_TAIL_CLIP std)``) and offset by ``bound``
    so that the slots stay non-negative. ``std`` is the round's total ``levels`` over
    ``sqrt(quorum)`` (:meth:`for_round`), so an aggregate of at least ``quorum``
    contributors carries at least the mechanism's noise; ``clip`` is the DP clipping
    norm the noise was sized for. Every contributor's tag binds it
    (:meth:`EncryptedModel.context`), so the server can neither change it nor pass off
    an aggregate of fewer contributors as complete."""

    std: float
    quorum: int
    clip: float

    @classmethod
    def for_round(cls, levels: float, quorum: int, clip: float) -> ClientNoise:
        """Each of at least ``quorum`` contributors' share of noise of std ``levels``."""
        return cls(float(levels) / math.sqrt(quorum), int(quorum), float(clip))

    def __post_init__(self) -> None:
        if not is_int(self.quorum) or self.quorum < 1:
            raise ValueError(f"the quorum must be a positive int, got {self.quorum!r}")
        for name in ("std", "clip"):
            value = getattr(self, name)
            if not isinstance(value, float) or not 0 < value < 2.0 ** 40:
                raise ValueError(f"the client noise's {name} must be a positive float below "
                                 f"2^40, got {value!r}")

    @property
    def bound(self) -> int:
        return math.ceil(CLIENT_TAIL_CLIP * self.std)

    def multiplier(self, step: float) -> float:
        """The noise multiplier an aggregate of ``quorum`` contributors carries."""
        return self.std * math.sqrt(self.quorum) * step / self.clip

    def to_dict(self) -> dict:
        return {"std": self.std, "quorum": self.quorum, "clip": self.clip}

    @classmethod
    def from_dict(cls, value: object) -> ClientNoise:
        if not isinstance(value, dict) or set(value) != {"std", "quorum", "clip"}:
            raise ValueError("client-noise must be an object of std, quorum and clip")
        return cls(value["std"], value["quorum"], value["clip"])


@dataclass(frozen=True)
class EncryptedModel:
    """A weighted sum of one or more clients' models, encrypted and tagged.

    ``ciphertexts`` holds the packed plaintexts (or, masked, the secrets' plaintexts),
    one row per metric sum and, last, the tag (:mod:`strategies.paillier_tags`).
    ``contributors`` maps each node inside to its weight; a single client's update
    names only its own node. ``run`` and ``server_round`` are the round the
    contributions were made for. ``masked`` is the sum of the masked levels and
    ``masks`` the number of secrets under it (contributors, and the server's noise):
    ``None`` and 0 for a model packed into Paillier plaintexts.
    """

    ciphertexts: np.ndarray
    fingerprint: str
    params: EncodingParams
    layout: Layout
    run: int
    server_round: int
    contributors: Mapping[int, int]
    noise_offset: int = 0  # the sum of the contributors' and the server's noise offsets
    sums: tuple[str, ...] = ()  # names of the metric sums, one plaintext row each
    client_noise: ClientNoise | None = None  # distributed DP: what each contributor added
    masked: np.ndarray | None = None
    masks: int = 0

    @property
    def total_weight(self) -> int:
        """The sum of the contributors' weights."""
        return sum(self.contributors.values())

    @property
    def server_noise(self) -> int:
        """The offset of noise the server added (central DP): what the contributors'
        own noise offsets do not account for. No key holder can check that noise."""
        own = self.client_noise.bound * len(self.contributors) if self.client_noise else 0
        return self.noise_offset - own

    def header(self) -> dict:
        header = {"version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                  "encoding": self.params.to_dict(), "layout": self.layout.to_json(),
                  "run": self.run, "round": self.server_round,
                  "contributors": {str(k): w for k, w in sorted(self.contributors.items())},
                  "sums": list(self.sums)}
        if self.noise_offset:
            header["noise-offset"] = self.noise_offset
        if self.client_noise:
            header["client-noise"] = self.client_noise.to_dict()
        if self.masks:
            header["ring-masks"] = {**self._ring_header(), "count": self.masks}
        return header

    @property
    def ring(self) -> ring_masks.Ring:
        """The masks' ring for this encoding (``ValueError`` if its sums do not fit)."""
        return ring_masks.Ring.for_levels(self.params.slot_bits)

    def _ring_header(self) -> dict:
        return {"degree": ring_masks.RING_DEGREE, "scale-bits": ring_masks.SCALE_BITS,
                "modulus-bits": self.ring.bits}

    def context(self) -> bytes:
        """What the tags (and, masked, the ring's public polynomials) bind: run, round,
        key, encoding, layout, the sums' names, the contributors' noise and the ring."""
        bound = [self.layout.to_json(), list(self.sums)]
        if self.client_noise:
            bound.append(self.client_noise.to_dict())
        if self.masks:
            bound.append(self._ring_header())
        return round_context(self.run, self.server_round, self.fingerprint,
                             self.params.to_dict(), bound)

    @property
    def payload_rows(self) -> int:
        """Plaintext rows before the sums: the packed model, or the masks' secret."""
        if self.masks:
            return ring_masks.secret_rows(self.params.plaintext_bits)
        return self.params.num_plaintexts(self.layout.size)

    @property
    def rows(self) -> int:
        """Plaintext rows: the payload, one per sum, and the tag."""
        return self.payload_rows + len(self.sums) + 1

    def digest(self) -> str:
        """SHA-256 of header, ciphertexts and masked vector: names this aggregate (e.g.
        for caching)."""
        h = hashlib.sha256(json.dumps(self.header(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.ciphertexts).data)
        if self.masked is not None:
            h.update(np.ascontiguousarray(self.masked, dtype="<u8").data)
        return h.hexdigest()

    def to_arrays(self) -> dict[str, np.ndarray]:
        header = json.dumps(self.header(), sort_keys=True).encode()
        masked = {} if self.masked is None else {MASKED_KEY: self.ring.to_bytes(self.masked)}
        return {CIPHERTEXTS_KEY: self.ciphertexts, **masked,
                HEADER_KEY: np.frombuffer(header, dtype=np.uint8).copy()}

    @staticmethod
    def is_encrypted(arrays: Mapping[str, object]) -> bool:
        return CIPHERTEXTS_KEY in arrays and HEADER_KEY in arrays

    @staticmethod
    def from_arrays(arrays: Mapping[str, np.ndarray], public_key: PublicKey) -> EncryptedModel:
        """Parse and check what arrived over the network.

        Raises
        ------
        InvalidUpdate
            On any malformed part, with the reason.
        """
        if set(arrays) - {MASKED_KEY} != {CIPHERTEXTS_KEY, HEADER_KEY}:
            raise InvalidUpdate(f"expected arrays {CIPHERTEXTS_KEY} and {HEADER_KEY} (and "
                                f"{MASKED_KEY} for a masked model), got {sorted(arrays)}")
        raw = arrays[HEADER_KEY]
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 1 \
                or raw.size > MAX_HEADER_BYTES:
            raise InvalidUpdate("the header must be a 1-D uint8 array of at most 1 MiB")
        try:
            header = json.loads(raw.tobytes().decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError(f"expected a JSON object, got {type(header).__name__}")
            if header.get("version") != FORMAT_VERSION:
                raise ValueError(f"format version {header.get('version')!r}, expected {FORMAT_VERSION}")
            fingerprint = header["fingerprint"]
            params = EncodingParams.from_dict(header["encoding"])
            params.check_modulus_bits(public_key.n_bits)  # else no one could decode the sum
            layout = Layout.from_json(header["layout"])
            run, server_round = header["run"], header["round"]
            for name, value in (("run", run), ("round", server_round)):
                if not is_int(value) or not 0 <= value < 2**64:
                    raise ValueError(f"{name} must be an unsigned 64-bit int, got {value!r}")
            contributors = _contributors(header["contributors"], params)
            offset = params.check_noise_offset(header.get("noise-offset", 0),
                                               sum(contributors.values()))
            sums = tuple(check_names(header.get("sums", [])))
            noise = header.get("client-noise")
            noise = ClientNoise.from_dict(noise) if noise is not None else None
            masks = header.get("ring-masks")
        except KeyError as err:
            raise InvalidUpdate(f"malformed header: no {err} entry") from None
        except (ValueError, TypeError, AttributeError, RecursionError) as err:  # deep JSON
            raise InvalidUpdate(f"malformed header: {err}") from None
        if fingerprint != public_key.fingerprint:
            raise InvalidUpdate(
                f"encrypted under key {str(fingerprint)[:16]}..., expected "
                f"{public_key.fingerprint[:16]}...: this node uses another key pair")
        model = EncryptedModel(np.zeros((0, 0), np.uint8), fingerprint, params, layout, run,
                               server_round, contributors, offset, sums, noise)
        if masks is not None:
            try:
                model = dataclasses.replace(model, masks=model._masks(masks))
            except (ValueError, TypeError) as err:
                raise InvalidUpdate(f"malformed header: {err}") from None
        if model.server_noise < 0:
            raise InvalidUpdate(f"noise offset {offset} is below the contributors' own")
        if bool(model.masks) != (MASKED_KEY in arrays):
            raise InvalidUpdate(f"the header and the arrays disagree on whether the model is "
                                f"masked ({MASKED_KEY})")
        try:
            cts = check_ciphertext_array(public_key, arrays[CIPHERTEXTS_KEY], model.rows)
        except ValueError as err:
            raise InvalidUpdate(str(err)) from None
        try:
            masked = model.ring.from_bytes(arrays[MASKED_KEY], layout.size) if model.masks \
                else None
        except ValueError as err:
            raise InvalidUpdate(str(err)) from None
        return dataclasses.replace(model, ciphertexts=cts, masked=masked)

    def _masks(self, value: object) -> int:
        """The header's ``ring-masks`` entry checked against this encoding's ring: the
        number of secrets."""
        check_maskable(self.params)
        expected = self._ring_header()
        if not isinstance(value, dict) or set(value) != {*expected, "count"} \
                or {k: value[k] for k in expected} != expected:
            raise ValueError(f"ring-masks must be {expected} with a count")
        count = value["count"]
        if not is_int(count) or not 1 <= count <= ring_masks.MAX_CONTRIBUTORS:
            raise ValueError(f"ring-masks count must be in 1..{ring_masks.MAX_CONTRIBUTORS}, "
                             f"got {count!r}")
        return int(count)


def check_maskable(params: EncodingParams) -> None:
    """``ValueError`` unless sums of ``params``' slots fit the ring masks' messages."""
    try:
        ring_masks.Ring.for_levels(params.slot_bits)
    except ValueError:
        raise ValueError(f"{params.slot_bits}-bit slots do not fit the masked payload (at "
                         f"most {63 - ring_masks.SCALE_BITS} bits): lower the maximum total "
                         "weight or the value bits") from None


def _contributors(value: object, params: EncodingParams) -> dict[int, int]:
    """The header's ``{node: weight}``, checked (``ValueError`` with the reason)."""
    if not isinstance(value, dict) or not value:
        raise ValueError("contributors must be a non-empty object of node id: weight")
    out = {}
    for key, weight in value.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < 2**64):
            raise ValueError(f"contributor {key!r} is not a node id")
        if not is_int(weight) or weight < 1:
            raise ValueError(f"the weight of node {key} must be a positive int, got {weight!r}")
        out[int(key)] = weight
    if sum(out.values()) > params.max_total_weight:
        raise ValueError(f"total weight {sum(out.values())} exceeds the encoding's maximum "
                         f"{params.max_total_weight}")
    return out


def client_weight(num_examples: int, weight_unit: int) -> int:
    """A client's integer weight: its examples in units of ``weight_unit``, at least 1."""
    if weight_unit < 1:
        raise ValueError(f"weight unit must be >= 1, got {weight_unit}")
    return max(1, int(round(num_examples / weight_unit)))


def encrypt_update(arrays: Sequence[np.ndarray], layout: Layout, weight: int,
                   params: EncodingParams, encryptor: Encryptor, tag_key: TagKey, *,
                   run: int, server_round: int, node: int, workers: int | None = 1,
                   rng: np.random.Generator | None = None,
                   sums: Mapping[str, float] | None = None,
                   noise: ClientNoise | None = None, masked: bool = False) -> EncryptedModel:
    """One client's weighted, quantized, packed, tagged and encrypted model, bound to
    ``(run, server_round, node)``, with ``sums`` (metrics within
    :func:`strategies.secure_sums.clamp`, already weighted) one per plaintext row as
    ``to_fixed(v) + 2^63``: a sum of up to ``2^16`` contributors is below ``2^80``, far
    inside a plaintext, and the key holders release only the round's sums. With
    ``noise`` (distributed DP), its share of discrete Gaussian noise is added to the
    levels before packing, so the tag covers it. With ``masked``, the levels are masked
    under a fresh ring secret and the secret is what is packed and encrypted (see the
    module docstring)."""
    if not 1 <= weight <= params.max_total_weight:
        raise ValueError(f"weight {weight} is outside 1..{params.max_total_weight}: raise "
                         "the weight unit or the maximum total weight")
    if masked:
        check_maskable(params)
    names = sorted(sums or {})
    check_names(names)
    model = EncryptedModel(np.zeros((0, 0), np.uint8), encryptor.public_key.fingerprint,
                           params, layout, run, server_round, {node: weight}, sums=tuple(names),
                           noise_offset=noise.bound if noise else 0, client_noise=noise,
                           masks=int(masked))
    levels = quantize(layout.flatten(arrays), params, weight, rng)
    if noise:
        shifted, _ = encode_noise(discrete_gaussian(noise.std, layout.size), noise.bound,
                                  weight, params)
        levels = levels + shifted
    plaintexts, vector = payload(model, levels)
    model = dataclasses.replace(model, masked=vector)
    plaintexts += [to_fixed(sums[k]) + OFFSET for k in names]
    plaintexts.append(tag_key.tag(plaintexts, model.context(), node, weight))
    cts = encryptor.encrypt_to_array(plaintexts, workers=workers)
    return dataclasses.replace(model, ciphertexts=cts)


def payload(model: EncryptedModel, levels: np.ndarray) -> tuple[list[int], np.ndarray | None]:
    """The plaintexts that carry ``levels`` (slot values) in ``model``'s payload, and the
    masked vector: the levels packed (``None``), or masked under a fresh ring secret
    whose plaintexts these are."""
    if not model.masks:
        return pack(levels, model.params), None
    secret = ring_masks.new_secret()
    masked = model.ring.mask(levels.astype(np.int64), secret, model.context())
    return ring_masks.secret_plaintexts(secret, model.params.plaintext_bits), masked


def aggregate(public_key: PublicKey, updates: Sequence[EncryptedModel], *,
              workers: int | None = 1) -> EncryptedModel:
    """Homomorphic sum of checked updates of one round that share encoding and layout
    and have no contributor in common."""
    if not updates:
        raise ValueError("nothing to aggregate")
    first = updates[0]
    contributors: dict[int, int] = {}
    for u in updates:
        if u.context() != first.context():
            raise InvalidUpdate("updates disagree on round, encoding or layout")
        if contributors.keys() & u.contributors.keys():
            raise InvalidUpdate("a node contributes twice")
        contributors.update(u.contributors)
    if sum(contributors.values()) > first.params.max_total_weight:
        raise InvalidUpdate(f"total weight {sum(contributors.values())} exceeds the "
                            f"encoding's maximum {first.params.max_total_weight}")
    cts = aggregate_arrays(public_key, [u.ciphertexts for u in updates], workers=workers)
    masked = first.ring.add([u.masked for u in updates]) if first.masks else None
    return dataclasses.replace(first, ciphertexts=cts, contributors=contributors,
                               noise_offset=sum(u.noise_offset for u in updates),
                               masked=masked, masks=sum(u.masks for u in updates))


def add_noise(model: EncryptedModel, noise: np.ndarray, bound: int, encryptor: Encryptor, *,
              workers: int | None = 1) -> EncryptedModel:
    """``model`` with the integer ``noise`` (in levels of the sum, clipped to
    ``[-bound, bound]``) added to its sum, homomorphically: the server encrypts the
    encoded noise under the public key and multiplies it in. Central DP in Paillier
    mode.

    Raises
    ------
    encoding.EncodingOverflow
        If the noise does not fit the slots' headroom.
    """
    if model.masks:
        raise ValueError("noise for a masked model is masked by its maker, as the threshold "
                         "mode's server noise is (strategies.threshold_protocol.ServerNoise)")
    values, offset = encode_noise(noise, bound, model.total_weight, model.params)
    # the sums and the tag are left as they are
    plaintexts = pack(values, model.params) + [0] * (len(model.sums) + 1)
    noise_cts = encryptor.encrypt_to_array(plaintexts, workers=workers)
    cts = aggregate_arrays(encryptor.public_key, [model.ciphertexts, noise_cts],
                           workers=workers)
    return dataclasses.replace(model, ciphertexts=cts,
                               noise_offset=model.noise_offset + offset)


class RoundSum:
    """The server's side of one round, whatever Flower API carries the updates.

    Each node may contribute one update (:meth:`add`): encrypted under ``public_key``
    with this round's ``params`` and the global model's ``layout``, made for this
    round and by the node that sent it, and the total weight may not pass
    ``params.max_total_weight``. :meth:`add` raises :class:`InvalidUpdate` with the
    reason, so the caller can leave that node out and go on. Key holders refuse to
    decrypt a sum of fewer than ``min_contributors`` updates, so :meth:`result`
    makes none.

    With ``client_noise`` (distributed DP) every update must carry exactly that noise,
    and the sum needs at least its quorum of contributors. With ``masked`` every update
    must be masked under one secret (:mod:`strategies.ring_masks`), else none may be.
    """

    def __init__(self, public_key: PublicKey, params: EncodingParams, layout: Layout | None,
                 server_round: int, min_contributors: int = 2,
                 client_noise: ClientNoise | None = None, masked: bool = False) -> None:
        self.public_key, self.params, self.layout = public_key, params, layout
        self.server_round, self.client_noise = server_round, client_noise
        self.masked = masked
        self.min_contributors = max(min_contributors, client_noise.quorum if client_noise
                                    else 0)
        self.updates: list[EncryptedModel] = []
        self.total_weight = self.noise_offset = 0
        self._nodes: set[int] = set()

    def add(self, node: int, arrays: Mapping[str, np.ndarray]) -> EncryptedModel:
        """:meth:`check` one update of ``node``, then :meth:`keep` it."""
        return self.keep(self.check(node, arrays))

    def check(self, node: int, arrays: Mapping[str, np.ndarray]) -> EncryptedModel:
        """Parse and check one update of ``node`` (see :meth:`EncryptedModel.from_arrays`)
        against the round and what it keeps, without keeping it (a caller with more
        checks keeps it after them); a second reply of a node in the round is refused,
        even after a bad first one."""
        if node in self._nodes:
            raise InvalidUpdate("a second reply from this node in this round")
        self._nodes.add(node)
        update = EncryptedModel.from_arrays(arrays, self.public_key)
        if update.client_noise != self.client_noise:
            raise InvalidUpdate(f"the update carries distributed-DP noise "
                                f"{_described(update.client_noise)}, the round asks for "
                                f"{_described(self.client_noise)}")
        if update.server_noise:
            raise InvalidUpdate("a client update carries a noise offset of its own")
        if update.masks != int(self.masked):
            raise InvalidUpdate(f"the update is {_payload(update.masks)}, the round asks for "
                                f"{_payload(int(self.masked))}")
        if dict(update.contributors) != {node: update.total_weight}:
            raise InvalidUpdate(f"the update names nodes {sorted(update.contributors)}, sent "
                                f"by node {node}: a node may only answer for itself")
        if update.server_round != self.server_round:
            raise InvalidUpdate(f"the update was made for round {update.server_round}, this "
                                f"is round {self.server_round}")
        if self.updates and update.run != self.updates[0].run:
            raise InvalidUpdate("the update was made for another run")
        if update.params != self.params:
            raise InvalidUpdate("encoded with other parameters than this round's")
        if update.layout != self.layout:
            raise InvalidUpdate("the model's arrays differ from the global model's")
        if self.updates and update.sums != self.updates[0].sums:
            raise InvalidUpdate(f"metric sums {list(update.sums)[:10]} differ from the "
                                f"round's {list(self.updates[0].sums)[:10]}")
        if self.total_weight + update.total_weight > self.params.max_total_weight:
            raise InvalidUpdate(f"its weight {update.total_weight} would take the total "
                                f"past {self.params.max_total_weight}: raise "
                                "max_total_weight or weight_unit")
        try:
            self.params.check_noise_offset(self.noise_offset + update.noise_offset,
                                           self.total_weight + update.total_weight)
        except EncodingOverflow:
            raise InvalidUpdate("its noise would take the sum out of its slots: raise "
                                "max_total_weight (more headroom bits)") from None
        return update

    def keep(self, update: EncryptedModel) -> EncryptedModel:
        """Count a checked update (:meth:`check`) in the round's sum."""
        self.updates.append(update)
        self.total_weight += update.total_weight
        self.noise_offset += update.noise_offset
        return update

    def result(self, *, workers: int | None = 1) -> EncryptedModel | None:
        """The encrypted sum of the kept updates, or ``None`` if there are fewer than
        ``min_contributors`` (logged by the caller: the model stays as it was)."""
        if len(self.updates) < max(1, self.min_contributors):
            return None
        return aggregate(self.public_key, self.updates, workers=workers)


def _payload(masks: int) -> str:
    return {0: "packed into Paillier plaintexts", 1: "masked under one ring secret"}.get(
        masks, f"masked under {masks} ring secrets")


def _described(noise: ClientNoise | None) -> str:
    return "none" if noise is None else (f"of std {noise.std:.6g} levels for a quorum of "
                                         f"{noise.quorum}")


class DecryptionRefused(ValueError):
    """A key holder will not decrypt this: always the same message, whatever the cause
    (which could tell the server something about the plaintext)."""

    def __init__(self) -> None:
        super().__init__("decryption refused: the encrypted model is not an authentic "
                         "aggregate of this federation's updates")


def decrypt_model(private_key: PrivateKey, model: EncryptedModel, *, min_contributors: int = 2,
                  accept_noise: bool = False, workers: int | None = 1
                  ) -> tuple[list[np.ndarray], dict[str, float]]:
    """The weighted average inside ``model``, as arrays in its layout, and its sums
    (metrics, already weighted by their senders), once its tag shows it is an
    aggregate of exactly the contributors its header names.

    Parameters
    ----------
    min_contributors
        Refuse a model of fewer contributors (1: a single update may be decrypted).
        A model whose contributors added distributed-DP noise also needs the quorum
        that noise was shared among (:class:`ClientNoise`, bound by the tag).
    accept_noise
        Decrypt a model the server added central-DP noise to, whose tag cannot hold
        (see :mod:`strategies.paillier_tags`); without it such a model is refused.

    Raises
    ------
    DecryptionRefused
        If the model has too few contributors, noise not accepted, a tag that does not
        check, or a sum out of range. The cause is not told apart: from the ciphertexts
        on, every failure is this one error, so a refusal carries no plaintext bit.
    ValueError
        If the model is under another key (public information).
    """
    if model.fingerprint != private_key.fingerprint:
        raise ValueError("this model was encrypted under another key pair")
    n = len(model.contributors)
    quorum = model.client_noise.quorum if model.client_noise else 0
    if n < max(min_contributors, quorum) or (model.server_noise and not accept_noise):
        raise DecryptionRefused()
    try:
        plaintexts = private_key.decrypt_array(model.ciphertexts, workers=workers)
    except ValueError:  # a ciphertext outside the key's subgroup
        raise DecryptionRefused() from None
    return read_aggregate(model, plaintexts, TagKey.from_private_key(private_key))


def read_aggregate(model: EncryptedModel, plaintexts: Sequence[int], tag_key: TagKey
                   ) -> tuple[list[np.ndarray], dict[str, float]]:
    """The weighted average and the sums inside ``model``'s decrypted ``plaintexts``,
    once the tag (the last plaintext) shows it is an aggregate of exactly the
    contributors the header names (unless the server added noise, which no tag
    covers: the callers decide whether to accept that).

    Raises
    ------
    DecryptionRefused
        For a tag that does not check or a sum out of range, not told apart.
    """
    n = len(model.contributors)
    try:
        *plaintexts, tag = plaintexts
        if not model.server_noise and not tag_key.verify(
                plaintexts, tag, model.context(), model.contributors):
            raise DecryptionRefused()
        rows = plaintexts[len(plaintexts) - len(model.sums):]
        if any(not 0 <= int(p) < n << 64 for p in rows):
            raise DecryptionRefused()
        payload = plaintexts[:len(plaintexts) - len(model.sums)]
        if model.masks:
            secret = ring_masks.secret_sum(payload, model.masks, model.params.plaintext_bits)
            levels = model.ring.unmask(model.masked, secret, model.masks, model.context(),
                                       model.layout.size)
            flat = decode_sums(levels, model.params, model.total_weight, model.noise_offset)
        else:
            flat = decode(payload, model.params, model.layout.size, model.total_weight,
                          model.noise_offset)
    except ValueError:  # EncodingOverflow, ring_masks.MaskError
        raise DecryptionRefused() from None
    sums = {k: from_fixed(int(p) - n * OFFSET) for k, p in zip(model.sums, rows, strict=True)}
    return model.layout.unflatten(flat), sums
