"""A server that reads each client's labels from its metrics (issue 14, item 7).

The server chooses the model a client evaluates or trains from: one that always
predicts class ``c`` has, on a client's examples, an accuracy equal to that client's
share of class ``c``. Asking for each client's accuracy then reads its label
distribution, one class per round, whatever the secure mode hides of the update.

The nodes here run the real client mods (``secagg_mod``, ``paillier_mod``) around a
classifier app whose prediction is the argmax of the model's ``bias`` array.

- **Masking**: a train reply carries its weight and metrics only inside the masked
  vector; the server learns their sums over the round, here the pooled share of
  ``c``, and no node's share.
- **Paillier**: a train reply carries its metrics inside the encrypted update, as
  weighted sums; in plaintext only the weight (the update's header holds it too) and,
  from round 2, the means the key holders release of the last aggregate's sums: the
  pooled share again.
- **Evaluation** (both modes): a node refuses federated evaluation, whose reply is its
  own metrics in plaintext. With the node setting ``plaintext-metrics`` (the defence
  off) the same request reads every node's share of ``c`` exactly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from strategies.keyfiles import write_secret
from strategies.paillier_message import paillier_mod
from strategies.paillier_node import round_config
from strategies.paillier_protocol import EncryptedModel, Layout, RoundSum
from strategies.encoding import EncodingParams
from strategies.secagg_message import SecAggFedAvg, secagg_mod
from tests.helpers import CLIP
from tests.helpers.fakes import ModGrid

pytestmark = pytest.mark.usefixtures("task_identity")  # Messages made outside a Flower run

CLASSES = 4
TARGET_CLASS = 2
# each node's labels: its share of class 2 differs (0.1, 0.5, 0.8, ...)
LABELS = {u: np.random.default_rng(u).permutation(
    [TARGET_CLASS] * share + [0] * (20 - share)) for u, share in
    {101: 2, 202: 10, 303: 16, 404: 5, 505: 0, 606: 13}.items()}


def share_of_target(node: int) -> float:
    return float(np.mean(LABELS[node] == TARGET_CLASS))


def crafted_model() -> dict[str, np.ndarray]:
    """Always predicts the target class."""
    bias = np.zeros(CLASSES, np.float32)
    bias[TARGET_CLASS] = 1.0
    return {"bias": bias}


def accuracy(msg: Message, node: int) -> float:
    bias = next(iter(msg.content.array_records.values()))["bias"].numpy()
    return float(np.mean(LABELS[node] == int(np.argmax(bias))))


def classifier(msg: Message, context: Context) -> Message:
    """The client app: trains (returns the model it got) or evaluates, and reports its
    accuracy and example count."""
    node = msg.metadata.dst_node_id
    acc, n = accuracy(msg, node), len(LABELS[node])
    if msg.metadata.message_type.startswith("evaluate"):
        return Message(RecordDict({"metrics": MetricRecord(
            {"num-examples": n, "accuracy": acc, "loss": 1 - acc})}), reply_to=msg)
    model = next(iter(msg.content.array_records.values()))
    return Message(RecordDict({"arrays": model, "metrics": MetricRecord(
        {"num-examples": n, "accuracy": acc})}), reply_to=msg)


def nodes(mod, node_config: dict | None = None) -> ModGrid:
    """Nodes running ``mod`` around the classifier, in-process."""
    return ModGrid(mod, classifier, LABELS, node_config)


def evaluate_requests(arrays: ArrayRecord) -> list[Message]:
    return [Message(RecordDict({"arrays": arrays, "config": ConfigRecord()}), dst_node_id=u,
                    message_type="evaluate") for u in LABELS]


def read_shares(replies: list[Message]) -> dict[int, float]:
    """What the server reads of each node's share of the target class."""
    return {r.metadata.src_node_id: r.content.metric_records["metrics"]["accuracy"]
            for r in replies if not r.has_error()}


# ------------------------------------------------------------------ masking
def masking_round(grid: ModGrid) -> tuple[list[Message], MetricRecord]:
    strategy = SecAggFedAvg(clip=CLIP, min_available_nodes=len(LABELS),
                            min_train_nodes=len(LABELS))
    arrays = ArrayRecord({k: Array(v) for k, v in crafted_model().items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    _, metrics = strategy.aggregate_train(1, replies)
    assert strategy.last_total_weight == sum(len(v) for v in LABELS.values())
    return replies, metrics


def test_masking_train_replies_give_the_server_only_the_sums():
    replies, metrics = masking_round(nodes(secagg_mod))
    assert len(replies) == len(LABELS) and not any(r.has_error() for r in replies)
    for reply in replies:  # nothing but the masked vector and its header
        assert all(len(record) == 0 for record in reply.content.metric_records.values())
        header = json.loads(reply.content.array_records["arrays"]["secagg-header"].numpy()
                            .tobytes())
        assert set(header) == {"version", "context", "node", "mod-bits", "length", "sums",
                               "layout"}
    pooled = np.mean(np.concatenate(list(LABELS.values())) == TARGET_CLASS)
    assert metrics["accuracy"] == pytest.approx(pooled, abs=2**-16)


def test_masking_nodes_refuse_evaluation_and_with_the_defence_off_it_reads_every_share():
    arrays = ArrayRecord({k: Array(v) for k, v in crafted_model().items()})
    replies = nodes(secagg_mod).send_and_receive(evaluate_requests(arrays))
    assert all(r.has_error() and "plaintext-metrics" in r.error.reason for r in replies)
    assert read_shares(replies) == {}

    off = nodes(secagg_mod, {"plaintext-metrics": True})
    assert read_shares(off.send_and_receive(evaluate_requests(arrays))) == {
        u: share_of_target(u) for u in LABELS}


# ------------------------------------------------------------------ Paillier
@pytest.fixture(scope="module")
def key_holder_config(keypair, tmp_path_factory) -> dict:
    key_file = tmp_path_factory.mktemp("holder") / "paillier.key.json"
    write_secret(key_file, json.dumps(keypair[1].to_dict()))
    return {"paillier-private-key": str(key_file)}


def paillier_params(public_key) -> EncodingParams:
    return EncodingParams.for_key(public_key.n_bits, 256, clip=CLIP)  # 6 nodes of 20


def paillier_train(grid: ModGrid, public_key, arrays: ArrayRecord | None = None,
                   server_round: int = 1) -> list[Message]:
    """A train round; in round 1 the initial model is public, so the server may choose
    it (the crafted model)."""
    params = paillier_params(public_key)
    config = ConfigRecord(round_config(params, public_key.fingerprint, 1, server_round))
    arrays = arrays or ArrayRecord({k: Array(v) for k, v in crafted_model().items()})
    return grid.send_and_receive([Message(RecordDict({"arrays": arrays, "config": config}),
                                          dst_node_id=u, message_type="train")
                                  for u in LABELS])


def test_paillier_train_replies_carry_only_the_weight(keypair, key_holder_config):
    replies = paillier_train(nodes(paillier_mod, key_holder_config), keypair[0])
    for reply in replies:
        assert not reply.has_error()
        node = reply.metadata.src_node_id
        assert dict(reply.content.metric_records["metrics"]) == {"num-examples":
                                                                  len(LABELS[node])}
        update = EncryptedModel.from_arrays(
            {k: v.numpy() for k, v in reply.content.array_records["arrays"].items()},
            keypair[0])
        assert dict(update.contributors) == {node: len(LABELS[node])}

    # round 2: the key holders decrypt the round-1 aggregate and release its metric
    # means (the encrypted sums of every node's accuracy): the pooled share only
    round_sum = RoundSum(keypair[0], paillier_params(keypair[0]),
                         Layout.of(["bias"], [crafted_model()["bias"]]), 1)
    for reply in replies:
        round_sum.add(reply.metadata.src_node_id, {
            k: v.numpy() for k, v in reply.content.array_records["arrays"].items()})
    aggregate = ArrayRecord({k: Array(v) for k, v in round_sum.result().to_arrays().items()})
    pooled = np.mean(np.concatenate(list(LABELS.values())) == TARGET_CLASS)
    for reply in paillier_train(nodes(paillier_mod, key_holder_config), keypair[0], aggregate, 2):
        metrics = dict(reply.content.metric_records["metrics"])
        assert metrics.pop("num-examples") == len(LABELS[reply.metadata.src_node_id])
        assert metrics.pop("released-round") == 1
        assert metrics.pop("released-accuracy") == pytest.approx(pooled, abs=2**-15)
        assert set(metrics) == {"released-paillier-clipped"}

    off = nodes(paillier_mod, {**key_holder_config, "plaintext-metrics": True})
    assert read_shares(paillier_train(off, keypair[0])) == {u: share_of_target(u)
                                                            for u in LABELS}


def test_paillier_nodes_refuse_evaluation_and_with_the_defence_off_it_reads_every_share(
        key_holder_config):
    arrays = ArrayRecord({k: Array(v) for k, v in crafted_model().items()})
    replies = nodes(paillier_mod, key_holder_config).send_and_receive(evaluate_requests(arrays))
    assert all(r.has_error() and "plaintext-metrics" in r.error.reason for r in replies)
    off = nodes(paillier_mod, {**key_holder_config, "plaintext-metrics": True})
    assert read_shares(off.send_and_receive(evaluate_requests(arrays))) == {
        u: share_of_target(u) for u in LABELS}
