"""The Paillier strategy of the Message API (strategies.paillier_message) with replies
built by hand: valid replies add up to the weighted average, bad ones are left out
with the node named, and the strategy never holds private key material."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from strategies.paillier import PublicKey
from strategies.paillier_message import PaillierFedAvg, as_record
from strategies.paillier_protocol import EncryptedModel
from strategies.records import record_arrays
from tests.helpers import CLIP, SHAPES, metadata
from tests.helpers import fuzzing
from tests.helpers.fuzzing import WEIGHTS, bad_paillier_reply, fuzz, no_hang, warnings_of
from tests.helpers.paillier import (assert_weighted_average_of_good, encrypted_arrays, find_secrets,
                                    foreign_arrays, model, truncated, with_big_row)


def rec(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def reply(node: int, record: ArrayRecord, n: int, loss: float = 1.0) -> Message:
    return Message(content=RecordDict({"arrays": record, "metrics": MetricRecord(
        {"num-examples": n, "train-loss": loss})}), metadata=metadata(node))


class FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3, 4, 5, 6, 7, 8]


def test_secret_search_finds_a_key(keypair):
    """The search of helpers.paillier.find_secrets would catch a strategy that kept the
    private key or a prime."""

    class Leaky:
        def __init__(self):
            self.cache = {"k": [keypair[1]]}
            self.prime = int(keypair[1].q)

    assert find_secrets(Leaky(), keypair[1]) == ["strategy.cache['k'][0]", "strategy.prime"]


def test_message_api_strategy_aggregates_valid_replies_and_names_bad_ones(
        keypair, other_public_key, task_identity, flwr_caplog):
    strategy = PaillierFedAvg(keypair[0], clip=CLIP, min_available_nodes=1, min_train_nodes=1)
    names = list(SHAPES)
    messages = list(strategy.configure_train(1, rec(model(0.0)), ConfigRecord(),
                                             FakeGrid()))
    config = next(iter(messages[0].content.config_records.values()))
    assert config["paillier-fingerprint"] == keypair[0].fingerprint

    def enc(m, n, node, server_round=1):
        return encrypted_arrays(keypair, list(m.values()), names, n, strategy, node,
                                server_round)

    good = [model(0.5, seed=1), model(-0.25, seed=2)]
    replies = [reply(1, rec(enc(good[0], 10, 1)), 10, loss=1.0),
               reply(2, rec(enc(good[1], 30, 2)), 30, loss=2.0),
               reply(1, rec(enc(model(1.5), 10, 1)), 10),  # a second reply from node 1
               reply(3, rec(foreign_arrays(other_public_key, list(good[0].values()), names, 10,
                                           strategy.params, 3)), 10),
               reply(4, rec(truncated(enc(good[0], 10, 4))), 10),
               reply(5, rec(with_big_row(enc(good[0], 10, 5))), 10),
               reply(6, rec(good[0]), 10),  # plaintext
               Message(error=Error(code=1, reason="crashed"), metadata=metadata(7)),
               reply(8, rec(enc(good[0], 10, 1)), 10),  # node 1's update, sent by node 8
               reply(9, rec(enc(good[0], 10, 9, server_round=2)), 10)]  # made for round 2
    flwr_caplog.clear()
    arrays, metrics = strategy.aggregate_train(1, replies)

    assert_weighted_average_of_good(record_arrays(arrays), keypair, good, strategy)
    assert metrics["train-loss"] == pytest.approx(1.75)
    warnings = [r.getMessage() for r in flwr_caplog.records if r.levelno == logging.WARNING]
    for node, why in [(1, "second reply"), (3, "another key pair"), (4, "got (4, 511)"),
                      (5, "n^2"), (6, "not encrypted"), (7, "crashed"),
                      (8, "only answer for itself"), (9, "made for round 2")]:
        assert any(f"node {node} " in w.lower() and why in w for w in warnings), (node, warnings)
    assert len(set(warnings)) == 8
    assert find_secrets(strategy, keypair[1]) == []


def test_message_api_strategy_refuses_a_total_weight_overflow(keypair, task_identity,
                                                              flwr_caplog):
    strategy = PaillierFedAvg(keypair[0], clip=CLIP, max_total_weight=64,
                              min_available_nodes=1, min_train_nodes=1)
    list(strategy.configure_train(1, rec(model(0.0)), ConfigRecord(), FakeGrid()))
    names = list(SHAPES)
    replies = [reply(node, as_record(EncryptedModel.from_arrays(encrypted_arrays(
        keypair, list(model(0.1).values()), names, n, strategy, node), keypair[0])), n)
        for node, n in ((1, 40), (2, 40), (3, 20))]
    arrays, _ = strategy.aggregate_train(1, replies)
    summed = EncryptedModel.from_arrays(record_arrays(arrays), keypair[0])
    assert dict(summed.contributors) == {1: 40, 3: 20}
    assert any("node 2" in r.getMessage() and "past 64" in r.getMessage()
               for r in flwr_caplog.records)


# ------------------------------------------------------------------ fuzzing
def paillier_result(record: ArrayRecord | None, pk: PublicKey) -> EncryptedModel | None:
    return None if record is None else EncryptedModel.from_arrays(record_arrays(record), pk)


@pytest.mark.usefixtures("task_identity")
@fuzz(40)
@given(data=st.data())
def test_paillier_strategy_leaves_out_bad_replies(keys, paillier, caplog_flwr, data):
    pk = keys[0]
    strategy = PaillierFedAvg(pk, clip=CLIP, max_total_weight=1000, min_available_nodes=1,
                              min_train_nodes=1)
    plain = paillier["models"][0]
    list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in plain.items()}),
                                  ConfigRecord(), fuzzing.FakeGrid([1, 2, 3])))
    good = [u.to_arrays() for u in paillier["updates"]]
    replies = [fuzzing.reply(node, ArrayRecord({k: Array(v) for k, v in g.items()}),
                     {"num-examples": w})
               for node, g, w in zip((1, 2), good, WEIGHTS, strict=True)]
    expected = paillier_result(strategy.aggregate_train(1, replies)[0], pk)
    bad, must_fail = data.draw(bad_paillier_reply(good[0], plain, 3))
    caplog_flwr.clear()
    with no_hang():
        got = paillier_result(strategy.aggregate_train(1, [replies[0], bad, replies[1]])[0], pk)
    if got.total_weight == expected.total_weight:  # left out
        assert np.array_equal(got.ciphertexts, expected.ciphertexts)
        assert any("node 3" in w.lower() for w in warnings_of(caplog_flwr))
    else:
        assert not must_fail, "a malformed reply was aggregated"
