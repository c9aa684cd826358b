"""Encrypted models and the round sum (strategies.paillier_protocol): headers and
ciphertexts as a sender can make them.

Fuzz tests (``tests.helpers.fuzzing``): random and near-valid malformed input is
either accepted with a well-formed result or refused with the exception the callers
catch and a message that says what was wrong."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies.aggregation import InvalidUpdate
from strategies.paillier_node import decrypt_global_model
from strategies.paillier_protocol import (CIPHERTEXTS_KEY, HEADER_KEY, DecryptionRefused,
                                          EncryptedModel, Layout, RoundSum)
from tests.helpers.fuzzing import (WEIGHTS, attempt, bad_row, deep_json, fuzz, garbage,
                                   header_of_model, json_values, mutated_array, mutated_bytes,
                                   mutated_json, refused, with_header)


# ------------------------------------------------------------------ fuzzing
def check_encrypted_model(keys, arrays: object) -> EncryptedModel | BaseException:
    """Parse as the server does; if accepted, decrypt as a client node does."""
    pk, sk = keys
    model = attempt(lambda: EncryptedModel.from_arrays(arrays, pk), InvalidUpdate)
    if refused(model):
        return model
    assert model.ciphertexts.shape == (model.params.num_plaintexts(model.layout.size)
                                       + len(model.sums) + 1, pk.ciphertext_bytes)
    model.params.check_modulus_bits(pk.n_bits)
    assert 1 <= model.total_weight <= model.params.max_total_weight
    config = {"paillier-min-contributors": 1, "paillier-accept-server-noise": True}
    out = attempt(lambda: decrypt_global_model(sk, arrays, config, 1), ValueError)
    if not refused(out):
        layout, plain, released = out
        assert [a.shape for a in plain] == list(layout.shapes)
        assert all(np.isfinite(a).all() for a in plain)
        assert all(np.isfinite(v) for v in released.values())
    return model


@fuzz(80)
@given(data=st.data())
def test_encrypted_model_header(keys, paillier, data):
    arrays = paillier["updates"][0].to_arrays()
    header = data.draw(mutated_json(header_of_model(arrays)))
    check_encrypted_model(keys, with_header(arrays, header))


@fuzz(60)
@given(data=st.data())
def test_encrypted_model_header_bytes(keys, paillier, data):
    arrays = paillier["updates"][0].to_arrays()
    raw = data.draw(mutated_bytes(arrays[HEADER_KEY].tobytes()) | garbage)
    check_encrypted_model(keys, {**arrays, HEADER_KEY: np.frombuffer(raw, np.uint8).copy()})


@fuzz(60)
@given(data=st.data())
def test_encrypted_model_ciphertexts(keys, paillier, data):
    arrays = paillier["updates"][0].to_arrays()
    cts = arrays[CIPHERTEXTS_KEY]
    changed = data.draw(mutated_array(cts) | bad_row(keys[0], cts))
    check_encrypted_model(keys, {**arrays, CIPHERTEXTS_KEY: changed})


@fuzz(40)
@given(arrays=st.dictionaries(st.sampled_from([CIPHERTEXTS_KEY, HEADER_KEY, "x"]),
                              garbage.map(lambda b: np.frombuffer(b, np.uint8)) | json_values))
def test_encrypted_model_garbage(keys, arrays):
    assert refused(check_encrypted_model(keys, arrays))


@pytest.mark.parametrize("change", [
    {"encoding": "slots"}, {"noise-offset": 10**400}, {"layout": [["w", "float32", [10**30]]]},
    {"contributors": {"1": 2**64}}, {"contributors": {}}, {"contributors": {"x": 1}},
    {"round": -1}, {"run": 2**64}, {"version": 1}, {"fingerprint": None}])
def test_encrypted_model_header_refusals(keys, paillier, change):
    arrays = paillier["updates"][0].to_arrays()
    header = header_of_model(arrays)
    if change == {"encoding": "slots"}:  # more slots than fit below n: a client can't decode
        change = {"encoding": {**header["encoding"], "slots-per-plaintext": 10**9}}
    assert refused(check_encrypted_model(keys, with_header(arrays, {**header, **change})))


def test_encrypted_model_deep_header(keys, paillier):
    arrays = paillier["updates"][0].to_arrays()
    raw = np.frombuffer(deep_json(300_000).encode(), np.uint8)
    assert refused(check_encrypted_model(keys, {**arrays, HEADER_KEY: raw}))


@fuzz(40)
@given(data=st.data())
def test_round_sum_keeps_only_good_updates(keys, paillier, data):
    pk = keys[0]
    good = [u.to_arrays() for u in paillier["updates"]]
    bad = data.draw(st.one_of(
        st.just(good[0]).map(header_of_model).flatmap(mutated_json).map(
            lambda h: with_header(good[0], h)),
        st.just(good[0][CIPHERTEXTS_KEY]).flatmap(
            lambda c: mutated_array(c) | bad_row(pk, c)).map(
            lambda c: {**good[0], CIPHERTEXTS_KEY: c}),
        st.dictionaries(st.sampled_from([CIPHERTEXTS_KEY, HEADER_KEY]),
                        garbage.map(lambda b: np.frombuffer(b, np.uint8)))))
    round_sum = RoundSum(pk, paillier["params"], paillier["layout"], 1)
    round_sum.add(1, good[0])
    before = (list(round_sum.updates), round_sum.total_weight)
    result = attempt(lambda: round_sum.add(3, bad), InvalidUpdate)
    if refused(result):
        assert (round_sum.updates, round_sum.total_weight) == before
    round_sum.add(2, good[1])
    if refused(result):
        expected = RoundSum(pk, paillier["params"], paillier["layout"], 1)
        for node, g in enumerate(good, 1):
            expected.add(node, g)
        assert np.array_equal(round_sum.result().ciphertexts, expected.result().ciphertexts)
        assert round_sum.total_weight == sum(WEIGHTS)


def test_metric_sums_travel_encrypted_and_come_out_summed(keys):
    """Each update carries its weighted metrics as encrypted rows under the tag; the
    key holders decrypt only the aggregate's sums, exact to 2^-16 per update; updates
    with other metric names do not join the round."""
    from strategies.encoding import EncodingParams
    from strategies.paillier import Encryptor
    from strategies.paillier_protocol import decrypt_model, encrypt_update
    from strategies.paillier_tags import TagKey

    pk, sk = keys
    params = EncodingParams.for_key(pk.n_bits, 64, clip=1.0)
    layout = Layout.of(["w"], [np.zeros(5, np.float32)])
    encryptor, tag_key = Encryptor(pk, sk), TagKey.from_private_key(sk)
    sums = {1: {"loss": 3 * 0.25, "correct": 3 * 7.0}, 2: {"loss": 5 * 2.5, "correct": 5 * 1.0}}
    weights = {1: 3, 2: 5}
    round_sum = RoundSum(pk, params, layout, 4)
    for u in (1, 2):
        update = encrypt_update([np.full(5, 0.1 * u, np.float32)], layout, weights[u], params,
                                encryptor, tag_key, run=1, server_round=4, node=u, sums=sums[u])
        assert update.sums == ("correct", "loss") and update.rows == 1 + 2 + 1
        round_sum.add(u, update.to_arrays())
    other = encrypt_update([np.zeros(5, np.float32)], layout, 1, params, encryptor, tag_key,
                           run=1, server_round=4, node=3, sums={"loss": 1.0})
    with pytest.raises(InvalidUpdate, match="metric sums"):
        round_sum.add(3, other.to_arrays())
    arrays, out = decrypt_model(sk, round_sum.result())
    assert out == pytest.approx({"loss": 0.75 + 12.5, "correct": 21.0 + 5.0}, abs=2 * 2**-16)
    assert np.allclose(arrays[0], (3 * 0.1 + 5 * 0.2) / 8, atol=params.max_error())
    # one update alone is refused, sums and all (no single node's metrics come out)
    with pytest.raises(DecryptionRefused):
        decrypt_model(sk, other)
