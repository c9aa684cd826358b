"""Proofs of plaintext knowledge (strategies.plaintext_proofs), on the session's real
2048-bit threshold key: an honest proof verifies; one made for other ciphertexts, another
context or another key, one with any value changed, and the best a prover can do for a
row it cannot decrypt are refused. Also the multi-exponentiation behind the verifier."""

from __future__ import annotations

import dataclasses
import secrets

import gmpy2
import pytest
from gmpy2 import mpz
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.keyfiles import THRESHOLD_PUBLIC_NAME, load_threshold_public_key
from strategies.paillier import _multi_pow, ciphertexts_from_array
from strategies.plaintext_proofs import (InvalidProof, PlaintextProof, ProvingEncryptor,
                                         prove_plaintexts, verify_plaintexts)
from strategies.threshold_paillier import ThresholdEncryptor, deal_threshold_key

CONTEXT = b"contribution of node 7, run 1, round 3"
ROWS = 40


@pytest.fixture(scope="module")
def public(threshold_key_dir):
    return load_threshold_public_key(threshold_key_dir / THRESHOLD_PUBLIC_NAME)


@pytest.fixture(scope="module")
def proven(public):
    """A prover's rows (plaintexts and randomizers kept), its ciphertexts and proof."""
    prover = ProvingEncryptor(ThresholdEncryptor(public))
    array = prover.encrypt_to_array([secrets.randbelow(int(public.n)) for _ in range(ROWS)])
    return prover, ciphertexts_from_array(public, array), prover.prove(array, CONTEXT)


def test_an_honest_proof_verifies_and_travels_as_text(public, proven):
    _, cts, proof = proven
    verify_plaintexts(public, cts, proof, CONTEXT)
    again = PlaintextProof.from_text(proof.to_text())
    assert again == proof
    verify_plaintexts(public, cts, again, CONTEXT)


def test_a_proof_holds_only_for_its_ciphertexts_and_context(public, proven):
    _, cts, proof = proven
    for other_cts, context in [(cts, CONTEXT + b"!"), (cts[:-1], CONTEXT),
                               (cts[1:] + cts[:1], CONTEXT), (cts + cts[:1], CONTEXT)]:
        with pytest.raises(InvalidProof, match="does not verify"):
            verify_plaintexts(public, other_cts, proof, context)
    other, _ = deal_threshold_key(2, 3, 512, allow_insecure=True)
    small = ProvingEncryptor(ThresholdEncryptor(other))
    array = small.encrypt_to_array([1, 2, 3])
    with pytest.raises(InvalidProof):  # a proof under another key
        verify_plaintexts(public, ciphertexts_from_array(other, array),
                          small.prove(array, CONTEXT), CONTEXT)


@settings(max_examples=30, deadline=None)
@given(field=st.sampled_from(["commitment", "z_message", "z_random"]),
       delta=st.integers(1, 2**64))
def test_any_value_changed_is_refused(public, proven, field, delta):
    _, cts, proof = proven
    changed = dataclasses.replace(proof, **{field: getattr(proof, field) + delta})
    with pytest.raises(InvalidProof):
        verify_plaintexts(public, cts, changed, CONTEXT)


def test_values_out_of_range_are_refused_before_any_work(public, proven):
    _, cts, proof = proven
    for bad in [dataclasses.replace(proof, z_message=int(public.n)),
                dataclasses.replace(proof, z_random=1 << 4000),
                dataclasses.replace(proof, z_random=-1),
                dataclasses.replace(proof, commitment=0),
                dataclasses.replace(proof, commitment=int(public.n))]:  # not a unit
        with pytest.raises(InvalidProof, match="out of range"):
            verify_plaintexts(public, cts, bad, CONTEXT)


def test_a_row_derived_from_someone_elses_ciphertext_cannot_be_proven(public, proven):
    """The colluder's position: one row times the inverse of an honest client's
    ciphertext, whose plaintext it does not know. Its best proof uses every value it
    does know; that fails, and so does any guess of the unknown plaintext but the true
    one."""
    prover, cts, _ = proven
    secret_plaintext = secrets.randbelow(int(public.n))
    theirs = ThresholdEncryptor(public).encrypt(secret_plaintext)
    nsquare, n = public.nsquare, int(public.n)
    for row in (0, ROWS // 2, ROWS - 1):
        crafted = list(cts)
        crafted[row] = crafted[row] * gmpy2.invert(theirs, nsquare) % nsquare
        best = prove_plaintexts(public, prover.plaintexts, prover.randomizers, crafted,
                                CONTEXT)
        with pytest.raises(InvalidProof, match="does not verify"):
            verify_plaintexts(public, crafted, best, CONTEXT)
        guess = list(prover.plaintexts)
        guess[row] = (guess[row] - secret_plaintext - 1) % n  # off by one
        with pytest.raises(InvalidProof, match="does not verify"):
            verify_plaintexts(public, crafted, prove_plaintexts(
                public, guess, prover.randomizers, crafted, CONTEXT), CONTEXT)


def test_knowing_the_plaintexts_is_enough_whatever_the_randomizers_are_called(public):
    """A contributor that re-randomized a row (or encrypted it itself) still knows it:
    the proof is about the plaintexts; the randomizer it uses must just be the row's."""
    encryptor = ThresholdEncryptor(public)
    plaintexts = [5, 0, int(public.n) - 1]
    randomizers = [secrets.randbits(public.randomizer_bits) for _ in plaintexts]
    cts = [encryptor.encrypt_with(m, a) for m, a in zip(plaintexts, randomizers)]
    verify_plaintexts(public, cts, prove_plaintexts(public, plaintexts, randomizers, cts,
                                                    CONTEXT), CONTEXT)
    # a randomizer twice as long (the product of two encryptions) works too
    doubled = [c * encryptor.encrypt_with(0, a) % public.nsquare
               for c, a in zip(cts, randomizers)]
    verify_plaintexts(public, doubled, prove_plaintexts(
        public, plaintexts, [2 * a for a in randomizers], doubled, CONTEXT), CONTEXT)


def test_the_prover_refuses_ciphertexts_it_did_not_make(public, proven):
    prover, cts, _ = proven
    other = ProvingEncryptor(ThresholdEncryptor(public))
    array = other.encrypt_to_array([1] * ROWS)
    with pytest.raises(ValueError, match="not the ciphertexts this encryptor made"):
        prover.prove(array, CONTEXT)


@pytest.mark.parametrize("text", ["", "[]", "{}", '{"A": "zz", "zm": "1", "za": "1"}',
                                  '{"A": "1", "zm": "1"}', "x" * 70000, None, 5])
def test_a_malformed_proof_text_is_named(text):
    with pytest.raises(InvalidProof, match="proof of plaintext knowledge"):
        PlaintextProof.from_text(text)


@settings(max_examples=40, deadline=None)
@given(count=st.integers(0, 150), bits=st.integers(0, 140), seed=st.integers(0, 2**32))
def test_the_multi_exponentiation_is_the_product_of_powers(count, bits, seed):
    import random

    rng = random.Random(seed)
    modulus = mpz(rng.getrandbits(512) | 1)
    bases = [mpz(rng.randrange(1, int(modulus))) for _ in range(count)]
    exponents = [rng.getrandbits(bits) if bits else 0 for _ in range(count)]
    expected = mpz(1)
    for b, e in zip(bases, exponents):
        expected = expected * gmpy2.powmod(b, e, modulus) % modulus
    assert _multi_pow(bases, exponents, modulus) == expected % modulus
