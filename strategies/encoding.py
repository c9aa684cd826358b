"""Fixed-point encoding and slot packing of model updates for additive encryption.

Flower-free and key-free: this module turns float vectors into big non-negative
integers whose sum (as computed homomorphically by Paillier, or by masking) can be
turned back into a weighted average, and it refuses to decode a sum that cannot be
right.

The scheme, in the style of BatchCrypt (Zhang et al., USENIX ATC 2020):

1. **Clip** every value to ``[-clip, clip]``.
2. **Quantize** with stochastic rounding to ``value_bits``-bit integers using offset
   encoding: ``x`` maps to ``t = (x + clip) / scale`` with
   ``scale = 2 * clip / (2**value_bits - 1)``, and ``q = floor(t + u)`` with ``u``
   uniform in ``[0, 1)``. Then ``E[q] = t`` (unbiased) and ``|q - t| < 1``, and
   ``q`` lies in ``[0, 2**value_bits - 1]``: no sign to worry about in a sum.
3. **Weight**: client ``k`` sends ``w_k * q_k`` where ``w_k`` is a small positive
   integer weight (its number of examples, or that number divided by a unit the
   server announces and rounded, or 1 for unweighted FedAvg). The *total weight*
   ``W = sum(w_k)`` of the clients whose updates are summed is what the decoder
   divides by.
4. **Pack** ``slots_per_plaintext`` of these integers into one plaintext integer,
   ``slot_bits`` bits each, slot 0 in the most significant position. A slot holds
   ``value_bits + headroom_bits`` bits or more, and ``headroom_bits =
   ceil(log2(max_total_weight))``: a sum of weighted values of total weight ``W <=
   2**headroom_bits`` is at most ``W * (2**value_bits - 1) < 2**slot_bits``, so it
   never carries into its neighbor slot. The packed integer has at most
   ``slot_bits * slots_per_plaintext <= n_bits - 1`` bits, so it (and the sum of
   all clients' packed integers) stays below a Paillier modulus of ``n_bits`` bits.
5. **Decode** the summed plaintexts: every slot must be at most
   ``W * (2**value_bits - 1)``, the spare bits above the top slot and the unused
   slots of the last plaintext must be zero; otherwise decoding raises
   :class:`EncodingOverflow` instead of returning wrapped garbage. The weighted
   average is ``S / W * scale - clip``.

Wire cost: a ``n_bits``-bit Paillier ciphertext has ``2 * n_bits`` bits and carries
``slots_per_plaintext`` values, so each doubling of the maximum total weight costs
one bit per slot. With a 2048-bit key and ``value_bits=16``, a maximum total
weight of 128 gives 23-bit slots, 89 per plaintext, about 46 ciphertext bits per
value (1.44x float32); a maximum total weight of 65,536 (weights equal to example
counts on MNIST) gives 32-bit slots, 63 per plaintext, 2.03x float32.

Caveat: decoding catches sums that overflow what honest clients can produce, but a
client that encrypts arbitrary slot values can still bias the aggregate within
that range; additive encryption alone does not prove that inputs are well formed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .fixed_point import FixedPointParams
from .checks import is_int, is_number

__all__ = [
    "EncodingOverflow",
    "EncodingParams",
    "quantize",
    "pack",
    "unpack",
    "dequantize",
    "encode",
    "decode",
    "decode_sums",
]

# Slots are handled as uint64 while packing, and ``w * q`` must fit one.
_MAX_SLOT_BITS = 62
_MAX_VALUE_BITS = 32
# Plaintexts converted to bits at once while packing (bounds temporary memory).
_CHUNK = 2048


class EncodingOverflow(ValueError):
    """A summed plaintext holds a value that honest clients cannot produce
    (too many clients or too much weight for the headroom, or tampered inputs)."""


@dataclass(frozen=True)
class EncodingParams(FixedPointParams):
    """How values are quantized and packed into plaintext integers.

    Parameters
    ----------
    value_bits
        Bits of one quantized value, ``q`` in ``[0, 2**value_bits - 1]``.
    clip
        Values are clipped to ``[-clip, clip]`` before quantization.
    headroom_bits
        Extra bits per slot for the sum; the total weight of a decoded sum may be
        at most ``2**headroom_bits``.
    slot_bits
        Bits per slot, at least ``value_bits + headroom_bits``.
    slots_per_plaintext
        Values packed into one plaintext integer.

    Use :meth:`for_key` to derive the packing from a key size and a maximum total
    weight rather than filling these in by hand.
    """

    value_bits: int
    clip: float
    headroom_bits: int
    slot_bits: int
    slots_per_plaintext: int

    def __post_init__(self) -> None:
        for name in ("value_bits", "headroom_bits", "slot_bits", "slots_per_plaintext"):
            value = getattr(self, name)
            if not is_int(value):
                raise ValueError(f"{name} must be an int, got {type(value).__name__}")
            object.__setattr__(self, name, int(value))
        clip = self.clip
        if not is_number(clip):
            raise ValueError(f"clip must be a number, got {type(clip).__name__}")
        clip = float(clip)
        if not math.isfinite(clip) or clip <= 0:
            raise ValueError(f"clip must be a positive finite number, got {clip}")
        object.__setattr__(self, "clip", clip)
        if not 1 <= self.value_bits <= _MAX_VALUE_BITS:
            raise ValueError(f"value_bits must be in [1, {_MAX_VALUE_BITS}], got {self.value_bits}")
        if self.headroom_bits < 0:
            raise ValueError(f"headroom_bits must be >= 0, got {self.headroom_bits}")
        if self.slot_bits < self.value_bits + self.headroom_bits:
            raise ValueError(
                f"slot_bits={self.slot_bits} cannot hold value_bits + headroom_bits = "
                f"{self.value_bits + self.headroom_bits}: raise slot_bits or lower the maximum "
                "total weight")
        if self.slot_bits > _MAX_SLOT_BITS:
            raise ValueError(
                f"slot_bits must be at most {_MAX_SLOT_BITS}, got {self.slot_bits}: lower "
                "value_bits or the maximum total weight")
        if self.slots_per_plaintext < 1:
            raise ValueError(f"slots_per_plaintext must be >= 1, got {self.slots_per_plaintext}")

    @classmethod
    def for_key(
        cls,
        n_bits: int,
        max_total_weight: int,
        *,
        clip: float,
        value_bits: int = 16,
        slot_bits: int | None = None,
        slots_per_plaintext: int | None = None,
    ) -> EncodingParams:
        """Derive the packing for a Paillier modulus of ``n_bits`` bits.

        Parameters
        ----------
        n_bits
            Bit length of the Paillier modulus ``n`` (2048 for a 2048-bit key).
        max_total_weight
            Largest ``sum(w_k)`` over the clients of one aggregate. Clients multiply
            their quantized update by their integer weight ``w_k``; use small
            weights (e.g. 1 per client, or examples divided by a unit) to keep slots
            narrow and ciphertexts few.
        clip
            Values are clipped to ``[-clip, clip]``.
        value_bits
            Quantization bits per value (BatchCrypt uses 16).
        slot_bits, slots_per_plaintext
            Overrides; by default ``slot_bits = value_bits + ceil(log2(max_total_weight))``
            and as many slots as fit in ``n_bits - 1`` bits.
        """
        if isinstance(max_total_weight, bool) or not isinstance(
                max_total_weight, (int, np.integer)):
            raise ValueError(
                f"max_total_weight must be an int, got {type(max_total_weight).__name__}")
        if max_total_weight < 1:
            raise ValueError(f"max_total_weight must be >= 1, got {max_total_weight}")
        if not is_int(n_bits) or n_bits < 2:
            raise ValueError(f"n_bits must be an int >= 2, got {n_bits!r}")
        headroom = (int(max_total_weight) - 1).bit_length()  # ceil(log2(W)), 0 for W = 1
        if slot_bits is None:
            slot_bits = value_bits + headroom
        if slots_per_plaintext is None:
            slots_per_plaintext = (int(n_bits) - 1) // slot_bits
            if slots_per_plaintext < 1:
                raise ValueError(
                    f"a {n_bits}-bit modulus cannot hold one {slot_bits}-bit slot below n")
        params = cls(value_bits=value_bits, clip=clip, headroom_bits=headroom,
                     slot_bits=slot_bits, slots_per_plaintext=slots_per_plaintext)
        params.check_modulus_bits(n_bits)
        return params

    # -- derived quantities -------------------------------------------------

    @property
    def max_total_weight(self) -> int:
        """Largest total weight a decoded sum may carry: ``2**headroom_bits``."""
        return 1 << self.headroom_bits

    @property
    def plaintext_bits(self) -> int:
        """Bits used by one packed plaintext: ``slot_bits * slots_per_plaintext``."""
        return self.slot_bits * self.slots_per_plaintext

    def num_plaintexts(self, num_values: int) -> int:
        """Plaintexts (hence ciphertexts) needed for ``num_values`` values."""
        if num_values < 0:
            raise ValueError(f"num_values must be >= 0, got {num_values}")
        return -(-int(num_values) // self.slots_per_plaintext)

    def check_modulus_bits(self, n_bits: int) -> None:
        """Raise ``ValueError`` unless every packed sum stays below a modulus of
        ``n_bits`` bits (it must have at most ``n_bits - 1`` bits)."""
        if self.plaintext_bits > n_bits - 1:
            raise ValueError(
                f"{self.slots_per_plaintext} slots of {self.slot_bits} bits "
                f"({self.plaintext_bits} bits) do not fit below a {n_bits}-bit modulus "
                f"(at most {n_bits - 1} bits): use fewer slots per plaintext")

    def max_error(self) -> float:
        """Worst-case absolute error of one decoded weighted-average value.

        For inputs inside ``[-clip, clip]``, stochastic rounding moves each
        ``w_k * q_k`` by less than ``w_k`` steps, so the decoded ``S / W`` is less
        than one step from the exact weighted average of the ``t_k``: the error is
        below ``scale = 2 * clip / (2**value_bits - 1)``. A margin of
        ``1e-9 * clip`` covers float64 rounding in quantizing and decoding. Inputs
        outside ``[-clip, clip]`` add their clipping error on top (not covered).
        The rounding is unbiased: the expected decoded value is exact.
        """
        return self.step + 1e-9 * self.clip

    def check_noise_offset(self, noise_offset: object, total_weight: int) -> int:
        """``noise_offset`` as an int; ``ValueError`` unless it is one that
        :func:`encode_noise` can produce for a sum of ``total_weight``
        (:class:`EncodingOverflow` if it does not fit the slots)."""
        if not is_int(noise_offset) \
                or noise_offset < 0:
            raise ValueError(f"noise offset must be a non-negative int, got {noise_offset!r}")
        if noise_offset and int(total_weight) * self.levels + 2 * int(noise_offset) \
                >= 1 << self.slot_bits:
            raise EncodingOverflow(
                f"noise offset {noise_offset} does not fit the {self.slot_bits}-bit slots at "
                f"total weight {total_weight}: no noise that encode_noise adds is that large")
        return int(noise_offset)

    # -- flat dict form (for metadata sent beside ciphertexts) ---------------

    def to_dict(self) -> dict[str, int | str]:
        """A flat dict of ints and strings (``clip`` as its exact ``repr``)."""
        return {
            "value-bits": self.value_bits,
            "clip": repr(self.clip),
            "headroom-bits": self.headroom_bits,
            "slot-bits": self.slot_bits,
            "slots-per-plaintext": self.slots_per_plaintext,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> EncodingParams:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` on missing, extra or
        ill-typed entries."""
        if not isinstance(data, Mapping):
            raise ValueError(f"encoding parameters must be a dict, got {type(data).__name__}")
        expected = {"value-bits", "clip", "headroom-bits", "slot-bits", "slots-per-plaintext"}
        keys = set(data)
        if keys != expected:
            missing, extra = sorted(expected - keys), sorted(map(str, keys - expected))
            raise ValueError(
                f"encoding parameters: missing keys {missing}, unexpected keys {extra}")
        clip = data["clip"]
        if isinstance(clip, str):
            try:
                clip = float(clip)
            except ValueError:
                raise ValueError(f"encoding parameter clip is not a number: {clip!r}") from None
        return cls(
            value_bits=data["value-bits"],  # type: ignore[arg-type]
            clip=clip,  # type: ignore[arg-type]
            headroom_bits=data["headroom-bits"],  # type: ignore[arg-type]
            slot_bits=data["slot-bits"],  # type: ignore[arg-type]
            slots_per_plaintext=data["slots-per-plaintext"],  # type: ignore[arg-type]
        )


def _check_weight(weight: object, params: EncodingParams, name: str) -> int:
    if not is_int(weight):
        raise ValueError(f"{name} must be an int, got {type(weight).__name__}")
    if not 1 <= weight <= params.max_total_weight:
        raise ValueError(
            f"{name} must be in [1, {params.max_total_weight}] (2**headroom_bits), got {weight}: "
            "derive the encoding parameters for a larger maximum total weight")
    return int(weight)


def quantize(
    values: np.ndarray,
    params: EncodingParams,
    weight: int = 1,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Clip, quantize with stochastic rounding and multiply by ``weight``.

    Parameters
    ----------
    values
        1-D float array (flatten a model with
        ``np.concatenate([a.ravel() for a in arrays])``); must be finite.
    params
        The encoding parameters.
    weight
        This client's integer weight ``w_k``, in ``[1, params.max_total_weight]``.
    rng
        Source of the rounding noise; a fresh OS-seeded generator by default.

    Returns
    -------
    numpy.ndarray
        uint64 array of ``weight * q`` with ``q`` in ``[0, 2**value_bits - 1]``.
    """
    weight = _check_weight(weight, params, "weight")
    x = np.asarray(values)
    if x.ndim != 1:
        raise ValueError(
            f"values must be 1-D, got shape {x.shape}: flatten with "
            "np.concatenate([a.ravel() for a in arrays])")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"values must be numeric, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("values hold NaN or infinity")
    rng = np.random.default_rng() if rng is None else rng
    return params.fixed_point.quantize(x, rng, weight)


def pack(encoded: np.ndarray, params: EncodingParams) -> list[int]:
    """Pack a 1-D array of slot values (e.g. from :func:`quantize`) into plaintexts.

    Slot 0 of each plaintext is its most significant ``slot_bits`` bits; the last
    plaintext is zero-padded. Returns ``params.num_plaintexts(len(encoded))`` ints,
    each below ``2**params.plaintext_bits``.
    """
    enc = np.asarray(encoded)
    if enc.ndim != 1:
        raise ValueError(f"encoded values must be 1-D, got shape {enc.shape}")
    if enc.dtype.kind not in "iu":
        raise ValueError(f"encoded values must be integers, got dtype {enc.dtype}")
    if enc.size and (enc.min() < 0 or int(enc.max()) >> params.slot_bits):
        raise ValueError(f"encoded values must lie in [0, 2**{params.slot_bits})")
    s, b = params.slots_per_plaintext, params.slot_bits
    m = params.num_plaintexts(enc.size)
    padded = np.zeros(m * s, dtype=">u8")
    padded[: enc.size] = enc
    nbytes = -(-params.plaintext_bits // 8)
    pad_bits = 8 * nbytes - params.plaintext_bits
    out: list[int] = []
    for start in range(0, m, _CHUNK):
        rows = padded[start * s : (start + _CHUNK) * s].view(np.uint8).reshape(-1, s, 8)
        if b % 8 == 0 and pad_bits == 0:
            raw = np.ascontiguousarray(rows[:, :, 8 - b // 8 :]).reshape(rows.shape[0], -1)
        else:
            bits = np.unpackbits(rows, axis=2)[:, :, 64 - b :].reshape(rows.shape[0], s * b)
            if pad_bits:
                bits = np.concatenate(
                    [np.zeros((bits.shape[0], pad_bits), dtype=np.uint8), bits], axis=1)
            raw = np.packbits(bits, axis=1)
        buf = raw.tobytes()
        out.extend(int.from_bytes(buf[i : i + nbytes], "big")
                   for i in range(0, len(buf), nbytes))
    return out


def unpack(
    plaintexts: Sequence[int],
    params: EncodingParams,
    num_values: int,
    total_weight: int,
    noise_offset: int = 0,
) -> np.ndarray:
    """Unpack summed plaintexts into the per-value sums ``S = sum(w_k * q_k)``.

    Parameters
    ----------
    plaintexts
        Decrypted sums of the clients' packed plaintexts (ints or gmpy2 ints).
    params
        The encoding parameters the clients used.
    num_values
        Number of values packed (the model size).
    total_weight
        ``sum(w_k)`` over the clients included in the sum.
    noise_offset
        The offset of noise the server added (:func:`encode_noise`); a slot may
        then hold up to ``2 * noise_offset`` more.

    Returns
    -------
    numpy.ndarray
        uint64 array of length ``num_values``.

    Raises
    ------
    EncodingOverflow
        If ``total_weight`` exceeds ``params.max_total_weight``, a plaintext has
        bits above the top slot, a slot exceeds ``total_weight * (2**value_bits - 1)``
        or a padding slot is not zero.
    """
    noise_offset = _check_total(params, total_weight, noise_offset)
    m = params.num_plaintexts(num_values)
    if len(plaintexts) != m:
        raise ValueError(f"{len(plaintexts)} plaintexts for {num_values} values, expected {m}")
    s, b = params.slots_per_plaintext, params.slot_bits
    nbytes = -(-params.plaintext_bits // 8)
    pad_bits = 8 * nbytes - params.plaintext_bits
    chunks = []
    for start in range(0, m, _CHUNK):
        parts = []
        for pt in plaintexts[start : start + _CHUNK]:
            pt = int(pt)
            if pt < 0 or pt.bit_length() > params.plaintext_bits:
                raise EncodingOverflow(
                    f"a plaintext does not fit in {params.plaintext_bits} bits: the sum "
                    "overflowed its slots (or the ciphertexts were made with other parameters "
                    "or another key)")
            parts.append(pt.to_bytes(nbytes, "big"))
        raw = np.frombuffer(b"".join(parts), dtype=np.uint8).reshape(-1, nbytes)
        rows = raw.shape[0]
        if b % 8 == 0 and pad_bits == 0:
            wide = np.zeros((rows, s, 8), dtype=np.uint8)
            wide[:, :, 8 - b // 8 :] = raw.reshape(rows, s, b // 8)
        else:
            bits = np.unpackbits(raw, axis=1)[:, pad_bits:].reshape(rows, s, b)
            wide_bits = np.zeros((rows, s, 64), dtype=np.uint8)
            wide_bits[:, :, 64 - b :] = bits
            wide = np.packbits(wide_bits, axis=2)
        chunks.append(wide.reshape(-1).view(">u8").astype(np.uint64))
    sums = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint64)
    if sums[num_values:].any():
        raise EncodingOverflow(
            "a padding slot after the last value is not zero: the ciphertexts were tampered "
            "with or made for a different model size")
    return _check_range(sums[:num_values], params, total_weight, noise_offset)


def _check_total(params: EncodingParams, total_weight: object, noise_offset: object) -> int:
    """The checked noise offset, after checking ``total_weight`` against the headroom."""
    if not is_int(total_weight):
        raise ValueError(f"total_weight must be an int, got {type(total_weight).__name__}")
    if total_weight < 1:
        raise ValueError(f"total_weight must be >= 1, got {total_weight}")
    if total_weight > params.max_total_weight:
        raise EncodingOverflow(
            f"total weight {total_weight} exceeds the headroom of the encoding "
            f"({params.max_total_weight} = 2**{params.headroom_bits}): slots may have carried "
            "into each other; aggregate fewer clients or derive parameters for more weight")
    return params.check_noise_offset(noise_offset, total_weight)


def _check_range(sums: np.ndarray, params: EncodingParams, total_weight: int,
                 noise_offset: int) -> np.ndarray:
    """``sums`` as uint64, once every one lies in what ``total_weight`` clients (and the
    noise) can sum to."""
    limit = params.fixed_point.max_sum(total_weight) + 2 * noise_offset
    if sums.size and (int(sums.min()) < 0 or int(sums.max()) > limit):
        raise EncodingOverflow(  # which value, and by how much, stay unsaid: plaintext
            f"a value sums to more than total weight {total_weight} x {params.levels} = "
            f"{limit} (or below 0): a client used a larger weight than reported, or the "
            "inputs were tampered with")
    return sums.astype(np.uint64)


def decode_sums(sums: np.ndarray, params: EncodingParams, total_weight: int,
                noise_offset: int = 0) -> np.ndarray:
    """The weighted average from per-value sums that were never packed (a masked
    payload, :mod:`strategies.ring_masks`), after :func:`unpack`'s checks."""
    noise_offset = _check_total(params, total_weight, noise_offset)
    return dequantize(_check_range(np.asarray(sums), params, total_weight, noise_offset),
                      params, total_weight, noise_offset)


def dequantize(sums: np.ndarray, params: EncodingParams, total_weight: int,
               noise_offset: int = 0) -> np.ndarray:
    """The weighted average ``(S - noise_offset) / W * scale - clip`` as float64
    (its error bound is :meth:`EncodingParams.max_error`)."""
    if not is_int(total_weight):
        raise ValueError(f"total_weight must be an int, got {type(total_weight).__name__}")
    if total_weight < 1:
        raise ValueError(f"total_weight must be >= 1, got {total_weight}")
    noise_offset = params.check_noise_offset(noise_offset, total_weight)
    return params.fixed_point.dequantize(sums, total_weight, noise_offset)


def encode_noise(noise: np.ndarray, bound: int, total_weight: int, params: EncodingParams
                 ) -> tuple[np.ndarray, int]:
    """Slot values that add the integer ``noise`` (in units of one level of the sum,
    clipped to ``[-bound, bound]``) to a sum of total weight ``total_weight``; and the
    offset ``bound`` that keeps them non-negative (decoders subtract it:
    :func:`dequantize`).

    Raises
    ------
    EncodingOverflow
        If the sum with the noise could carry out of its slots.
    """
    bound = int(bound)
    if int(total_weight) * params.levels + 2 * bound >= 1 << params.slot_bits:
        raise EncodingOverflow(f"noise up to {bound} levels does not fit the "
                               f"{params.slot_bits}-bit slots: raise the maximum total weight "
                               "(more headroom)")
    return (np.clip(np.asarray(noise, np.int64), -bound, bound) + bound).astype(np.uint64), bound


def encode(
    values: np.ndarray,
    params: EncodingParams,
    weight: int = 1,
    rng: np.random.Generator | None = None,
) -> list[int]:
    """:func:`quantize` then :func:`pack`: one client's plaintexts."""
    return pack(quantize(values, params, weight, rng), params)


def decode(
    plaintexts: Sequence[int],
    params: EncodingParams,
    num_values: int,
    total_weight: int,
    noise_offset: int = 0,
) -> np.ndarray:
    """:func:`unpack` then :func:`dequantize`: the weighted average of the clients."""
    return dequantize(unpack(plaintexts, params, num_values, total_weight, noise_offset),
                      params, total_weight, noise_offset)
