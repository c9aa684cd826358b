"""Paillier keys, fast encryption, aggregation, decryption and wire format
(strategies.paillier), with one real 2048-bit key for the whole session."""

from __future__ import annotations

import hashlib
import json
import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.aggregation import weighted_average
from strategies.encoding import EncodingParams, decode, encode
from strategies.paillier import (Encryptor, PrivateKey, PublicKey, add_ciphertexts,
                                 aggregate_arrays, check_ciphertext_array, check_fingerprint,
                                 ciphertexts_from_array, ciphertexts_to_array, generate_keypair,
                                 subgroup_prime_bits)
from tests.helpers.fuzzing import (attempt, bad_row, fuzz, garbage, mutated_array, mutated_json,
                                   refused)


@pytest.fixture(scope="session")
def public_encryptor(keypair) -> Encryptor:
    """Subgroup randomizer with the public key only (the server's DP noise)."""
    return Encryptor(keypair[0])


@pytest.fixture(scope="session")
def small_keypair() -> tuple[PublicKey, PrivateKey]:
    return generate_keypair(512, allow_insecure=True)


def test_keypair(keypair):
    pk, sk = keypair
    assert pk.n_bits == 2048 and pk.n_bytes == 256 and pk.ciphertext_bytes == 512
    assert sk.p * sk.q == pk.n and sk.p.bit_length() == sk.q.bit_length() == 1024
    assert pk.fingerprint == hashlib.sha256(int(pk.n).to_bytes(256, "big")
                                            + int(pk.h).to_bytes(256, "big")).hexdigest()
    assert sk.fingerprint == pk.fingerprint
    # the subgroup: alpha_p | p - 1, alpha_q | q - 1, h of order alpha_p alpha_q modulo n
    assert subgroup_prime_bits(2048) == 224 and subgroup_prime_bits(3072) == 256
    assert sk.alpha_p.bit_length() == sk.alpha_q.bit_length() == 224
    assert (sk.p - 1) % sk.alpha_p == 0 and (sk.q - 1) % sk.alpha_q == 0
    alpha = int(sk.alpha_p * sk.alpha_q)
    assert pow(int(pk.h), alpha, int(pk.n)) == 1
    assert all(pow(int(pk.h), alpha // a, int(pk.n)) != 1 for a in (sk.alpha_p, sk.alpha_q))
    assert pk.subgroup_bits == alpha.bit_length()
    # p - 1 is not smooth: its cofactor beyond 2 alpha_p is a large random number
    assert ((sk.p - 1) // (2 * sk.alpha_p)).bit_length() > 700


def test_small_keys_need_explicit_opt_in(small_keypair):
    with pytest.raises(ValueError, match="insecure"):
        generate_keypair(1024)
    with pytest.raises(ValueError, match="insecure"):
        PublicKey(small_keypair[0].n, small_keypair[0].h, small_keypair[0].subgroup_bits)
    with pytest.raises(ValueError, match="even int"):
        generate_keypair(2049)
    assert small_keypair[0].n_bits == 512


def test_key_serialization_round_trip(keypair, encryptor):
    pk, sk = keypair
    pk2 = PublicKey.from_dict(json.loads(json.dumps(pk.to_dict())))
    sk2 = PrivateKey.from_dict(json.loads(json.dumps(sk.to_dict())))
    assert pk2 == pk and sk2.public_key == pk
    assert sk2.decrypt(encryptor.encrypt(42)) == 42


def test_public_key_dict_holds_no_private_material(keypair):
    pk, sk = keypair
    data = pk.to_dict()
    assert set(data) == {"type", "version", "n", "h", "subgroup-bits", "fingerprint"}
    text = json.dumps(data)
    lam = (sk.p - 1) * (sk.q - 1)
    for secret in (sk.p, sk.q, lam, lam // 2, sk.alpha_p, sk.alpha_q, sk.alpha_p * sk.alpha_q):
        assert format(int(secret), "x") not in text
        assert str(int(secret)) not in text
    assert str(sk.p) not in repr(sk) and format(int(sk.p), "x") not in repr(sk)


def test_key_dicts_are_validated(keypair, small_keypair):
    pk, sk = keypair
    with pytest.raises(ValueError, match="fingerprint"):
        PublicKey.from_dict({**pk.to_dict(), "fingerprint": "0" * 64})
    with pytest.raises(ValueError, match="type"):
        PublicKey.from_dict(sk.to_dict())
    with pytest.raises(ValueError, match="hex"):
        PublicKey.from_dict({**pk.to_dict(), "n": "xyz"})
    with pytest.raises(ValueError, match="keys"):
        PublicKey.from_dict({**pk.to_dict(), "p": "1"})
    with pytest.raises(ValueError, match="primes"):
        PrivateKey.from_dict({**sk.to_dict(), "q": format(int(sk.q) + 2, "x")})
    with pytest.raises(ValueError, match="divide"):
        PrivateKey.from_dict({**sk.to_dict(), "alpha-p": sk.to_dict()["alpha-q"],
                              "alpha-q": sk.to_dict()["alpha-p"]})
    with pytest.raises(ValueError, match="order"):
        PrivateKey.from_dict({**sk.to_dict(), "h": format(int(pk.h) + 1, "x")})
    with pytest.raises(ValueError, match="fingerprint"):  # h changes the fingerprint
        PublicKey.from_dict({**pk.to_dict(), "h": format(int(pk.h) + 1, "x")})
    with pytest.raises(ValueError, match="fedapp keygen"):  # keys from before the subgroup
        PublicKey.from_dict({"type": "paillier-public-key", "version": 1, "n": "ff",
                             "fingerprint": "0" * 64})
    mixed = {**sk.to_dict(), "q": format(int(small_keypair[1].q), "x")}
    with pytest.raises(ValueError):
        PrivateKey.from_dict(mixed, allow_insecure=True)


# ------------------------------------------------------------------ encryption and decryption
@pytest.mark.parametrize("which", ["encryptor", "public_encryptor"])
def test_encrypt_decrypt(keypair, which, request):
    pk, sk = keypair
    enc: Encryptor = request.getfixturevalue(which)
    plaintexts = [0, 1, int(pk.n) - 1, 2**2047 - 1,
                  *(secrets.randbelow(int(pk.n)) for _ in range(5))]
    ciphertexts = enc.encrypt_many(plaintexts)
    assert all(0 < c < pk.nsquare for c in ciphertexts)
    assert sk.decrypt_many(ciphertexts) == plaintexts


def test_encryption_is_randomized(keypair, encryptor, public_encryptor):
    sk = keypair[1]
    ciphertexts = [encryptor.encrypt(7), encryptor.encrypt(7), public_encryptor.encrypt(7)]
    assert len(set(ciphertexts)) == 3
    assert [sk.decrypt(c) for c in ciphertexts] == [7, 7, 7]
    assert encryptor.obfuscator() != encryptor.obfuscator()


def test_randomizers_lie_in_the_key_subgroup(keypair, encryptor, public_encryptor, small_keypair):
    pk, sk = keypair
    alpha = int(sk.alpha_p * sk.alpha_q)
    for enc in (encryptor, public_encryptor):
        r = enc.obfuscator()
        assert pow(int(r), alpha, int(pk.nsquare)) == 1 and r != 1
    with pytest.raises(ValueError, match="does not belong"):
        Encryptor(keypair[0], small_keypair[1])


@settings(max_examples=50, deadline=None)
@given(exponent=st.integers(0, 2**300 - 1), window=st.sampled_from([1, 8, 11]))
def test_fixed_base_tables_match_powmod(small_keypair, exponent, window):
    from strategies.paillier import _fixed_base_pow, _fixed_base_table

    modulus = small_keypair[1].psquare
    base = small_keypair[0].h
    table = _fixed_base_table(base, modulus, 300, window)
    assert _fixed_base_pow(table, exponent, modulus, window) == pow(int(base), exponent,
                                                                    int(modulus))


def test_decrypt_refuses_ciphertexts_outside_the_subgroup(keypair, encryptor):
    """A textbook Paillier ciphertext (randomizer r^n, r uniform) is not one of this
    key's: decryption refuses it rather than return garbage."""
    pk, sk = keypair
    r = secrets.randbelow(int(pk.n) - 2) + 2
    textbook = (1 + 5 * int(pk.n)) * pow(r, int(pk.n), int(pk.nsquare)) % int(pk.nsquare)
    with pytest.raises(ValueError, match="subgroup"):
        sk.decrypt(textbook)
    mixed = int(encryptor.encrypt(5)) * textbook % int(pk.nsquare)
    with pytest.raises(ValueError, match="subgroup"):
        sk.decrypt_array(ciphertexts_to_array(pk, [encryptor.encrypt(1), mixed]))


@pytest.mark.parametrize("bad", [-1, "n", 1.5, True])
def test_plaintext_out_of_range_rejected(keypair, encryptor, bad):
    value = int(keypair[0].n) if bad == "n" else bad
    with pytest.raises(ValueError, match="plaintext"):
        encryptor.encrypt(value)


def test_decrypt_rejects_out_of_range(keypair):
    pk, sk = keypair
    for bad in (0, pk.nsquare, -3):
        with pytest.raises(ValueError, match="ciphertext"):
            sk.decrypt(bad)


def test_homomorphic_addition(keypair, encryptor):
    pk, sk = keypair
    rows = [[secrets.randbelow(2**2040) for _ in range(4)] for _ in range(3)]
    total = add_ciphertexts(pk, [encryptor.encrypt_many(r) for r in rows])
    assert sk.decrypt_many(total) == [sum(col) % int(pk.n) for col in zip(*rows)]
    with pytest.raises(ValueError, match="vector 1"):
        add_ciphertexts(pk, [total, total[:2]])


# ------------------------------------------------------------------ wire format
def test_wire_round_trip(keypair, encryptor):
    pk = keypair[0]
    ciphertexts = encryptor.encrypt_many([1, 2, 3])
    array = ciphertexts_to_array(pk, ciphertexts)
    assert array.dtype == np.uint8 and array.shape == (3, 512)
    assert int.from_bytes(array[1].tobytes(), "big") == ciphertexts[1]
    assert ciphertexts_from_array(pk, array, count=3) == ciphertexts
    assert ciphertexts_to_array(pk, []).shape == (0, 512)


@pytest.fixture(scope="module")
def wire(keypair, encryptor) -> np.ndarray:
    return encryptor.encrypt_to_array([5, 6, 7])


def _replace_row(array: np.ndarray, row: int, value: int) -> np.ndarray:
    out = array.copy()
    out[row] = np.frombuffer(int(value).to_bytes(array.shape[1], "big"), dtype=np.uint8)
    return out


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a, pk: a.astype(np.int16), "uint8"),
        (lambda a, pk: a.astype(np.float32), "uint8"),
        (lambda a, pk: a.tolist(), "numpy array"),
        (lambda a, pk: a.reshape(-1), "shape"),
        (lambda a, pk: a[:, 1:], "shape"),
        (lambda a, pk: np.zeros((3, 256), dtype=np.uint8), "shape"),
        (lambda a, pk: a[:2], "expected 3"),
        (lambda a, pk: _replace_row(a, 1, 0), "ciphertext 1 is zero"),
        (lambda a, pk: _replace_row(a, 2, pk.nsquare), "ciphertext 2 is not below"),
        (lambda a, pk: _replace_row(a, 0, pk.nsquare + 1), "ciphertext 0 is not below"),
        (lambda a, pk: np.full_like(a, 255), "not below"),
    ],
)
def test_bad_wire_arrays_rejected(keypair, wire, mutate, match):
    pk = keypair[0]
    with pytest.raises(ValueError, match=match):
        check_ciphertext_array(pk, mutate(wire, pk), count=3)
    with pytest.raises(ValueError, match=match):
        aggregate_arrays(pk, [wire, mutate(wire, pk)], count=3)


def test_largest_valid_ciphertext_accepted(keypair, wire):
    pk = keypair[0]
    check_ciphertext_array(pk, _replace_row(wire, 0, pk.nsquare - 1), count=3)
    check_ciphertext_array(pk, _replace_row(wire, 0, 1), count=3)


def test_aggregate_names_the_bad_array(keypair, wire):
    with pytest.raises(ValueError, match="array 1: expected 3 ciphertexts, got 2"):
        aggregate_arrays(keypair[0], [wire, wire[:2]])
    with pytest.raises(ValueError, match="at least one"):
        aggregate_arrays(keypair[0], [])


def test_fingerprint_check(keypair):
    pk = keypair[0]
    check_fingerprint(pk, pk.fingerprint)
    with pytest.raises(ValueError, match="same key pair"):
        check_fingerprint(pk, "0" * 64)


# ----------------------------------------- end to end: encode, encrypt, aggregate, decrypt, decode
@settings(max_examples=12, deadline=None)
@given(size=st.integers(1, 400), clients=st.integers(1, 5), seed=st.integers(0, 2**32 - 1),
       data=st.data())
def test_encrypted_weighted_average_within_max_error(keypair, encryptor, size, clients, seed,
                                                     data):
    pk, sk = keypair
    params = EncodingParams.for_key(pk.n_bits, 128, clip=0.5)
    weights = data.draw(st.lists(st.integers(1, 128 // clients), min_size=clients,
                                 max_size=clients))
    rng = np.random.default_rng(seed)
    updates = [rng.uniform(-0.5, 0.5, size).astype(np.float32) for _ in weights]
    count = params.num_plaintexts(size)
    arrays = [encryptor.encrypt_to_array(encode(x, params, w, rng))
              for x, w in zip(updates, weights)]
    aggregate = aggregate_arrays(pk, arrays, count=count)
    avg = decode(sk.decrypt_array(aggregate, count=count), params, size, sum(weights))
    expected = weighted_average([[x] for x in updates], weights)[0].astype(np.float64)
    assert np.abs(avg - expected).max() <= params.max_error()


def test_worker_processes_give_the_same_results(keypair, encryptor):
    pk, sk = keypair
    plaintexts = [secrets.randbelow(2**2047) for _ in range(130)]
    array = encryptor.encrypt_to_array(plaintexts, workers=2)
    assert array.shape == (130, 512)
    total = aggregate_arrays(pk, [array, array], workers=2)
    assert sk.decrypt_array(total, count=130, workers=2) == [2 * m % pk.n for m in plaintexts]
    with pytest.raises(ValueError, match="workers"):
        encryptor.encrypt_to_array(plaintexts, workers=0)


# ------------------------------------------------------------------ fuzzing
@fuzz(60)
@given(data=st.data())
def test_public_key_dict(keys, data):
    document = data.draw(mutated_json(keys[0].to_dict()))
    result = attempt(lambda: PublicKey.from_dict(document), ValueError)
    assert refused(result) or result == keys[0]


@fuzz(60)
@given(data=st.data())
def test_private_key_dict(keys, data):
    document = data.draw(mutated_json(keys[1].to_dict()))
    result = attempt(lambda: PrivateKey.from_dict(document), ValueError)
    assert refused(result) or result.fingerprint == keys[1].fingerprint


@fuzz(80)
@given(data=st.data())
def test_ciphertext_arrays(keys, paillier, data):
    pk = keys[0]
    cts = np.concatenate([u.ciphertexts for u in paillier["updates"]])
    array = data.draw(st.one_of(
        mutated_array(cts), bad_row(pk, cts),
        garbage.map(lambda b: np.frombuffer(b, np.uint8)),
        st.sampled_from([None, b"\x01" * 512, [[1] * 512], cts.tolist()])))
    count = data.draw(st.sampled_from([None, 0, 1, 2, 3]))
    result = attempt(lambda: check_ciphertext_array(pk, array, count), ValueError)
    if not refused(result):
        assert result.dtype == np.uint8 and result.shape[1:] == (pk.ciphertext_bytes,)
        assert count is None or len(result) == count
        assert all(0 < int.from_bytes(row.tobytes(), "big") < pk.nsquare for row in result)
    good = paillier["updates"][0].ciphertexts
    result = attempt(lambda: aggregate_arrays(pk, [good, array, good]), ValueError)
    assert not refused(result) or "array 1" in str(result)
