"""The two computing parties' protocols on additive shares in Z_2^64.

- Products: Beaver triples (Beaver, CRYPTO 1991); a linear or convolution layer is one
  bilinear triple against the layer's weights, whose mask is opened once per session.
- Truncation: SecureML's local shift (:func:`ring.truncate`).
- Comparison: the sign of ``x = x0 + x1`` is the top bit of the sum of the two shares.
  The parties compute it on XOR shares with a Kogge-Stone carry-lookahead adder (one
  AND layer plus six, each a batch of AND triples: the binary circuit of ABY, Demmler
  et al., NDSS 2015, and of CrypTen's A2B), then turn the bit into an additive share
  with a dealer-made shared bit. ReLU, max-pool and argmax are built on it.

The dealer runs the same code with ``party = "dealer"``: every data-dependent step
becomes a no-op on zero arrays, so it asks for the same correlations in the same order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .correlations import DEALER, Correlations
from .ring import WORD, truncate

Exchange = Callable[[list[np.ndarray]], list[np.ndarray]]
ONE = WORD(1)


class Engine:
    """One party's side of the two-party computation.

    Parameters
    ----------
    party
        ``0``, ``1`` or :data:`correlations.DEALER`.
    correlations
        This party's source of the dealer's randomness.
    exchange
        Sends this party's arrays to the other computing party and returns the other's
        (not used by the dealer).
    """

    def __init__(self, party: int | str, correlations: Correlations,
                 exchange: Exchange | None = None) -> None:
        if party not in (0, 1, DEALER):
            raise ValueError(f"party must be 0, 1 or {DEALER!r}, got {party!r}")
        if party != DEALER and exchange is None:
            raise ValueError("a computing party needs an exchange with the other party")
        self.party, self.corr, self._exchange = party, correlations, exchange
        self._opened: dict[object, np.ndarray] = {}
        self._masks: dict[object, np.ndarray] = {}
        #: bias shares by weight key (added after a layer's product, no mask needed)
        self.biases: dict[object, np.ndarray] = {}

    @property
    def dealer(self) -> bool:
        return self.party == DEALER

    def public(self, value: np.ndarray) -> np.ndarray:
        """Shares of a public value: party 0 holds it, party 1 zero."""
        value = np.asarray(value, dtype=WORD)
        return value if self.party == 0 else np.zeros_like(value)

    def open(self, *shares: np.ndarray, xor: bool = False) -> list[np.ndarray]:
        """Reveal values to both parties in one round (the dealer gets zeros)."""
        if self.dealer:
            return [np.zeros_like(s) for s in shares]
        theirs = self._exchange(list(shares))
        for mine, other in zip(shares, theirs, strict=True):
            if other.shape != mine.shape:
                raise ValueError(f"the other party sent shape {other.shape}, expected "
                                 f"{mine.shape}: the parties' plans differ")
        return [m ^ o if xor else m + o for m, o in zip(shares, theirs)]

    # -- the model --------------------------------------------------------------------
    def load(self, key: object, share: np.ndarray | None, shape: tuple[int, ...]) -> None:
        """Take one weight array's share and open it under a session mask (one round)."""
        mask = self.corr.fixed(key, shape)
        if self.dealer:
            return
        if share.shape != tuple(shape):
            raise ValueError(f"weight {key} has shape {share.shape}, the plan says {shape}")
        self._masks[key] = mask
        self._opened[key] = self.open(share - mask)[0]

    def bilinear(self, key: object, x: np.ndarray, out_shape: tuple[int, ...],
                 op: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """Shares of ``op(x, W)`` for the loaded weights ``W`` of ``key`` (one round)."""
        triple = self.corr.bilinear(key, x.shape, out_shape, op)
        if self.dealer:
            return np.zeros(out_shape, dtype=WORD)
        a, c = triple
        (e,) = self.open(x - a)
        opened, mask = self._opened[key], self._masks[key]
        return op(e, opened + mask if self.party == 0 else mask) + op(a, opened) + c

    # -- arithmetic -------------------------------------------------------------------
    def mul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Elementwise product of two shared arrays (one round, no truncation)."""
        triple = self.corr.triple(x.shape)
        if self.dealer:
            return np.zeros(x.shape, dtype=WORD)
        a, b, c = triple
        e, f = self.open(x - a, y - b)
        z = c + e * b + f * a
        return z + e * f if self.party == 0 else z

    def truncate(self, x: np.ndarray, bits: int) -> np.ndarray:
        return x if self.dealer else truncate(x, bits)

    # -- comparison -------------------------------------------------------------------
    def _and(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """AND of XOR-shared words (one round)."""
        triple = self.corr.and_triple(x.shape)
        if self.dealer:
            return np.zeros(x.shape, dtype=WORD)
        u, v, w = triple
        d, e = self.open(x ^ u, y ^ v, xor=True)
        z = (d & v) ^ (e & u) ^ w
        return z ^ (d & e) if self.party == 0 else z

    def negative(self, x: np.ndarray) -> np.ndarray:
        """XOR shares of the bit ``x < 0`` (seven rounds).

        The top bit of ``x0 + x1`` is ``x0[63] ^ x1[63] ^ carry[63]``, where the carry
        comes from the sum of the low 63 bits: generate ``g = x0 & x1`` and propagate
        ``p = x0 ^ x1`` go through the prefix tree in six layers.
        """
        zeros = np.zeros_like(x)
        mine_a, mine_b = (x, zeros) if self.party == 0 else (zeros, x)
        g = self._and(mine_a, mine_b)
        p = x  # x0 ^ x1, each party holding its own word
        n = x.size
        for shift in (1, 2, 4, 8, 16, 32):
            s = WORD(shift)
            both = self._and(np.concatenate([p.ravel(), p.ravel()]),
                             np.concatenate([(g << s).ravel(), (p << s).ravel()]))
            g = g ^ both[:n].reshape(x.shape)
            p = both[n:].reshape(x.shape)
        return ((x >> WORD(63)) ^ (g >> WORD(62))) & ONE

    def to_arithmetic(self, bits: np.ndarray) -> np.ndarray:
        """Additive shares of XOR-shared bits (one round, a dealer-made shared bit)."""
        pair = self.corr.shared_bit(bits.shape)
        if self.dealer:
            return np.zeros(bits.shape, dtype=WORD)
        r, ra = pair
        (c,) = self.open(bits ^ r, xor=True)
        s = ra * (ONE - WORD(2) * c)
        return s + c if self.party == 0 else s

    def less_than_zero(self, x: np.ndarray) -> np.ndarray:
        """Additive shares of ``x < 0`` as 0/1 (eight rounds)."""
        return self.to_arithmetic(self.negative(x))

    def relu(self, x: np.ndarray) -> np.ndarray:
        """``max(x, 0)`` (nine rounds)."""
        return self.mul(x, self.public(np.ones(x.shape, dtype=WORD)) - self.less_than_zero(x))

    def maximum(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Elementwise ``max(a, b)``; ``a`` on ties (nine rounds)."""
        return a + self.mul(self.less_than_zero(a - b), b - a)

    def maxpool2(self, x: np.ndarray) -> np.ndarray:
        """2x2 max-pooling of ``(N, C, H, W)`` shares, H and W even."""
        x = self.maximum(x[..., 0::2], x[..., 1::2])
        return self.maximum(x[..., 0::2, :], x[..., 1::2, :])

    def argmax(self, x: np.ndarray) -> np.ndarray:
        """Shares of each row's index of its largest value: a tournament, 4 x 9 rounds
        for 10 classes. On an exact tie either index may win."""
        values = x
        index = self.public(np.broadcast_to(np.arange(x.shape[1], dtype=WORD), x.shape).copy())
        while values.shape[1] > 1:
            half = values.shape[1] // 2
            a, b = values[:, :half], values[:, half:2 * half]
            ia, ib = index[:, :half], index[:, half:2 * half]
            later = self.less_than_zero(a - b)  # 1 where b wins
            both = self.mul(np.concatenate([later, later], axis=1),
                            np.concatenate([b - a, ib - ia], axis=1))
            values = np.concatenate([a + both[:, :half], values[:, 2 * half:]], axis=1)
            index = np.concatenate([ia + both[:, half:], index[:, 2 * half:]], axis=1)
        return index[:, 0]
