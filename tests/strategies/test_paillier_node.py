"""The Paillier round config a node receives (strategies.paillier_node).

Fuzz tests (``tests.helpers.fuzzing``): random and near-valid malformed input is
either accepted with a well-formed result or refused with the exception the callers
catch and a message that says what was wrong."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies.paillier_node import encrypt_local_model, parse_round_config, round_config
from tests.helpers.fuzzing import attempt, fuzz, mutated_json, refused


# ------------------------------------------------------------------ fuzzing
@fuzz(60)
@given(data=st.data())
def test_round_config_on_the_client(keys, paillier, data):
    config = round_config(paillier["params"], keys[0].fingerprint, 1, 1)
    document = data.draw(mutated_json(config).filter(lambda d: isinstance(d, dict)))
    result = attempt(lambda: parse_round_config(document), ValueError)
    if refused(result):
        return
    plain = paillier["models"][0]
    update = attempt(lambda: encrypt_local_model(document, list(plain), list(plain.values()),
                                                 10, keys[1], run=1, node=1, workers=1),
                     ValueError)
    if not refused(update):
        model, clipped = update
        model.params.check_modulus_bits(keys[0].n_bits)
        assert 0 <= clipped <= 1


def test_round_config_with_slots_past_the_key_is_refused(keys, paillier):
    params = paillier["params"]
    config = round_config(params, keys[0].fingerprint, 1, 1)
    config["paillier-encoding-slots-per-plaintext"] = 10**9
    plain = paillier["models"][0]
    with pytest.raises(ValueError, match="do not fit below"):
        encrypt_local_model(config, list(plain), list(plain.values()), 10, keys[1], run=1,
                            node=1, workers=1)
