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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .checks import is_int
from .aggregation import InvalidUpdate, Layout  # noqa: F401  (Layout: part of this API)
from .encoding import EncodingParams, decode, encode, encode_noise, pack
from .paillier import (Encryptor, PrivateKey, PublicKey, aggregate_arrays,
                       check_ciphertext_array)

CIPHERTEXTS_KEY = "paillier-ciphertexts"
HEADER_KEY = "paillier-header"
MAX_HEADER_BYTES = 1 << 20  # the header beside the ciphertexts: encoding, layout, weight
FORMAT_VERSION = 1


@dataclass(frozen=True)
class EncryptedModel:
    """A weighted sum of one or more clients' models, encrypted.

    ``total_weight`` is the sum of the weights of the models inside; a single
    client's update has its own weight.
    """

    ciphertexts: np.ndarray
    fingerprint: str
    params: EncodingParams
    layout: Layout
    total_weight: int
    noise_offset: int = 0  # > 0 once the server added DP noise (encoding.encode_noise)

    def header(self) -> dict:
        header = {"version": FORMAT_VERSION, "fingerprint": self.fingerprint,
                  "encoding": self.params.to_dict(), "layout": self.layout.to_json(),
                  "total-weight": self.total_weight}
        if self.noise_offset:
            header["noise-offset"] = self.noise_offset
        return header

    def digest(self) -> str:
        """SHA-256 of header and ciphertexts: names this aggregate (e.g. for caching)."""
        h = hashlib.sha256(json.dumps(self.header(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.ciphertexts).data)
        return h.hexdigest()

    def to_arrays(self) -> dict[str, np.ndarray]:
        header = json.dumps(self.header(), sort_keys=True).encode()
        return {CIPHERTEXTS_KEY: self.ciphertexts,
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
        if set(arrays) != {CIPHERTEXTS_KEY, HEADER_KEY}:
            raise InvalidUpdate(f"expected arrays {CIPHERTEXTS_KEY} and {HEADER_KEY}, got "
                                f"{sorted(arrays)}")
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
            total = header["total-weight"]
            if not is_int(total) or total < 1:
                raise ValueError(f"total-weight must be a positive int, got {total!r}")
            offset = params.check_noise_offset(header.get("noise-offset", 0), total)
        except KeyError as err:
            raise InvalidUpdate(f"malformed header: no {err} entry") from None
        except (ValueError, TypeError, AttributeError, RecursionError) as err:  # deep JSON
            raise InvalidUpdate(f"malformed header: {err}") from None
        if fingerprint != public_key.fingerprint:
            raise InvalidUpdate(
                f"encrypted under key {str(fingerprint)[:16]}..., expected "
                f"{public_key.fingerprint[:16]}...: this node uses another key pair")
        if total > params.max_total_weight:
            raise InvalidUpdate(f"total weight {total} exceeds the encoding's maximum "
                                f"{params.max_total_weight}")
        try:
            cts = check_ciphertext_array(public_key, arrays[CIPHERTEXTS_KEY],
                                         params.num_plaintexts(layout.size))
        except ValueError as err:
            raise InvalidUpdate(str(err)) from None
        return EncryptedModel(cts, fingerprint, params, layout, total, offset)


def client_weight(num_examples: int, weight_unit: int) -> int:
    """A client's integer weight: its examples in units of ``weight_unit``, at least 1."""
    if weight_unit < 1:
        raise ValueError(f"weight unit must be >= 1, got {weight_unit}")
    return max(1, int(round(num_examples / weight_unit)))


def encrypt_update(arrays: Sequence[np.ndarray], layout: Layout, weight: int,
                   params: EncodingParams, encryptor: Encryptor, *, workers: int | None = 1,
                   rng: np.random.Generator | None = None) -> EncryptedModel:
    """One client's weighted, quantized, packed and encrypted model."""
    if not 1 <= weight <= params.max_total_weight:
        raise ValueError(f"weight {weight} is outside 1..{params.max_total_weight}: raise "
                         "the weight unit or the maximum total weight")
    plaintexts = encode(layout.flatten(arrays), params, weight, rng)
    cts = encryptor.encrypt_to_array(plaintexts, workers=workers)
    return EncryptedModel(cts, encryptor.public_key.fingerprint, params, layout, weight)


def aggregate(public_key: PublicKey, updates: Sequence[EncryptedModel], *,
              workers: int | None = 1) -> EncryptedModel:
    """Homomorphic sum of checked updates that share encoding and layout."""
    if not updates:
        raise ValueError("nothing to aggregate")
    first = updates[0]
    for u in updates[1:]:
        if u.params != first.params or u.layout != first.layout:
            raise InvalidUpdate("updates disagree on encoding or layout")
    total = sum(u.total_weight for u in updates)
    if total > first.params.max_total_weight:
        raise InvalidUpdate(f"total weight {total} exceeds the encoding's maximum "
                            f"{first.params.max_total_weight}")
    cts = aggregate_arrays(public_key, [u.ciphertexts for u in updates], workers=workers)
    return EncryptedModel(cts, first.fingerprint, first.params, first.layout, total,
                          sum(u.noise_offset for u in updates))


def add_noise(model: EncryptedModel, noise: np.ndarray, bound: float, encryptor: Encryptor, *,
              workers: int | None = 1, rng: np.random.Generator | None = None
              ) -> EncryptedModel:
    """``model`` with ``noise`` (value units, clipped to ``[-bound, bound]``) added to
    its weighted average, homomorphically: the server encrypts the encoded noise
    under the public key and multiplies it in. Central DP in Paillier mode.

    Raises
    ------
    encoding.EncodingOverflow
        If the noise does not fit the slots' headroom.
    """
    values, offset = encode_noise(noise, bound, model.total_weight, model.params, rng)
    noise_cts = encryptor.encrypt_to_array(pack(values, model.params), workers=workers)
    cts = aggregate_arrays(encryptor.public_key, [model.ciphertexts, noise_cts],
                           workers=workers)
    return dataclasses.replace(model, ciphertexts=cts,
                               noise_offset=model.noise_offset + offset)


class RoundSum:
    """The server's side of one round, whatever Flower API carries the updates.

    Each client may contribute one update (:meth:`claim`); an update must be
    encrypted under ``public_key`` with this round's ``params`` and the global
    model's ``layout``, and the total weight may not pass
    ``params.max_total_weight`` (:meth:`add`). Both raise :class:`InvalidUpdate`
    with the reason, so the caller can leave that client out and go on.
    """

    def __init__(self, public_key: PublicKey, params: EncodingParams,
                 layout: Layout | None) -> None:
        self.public_key, self.params, self.layout = public_key, params, layout
        self.updates: list[EncryptedModel] = []
        self.total_weight = 0
        self._clients: set[Hashable] = set()

    def claim(self, client: Hashable) -> None:
        """Note that ``client`` replied; a second reply in the round is refused."""
        if client in self._clients:
            raise InvalidUpdate("a second reply from this client in this round")
        self._clients.add(client)

    def add(self, arrays: Mapping[str, np.ndarray]) -> EncryptedModel:
        """Parse and check one update (see :meth:`EncryptedModel.from_arrays`), then keep it."""
        update = EncryptedModel.from_arrays(arrays, self.public_key)
        if update.noise_offset:
            raise InvalidUpdate("a client update carries a noise offset")
        if update.params != self.params:
            raise InvalidUpdate("encoded with other parameters than this round's")
        if update.layout != self.layout:
            raise InvalidUpdate("the model's arrays differ from the global model's")
        if self.total_weight + update.total_weight > self.params.max_total_weight:
            raise InvalidUpdate(f"its weight {update.total_weight} would take the total "
                                f"past {self.params.max_total_weight}: raise "
                                "max_total_weight or weight_unit")
        self.updates.append(update)
        self.total_weight += update.total_weight
        return update

    def result(self, *, workers: int | None = 1) -> EncryptedModel | None:
        """The encrypted sum of the kept updates, or ``None`` if there is none."""
        return aggregate(self.public_key, self.updates, workers=workers) if self.updates else None


def decrypt_model(private_key: PrivateKey, model: EncryptedModel, *,
                  workers: int | None = 1) -> list[np.ndarray]:
    """The weighted average inside ``model``, as arrays in its layout.

    Raises
    ------
    encoding.EncodingOverflow
        If the sum cannot have come from honest clients (never wraps silently).
    """
    if model.fingerprint != private_key.fingerprint:
        raise ValueError("this model was encrypted under another key pair")
    plaintexts = private_key.decrypt_array(model.ciphertexts, workers=workers)
    flat = decode(plaintexts, model.params, model.layout.size, model.total_weight,
                  model.noise_offset)
    return model.layout.unflatten(flat)
