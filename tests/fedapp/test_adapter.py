"""The Message API adapter (fedapp.adapter) serves the NumPy clients, as the app's
ClientApp composes it."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedapp.client_app import app as client_app
from tests.helpers import TRAIN


def test_message_api_adapter_serves_the_numpy_client(data_dir, task_identity):
    run_config = {"task": "mnist", "data-dir": str(data_dir), "mnist-model": "small-cnn"}
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 50},
                  state=RecordDict(), run_config=run_config)
    from clients.models import SmallCNN, get_weights
    msg = Message(RecordDict({"arrays": ArrayRecord(get_weights(SmallCNN())),
                              "config": ConfigRecord({**TRAIN, "optimizer": "sgd"})}),
                  dst_node_id=1, message_type="train")
    out = client_app(msg, ctx)
    assert out.content["metrics"]["num-examples"] == 1080
    assert len(out.content["arrays"]) == len(get_weights(SmallCNN()))
    msg = Message(RecordDict({"arrays": out.content["arrays"], "config": ConfigRecord()}),
                  dst_node_id=1, message_type="evaluate")
    metrics = client_app(msg, ctx).content["metrics"]
    assert metrics["num-examples"] == 120 and 0 <= metrics["accuracy"] <= 1
    ctx_bad = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ValueError, match="partition-id"):
        client_app(msg, ctx_bad)
