"""Threshold Paillier (strategies.threshold_paillier), on a real 2048-bit key dealt
once for the module (3 of 5): any 3 shares decrypt, 2 cannot, a forged or replayed
partial is detected and left out, a share of another key is refused, and ciphertexts
are python-paillier's."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import gmpy2
import phe
import pytest
from gmpy2 import mpz
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.threshold_paillier import (
    InvalidPartial,
    KeyShare,
    ThresholdEncryptor,
    ThresholdPublicKey,
    _lagrange,
    combine,
    deal_threshold_key,
    partial_decrypt,
    verify_partial,
)

CONTEXT = b"run 7 / round 3 / aggregate digest"


@pytest.fixture(scope="module")
def key():
    return deal_threshold_key(3, 5)


@pytest.fixture(scope="module")
def encrypted(key):
    public, _ = key
    plaintexts = [0, 1, 2 ** 1000 + 12345, int(public.n) - 1]
    encryptor = ThresholdEncryptor(public)
    return plaintexts, [encryptor.encrypt(m) for m in plaintexts]


@pytest.fixture(scope="module")
def partials(key, encrypted):
    _, shares = key
    return [partial_decrypt(share, encrypted[1], CONTEXT) for share in shares]


def test_a_real_key_has_a_2048_bit_modulus_of_safe_primes_sizes(key):
    public, shares = key
    assert public.n.bit_length() == 2048 and (public.threshold, public.shares) == (3, 5)
    assert [s.index for s in shares] == [1, 2, 3, 4, 5]
    assert format(int(shares[0].secret), "x") not in repr(shares[0])


def test_any_threshold_of_the_shares_decrypts(key, encrypted, partials):
    public, _ = key
    plaintexts, ciphertexts = encrypted
    for chosen in itertools.combinations(partials, 3):
        assert combine(public, ciphertexts, list(chosen), CONTEXT) == (plaintexts, [])


def test_one_share_fewer_cannot_decrypt(key, encrypted, partials):
    """Two partials are refused; and interpolating two of them as if two were enough
    (a degree-1 polynomial) gives garbage, not the plaintext."""
    public, _ = key
    plaintexts, ciphertexts = encrypted
    with pytest.raises(ValueError, match="2 valid partial decryptions from different "
                                         "shares, 3 needed"):
        combine(public, ciphertexts, partials[:2], CONTEXT)
    with pytest.raises(ValueError, match="2 valid"):  # the same share twice counts once
        combine(public, ciphertexts, [partials[0], partials[0], partials[1]], CONTEXT)
    n, nsquare = public.n, public.nsquare
    for pair in itertools.combinations(partials, 2):
        lambdas = _lagrange([p.index for p in pair], public.delta)
        unscale = gmpy2.invert(4 * mpz(public.delta) ** 2, n)
        for j, m in enumerate(plaintexts):
            acc = mpz(1)
            for p in pair:
                lam = lambdas[p.index]
                base = p.values[j] if lam > 0 else gmpy2.invert(p.values[j], nsquare)
                acc = acc * gmpy2.powmod(base, 2 * abs(lam), nsquare) % nsquare
            guess = (acc - 1) // n * unscale % n
            assert guess != m


def test_a_forged_partial_is_detected_named_and_left_out(key, encrypted, partials):
    public, shares = key
    plaintexts, ciphertexts = encrypted
    good = partials[1]
    forged = {
        "a value changed": dataclasses.replace(
            good, values=(good.values[0] * 4 % public.nsquare, *good.values[1:])),
        "the proof's response changed": dataclasses.replace(good, response=good.response + 1),
        "another share's index": dataclasses.replace(good, index=3),
        "the values of another share": dataclasses.replace(partials[3], index=2),
        "one value fewer": dataclasses.replace(good, values=good.values[:-1]),
        "values outside the group": dataclasses.replace(
            good, values=(public.n, *good.values[1:])),
    }
    for what, partial in forged.items():
        with pytest.raises(InvalidPartial, match="share [23]"):
            verify_partial(public, ciphertexts, partial, CONTEXT)
        result, left_out = combine(public, ciphertexts,
                                   [partial, partials[0], partials[2], partials[4]], CONTEXT)
        assert result == plaintexts and left_out == [partial.index], what
    # a share holder that computes with a wrong share cannot prove its partial
    liar = object.__new__(KeyShare)
    for name, value in (("public", public), ("index", 2), ("secret", shares[1].secret + 1)):
        object.__setattr__(liar, name, value)
    with pytest.raises(InvalidPartial, match="does not verify"):
        verify_partial(public, ciphertexts, partial_decrypt(liar, ciphertexts, CONTEXT),
                       CONTEXT)


def test_a_partial_is_bound_to_its_context_and_its_ciphertexts(key, encrypted, partials):
    """Replayed into another round, or offered for other ciphertexts, a partial fails."""
    public, _ = key
    _, ciphertexts = encrypted
    with pytest.raises(InvalidPartial, match="does not verify"):
        verify_partial(public, ciphertexts, partials[0], b"run 7 / round 4")
    swapped = [ciphertexts[1], ciphertexts[0], *ciphertexts[2:]]
    with pytest.raises(InvalidPartial, match="does not verify"):
        verify_partial(public, swapped, partials[0], CONTEXT)


def test_ciphertexts_are_python_paillier_ciphertexts(key):
    """phe encrypts under the same n; the shares decrypt it, and sums of ours and
    phe's decrypt to the sum."""
    public, shares = key
    theirs = phe.PaillierPublicKey(int(public.n))
    ours = ThresholdEncryptor(public)
    a, b = theirs.raw_encrypt(4242), ours.encrypt(1_000_000)
    total = mpz(a) * b % public.nsquare
    cs = [a, b, total]
    parts = [partial_decrypt(s, cs, CONTEXT) for s in shares[2:]]
    assert combine(public, cs, parts, CONTEXT)[0] == [4242, 1_000_000, 1_004_242]


def test_a_share_of_another_key_is_refused(key):
    public, shares = key
    other, _ = deal_threshold_key(2, 3, 512, allow_insecure=True)
    with pytest.raises(ValueError, match="does not belong to this public key"):
        KeyShare(public, 1, shares[1].secret)  # share 2's value under index 1
    data = shares[0].to_dict()
    data["public-key"] = other.to_dict()
    with pytest.raises(ValueError, match="does not belong"):
        KeyShare.from_dict(data, allow_insecure=True)
    with pytest.raises(ValueError, match="a threshold public key, not a key share"):
        KeyShare.from_dict(public.to_dict())


def test_keys_and_shares_round_trip_as_json_and_refuse_tampering(key):
    public, shares = key
    again = KeyShare.from_dict(json.loads(json.dumps(shares[2].to_dict())))
    assert again.index == 3 and again.secret == shares[2].secret
    assert again.public.fingerprint == public.fingerprint
    data = public.to_dict()
    data["verification"][0] = data["verification"][1]
    with pytest.raises(ValueError, match="fingerprint does not match"):
        ThresholdPublicKey.from_dict(data)
    with pytest.raises(ValueError, match="unsupported version"):
        ThresholdPublicKey.from_dict({**public.to_dict(), "version": 2})


@pytest.mark.parametrize("threshold,shares,bits,match", [
    (1, 3, 2048, "threshold 1 would let one holder decrypt alone"),
    (4, 3, 2048, "threshold must be an int in"),
    (2, 65, 2048, "shares must be an int in"),
    (2, 3, 1024, "insecure"),
])
def test_the_dealer_refuses_weak_settings(threshold, shares, bits, match):
    with pytest.raises(ValueError, match=match):
        deal_threshold_key(threshold, shares, bits)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 12).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.integers(1, n), min_size=1, max_size=n, unique=True),
    st.lists(st.integers(-2 ** 64, 2 ** 64), min_size=1, max_size=n))))
def test_lagrange_coefficients_are_integers_that_interpolate_delta_times_f0(case):
    n, indices, coefficients = case
    coefficients = coefficients[:len(indices)]  # degree below the number of points
    lambdas = _lagrange(indices, math.factorial(n))

    def f(x):
        return sum(a * x ** k for k, a in enumerate(coefficients))

    assert all(isinstance(v, int) for v in lambdas.values())
    assert sum(lambdas[i] * f(i) for i in indices) == math.factorial(n) * f(0)
