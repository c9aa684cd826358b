"""The Paillier strategy of the Message API (strategies.paillier_message) with replies
built by hand: valid replies add up to the weighted average, bad ones are left out
with the node named, and the strategy never holds private key material."""

from __future__ import annotations

import copy
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


# ------------------------------------------------------------------ decrypt-once
DECRYPT_ONCE_NODES = [11, 22, 33]


def local(node: int) -> dict[str, np.ndarray]:
    return model(node / 100, seed=node)


def decrypt_once_grid(keypair, tmp_path, received: dict):
    import json

    from strategies.keyfiles import write_secret
    from strategies.paillier_message import paillier_mod
    from tests.helpers.fakes import ModGrid

    key_file = tmp_path / "paillier.key.json"
    write_secret(key_file, json.dumps(keypair[1].to_dict()))

    def train(msg: Message, context) -> Message:
        received[context.node_id] = record_arrays(msg.content.array_records["arrays"])
        return Message(RecordDict({"arrays": rec(local(context.node_id)), "metrics":
                                   MetricRecord({"num-examples": context.node_id,
                                                 "train-loss": 0.25})}), reply_to=msg)
    class CopyingGrid(ModGrid):
        """Each node gets its own copy of a message, as over the network (Flower's
        FedAvg sends every node the same RecordDict object)."""

        def send_and_receive(self, messages, *, timeout=None):
            return super().send_and_receive([Message(
                copy.deepcopy(m.content), dst_node_id=m.metadata.dst_node_id,
                message_type=m.metadata.message_type) for m in messages], timeout=timeout)

    return CopyingGrid(paillier_mod, train, DECRYPT_ONCE_NODES,
                       {"paillier-private-key": str(key_file)})


def test_decrypt_once_one_key_holder_decrypts_and_the_others_open_the_sealed_model(
        keypair, tmp_path, task_identity, monkeypatch, flwr_caplog):
    from strategies import paillier_message
    from strategies.threshold_protocol import GroupKey, SealError, is_sealed, open_model

    calls = {"decrypt": [], "open": []}
    for name, kind in (("decrypt_global_model", "decrypt"), ("open_sealed_model", "open")):
        real = getattr(paillier_message, name)
        monkeypatch.setattr(paillier_message, name, lambda *a, _real=real, _kind=kind, **k: (
            calls[_kind].append(1), _real(*a, **k))[1])
    received: dict = {}
    grid = decrypt_once_grid(keypair, tmp_path, received)
    strategy = PaillierFedAvg(keypair[0], clip=CLIP, decrypt_once=True, min_available_nodes=3,
                              min_train_nodes=3, fraction_evaluate=0.0)
    first = strategy.configure_train(1, rec(model(0.0)), ConfigRecord(), grid)
    encrypted, _ = strategy.aggregate_train(1, grid.send_and_receive(list(first)))
    messages = list(strategy.configure_train(2, encrypted, ConfigRecord(), grid))
    sent = record_arrays(messages[0].content.array_records["arrays"])
    assert is_sealed(sent) and "node 11 decrypted and sealed" in flwr_caplog.text
    grid.send_and_receive(messages)
    # no node decrypted through the mod: each opened the sealed model (one AES pass)
    assert calls == {"decrypt": [], "open": [1, 1, 1]}
    expected = np.average([np.concatenate([a.ravel() for a in local(u).values()])
                           for u in DECRYPT_ONCE_NODES], axis=0, weights=DECRYPT_ONCE_NODES)
    for node in DECRYPT_ONCE_NODES:
        got = np.concatenate([a.ravel() for a in received[node].values()])
        np.testing.assert_allclose(got, expected, atol=strategy.params.max_error() + 1e-6)
    # the server cannot open it; every key holder derives the same group key
    with pytest.raises(SealError):
        open_model(GroupKey(bytes(32), keypair[0].fingerprint), sent, run=1)
    assert open_model(GroupKey.of_private_key(keypair[1]), sent, run=1)[2] == {
        "train-loss": pytest.approx(0.25), "paillier-clipped": 0.0}
    assert find_secrets(strategy, keypair[1]) == []


def test_decrypt_once_key_holders_seal_only_what_they_would_decrypt(keypair, tmp_path,
                                                                     task_identity,
                                                                     flwr_caplog):
    """A single update passed off as the aggregate: the designated key holders refuse to
    seal it (the same checks as decrypting), and the nodes get the encrypted model, which
    they refuse too."""
    grid = decrypt_once_grid(keypair, tmp_path, {})
    strategy = PaillierFedAvg(keypair[0], clip=CLIP, decrypt_once=True, min_available_nodes=3,
                              min_train_nodes=3, fraction_evaluate=0.0)
    first = list(strategy.configure_train(1, rec(model(0.0)), ConfigRecord(), grid))
    replies = grid.send_and_receive(first)
    lone = replies[0].content.array_records["arrays"]  # node 11's own update
    messages = list(strategy.configure_train(2, lone, ConfigRecord(), grid))
    assert not any("threshold-sealed-model" in record_arrays(m.content.array_records["arrays"])
                   for m in messages)
    assert "no key holder sealed the model" in flwr_caplog.text
    assert "decryption refused" in flwr_caplog.text
