"""Correlated randomness from the dealer (Beaver, CRYPTO 1991; PySyft's crypto provider).

The dealer shares a PRG seed with each computing party. Every random value a party
needs is drawn from its own seed, so the dealer sends party 0 nothing after the
seed and party 1 only the corrections that make the correlation hold (the third word
of a triple): the "seed compression" of SPDZ-style preprocessing. Dealer and parties
call the same methods in the same order; the dealer's calls return nothing.

The dealer learns nothing about inputs or the model: it never receives a share. It
must not collude with a computing party (it knows every mask).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .ring import WORD, Prg

#: The dealer's role; the computing parties are 0 and 1.
DEALER = "dealer"


class Correlations:
    """One role's view of the dealer's randomness.

    Parameters
    ----------
    role
        ``0``, ``1`` or :data:`DEALER`.
    prg0, prg1
        The PRGs shared with party 0 and party 1 (the dealer holds both, a party its own).
    send, receive
        The dealer sends party 1's corrections with ``send``; party 1 takes them with
        ``receive``.
    """

    def __init__(self, role: int | str, prg0: Prg | None = None, prg1: Prg | None = None,
                 send: Callable[[np.ndarray], None] | None = None,
                 receive: Callable[[], np.ndarray] | None = None) -> None:
        needs = {0: (prg0,), 1: (prg1, receive), DEALER: (prg0, prg1, send)}
        if role not in needs or any(n is None for n in needs[role]):
            raise ValueError(f"role {role!r} needs its PRGs and link to the dealer")
        self.role, self._prg0, self._prg1 = role, prg0, prg1
        self._send, self._receive = send, receive
        self._fixed: dict[Any, np.ndarray] = {}

    def _draw(self, shape: tuple[int, ...], bits: bool = False
              ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Party 0's and party 1's draws of one random value (``None`` where unseen)."""
        take = (lambda p: p.bits(shape)) if bits else (lambda p: p.words(shape))
        return (take(self._prg0) if self._prg0 else None,
                take(self._prg1) if self._prg1 else None)

    def _draw0(self, shape: tuple[int, ...]) -> np.ndarray | None:
        """Party 0's share of a value the dealer corrects for party 1."""
        return self._prg0.words(shape) if self._prg0 else None

    def _correct(self, first: np.ndarray | None, make: Callable[[], np.ndarray],
                 shape: tuple[int, ...], xor: bool = False) -> np.ndarray | None:
        """Shares of the value ``make()``: party 0's drawn, party 1's sent by the dealer."""
        if self.role == 0:
            return first
        if self.role == 1:
            second = self._receive()
            if second.shape != tuple(shape) or second.dtype != WORD:
                raise ValueError(f"the dealer sent a correction of shape {second.shape}, "
                                 f"expected {tuple(shape)}: the parties' plans differ")
            return second
        value = make()
        self._send(value ^ first if xor else value - first)
        return None

    def _mine(self, pair: tuple[np.ndarray | None, np.ndarray | None]) -> np.ndarray | None:
        return pair[self.role] if self.role in (0, 1) else None

    def fixed(self, key: Any, shape: tuple[int, ...]) -> np.ndarray | None:
        """A mask ``B`` kept for the whole session (for one weight array)."""
        b = self._draw(shape)
        if self.role == DEALER:
            self._fixed[key] = b[0] + b[1]
        return self._mine(b)

    def triple(self, shape: tuple[int, ...]):
        """Elementwise Beaver triple ``(a, b, a*b)``: this party's shares."""
        a, b = self._draw(shape), self._draw(shape)
        c0 = self._draw0(shape)
        c = self._correct(c0, lambda: (a[0] + a[1]) * (b[0] + b[1]), shape)
        return None if self.role == DEALER else (self._mine(a), self._mine(b), c)

    def bilinear(self, key: Any, a_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 op: Callable[[np.ndarray, np.ndarray], np.ndarray]):
        """``(a, op(a, B))`` for the fixed mask ``B`` of ``key`` and a fresh ``a``."""
        a = self._draw(a_shape)
        c0 = self._draw0(out_shape)
        c = self._correct(c0, lambda: op(a[0] + a[1], self._fixed[key]), out_shape)
        return None if self.role == DEALER else (self._mine(a), c)

    def and_triple(self, shape: tuple[int, ...]):
        """Bitwise AND triple ``(u, v, u & v)`` over XOR shares of 64-bit words."""
        u, v = self._draw(shape), self._draw(shape)
        w0 = self._draw0(shape)
        w = self._correct(w0, lambda: (u[0] ^ u[1]) & (v[0] ^ v[1]), shape, xor=True)
        return None if self.role == DEALER else (self._mine(u), self._mine(v), w)

    def shared_bit(self, shape: tuple[int, ...]):
        """A random bit, shared both by XOR (``r``) and additively (``ra``)."""
        r = self._draw(shape, bits=True)
        ra0 = self._draw0(shape)
        ra = self._correct(ra0, lambda: r[0] ^ r[1], shape)
        return None if self.role == DEALER else (self._mine(r), ra)
